"""One training step of a new task: Share (ε-only, on a frozen basis) against LoRA, same batch.

    /work/venv/bin/python -m benchmarks.train_step            # MiniLM-L6 (tiny BERT if missing)
    /work/venv/bin/python -m benchmarks.train_step --write    # also update benchmarks/RESULTS.md

Both steps are the ones the continual runner trains with (``share_jax.experiments``): the backbone's
features, a linear head, cross-entropy, optax Adam. LoRA: ``apply_lora`` (W + a b) inside a
``jax.value_and_grad`` over {LoRA tree, head}. Share: ``sj.make_train_step`` over the task's
coefficients ε (+ φ temporary factors) and head, on a subspace (k columns per side) built from
random rank-r LoRAs. "head only" (no adapter, the backbone's backward pass skipped) is the floor.
``--factored`` adds a prototype Share step that never forms ΔW (see ``factored_objective``).
Steps are timed interleaved (one step of each variant per round) after compilation; the table
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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import share_jax as sj
from benchmarks.results_file import report
from share_jax.experiments import backbones, training
from share_jax.experiments.synthetic import random_loras
from share_jax.lora import apply_lora, select_kernels
from share_jax.paths import as_predicate, flatten_with_paths
from share_jax.subspace import SIDES
from share_jax.train import trained_factors


def optimizer_bytes(opt_state: Any) -> int:
  """Bytes held by an optimizer state's arrays."""
  return sum(
    int(np.prod(x.shape)) * x.dtype.itemsize
    for x in jax.tree.leaves(opt_state)
    if hasattr(x, "dtype")
  )


HEADING = "## ε-only step vs LoRA step (issue 3/5)"
NUM_CLASSES = 4


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
  """A jitted ``step(trainable, opt_state, *args)``, its state, and ``adapt(trainable)`` -> the
  adapted params (the part of the step that differs between methods)."""

  step: Callable
  args: tuple
  state: tuple
  adapt: Callable | None
  adapter_params: int
  opt_bytes: int

  def run(self) -> None:
    trainable, opt_state, _ = self.state
    self.state = jax.block_until_ready(self.step(trainable, opt_state, *self.args))

  def cost(self) -> tuple[float, float]:
    """(GFLOP, GB accessed) of the compiled step, from XLA's cost analysis."""
    cost = self.step.lower(*self.state[:2], *self.args).compile().cost_analysis()
    return cost["flops"] / 1e9, cost["bytes accessed"] / 1e9


def factored_objective(loss: Callable, layout, prefix: str = "params/") -> Callable:
  """Prototype, not in the library: ``objective(trainable, (params, bases), batch)`` in which
  every adapted ``nn.Dense`` adds (x F_a) F_bᵀ to its output, instead of the step building
  W + F_a F_bᵀ. No ΔW and no dense dL/dΔW = xᵀ dy (2·B·T·d_in·d_out per kernel) are formed."""
  slots = {
    path.removeprefix(prefix).removesuffix("/kernel"): [layout.slots[(path, s)] for s in SIDES]
    for path in layout.paths
  }

  def objective(trainable, params_bases, batch):
    params, bases = params_bases
    factors = trained_factors(bases, trainable)

    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      key = "/".join(context.module.path)
      if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
        if key in slots:
          (ga, ra), (gb, rb) = slots[key]
          out = out + (args[0] @ factors[ga][ra]) @ factors[gb][rb].T
      return out

    with nn.intercept_methods(intercept):
      return loss(params, trainable.head, batch)

  return objective


def variants(bb: backbones.Backbone, batch: dict, args) -> tuple[dict[str, Variant], list[str]]:
  """The head-only, LoRA and Share steps on ``batch``, all with Adam and the same small random
  linear head (a zero head would give the adapters zero gradients)."""
  loss = training.classification_loss(bb.features)
  opt = optax.adam(1e-3)
  w = 0.01 * jax.random.normal(jax.random.key(3), (bb.feature_dim, NUM_CLASSES))
  head = training.zero_head(bb.feature_dim, NUM_CLASSES) | {"w": w}
  params = bb.params

  def variant(step, step_args, trainable, adapt, adapter):
    opt_state = opt.init(trainable)
    return Variant(
      step, step_args, (trainable, opt_state, None), adapt, adapter, optimizer_bytes(opt_state)
    )

  out = {
    "head only (floor)": variant(
      training.make_step(lambda tr, p, b: loss(p, tr, b), opt), (params, batch), head, None, 0
    )
  }
  lora = sj.init_lora_tree(params, bb.target, rank=args.rank, rng=jax.random.key(0))
  out[f"LoRA r={args.rank}"] = variant(
    training.make_step(lambda tr, p, b: loss(apply_lora(p, tr["lora"]), tr["head"], b), opt),
    (params, batch),
    {"lora": lora, "head": head},
    lambda tr: apply_lora(params, tr["lora"]),
    size(lora),
  )
  loras = random_loras(params, bb.target, args.loras, rank=args.rank, seed=1)
  sub = sj.init_subspace(params, loras, k=args.k)
  share_step = sj.make_train_step(loss, opt, sub.layout)
  factored_step = training.make_step(factored_objective(loss, sub.layout), opt)
  errors = []
  for phi in args.phi:
    state = sj.begin_task(sub, "new", rng=jax.random.key(2), p=args.p, phi=phi, head=head)
    name = f"Share k={args.k}, p={args.p}, φ={phi}" + (" (ε only)" if phi == 0 else "")
    adapter = size((state.coef, state.temp, state.temp_coef))
    adapt = lambda tr: sj.adapted_params(params, sub, tr)  # noqa: E731
    out[name] = variant(share_step, (params, sub.bases, batch), state, adapt, adapter)
    if args.factored:
      step_args = ((params, sub.bases), batch)
      out[f"{name}, factored (prototype)"] = variant(factored_step, step_args, state, None, adapter)
      dense = jax.grad(lambda tr: loss(sj.adapted_params(params, sub, tr), tr.head, batch))(state)
      fact = jax.grad(factored_objective(loss, sub.layout))(state, (params, sub.bases), batch)
      errors.append(max_rel_diff(dense, fact))
  if not errors:
    return out, []
  return out, [f"Factored vs dense gradients: max relative difference {max(errors):.1e}."]


