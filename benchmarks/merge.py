"""Merge scaling (issue 2): absorb one new LoRA into a subspace that already holds T tasks.

Times ``share_jax.absorb`` end to end (and the jitted ``merge_group`` alone) against NumPy
float32 baselines fed the same inputs:

  (c) the same small-space math as share_jax (QR of [β, X], the small centred factor, its SVD,
      every task re-projected eagerly), batched over slots, on the state's bases, task-minor
      coefficients and scatter factor (the floor a plain NumPy port reaches);

share_jax re-projects lazily (``share_jax.frames``): an absorb composes per-frame maps; when the
frame slots run out the young frames are folded into one, and everything settles only when they
outweigh the oldest frame. The table times one absorb (copying the coefficients, and with
``donate=True``), a run of ``--run`` absorbs in a row (folds included: the steady cost per task),
and a full ``settle`` of the absorb's result.

and, per kernel and side, on the T tasks' reconstructed factor columns plus the new LoRA's, a
d × (T·r + r) stack:

  (a) explicit-stack thin SVD: ``np.linalg.svd(X - mean, full_matrices=False)``, top k, project all;
  (b) the reference code: ``np.linalg.eig(Xc @ Xc.T)``, real parts, sort, top k, project all.

It also checks that share_jax's new bases and old-task reconstructions equal (a)'s.

  python -m benchmarks.merge                      # T = 10 100 1000, roberta and 7b shapes
  python -m benchmarks.merge --quick              # T = 4 16, tiny shapes, 2 reps (smoke test)
  python -m benchmarks.merge --T 10 1000 --shapes 7b --reps 7 --profile

Baselines are expensive (a 4096 × 4096 ``eig`` takes minutes here); every baseline cell gets a
time budget. Slots (kernel, side) all have the same shape, so a cell whose budget runs out is
extrapolated from the slots it timed, and a cell whose single slot would exceed ``--max-slot-s``
is scaled from a smaller T by a flop model. The table marks both.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import share_jax as sj
from share_jax import diagnostics, profiling
from share_jax.subspace import FRAMES

# ----------------------------------------------------------------------------- problem


@dataclasses.dataclass(frozen=True)
class Shape:
  """A model's adapted kernels: ``n_layers`` × (query, value), each d × d, LoRA rank r."""

  name: str
  d: int
  n_layers: int
  r: int
  k: int

  @property
  def paths(self) -> list[str]:
    return [
      f"layer_{i}/attention/{proj}/kernel"
      for i in range(self.n_layers)
      for proj in ("query", "value")
    ]

  @property
  def n_slots(self) -> int:
    return 2 * len(self.paths)

  def describe(self) -> str:
    return f"{len(self.paths)} × {self.d}², r={self.r}, k={self.k}"


SHAPES = {
  "roberta": Shape("roberta", d=768, n_layers=12, r=8, k=32),
  "7b": Shape("7b", d=4096, n_layers=2, r=16, k=64),
  "7b-k256": Shape("7b-k256", d=4096, n_layers=2, r=16, k=256),
  "tiny": Shape("tiny", d=128, n_layers=2, r=4, k=8),
}


class Planted:
  """Random LoRAs whose factors share a hidden 2k-dim subspace (geometric spectrum) plus noise."""

  def __init__(self, shape: Shape, seed: int):
    self.shape = shape
    self.rng = np.random.default_rng(seed)
    d, h = shape.d, min(2 * shape.k, shape.d)
    self.scales = np.geomspace(1.0, 0.05, h).astype(np.float32)[:, None]
    self.noise = np.float32(0.1 / np.sqrt(d))  # noise column norm ≈ 0.1, signal ≈ 3
    self.hidden = {p: (self._ortho(d, h), self._ortho(d, h)) for p in shape.paths}
    self.params = sj.nest({p: np.zeros((d, d), np.float32) for p in shape.paths})

  def _ortho(self, d: int, h: int) -> np.ndarray:
    return np.linalg.qr(self.rng.standard_normal((d, h), np.float32))[0]

  def _side(self, u: np.ndarray) -> np.ndarray:
    r, h = self.shape.r, u.shape[1]
    x = u @ (self.scales * self.rng.standard_normal((h, r), np.float32))
    return x + self.noise * self.rng.standard_normal(x.shape, np.float32)

  def lora(self) -> dict:
    return sj.nest(
      {p: sj.LoRA(self._side(ua), self._side(ub).T) for p, (ua, ub) in self.hidden.items()}
    )

  def loras(self, n: int) -> list[dict]:
    return [self.lora() for _ in range(n)]


