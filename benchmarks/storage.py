"""Storage accounting: the paper's RoBERTa-base figures, and Mistral-7B shapes with 500 tasks.

    python -m benchmarks.storage
    python -m benchmarks.storage --quick    # smoke test: 2 RoBERTa layers, 10 Mistral tasks

RoBERTa-base is built for real (24 query/value kernels 768 × 768, 6 LoRAs of rank 8, k = 32, the
reference code's k × r coefficients). Mistral-7B (32 layers, q_proj 4096 × 4096, v_proj
4096 × 1024, LoRA rank 16, k = 256 as in the official NLG code) with 500 tasks is counted from the
same ``share_jax.storage`` code over a subspace whose arrays are shape-only placeholders.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import share_jax as sj

MB = 1e6


def roberta_base(tasks: int = 6, k: int = 32, r: int = 8, layers: int = 12) -> sj.Storage:
  rng = np.random.default_rng(0)
  params = {
    f"layer_{i}": {m: {"kernel": np.zeros((768, 768), np.float32)} for m in ("query", "value")}
    for i in range(layers)
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
      for i in range(layers)
    }
    for _ in range(tasks)
  ]
  return sj.storage(sj.init_subspace(params, loras, k=k))


def counted(
  shapes: dict[str, tuple[int, int]], tasks: int, k: int, r: int, lora_rank: int | None = None
) -> sj.Storage:
  """``storage`` of ``tasks`` rank-r tasks at active rank k; arrays are not allocated."""
  params = sj.nest({p: jax.ShapeDtypeStruct(s, jnp.bfloat16) for p, s in shapes.items()})
  layout = sj.empty_subspace(params, "kernel$").layout
  groups = {}
  for g, (d, n) in layout.groups.items():
    groups[g] = sj.FactorGroup(
      basis=jax.ShapeDtypeStruct((n, d, k), jnp.float32),
      rank=np.full((n,), k, np.int32),
      coef=jax.ShapeDtypeStruct((n, k, tasks, r), jnp.float32),
      ncols=np.full((tasks, n), r, np.int32),
      scatter=jax.ShapeDtypeStruct((n, k, k), jnp.float32),
      energy=jax.ShapeDtypeStruct((n,), jnp.float32),
      lost=jax.ShapeDtypeStruct((n,), jnp.float32),
    )
  sub = sj.Subspace.create(groups, layout, tuple(range(tasks)), sj.SubspaceConfig(k=k))
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


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="smoke test: small counts")
  args = ap.parse_args()
  layers, tasks = (2, 10) if args.quick else (12, 500)
  print(
    "| model | tasks | coefficients per task | all coefficients | bases | LoRA per task | "
    "all LoRAs | params ratio per task | memory ratio, coefficients only (paper) | "
    "memory ratio with bases |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  roberta = "RoBERTa-base q,v, k=32, r=8" + (f" ({layers} of 12 layers)" if args.quick else "")
  print(row(roberta, roberta_base(layers=layers)))
  ingested = counted(MISTRAL, tasks, 256, 16)
  print(row(f"Mistral-7B q,v, k=256, {tasks} ingested r=16 LoRAs", ingested))
  trained = counted(MISTRAL, tasks, 256, 1, lora_rank=16)
  print(row(f"Mistral-7B q,v, k=256, {tasks} tasks trained at p=1 vs r=16 LoRAs", trained))


if __name__ == "__main__":
  main()