def max_rel_diff(a, b) -> float:
  """Largest |a - b| / max |a| over the non-empty leaves of two equal pytrees."""
  return max(
    float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(x)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    if x.size
  )


def adapter_path(v: Variant, target: str) -> Callable[[], jax.Array]:
  """The adapted kernels and their backward given a fixed dL/dW: what a step spends on the
  adapter itself (the backbone's forward and backward, dL/dW included, are shared)."""
  pred = as_predicate(target)

  def objective(trainable):
    kernels = flatten_with_paths(v.adapt(trainable))
    return sum(jnp.sum(w) for p, w in kernels.items() if jnp.ndim(w) == 2 and pred(p, w))

  grad = jax.jit(jax.grad(objective))
  return lambda: grad(v.state[0])


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
  ap.add_argument("--factored", action="store_true", help="also the factored Share prototype")
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--write", action="store_true", help=f"write {HEADING!r} into RESULTS.md")
  args = ap.parse_args()

  bb = backbone(args.model, args.seq)
  vs, notes = variants(bb, batch_of(bb, args.batch, args.seq), args)
  steps = {n: v.run for n, v in vs.items()}
  paths = {n: adapter_path(v, bb.target) for n, v in vs.items() if v.adapt is not None}
  first, wall, cpu = measure(steps, args.rounds)
  path_s = {n: statistics.median(t) for n, t in measure(paths, args.rounds)[1].items()}
  step_s = {n: statistics.median(t) for n, t in wall.items()}
  lora = f"LoRA r={args.rank}"
  kernels = select_kernels(bb.params, bb.target)
  dw_gflop = 2 * args.batch * args.seq * sum(int(np.size(w)) for w in kernels.values()) / 1e9
  rows = []
  for n, v in vs.items():
    head = size(v.state[0]) - v.adapter_params
    adapter = f"{path_s[n] * 1e3:.2f}" if n in path_s else "–"
    gflop, gbytes = v.cost()
    rows.append(
      f"| {n} | {head:,} + {v.adapter_params:,} | {v.opt_bytes:,} | {gflop:.3f} | "
      f"{gbytes:.3f} | {first[n]:.1f} | {step_s[n] * 1e3:.4g} | {1 / step_s[n]:.2f} | "
      f"{paired_ratio(wall[lora], wall[n])} | {paired_ratio(cpu[lora], cpu[n])} | {adapter} |"
    )
  report(
    HEADING,
    "benchmarks.train_step",
    [
      f"{bb.name}; adapters on `{bb.target}` ({len(kernels)} "
      f"kernels); batch {args.batch} × {args.seq} tokens, {NUM_CLASSES}-way linear head, Adam. "
      f"Share's subspace: k = {args.k} per side from {args.loras} random rank-{args.rank} LoRAs. "
      f"Times: medians of {args.rounds} interleaved rounds (in shuffled order) after compilation. "
      "Throughput vs LoRA: median (quartiles) of the per-round ratios of LoRA's time to the "
      "step's, by wall time and by process CPU time. GFLOP and GB accessed: XLA's cost analysis "
      "of the compiled step. Adapter path: building the adapted kernels and their backward from "
      "a given dL/dW, alone.",
      "",
      "| step | trained params (head + adapter) | Adam state bytes | GFLOP / step | "
      "GB accessed / step | compile + 1st step s | ms / step | steps / s | "
      "throughput vs LoRA (wall) | (CPU time) | adapter path ms |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
      *rows,
      "",
      " ".join(
        [
          f"Both dense steps form dL/dW = xᵀ dy for every adapted kernel ({dw_gflop:.3g} GFLOP "
          "per step, 2·B·T·Σ d_in·d_out) and W + ΔW; a factored step forms neither.",
          *notes,
        ]
      ),
    ],
    write=args.write,
    note=", shared with other processes (compare ratios within the table, not absolute times)",
  )


if __name__ == "__main__":
  main()