def block(sub: sj.Subspace) -> sj.Subspace:
  jax.block_until_ready(sub.groups)
  return sub


def build(
  shape: Shape, ts: list[int], chunk: int, seed: int, log, build_max: int = 1000
) -> tuple[Planted, dict]:
  """Subspaces holding each T in ``ts`` tasks: one init, then absorbs of ``chunk`` LoRAs at a time
  (capacities grow in buckets as in real use); a T above ``build_max`` repeats the tasks of the
  largest T built (``tiled``). Returns the generator and ``{T: subspace}``."""
  gen = Planted(shape, seed)
  sub, count, snaps = None, 0, {}
  t0 = time.perf_counter()
  for target in sorted(ts):
    if target > build_max and sub is not None:
      snaps[target] = block(tiled(sub, target))
      log(f"  tiled T={target} ({time.perf_counter() - t0:.1f} s so far)")
      continue
    while count < target:
      n = min(chunk, target - count)
      ids = list(range(count, count + n))
      if sub is None:
        sub = sj.init_subspace(gen.params, gen.loras(n), k=shape.k, task_ids=ids)
      else:
        sub = sj.absorb(sub, gen.loras(n), task_ids=ids)
      count += n
    snaps[target] = block(sub)
    log(f"  built T={target} ({time.perf_counter() - t0:.1f} s so far)")
  return gen, snaps


def tiled(sub: sj.Subspace, t: int) -> sj.Subspace:
  """``sub``'s tasks repeated t / T times (same bases; scatter scaled to match; capacity the
  power of two >= t): a state of t tasks at a fraction of the cost of absorbing them."""
  n = sub.num_tasks
  if t % n:
    raise SystemExit(f"--T {t} must be a multiple of {n} to be tiled from it")
  reps, cap = t // n, 1 << (t - 1).bit_length()
  groups = {}
  for g, grp in sj.settle(sub).groups.items():
    coef = np.tile(np.asarray(grp.coef[:, :, :n]), (1, 1, reps, 1))
    ncols = np.tile(np.asarray(grp.ncols[:n]), (reps, 1))
    groups[g] = grp.stored().replace(
      coef=jax.numpy.asarray(np.pad(coef, ((0, 0), (0, 0), (0, cap - t), (0, 0)))),
      ncols=jax.numpy.asarray(np.pad(ncols, ((0, cap - t), (0, 0)))),
      scatter=grp.scatter * np.sqrt(reps),
      lost=grp.lost * reps,
    )
  ids = [f"{i}-{j}" for j in range(reps) for i in sub.task_ids]
  return sj.Subspace.create(groups, sub.layout, tuple(ids), sub.config)


def blas_threads(n: int | dict[str, int] | None = None) -> dict[str, int]:
  """Threads of every loaded OpenBLAS (numpy's, and scipy's, which jaxlib's LAPACK calls), by
  library file; first set them to ``n`` (one count, or a dict as returned) if given."""
  import ctypes

  import scipy.linalg.cython_lapack  # noqa: F401  (loads the OpenBLAS that jaxlib uses)

  with open("/proc/self/maps") as f:
    libs = sorted({w for w in f.read().split() if "openblas" in w and ".so" in w})
  out = {}
  for path in libs:
    lib, name = ctypes.CDLL(path), os.path.basename(path)
    for suffix in ("64_", ""):
      if hasattr(lib, f"scipy_openblas_get_num_threads{suffix}"):
        want = n.get(name) if isinstance(n, dict) else n
        if want is not None:
          getattr(lib, f"scipy_openblas_set_num_threads{suffix}")(int(want))
        out[name] = getattr(lib, f"scipy_openblas_get_num_threads{suffix}")()
        break
  return out


