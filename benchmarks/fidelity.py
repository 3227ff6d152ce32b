"""Fidelity: for each k rule, the k chosen, the bytes stored and each task's ΔW error, reported
(``share_jax.task_errors``) against the truth computed from the original adapters.

    python -m benchmarks.fidelity            # writes its section of benchmarks/RESULTS.md
    python -m benchmarks.fidelity --quick    # fewer rules and tasks, prints only (<= 60 s)

Two task sets, each built by ``init_subspace`` on the first half of the tasks and ``absorb`` of the
rest one at a time (so the reported errors go through merges):
- random: LoRAs with Gaussian factors (rank 8, 4 kernels 128 × 128): no shared structure;
- PEFT: real PEFT LoRA adapters (r = 8 on query/value of a small torch BERT, hidden 64, 2
  layers), each trained for a few steps on its own random classification task, saved with
  ``save_pretrained`` and read back with ``share_jax.peft_io.read_adapter``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np

import share_jax as sj
from share_jax.paths import nest

HEADING = "## Fidelity: k rule → k, bytes and task error (issue 8)"
RULES = [
  {"explained_variance": 0.6},
  {"explained_variance": 0.9},
  {"explained_variance": 1.0},
  {"explained_variance": 1.0, "center": False},
  {"k": 4},
  {"k": 16},
  {"max_task_error": 0.05},
  {"max_task_error": 0.2},
  {"max_task_error": 0.5},
]
QUICK_RULES = [RULES[0], RULES[4], RULES[7]]  # explained variance 1: tests/test_fidelity.py


def random_tasks(n: int, seed: int = 0) -> tuple[dict, list[dict]]:
  rng = np.random.default_rng(seed)
  shapes = {f"layer_{i}/{m}/kernel": (128, 128) for i in range(2) for m in ("query", "value")}
  params = nest({p: np.zeros(s, np.float32) for p, s in shapes.items()})
  loras = [
    nest(
      {
        p: sj.LoRA(
          rng.normal(size=(s[0], 8)).astype(np.float32),
          rng.normal(size=(8, s[1])).astype(np.float32),
          16.0,
        )
        for p, s in shapes.items()
      }
    )
    for _ in range(n)
  ]
  return params, loras


def peft_tasks(n: int, steps: int) -> tuple[dict, list[dict]]:
  """``n`` PEFT adapters trained on one frozen torch BERT, read back through ``peft_io``."""
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import BertConfig, BertForSequenceClassification

  from share_jax.peft_io import read_adapter

  config = BertConfig(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    num_labels=4,
  )
  loras = []
  with tempfile.TemporaryDirectory() as tmp:
    for t in range(n):
      torch.manual_seed(0)  # the same frozen base for every task
      base = BertForSequenceClassification(config)
      torch.manual_seed(100 + t)
      model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
      )
      x = torch.randint(0, 256, (64, 16))
      y = torch.randint(0, 4, (64,))
      opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
      for _ in range(steps):
        opt.zero_grad()
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
      model.save_pretrained(f"{tmp}/task{t}")
      loras.append(read_adapter(f"{tmp}/task{t}", scheme="hf_flax").lora)
  shapes = {p: (x.a.shape[0], x.b.shape[1]) for p, x in sj.lora_leaves(loras[0]).items()}
  return nest({p: np.zeros(s, np.float32) for p, s in shapes.items()}), loras


def true_errors(sub: sj.Subspace, loras: list[dict]) -> np.ndarray:
  """Relative ΔW error of every task versus its original adapter, in float64."""
  out = []
  for t, lora in enumerate(loras):
    rec = sj.lora_leaves(sj.reconstruct(sub, t))
    num = den = 0.0
    for path, x in sj.lora_leaves(lora).items():
      want = np.asarray(x.a, np.float64) @ np.asarray(x.b, np.float64) * x.scale
      got = np.asarray(rec[path].a, np.float64) @ np.asarray(rec[path].b, np.float64)
      num += float(np.sum((got - want) ** 2))
      den += float(np.sum(want**2))
    out.append(np.sqrt(num / den))
  return np.asarray(out)


def build(params: dict, loras: list[dict], rule: dict) -> sj.Subspace:
  half = max(len(loras) // 2, 1)
  sub = sj.init_subspace(params, loras[:half], task_ids=list(range(half)), **rule)
  for t in range(half, len(loras)):
    sub = sj.absorb(sub, [loras[t]], task_ids=[t])
  return sub


def row(name: str, params: dict, loras: list[dict], rule: dict) -> str:
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sj.FidelityWarning)
    sub = build(params, loras, rule)
  ks = list(sub.ranks().values())
  st = sj.storage(sub)
  reported = np.asarray(list(sj.task_errors(sub).values()))
  truth = true_errors(sub, loras)
  assert np.all(reported >= truth - 1e-5), "task_errors under-reported"
  rule_text = ", ".join(f"{k}={v}" for k, v in rule.items())
  return (
    f"| {name} | {rule_text} | {min(ks)}–{max(ks)} (mean {np.mean(ks):.1f}) | "
    f"{st.share_bytes / 1e3:.1f} kB / {st.lora_bytes / 1e3:.1f} kB | "
    f"{reported.max():.3g} / {truth.max():.3g} | {reported.mean():.3g} / {truth.mean():.3g} |"
  )


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="fewer rules and tasks; print only")
  args = ap.parse_args(argv)
  start = time.perf_counter()
  n = 4 if args.quick else 8
  rules = QUICK_RULES if args.quick else RULES
  sets = [("random", *random_tasks(n))]
  try:
    sets.append(("PEFT", *peft_tasks(n, steps=10 if args.quick else 30)))
  except ImportError as e:  # torch/peft/transformers are test dependencies only
    print(f"skipping the PEFT adapters: {e}")
  lines = [
    "| tasks | k rule | k per side | stored / as LoRAs | worst error reported / true "
    "| mean error reported / true |",
    "|---|---|---|---|---|---|",
  ]
  print("\n".join(lines), flush=True)
  for name, params, loras in sets:
    for rule in rules:
      lines.append(row(f"{name} ({len(loras)})", params, loras, rule))
      print(lines[-1], flush=True)
  took = time.perf_counter() - start
  if args.quick:
    print(f"quick run: {took:.0f} s")
    return
  from benchmarks.results_file import write_section

  text = (
    f"{HEADING}\n\n`python -m benchmarks.fidelity` — {time.strftime('%Y-%m-%d')}, "
    f"{platform.machine()} CPU, {took:.0f} s. Each set: `init_subspace` on the first half of "
    "the tasks, then `absorb` of the others one at a time; center=True unless said. Errors are "
    "relative ‖ΔW − ΔW_stored‖_F over all adapted kernels; reported = `sj.task_errors` (an "
    "upper bound tracked through the merges), true = from the original adapters in float64. "
    "Bytes: bases + coefficients (float32) vs the same adapters as LoRAs.\n\n"
    + "\n".join(lines)
    + "\n"
  )
  write_section(HEADING, text)


if __name__ == "__main__":
  main()
