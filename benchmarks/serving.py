"""Mixed-task serving: one batch whose examples use 64 different tasks, against a single-task batch
of the same size and against a loop that applies ``task_params`` per task.

    python -m benchmarks.serving            # MiniLM-L6 (tiny BERT if missing)
    python -m benchmarks.serving --write    # also update benchmarks/RESULTS.md
    python -m benchmarks.serving --quick    # smoke test: tiny BERT, 8 tasks, nothing written

Every task is a random rank-``r`` LoRA on the query and value kernels, all merged into one
subspace with k columns per side. Times are medians of ``--repeats`` interleaved runs after a
warm-up.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import share_jax as sj
from benchmarks.results_file import report
from share_jax.experiments.models import BertEncoder, load_bert_params, minilm_path, tiny_config
from share_jax.experiments.synthetic import random_loras
from share_jax.serving import mixed_task_apply

HEADING = "## Mixed-task serving (issue 5)"


def backbone(name: str):
  """(model name, BertEncoder, variables): MiniLM-L6 when installed and asked for, else tiny."""
  if name == "minilm":
    try:
      config, variables = load_bert_params(minilm_path())
      return "all-MiniLM-L6-v2", BertEncoder(config), variables
    except FileNotFoundError:
      pass
  model, ids = BertEncoder(tiny_config()), jnp.zeros((1, 8), jnp.int32)
  return "tiny BERT (2 layers, H=32)", model, jax.jit(model.init)(jax.random.key(0), ids, ids)


def median_times(variants: dict, repeats: int) -> dict[str, float]:
  """Median seconds per variant; runs interleave, so load changes hit every variant alike."""
  for fn in variants.values():
    jax.block_until_ready(fn())
  times = {v: [] for v in variants}
  for _ in range(repeats):
    for v, fn in variants.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[v].append(time.perf_counter() - start)
  return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
  ap.add_argument("--tasks", type=int, default=64, help="tasks, and examples in the batch")
  ap.add_argument("--seq", type=int, default=64, help="tokens per example")
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--k", type=int, default=32)
  ap.add_argument("--target", default=r"attention/(query|value)/kernel$")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--write", action="store_true", help=f"write {HEADING!r} into RESULTS.md")
  ap.add_argument("--quick", action="store_true", help="smoke test: tiny BERT, small shapes")
  args = ap.parse_args()
  if args.quick:
    if args.write:
      ap.error("--quick results are not recorded: drop --write")
    args.model, args.tasks, args.seq, args.rank, args.k, args.repeats = "tiny", 8, 8, 2, 4, 2

  name, model, params = backbone(args.model)
  loras = random_loras(params, args.target, args.tasks, rank=args.rank, seed=0)
  sub = sj.init_subspace(params, loras, k=args.k)
  b = args.tasks
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(1, model.config.vocab_size, size=(b, args.seq)), jnp.int32)
  mask = jnp.ones_like(ids)

  apply = jax.jit(model.apply)
  serve = jax.jit(functools.partial(mixed_task_apply, model.apply))
  mixed, same = jnp.arange(b, dtype=jnp.int32), jnp.zeros(b, jnp.int32)
  merged = sj.task_params(params, sub, 0)

  def loop():
    return [
      apply(sj.task_params(params, sub, t), ids[i : i + 1], mask[i : i + 1])
      for i, t in enumerate(sub.task_ids)
    ]

  err = float(jnp.max(jnp.abs(serve(params, sub, mixed, ids, mask) - jnp.concatenate(loop()))))
  variants = {
    "single task, ΔW merged (plain forward)": lambda: apply(merged, ids, mask),
    "single task, factored path": lambda: serve(params, sub, same, ids, mask),
    f"mixed, {b} tasks, factored path": lambda: serve(params, sub, mixed, ids, mask),
    f"loop: task_params per task ({b} × batch 1)": loop,
  }
  times = median_times(variants, args.repeats)
  base = times["single task, ΔW merged (plain forward)"]
  rows = [f"| {v} | {t * 1e3:.1f} | {b / t:.1f} | {base / t:.2f}× |" for v, t in times.items()]
  report(
    HEADING,
    "benchmarks.serving",
    [
      f"{name}; {len(sub.layout.kernels)} adapted kernels (`{args.target}`), {b} tasks "
      f"(LoRA rank {args.rank}) in one subspace with k = {args.k}; batch of {b} examples × "
      f"{args.seq} tokens. Median of {args.repeats} interleaved runs after a warm-up.",
      "",
      "| variant | ms / batch | examples / s | throughput vs single task |",
      "|---|---|---|---|",
      *rows,
      "",
      f"Mixed batch vs the per-task loop: max |Δ| = {err:.1e}. Mixed / single-task throughput: "
      f"**{base / times[f'mixed, {b} tasks, factored path']:.2f}×** (target ≥ 0.8×).",
    ],
    write=args.write,
    note=" (shared machine)",
  )


if __name__ == "__main__":
  main()