# ----------------------------------------------------------------------------- share_jax timing


def median(xs) -> float:
  return float(statistics.median(xs))


def timed(fn: Callable, *args, **kw) -> tuple[float, object]:
  t = time.perf_counter()
  out = fn(*args, **kw)
  return time.perf_counter() - t, out


def absorb_one(sub: sj.Subspace, new: dict, donate: bool = False) -> sj.Subspace:
  return block(sj.absorb(sub, [new], task_ids=["new"], donate=donate))


def own_copy(sub: sj.Subspace) -> sj.Subspace:
  """``sub`` with its own coefficient buffers, for an absorb that donates them (untimed)."""
  groups = {g: grp.replace(coef=jnp.copy(grp.coef)) for g, grp in sub.groups.items()}
  return block(sub.replace(groups=groups))


def settle_one(sub: sj.Subspace) -> sj.Subspace:
  """Fold every task of ``sub`` (after an absorb: two frames) into current coordinates."""
  return block(sj.settle(sub))


def absorb_run(sub: sj.Subspace, new: dict, n: int, donate: bool) -> float:
  """Mean seconds per absorb over ``n`` single absorbs in a row from ``sub``."""
  sub = own_copy(sub) if donate else sub
  t = time.perf_counter()
  for i in range(n):
    sub = block(sj.absorb(sub, [new], task_ids=[f"run{i}"], donate=donate))
  return (time.perf_counter() - t) / n


def kernel_calls(sub: sj.Subspace, new: dict) -> list[profiling.KernelCall]:
  """The jitted merge kernel calls (arguments as passed) that ``absorb`` makes for one new task."""
  with profiling.record() as rec:
    absorb_one(sub, new)
  return rec.kernels


def run_kernel(calls: list[profiling.KernelCall]) -> None:
  for call in calls:
    call.run()


def first_call(sub: sj.Subspace, new: dict) -> dict:
  """Absorb with empty caches (compile included), the kernel's compile time alone, and the
  ``merge_group`` calls absorb made."""
  jax.clear_caches()
  first, out = timed(absorb_one, sub, new)
  calls = kernel_calls(sub, new)
  jax.clear_caches()
  compile_s, temp = 0.0, 0
  for call in calls:
    dt, compiled = timed(lambda c: c.lower().compile(), call)
    compile_s += dt
    temp = max(temp, compiled.memory_analysis().temp_size_in_bytes)
  (cap,), (cap_out,) = ({g.capacity[1] for g in s.groups.values()} for s in (sub, out))
  t_cap = str(cap) if cap == cap_out else f"{cap}→{cap_out}"
  return {
    "first_s": first,
    "compile_s": compile_s,
    "temp_mb": temp / 2**20,
    "t_cap": t_cap,
    "out": out,
    "calls": calls,
  }


def time_share(subs: dict, new: dict, reps: int, profile: bool, run: int) -> dict:
  """Per T: first call, then absorb and ``merge_group`` medians, the Ts interleaved rep by rep
  so that load changes hit every T alike."""
  res = {t: first_call(sub, new) for t, sub in subs.items()}
  for t, sub in subs.items():
    absorb_one(sub, new)
    absorb_one(own_copy(sub), new, donate=True)
    run_kernel(res[t]["calls"])
    settle_one(res[t]["out"])
    absorb_run(sub, new, run, donate=True)
  keys = ("absorb", "in_place", "kernel", "settle", "run", "run_in_place")
  runs = {t: {key: [] for key in keys} for t in subs}
  for _ in range(reps):
    for t, sub in subs.items():
      runs[t]["absorb"].append(timed(absorb_one, sub, new)[0])
      runs[t]["in_place"].append(timed(absorb_one, own_copy(sub), new, donate=True)[0])
      runs[t]["kernel"].append(timed(run_kernel, res[t]["calls"])[0])
      runs[t]["settle"].append(timed(settle_one, res[t]["out"])[0])
      runs[t]["run"].append(absorb_run(sub, new, run, donate=False))
      runs[t]["run_in_place"].append(absorb_run(sub, new, run, donate=True))
  for t, sub in subs.items():
    r = res[t]
    r["absorb_s"], r["kernel_s"] = median(runs[t]["absorb"]), median(runs[t]["kernel"])
    for key in ("settle", "in_place", "run", "run_in_place"):
      r[f"{key}_s"] = median(runs[t][key])
    r["absorb_runs"] = runs[t]["absorb"]
    if profile:
      r["profile"] = profile_phases(sub, new, reps)
      r["xla_ops"] = xla_ops(r["calls"], reps)
  return res


