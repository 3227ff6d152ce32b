"""One training step of a new task: Share's step (ε, + φ temporary factors, on a frozen basis)
against a LoRA step, on the same batch.

    python -m benchmarks.train_step            # MiniLM-L6 (tiny BERT if missing)
    python -m benchmarks.train_step --quick    # tiny BERT, a few rounds (≤ 60 s)
    python -m benchmarks.train_step --write    # also update benchmarks/RESULTS.md

Every step is built from the public API as the continual runner builds it: the backbone's
features, a linear head, cross-entropy, optax Adam, ``sj.make_step``. LoRA: ``sj.apply_lora``
(W + a b formed, as peft-style code written on params does) and, as a second reference, the same
LoRA through ``sj.low_rank_loss`` (factored, what the runner trains). Share: ``sj.make_train_step``
(factored: (x F_a) F_bᵀ added inside each adapted Dense, no ΔW) and the same step with
``factored=False`` (W + ΔW formed), on a subspace of k columns per side built from random rank-r
LoRAs. "head only" (no adapter, the backbone's backward pass skipped) is the floor. Steps are
timed interleaved (one step of each variant per round, shuffled) after compilation; the table
gives medians over rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import share_jax as sj
from benchmarks.results_file import report
from share_jax.experiments import backbones, fitting
from share_jax.experiments.methods import lora_factors
from share_jax.experiments.synthetic import random_loras

HEADING = "## ε-only step vs LoRA step (issue 3/5)"
NUM_CLASSES = 4
LORA = "LoRA r={r}, W + a b formed"


def optimizer_bytes(opt_state: Any) -> int:
  """Bytes held by an optimizer state's arrays."""
  return sum(
    int(np.prod(x.shape)) * x.dtype.itemsize
    for x in jax.tree.leaves(opt_state)
    if hasattr(x, "dtype")
  )


def backbone(name: str, seq: int) -> backbones.Backbone:
  """MiniLM-L6 when installed and asked for, else the random tiny BERT."""
  if name == "minilm":
    try:
      return backbones.minilm_backbone(max_len=seq)
    except FileNotFoundError as e:
      print(f"{e}; using the tiny BERT", file=sys.stderr)
  return backbones.tiny_bert_backbone(max_len=seq)


def batch_of(bb: backbones.Backbone, size: int, seq: int) -> dict:
  """``size`` random texts long enough to fill ``seq`` tokens, encoded once, and random labels."""
  rng = np.random.default_rng(0)
  words = "the market shares fell as new phones and flights were delayed by storms".split()
  texts = [" ".join(rng.choice(words, seq)) for _ in range(size)]
  y = rng.integers(0, NUM_CLASSES, size).astype(np.int32)
  return {"inputs": bb.encode(texts), "y": y}


def size(tree) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Variant:
  """A jitted ``step(trainable, opt_state, *args)`` and its state."""

  step: Callable
  args: tuple
  state: tuple
  adapter_params: int
  opt_bytes: int

  def run(self) -> None:
    trainable, opt_state, _ = self.state
    self.state = jax.block_until_ready(self.step(trainable, opt_state, *self.args))

  def cost(self) -> tuple[float, float]:
    """(GFLOP, GB accessed) of the compiled step, from XLA's cost analysis."""
    # make_train_step's step wraps a jitted one (it strips the state's static origin)
    jitted = self.step if hasattr(self.step, "lower") else self.step.__wrapped__
    cost = jitted.lower(*self.state[:2], *self.args).compile().cost_analysis()
    return cost["flops"] / 1e9, cost["bytes accessed"] / 1e9


def variants(bb: backbones.Backbone, batch: dict, args) -> tuple[dict[str, Variant], list[str]]:
  """The head-only, LoRA and Share steps on ``batch``, all with Adam and the same small random
  linear head (a zero head would give the adapters zero gradients)."""
  loss = fitting.classification_loss(bb.features)
  opt = optax.adam(1e-3)
  w = 0.01 * jax.random.normal(jax.random.key(3), (bb.feature_dim, NUM_CLASSES))
  head = fitting.zero_head(bb.feature_dim, NUM_CLASSES) | {"w": w}
  params = bb.params

  def variant(step, step_args, trainable, adapter):
    opt_state = opt.init(trainable)
    return Variant(
      step, step_args, (trainable, opt_state, None), adapter, optimizer_bytes(opt_state)
    )

  head_step = sj.make_step(lambda tr, p, b: loss(p, tr, b), opt)
  out = {"head only (floor)": variant(head_step, (params, batch), head, 0)}
  lora = {"lora": sj.init_lora_tree(params, bb.target, rank=args.rank, rng=jax.random.key(0))}
  lora["head"] = head
  dense_lora = sj.make_step(lambda tr, p, b: loss(sj.apply_lora(p, tr["lora"]), tr["head"], b), opt)
  factored_lora = sj.make_step(
    lambda tr, p, b: sj.low_rank_loss(loss, p, lora_factors(tr["lora"]), tr["head"], b), opt
  )
  out[LORA.format(r=args.rank)] = variant(dense_lora, (params, batch), lora, size(lora["lora"]))
  out[f"LoRA r={args.rank}, factored"] = variant(
    factored_lora, (params, batch), lora, size(lora["lora"])
  )
  sub = sj.init_subspace(
    params, random_loras(params, bb.target, args.loras, rank=args.rank, seed=1), k=args.k
  )
  errors = []
  for phi in args.phi:
    state = sj.begin_task(sub, "new", rng=jax.random.key(2), p=args.p, phi=phi, head=head)
    # both sides non-zero, so that every coefficient has a gradient to compare
    state = state.replace(coef=jax.tree.map(lambda c: c + 0.01, state.coef))
    name = f"Share k={args.k}, p={args.p}, φ={phi}" + (" (ε only)" if phi == 0 else "")
    adapter = size((state.coef, state.temp, state.temp_coef))
    for factored, label in ((True, "factored (the step)"), (False, "W + ΔW formed")):
      step = sj.make_train_step(loss, opt, sub.layout, factored=factored)
      out[f"{name}, {label}"] = variant(step, (params, sub.bases, batch), state, adapter)
    errors.append(gradient_difference(loss, sub, state, params, batch))
  note = f"Factored vs W + ΔW gradients: max relative difference {max(errors):.1e}."
  return out, [note]


