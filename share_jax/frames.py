"""Lazy coefficients: frames, reading tasks through them, and settling them.

A merge does not touch stored tasks (``FactorGroup``): a task stays in the coordinates of its
frame f, and ``maps[:, f]`` takes them to the current ones. Frames are non-decreasing over task
rows, so each frame's tasks are one run of rows, and everything here works one run at a time in
chunks of rows: the work follows the tasks held, and each run uses its frame's matrices (no
per-task matrix is gathered).

When the frame slots are full, a merge first folds the young frames into one (``fold_from``
picks them, size-tiered; ``fold_group``): only their rows are re-expressed. Settling
(``share_jax.settle``, built on ``settle_group`` and ``drift_grams``) folds every task into the
current coordinates, one open frame again. It happens when the young frames outweigh frame 0,
before a merge under the ``max_task_error`` rule, before ``set_task`` of a task whose frame a
merge has moved, before a checkpoint save and before sharding. ``drift_grams`` also gives what
per-task errors need on read: how far each stored ΔŴ moved since its frame began
(``share_jax.fidelity``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from share_jax.subspace import FRAMES, FactorGroup, first_frame, mm, pad_to

_CHUNK = 256  # task rows per step at most
_MIN_CHUNK = 64  # and at least (less at a smaller capacity)
_TAIL = 16  # rows per step over a frame's last, partial chunk


def over_frames(
  fn: Callable, group: FactorGroup, rows: jax.Array, out: dict, axes: dict, first: jax.Array = 0
):
  """``out`` ({name: array}) with task rows 0…``rows`` − 1 of frames >= ``first`` (along
  ``axes[name]``) replaced by ``fn(f, block)``, block the coefficients (L, Kc, c, P) of a chunk
  of c rows of frame f; other rows keep ``out``'s values. A frame's run is read in whole chunks,
  then its remainder in chunks of ``_TAIL`` rows (a one-task frame costs one small step); a
  chunk past T is clamped back and masked."""
  _, _, t, _ = group.coef.shape
  chunk = min(t, max(_MIN_CHUNK, min(_CHUNK, t // 4)))  # a quarter of capacity, within bounds
  tail = min(chunk, _TAIL)
  held = jnp.arange(t) < rows

  def steps(f, size: int, begin, hi, count, out):
    def chunk_body(i, out):
      start = begin + i * size
      at = jnp.minimum(start, t - size)
      r = at + jnp.arange(size)
      mask = (r >= start) & (r < jnp.minimum(start + size, hi))
      new = fn(f, jax.lax.dynamic_slice_in_dim(group.coef, at, size, 2))

      def put(name):
        o, ax = out[name], axes[name]
        old = jax.lax.dynamic_slice_in_dim(o, at, size, ax)
        keep = mask.reshape([size if i == ax else 1 for i in range(o.ndim)])
        return jax.lax.dynamic_update_slice_in_dim(o, jnp.where(keep, new[name], old), at, ax)

      return {name: put(name) for name in out}

    return jax.lax.fori_loop(0, count, chunk_body, out)

  def frame_body(f, out):
    lo = jnp.sum(held & (group.frame < f))
    hi = jnp.sum(held & (group.frame <= f))
    whole = (hi - lo) // chunk
    out = steps(f, chunk, lo, hi, whole, out)
    rest = lo + whole * chunk
    return steps(f, tail, rest, hi, (hi - rest + tail - 1) // tail, out)

  return jax.lax.fori_loop(first, FRAMES, frame_body, out)


def _current_zeros(group: FactorGroup) -> jax.Array:
  n, _, t, p = group.coef.shape
  return jnp.zeros((n, group.basis.shape[2], t, p))


@jax.jit
def current(group: FactorGroup, rows: jax.Array) -> jax.Array:
  """Coefficients of the first ``rows`` tasks in current coordinates, (L, K, T, P) with K the
  basis capacity (rows after them zero)."""

  def fn(f, block):
    return {"coef": mm("lkj,ljtp->lktp", group.maps[:, f], block)}

  return over_frames(fn, group, rows, {"coef": _current_zeros(group)}, {"coef": 2})["coef"]


@jax.jit
def settle_group(group: FactorGroup, coef: jax.Array) -> FactorGroup:
  """The group with its tasks' current coefficients ``coef`` (L, K, T, P) and one open frame."""
  return group.replace(coef=coef).settled()


def relabel(group: FactorGroup, f: int) -> FactorGroup:
  """The group with frame ``f``, which holds every task and which no merge has moved, as frame 0:
  settled without arithmetic."""
  return group.replace(
    frame=jnp.zeros_like(group.frame),
    maps=first_frame(group.maps[:, f]),
    frame_basis=(group.frame_basis[f],) * FRAMES,
  )


def fresh(group: FactorGroup, rows: int, first: int = 0) -> int | None:
  """The frame that holds every task row from ``first`` to ``rows`` − 1 when nothing has moved
  it (its map the identity, its basis the current one, coordinates of the current size), else
  None."""
  held = np.asarray(group.frame)[first:rows]
  f = int(held.max(initial=0))
  if held.size and held.min() != f or group.coef.shape[1] != group.basis.shape[2]:
    return None
  fb = group.frame_basis[f]
  same = fb is group.basis or bool(jnp.array_equal(fb, group.basis))
  return f if same and bool(jnp.all(group.maps[:, f] == jnp.eye(fb.shape[2]))) else None