def xla_ops(calls: list[profiling.KernelCall], reps: int, top: int = 16) -> list[tuple[str, float]]:
  """(XLA op, ms per call) of the ``merge_group`` calls, from a ``jax.profiler`` trace."""
  import collections
  import glob
  import gzip
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(reps):
        run_kernel(calls)
    (path,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  total = collections.Counter()
  skip = ("Thunk", "$", "Pjit", "Slinky", "Execute", "Common")
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(skip):
      total[e["name"]] += e.get("dur", 0) / 1e3 / reps
  hlo = "\n".join(call.lower().compile().as_text() for call in calls)
  out = []
  for name, ms in total.most_common(top):
    m = re.search(rf"%{re.escape(name)} = .*?op_name=\"([^\"]*)\"", hlo)
    out.append((f"{name} [{m.group(1).removeprefix('jit(merge_group)/')}]" if m else name, ms))
  return out


def profile_phases(sub: sj.Subspace, new: dict, reps: int) -> dict:
  """Medians of absorb's phases (``share_jax.profiling``: validate, stack, merge) over reps."""
  runs = []
  for _ in range(reps):
    with profiling.record() as rec:
      absorb_one(sub, new)
    runs.append(rec.seconds)
  return {name: median([r.get(name, 0.0) for r in runs]) for name in runs[0]}


# ----------------------------------------------------------------------------- baselines


def explicit_svd(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(a): thin SVD of the centred explicit stack, then every task's coefficients (timed too).
  Returns (basis, singular values, coefficients)."""
  u, s, _ = np.linalg.svd(x - x.mean(axis=1, keepdims=True), full_matrices=False)
  u = u[:, :k]
  return u, s, u.T @ x


def covariance_eig(x: np.ndarray, k: int) -> tuple[np.ndarray, None, np.ndarray]:
  """(b): general eig of the d × d centred covariance (the reference code), then every task's
  coefficients (timed too). Returns (basis, None, coefficients)."""
  xc = x - x.mean(axis=1, keepdims=True)
  w, v = np.linalg.eig(xc @ xc.T)
  order = np.argsort(w.real)[::-1][:k]
  u = np.ascontiguousarray(v.real[:, order])
  return u, None, u.T @ x


BASELINES = {"a": explicit_svd, "b": covariance_eig}


def small_space_inputs(sub: sj.Subspace, new: dict, shape: Shape) -> tuple[np.ndarray, ...]:
  """(c)'s inputs in the layout it likes best (not timed): bases (L, d, k), coefficients
  (L, k, T·r) task-minor, the scatter factor (L, k, k) and the new columns (L, d, r)."""
  ((g, grp),) = sj.settle(sub).groups.items()  # every benchmark shape has one group
  t, k = sub.num_tasks, int(np.max(np.asarray(grp.rank)))
  n_slots = grp.basis.shape[0]
  coef = np.asarray(grp.coef[:, :k, :t, : shape.r])
  cols = {path: diagnostics.lora_columns(lo) for path, lo in sj.lora_leaves(new).items()}
  x = np.zeros((n_slots, shape.d, shape.r), np.float32)
  for (path, side), (_, row) in sub.layout.slots.items():
    x[row] = cols[path][side]
  return (
    np.ascontiguousarray(np.asarray(grp.basis[:, :, :k])),
    np.ascontiguousarray(coef.reshape(n_slots, k, t * shape.r)),
    np.ascontiguousarray(np.asarray(grp.scatter[:, :k, :k])),
    x,
  )


def small_space_merge(basis, coef, scatter, x, k: int) -> tuple[np.ndarray, ...]:
  """(c): share_jax's merge math in NumPy float32, batched over slots (no fidelity bookkeeping,
  no mean direction): QR of [β, X], the small centred factor, its SVD, the new bases, every
  task's rotated coefficients, the new scatter factor and sklearn's sign flip."""
  kk = basis.shape[2]
  q, r = np.linalg.qr(np.concatenate([basis, x], axis=2))
  r_old, y = r[..., :kk], r[..., kk:]
  n_old, n_new = coef.shape[2], x.shape[2]
  mu_old = r_old @ coef.mean(axis=2, keepdims=True)
  mu_new = y.mean(axis=2, keepdims=True)
  corr = np.sqrt(n_old * n_new / (n_old + n_new)) * (mu_old - mu_new)
  f = np.concatenate([r_old @ scatter, y - mu_new, corr], axis=2)
  u = np.linalg.svd(f, full_matrices=False)[0][..., :k]
  new_basis = q @ u
  idx = np.argmax(np.abs(new_basis), axis=1)
  sign = np.sign(np.take_along_axis(new_basis, idx[:, None, :], axis=1))
  ut = np.swapaxes(u * sign, 1, 2)
  new_coef = np.concatenate([(ut @ r_old) @ coef, ut @ y], axis=2)
  new_scatter = np.swapaxes(np.linalg.qr(np.swapaxes(ut @ f, 1, 2), mode="r"), 1, 2)
  return new_basis * sign, new_coef, new_scatter


def time_small_space(sub: sj.Subspace, new: dict, shape: Shape, reps: int) -> dict:
  """(c) timed: median of ``reps`` whole merges (all slots)."""
  args = small_space_inputs(sub, new, shape)
  small_space_merge(*args, shape.k)
  times = [timed(small_space_merge, *args, shape.k)[0] for _ in range(reps)]
  return {"s": median(times), "how": f"{reps} rep"}


def flops(method: str, d: int, n: int) -> float:
  """Rough cost model, only used to scale a too-slow cell from a timed smaller one."""
  if method == "a":
    return d * n * min(d, n)
  return 25.0 * d**3 + 2.0 * d * d * n  # nonsymmetric eig with vectors ≈ 25 d³


def slot_stacks(sub: sj.Subspace, new: dict, shape: Shape) -> Callable[[int], np.ndarray]:
  """Slot i → float32 (d, T·r + r): old tasks' reconstructions β ε_t, then the new columns."""
  t = sub.num_tasks
  new_cols = {path: diagnostics.lora_columns(lo) for path, lo in sj.lora_leaves(new).items()}
  slots = list(sub.layout.slots.items())
  settled = sj.settle(sub).groups.items()
  host = {g: tuple(map(np.asarray, (v.basis, v.coef, v.rank))) for g, v in settled}

  def get(i: int) -> np.ndarray:
    (path, side), (g, row) = slots[i]
    basis, coef, rank = host[g]
    kk = int(rank[row])
    c = coef[row, :kk, :t, : shape.r]  # (k, T, r): every task here has rank r
    old = basis[row, :, :kk] @ c.reshape(kk, t * shape.r)
    return np.concatenate([old, new_cols[path][side].astype(np.float32)], axis=1)

  return get


def time_baseline(method: str, get, shape: Shape, t: int, args, history: dict, log) -> dict:
  """One baseline cell: full reps if the budget allows, else slot extrapolation or a flop-model
  estimate from the last smaller T timed (``history``; only if its slots took >= 1 s)."""
  fn, n_slots, n = BASELINES[method], shape.n_slots, t * shape.r + shape.r
  key = (shape.name, method)
  if key in history and history[key][2] >= 1.0:  # faster slots are overhead, not flops
    d0, n0, per0 = history[key]
    pred = per0 * flops(method, shape.d, n) / flops(method, d0, n0)
    if pred > args.max_slot_s:
      log(f"    ({method}) skipped: one slot ≈ {pred:.0f} s > --max-slot-s, scaled from n={n0}")
      return {"s": pred * n_slots, "how": f"model from T={(n0 - shape.r) // shape.r}"}
  reps, spent, totals, per_slot = args.baseline_reps, 0.0, [], []
  for _ in range(reps):
    row = []
    for i in range(n_slots):
      if row and spent > args.baseline_budget:
        break
      x = get(i)
      dt, _ = timed(fn, x, shape.k)
      row.append(dt)
      spent += dt
    per_slot += row
    if len(row) == n_slots:
      totals.append(sum(row))
    if spent > args.baseline_budget:
      break
  history[key] = (shape.d, n, median(per_slot))
  if totals:
    return {"s": median(totals), "how": f"{len(totals)} rep"}
  how = f"{len(per_slot)}/{n_slots} slots"
  return {"s": median(per_slot) * n_slots, "how": how}


# ----------------------------------------------------------------------------- accuracy


def reference_basis(x: np.ndarray, k: int) -> np.ndarray:
  """share_jax's bases in float64 from the explicit stack (d, n): the mean direction, then the
  top k − 1 principal directions of the centred stack with the mean projected out."""
  x = x.astype(np.float64)
  mu = x.mean(axis=1)
  u0 = mu / np.linalg.norm(mu)
  xc = x - mu[:, None]
  xc = xc - np.outer(u0, u0 @ xc)
  u = np.linalg.svd(xc, full_matrices=False)[0][:, : k - 1]
  return np.concatenate([u0[:, None], u], axis=1)


def accuracy(out: sj.Subspace, get, shape: Shape, t: int, slots_checked: int = 2) -> dict:
  """Projector distance ‖P_share − P_ref‖₂ and max relative error of the old and new tasks'
  reconstructions (B B_refᵀ x) against ``reference_basis`` on the first slots; float64."""
  out = sj.settle(out)
  slots = list(out.layout.slots.values())
  dist, err, err_new = 0.0, 0.0, 0.0
  for i in range(slots_checked):
    g, row = slots[i]
    grp = out.groups[g]
    kk = int(grp.rank[row])
    x = get(i).astype(np.float64)
    u_ref = reference_basis(x, kk)
    basis = np.asarray(grp.basis[row, :, :kk], np.float64)
    coef = np.asarray(grp.coef[row, :kk, : t + 1, : shape.r], np.float64)
    dist = max(dist, sin_max(u_ref, basis))
    want = u_ref @ (u_ref.T @ x)
    have = basis @ coef.reshape(kk, (t + 1) * shape.r)
    diff = np.linalg.norm((have - want).reshape(shape.d, t + 1, shape.r), axis=(0, 2))
    rel = diff / np.linalg.norm(want.reshape(shape.d, t + 1, shape.r), axis=(0, 2))
    err, err_new = max(err, rel[:t].max()), max(err_new, rel[t])
  return {"proj_dist": dist, "old_rel_err": err, "new_rel_err": err_new}


def sin_max(u: np.ndarray, v: np.ndarray) -> float:
  """‖U Uᵀ − V Vᵀ‖₂ for orthonormal U, V of equal width: ‖(I − U Uᵀ) V‖₂."""
  return float(np.linalg.norm(v - u @ (u.T @ v), 2))


# ----------------------------------------------------------------------------- report


def environment() -> dict:
  return {
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "command": " ".join(
      [os.path.basename(sys.executable), "-m", "benchmarks.merge", *sys.argv[1:]]
    ),
    "nproc": os.cpu_count(),
    "cpu": platform.processor() or platform.machine(),
    "jax": jax.__version__,
    "numpy": np.__version__,
    "backend": jax.default_backend(),
    "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
    "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE", "(unset)"),
    "loadavg_start": os.getloadavg(),
  }