def gradient_difference(loss, sub, state, params, batch) -> float:
  """Largest relative difference between the factored and the materialised step's gradients
  (one SGD step of rate 1 moves the state by minus the gradient), over the non-empty leaves."""
  sgd = optax.sgd(1.0)
  moved = [
    sj.make_train_step(loss, sgd, sub.layout, factored=f)(
      state, sgd.init(state), params, sub.bases, batch
    )[0]
    for f in (True, False)
  ]
  grads = [jax.tree.map(lambda a, b: a - b, state, m) for m in moved]
  return max(
    float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
    for x, y in zip(*(jax.tree.leaves(g) for g in grads), strict=True)
    if y.size and float(jnp.max(jnp.abs(y))) > 0
  )


def measure(fns: dict[str, Callable[[], object]], rounds: int) -> tuple[dict, dict, dict]:
  """(compile + first call s, wall s per round, process CPU s per round), rounds interleaved in
  a shuffled order. CPU time (all threads) is less sensitive than wall time to other processes
  on a shared machine.
  """
  first, wall, cpu = {}, {n: [] for n in fns}, {n: [] for n in fns}
  for name, fn in fns.items():
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first[name] = time.perf_counter() - start
  rng, names = np.random.default_rng(0), list(fns)
  for _ in range(rounds):
    for i in rng.permutation(len(names)):
      name, fn = names[i], fns[names[i]]
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return first, wall, cpu


def paired_ratio(base: list[float], other: list[float]) -> str:
  """Median and quartiles over rounds of base / other time (same-round pairs cancel drift)."""
  ratios = [b / o for b, o in zip(base, other, strict=True)]
  q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
  return f"{q2:.2f}× ({q1:.2f}–{q3:.2f})"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=64, help="tokens per example")
  ap.add_argument("--rank", type=int, default=8, help="LoRA rank (also of the random LoRAs)")
  ap.add_argument("--loras", type=int, default=5, help="random LoRAs the subspace is built from")
  ap.add_argument("--k", type=int, default=32)
  ap.add_argument("--p", type=int, default=1)
  ap.add_argument("--phi", type=int, nargs="+", default=[2, 0])
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--quick", action="store_true", help="tiny BERT, batch 8 × 16, 5 rounds")
  ap.add_argument("--write", action="store_true", help=f"write {HEADING!r} into RESULTS.md")
  args = ap.parse_args()
  if args.quick:
    args.model, args.batch, args.seq, args.rounds, args.k = "tiny", 8, 16, 5, 8

  bb = backbone(args.model, args.seq)
  vs, notes = variants(bb, batch_of(bb, args.batch, args.seq), args)
  first, wall, cpu = measure({n: v.run for n, v in vs.items()}, args.rounds)
  step_s = {n: statistics.median(t) for n, t in wall.items()}
  lora = LORA.format(r=args.rank)
  kernels = sj.lora_leaves(vs[lora].state[0]["lora"])
  dw_gflop = 2 * args.batch * args.seq * sum(x.a.shape[0] * x.b.shape[1] for x in kernels.values())
  rows = []
  for n, v in vs.items():
    head = size(v.state[0]) - v.adapter_params
    gflop, gbytes = v.cost()
    rows.append(
      f"| {n} | {head:,} + {v.adapter_params:,} | {v.opt_bytes:,} "
      f"({v.opt_bytes / vs[lora].opt_bytes:.0%}) | {gflop:.3f} | {gbytes:.3f} | {first[n]:.1f} | "
      f"{step_s[n] * 1e3:.4g} | {paired_ratio(wall[lora], wall[n])} | "
      f"{paired_ratio(cpu[lora], cpu[n])} |"
    )
  report(
    HEADING,
    "benchmarks.train_step",
    [
      f"{bb.name}; adapters on `{bb.target}` ({len(kernels)} kernels); batch {args.batch} × "
      f"{args.seq} tokens, {NUM_CLASSES}-way linear head, Adam. Share's subspace: k = {args.k} "
      f"per side from {args.loras} random rank-{args.rank} LoRAs. Times: medians of "
      f"{args.rounds} interleaved rounds (in shuffled order) after compilation. Throughput vs "
      f"LoRA: median (quartiles) of the per-round ratios of the time of `{lora}` (the reference) "
      "to the step's, by wall time and by process CPU time. Adam state: bytes, and as a share of "
      "LoRA's. GFLOP and GB accessed: XLA's cost analysis of the compiled step.",
      "",
      "| step | trained params (head + adapter) | Adam state bytes | GFLOP / step | "
      "GB accessed / step | compile + 1st step s | ms / step | throughput vs LoRA (wall) | "
      "(CPU time) |",
      "|---|---|---|---|---|---|---|---|---|",
      *rows,
      "",
      " ".join(
        [
          "A step that forms W + ΔW also forms dL/dW = xᵀ dy for every adapted kernel "
          f"({dw_gflop / 1e9:.3g} GFLOP per step, 2·B·T·Σ d_in·d_out); a factored step forms "
          "neither.",
          *notes,
        ]
      ),
    ],
    write=args.write,
    note=" (compare ratios within the table, not absolute times)",
  )


if __name__ == "__main__":
  main()