def _drift_maps(group: FactorGroup, first: jax.Array, top: jax.Array) -> jax.Array:
  """Per frame f in use, [W_f − M_f; T_f] ((K + Kc) × Kc per slot), with W_f = βᵀβ_f, M_f the
  frame's map and R_f = β_f − β W_f = Q_f T_f (thin QR, Q_f ⟂ β): a column β_f c of frame f is
  [β, Q_f] [W_f; T_f] c, and it is β M_f c now, so its drift has coordinates [W_f − M_f; T_f] c
  in the orthonormal [β, Q_f]. (L, F, K + Kc, Kc), zeros outside ``first`` … ``top`` − 1 (a loop
  over those, so other frames cost nothing; a conditional per frame would let XLA hoist the
  work)."""
  n, _, k = group.basis.shape
  kc = group.coef.shape[1]
  pick = [lambda *bases, f=f: bases[f] for f in range(FRAMES)]

  def body(f, out):
    fb = jax.lax.switch(f, pick, *group.frame_basis)
    w = mm("ldk,ldj->lkj", group.basis, fb)
    t = jnp.linalg.qr(fb - mm("ldk,lkj->ldj", group.basis, w), mode="r")
    return out.at[:, f].set(jnp.concatenate([w - group.maps[:, f], t], axis=1))

  return jax.lax.fori_loop(first, top, body, jnp.zeros((n, FRAMES, k + kc, kc)))


@functools.partial(jax.jit, static_argnames=("with_current",))
def drift_grams(
  group: FactorGroup, rows: jax.Array, with_current: bool = False, first: jax.Array = 0
) -> dict:
  """Per slot and task row, the p × p Grams (L, T, P, P) that give ‖ΔŴ_f − ΔŴ‖ of a kernel from
  its two sides (``fidelity``). A side's columns were X_f = β_f c when its frame began and are
  X = β M c now (M the frame's map); the drift D = X_f − X has coordinates
  S c with S = [W − M; T] (``_drift_maps``), X has M c: ``dd`` DᵀD = cᵀ(SᵀS)c, ``xx`` XᵀX =
  cᵀ(MᵀM)c and ``dx`` DᵀX = cᵀ(S_kᵀM)c, three Kc × Kc forms per frame applied to each task in
  one product, then one p × 3p contraction over Kc per task (no d-sized work per task; S is
  formed directly and each form is a product of it, so no large terms cancel).
  ``with_current``: also ``coef``, the current coefficients (L, K, T, P), from the same pass
  (``settle``). Rows of frames before ``first`` are left out (zero)."""
  held = jnp.arange(group.frame.shape[0]) < rows
  s = _drift_maps(group, first, jnp.max(jnp.where(held, group.frame + 1, 0)))
  k = group.basis.shape[2]

  def fn(f, c):
    sf, mf = s[:, f], group.maps[:, f]
    gram = lambda u, v: mm("lij,lik->ljk", u, v)  # noqa: E731
    forms = jnp.stack([gram(sf, sf), gram(mf, mf), gram(sf[:, :k], mf)], axis=1)  # (L, 3, Kc, Kc)
    y = mm("lakj,ljtp->laktp", forms, c)
    g = jnp.sum(c[:, None, :, :, :, None] * y[:, :, :, :, None, :], axis=2)
    out = {"dd": g[:, 0], "xx": g[:, 1], "dx": g[:, 2]}
    return out | ({"coef": mm("lkj,ljtp->lktp", mf, c)} if with_current else {})

  n, _, t, p = group.coef.shape
  out = dict.fromkeys(("dd", "xx", "dx"), jnp.zeros((n, t, p, p)))
  axes = dict.fromkeys(out, 1)
  if with_current:
    out["coef"], axes["coef"] = _current_zeros(group), 2
  return over_frames(fn, group, rows, out, axes, first)


def fold_from(held: np.ndarray) -> int:
  """The oldest frame a fold takes when the frame slots are full, from the held rows' frames
  ``held`` (a host array; returns a host int >= 0): the two
  newest frames, and each older one while it holds no more rows than all the younger ones
  together. Sizes then grow geometrically with age, as in a log-structured merge, so a task
  is re-expressed O(log T) times over a run of single absorbs, not at every settle; 0 means
  the young frames outweigh frame 0, and everything settles."""
  counts = np.bincount(held, minlength=FRAMES)
  first = FRAMES - 2
  while first > 0 and counts[first - 1] <= counts[first:].sum():
    first -= 1
  return first


@functools.partial(jax.jit, static_argnames=("k",))
def _fold_fields(frame, maps, rows, first, *, k):
  """Frame ids (T,) with held rows of frames >= ``first`` in ``first``, and maps (L, F, K, Kc)
  with frame ``first``'s the identity."""
  held = jnp.arange(frame.shape[0]) < rows
  n, _, _, kc = maps.shape
  eye = jnp.broadcast_to(jnp.eye(k, kc, dtype=jnp.float32), (n, k, kc))
  frame = jnp.where(held & (frame >= first), first, frame)
  return frame, jax.lax.dynamic_update_index_in_dim(maps, eye, first, 1)


def fold_group(group: FactorGroup, coef: jax.Array, rows: int, first: int) -> FactorGroup:
  """The group with ``coef`` (L, Kc, T, P), where the held rows of frames >= ``first`` are in
  current coordinates (zero-padded to Kc), and those rows in one frame ``first`` that begins
  now: its map the identity, its basis the current one (a reference, or one padded copy)."""
  k, kc = group.basis.shape[2], coef.shape[1]
  frame, maps = _fold_fields(group.frame, group.maps, jnp.asarray(rows), jnp.asarray(first), k=k)
  bases = group.frame_basis[:first] + (pad_to(group.basis, (2,), kc),) * (FRAMES - first)
  return group.replace(coef=coef, frame=frame, maps=maps, frame_basis=bases)


def next_frame(held: np.ndarray) -> int:
  """The frame a merge's new tasks open, from the held rows' frames ``held`` (a host array): one
  after the newest."""
  return int(held.max()) + 1 if held.size else 0