def fmt(x: float | None, spec: str = ".3g") -> str:
  return "—" if x is None else format(x, spec)


def _cell(x: dict | None, share_s: float) -> tuple[str, str]:
  """(time, speedup) of a baseline cell; ``~`` marks an extrapolated or modelled time."""
  if x is None:
    return "—", "—"
  mark = "" if x["how"].endswith("rep") else "~"
  return f"{mark}{x['s']:.3g} ({x['how']})", f"{mark}{x['s'] / share_s:.0f}×"


def table(rows: list[dict], run: int) -> str:
  head = (
    "| shape | T | T cap | share_jax absorb (s) | absorb, donate=True (s) | merge_group (s) "
    f"| settle (s) | run of {run}, per absorb (s) | run of {run}, donated (s) "
    "| merge temp (MB) "
    "| first call (s) | compile (s) "
    "| (c) NumPy small-space (s) | (c)/share "
    "| (a) SVD (s) | (b) eig (s) | (a)/share | (b)/share | ‖P−P_ref‖₂ | old recon rel err "
    "| new recon rel err |"
  )
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    s, acc = r["share"], r["acc"]
    (a, sa), (b, sb), (c, sc) = (_cell(r.get(m), s["absorb_s"]) for m in (*BASELINES, "c"))
    lines.append(
      f"| {r['shape']} | {r['T']} | {s['t_cap']} | {s['absorb_s']:.4f} | {s['in_place_s']:.4f} "
      f"| {s['kernel_s']:.4f} | {s['settle_s']:.4f} | {s['run_s']:.4f} "
      f"| {s['run_in_place_s']:.4f} | {s['temp_mb']:.0f} "
      f"| {s['first_s']:.2f} | {s['compile_s']:.2f} | {c} | {sc} | {a} | {b} | {sa} | {sb} "
      f"| {acc['proj_dist']:.1e} | {acc['old_rel_err']:.1e} | {acc['new_rel_err']:.1e} |"
    )
  return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--T", type=int, nargs="+", default=[10, 100, 1000], help="tasks already held")
  p.add_argument(
    "--build-max", type=int, default=1000, help="a larger T repeats the largest built's tasks"
  )
  p.add_argument("--shapes", default="roberta,7b", help=f"comma list of {sorted(SHAPES)}")
  p.add_argument("--reps", type=int, default=7, help="timed share_jax repetitions (median)")
  p.add_argument(
    "--run", type=int, default=3 * FRAMES, help="single absorbs in a row (folds and settles)"
  )
  p.add_argument("--baseline-reps", type=int, default=3, help="max timed reps per baseline cell")
  p.add_argument("--baseline-budget", type=float, default=40.0, help="seconds per baseline cell")
  p.add_argument("--max-slot-s", type=float, default=30.0, help="skip+model a slot slower than")
  p.add_argument("--no-baselines", action="store_true")
  p.add_argument("--chunk", type=int, default=30, help="LoRAs per absorb while building")
  p.add_argument("--profile", action="store_true", help="host-side and reprojection breakdown")
  p.add_argument("--quick", action="store_true", help="smoke test: T 4 16, tiny shapes, 2 reps")
  p.add_argument("--blas-threads", type=int, help="OpenBLAS threads while timing (default: as is)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="write raw results here")
  args = p.parse_args(argv)
  if args.quick:
    args.T, args.shapes, args.reps, args.chunk, args.run = [4, 16], "tiny", 2, 8, FRAMES + 1
    args.baseline_reps, args.baseline_budget = 1, 5.0
  args.reps = max(args.reps, 1)
  return args


def main(argv=None) -> None:
  args = parse(argv)
  env = environment()
  env["blas_threads"] = blas_threads(args.blas_threads)

  def log(msg):
    print(msg, file=sys.stderr, flush=True)

  log(json.dumps(env))
  rows, history = [], {}
  with jax.default_matmul_precision("float32"):
    for name in args.shapes.split(","):
      shape = SHAPES[name]
      log(f"{name}: {shape.describe()}, building T = {sorted(args.T)}")
      blas_threads(1)  # building is not timed; one thread is far faster on a loaded machine
      gen, snaps = build(shape, args.T, args.chunk, args.seed, log, args.build_max)
      new = gen.lora()
      blas_threads(env["blas_threads"])
      shares = time_share(snaps, new, args.reps, args.profile, args.run)
      for t, sub in snaps.items():
        share, out = shares[t], shares[t].pop("out")
        share.pop("calls")
        log(
          f"  T={t}: absorb {share['absorb_s']:.4f} s, merge_group {share['kernel_s']:.4f} s, "
          f"merge temp {share['temp_mb']:.0f} MB"
        )
        row = {"shape": name, "T": t, "share": share}
        get = slot_stacks(sub, new, shape)
        row["c"] = time_small_space(sub, new, shape, args.reps)
        log(f"  T={t}: (c) {row['c']['s']:.4f} s")
        if not args.no_baselines:
          for m in BASELINES:
            row[m] = time_baseline(m, get, shape, t, args, history, log)
            log(f"  T={t}: ({m}) {row[m]['s']:.3g} s ({row[m]['how']})")
        row["acc"] = accuracy(out, get, shape, t)
        log(f"  T={t}: {row['acc']}")
        rows.append(row)
        del get, out
      del snaps, shares
  env["loadavg_end"] = os.getloadavg()
  print(f"date {env['date']}; {env['command']}")
  print(
    f"nproc {env['nproc']}, jax {env['jax']} ({env['backend']}), numpy {env['numpy']}, "
    f"OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}, OPENBLAS_L2_SIZE={env['OPENBLAS_L2_SIZE']}, "
    f"OpenBLAS threads {env['blas_threads']}, "
    f"load average {env['loadavg_start'][0]:.1f} → {env['loadavg_end'][0]:.1f}"
  )
  print()
  print(table(rows, args.run))
  print()
  for name in args.shapes.split(","):
    by_t = {r["T"]: r["share"] for r in rows if r["shape"] == name}
    lo, hi = min(by_t), max(by_t)
    if lo != hi:
      g_abs = by_t[hi]["absorb_s"] / by_t[lo]["absorb_s"]
      g_ker = by_t[hi]["kernel_s"] / by_t[lo]["kernel_s"]
      g_in, g_run, g_run_in = (
        by_t[hi][key] / by_t[lo][key] for key in ("in_place_s", "run_s", "run_in_place_s")
      )
      c = {r["T"]: r["c"]["s"] for r in rows if r["shape"] == name}
      print(
        f"{name}: growth T={hi}/T={lo}: absorb {g_abs:.2f}× (donated {g_in:.2f}×), "
        f"merge_group {g_ker:.2f}×, in runs of {args.run} {g_run:.2f}× (donated {g_run_in:.2f}×), "
        f"(c) NumPy small-space {c[hi] / c[lo]:.2f}×"
      )
  if args.profile:
    print()
    print("absorb's phases (share_jax.profiling; merge = capacity planning + merge_group calls):")
    print("| shape | T | absorb | merge_group | validate | stack | merge |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
      s, p = r["share"], r["share"]["profile"]
      print(
        f"| {r['shape']} | {r['T']} | {s['absorb_s'] * 1e3:.1f} ms | {s['kernel_s'] * 1e3:.1f} ms "
        f"| {p['validate'] * 1e3:.2f} ms | {p['stack'] * 1e3:.2f} ms | {p['merge'] * 1e3:.2f} ms |"
      )
    print()
    print("XLA ops of merge_group (ms per call, from a jax.profiler trace):")
    for r in rows:
      ops = ", ".join(f"{n} {ms:.1f}" for n, ms in r["share"]["xla_ops"])
      print(f"- {r['shape']} T={r['T']}: {ops}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"env": env, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
  main()
