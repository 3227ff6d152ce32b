"""Storage accounting: the paper's RoBERTa-base figures, and Mistral-7B shapes with 500 tasks.

    python benchmarks/storage.py

RoBERTa-base is built for real (24 query/value kernels 768 × 768, 6 LoRAs of rank 8, k = 32, the
reference code's k × r coefficients). Mistral-7B (32 layers, q_proj 4096 × 4096, v_proj
4096 × 1024, LoRA rank 16, k = 256 as in the official NLG code) with 500 tasks is counted from the
same ``share_jax.storage`` code over a subspace whose arrays are shape-only placeholders.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import share_jax as sj
from share_jax.subspace import FactorGroup, KernelSpec, Layout, Subspace, SubspaceConfig

MB = 1e6


def roberta_base(tasks: int = 6, k: int = 32, r: int = 8) -> sj.Storage:
  rng = np.random.default_rng(0)
  params = {
    f"layer_{i}": {m: {"kernel": np.zeros((768, 768), np.float32)} for m in ("query", "value")}
    for i in range(12)
  }
  loras = [
    {
      f"layer_{i}": {
        m: {
          "kernel": sj.LoRA(
            rng.normal(size=(768, r)).astype(np.float32),
            rng.normal(size=(r, 768)).astype(np.float32),
          )
        }
        for m in ("query", "value")
      }
      for i in range(12)
    }
    for _ in range(tasks)
  ]
  return sj.storage(sj.init_subspace(params, loras, k=k))


def counted(
  shapes: dict[str, tuple[int, int]], tasks: int, k: int, r: int, lora_rank: int | None = None
) -> sj.Storage:
  """``storage`` of ``tasks`` rank-r tasks at active rank k; arrays are not allocated."""
  layout = Layout(tuple(KernelSpec(p, s, "bfloat16") for p, s in sorted(shapes.items())))
  groups = {}
  for g, (d, n) in layout.groups.items():
    groups[g] = FactorGroup(
      basis=jax.ShapeDtypeStruct((n, d, k), jnp.float32),
      rank=np.full((n,), k, np.int32),
      coef=jax.ShapeDtypeStruct((tasks, n, k, r), jnp.float32),
      ncols=np.full((tasks, n), r, np.int32),
      scatter=jax.ShapeDtypeStruct((n, k, k), jnp.float32),
      energy=jax.ShapeDtypeStruct((n,), jnp.float32),
    )
  sub = Subspace.create(groups, layout, tuple(range(tasks)), SubspaceConfig(k=k))
  return sj.storage(sub, lora_rank=lora_rank)


MISTRAL = {
  f"model/layers/{i}/self_attn/{m}/kernel": shape
  for i in range(32)
  for m, shape in (("q_proj", (4096, 4096)), ("v_proj", (4096, 1024)))
}


def row(name: str, st: sj.Storage) -> str:
  n = len(st.coef_params)
  coef = sum(st.coef_params.values())
  lora = sum(st.lora_params.values())
  return (
    f"| {name} | {n} | {coef / n / 1e6:.4f} M | {coef * 4 / MB:.3g} MB | "
    f"{st.basis_params / 1e6:.3f} M ({st.basis_params * 4 / MB:.3g} MB) | {lora / n / 1e6:.3f} M | "
    f"{lora * 4 / MB:.4g} MB | "
    f"{st.ratio_per_task:.1f}× | {lora / coef:.1f}× | {st.ratio_with_bases:.2f}× |"
  )


def main():
  print(
    "| model | tasks | coefficients per task | all coefficients | bases | LoRA per task | "
    "all LoRAs | params ratio per task | memory ratio, coefficients only (paper) | "
    "memory ratio with bases |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  print(row("RoBERTa-base q,v, k=32, r=8", roberta_base()))
  print(row("Mistral-7B q,v, k=256, 500 ingested r=16 LoRAs", counted(MISTRAL, 500, 256, 16)))
  trained = counted(MISTRAL, 500, 256, 1, lora_rank=16)
  print(row("Mistral-7B q,v, k=256, 500 tasks trained at p=1 vs r=16 LoRAs", trained))


if __name__ == "__main__":
  main()
