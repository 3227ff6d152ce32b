"""Lazy coefficients: frames, reading tasks through them, and settling them.

A merge does not touch stored tasks (``FactorGroup``): a task stays in the coordinates of its
frame f, and ``maps[:, f]`` takes them to the current ones. Frames are non-decreasing over task
rows, so each frame's tasks are one run of rows, and everything here works one run at a time in
chunks of rows: the work follows the tasks held, each task with its own frame's matrices, and no
per-task matrix is gathered.

``settle`` folds every task into the current coordinates (one open frame again): the driver
calls it when the frame slots are full (every ``FRAMES - 1`` merges), before a merge under the
``max_task_error`` rule and before ``set_task``. ``drift_grams`` gives what per-task errors need
on read: how far the stored ΔŴ moved since its frame began (``share_jax.fidelity``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from share_jax.subspace import FRAMES, FactorGroup, first_frame, mm

_CHUNK = 256  # task rows per step


def over_frames(fn: Callable, group: FactorGroup, rows: jax.Array, out):
  """``out`` (a pytree of arrays with task axis 0) with rows 0…``rows`` − 1 replaced by
  ``fn(f, block)``, block the coefficients (L, K, c, P) of a chunk of c rows of frame f; rows
  after ``rows`` keep ``out``'s values. A chunk past T is clamped back and masked."""
  _, _, t, _ = group.coef.shape
  chunk = min(t, _CHUNK)
  held = jnp.arange(t) < rows

  def frame_body(f, out):
    lo = jnp.sum(held & (group.frame < f))
    hi = jnp.sum(held & (group.frame <= f))

    def chunk_body(i, out):
      first = lo + i * chunk
      at = jnp.minimum(first, t - chunk)
      r = at + jnp.arange(chunk)
      mask = (r >= first) & (r < jnp.minimum(first + chunk, hi))
      new = fn(f, jax.lax.dynamic_slice_in_dim(group.coef, at, chunk, 2))

      def put(o, n):
        old = jax.lax.dynamic_slice_in_dim(o, at, chunk, 0)
        keep = mask.reshape((chunk,) + (1,) * (o.ndim - 1))
        return jax.lax.dynamic_update_slice_in_dim(o, jnp.where(keep, n, old), at, 0)

      return jax.tree.map(put, out, new)

    return jax.lax.fori_loop(0, (hi - lo + chunk - 1) // chunk, chunk_body, out)

  return jax.lax.fori_loop(0, FRAMES, frame_body, out)


@jax.jit
def current(group: FactorGroup, rows: jax.Array) -> jax.Array:
  """Coefficients of the first ``rows`` tasks in current coordinates, (L, K, T, P) with K the
  basis capacity (rows after them zero)."""

  def fn(f, block):
    return mm("lkj,ljtp->tlkp", group.maps[:, f], block)

  n, _, t, p = group.coef.shape
  out = jnp.zeros((t, n, group.basis.shape[2], p))
  return jnp.moveaxis(over_frames(fn, group, rows, out), 0, 2)


@jax.jit
def settle_group(group: FactorGroup, rows: jax.Array) -> FactorGroup:
  """The group with every task in current coordinates and one open frame (0)."""
  return group.replace(coef=current(group, rows)).settled()


@jax.jit
def relabel(group: FactorGroup, f: jax.Array) -> FactorGroup:
  """The group with frame ``f``, which holds every task and which no merge has moved, as frame 0:
  settled without arithmetic."""
  return group.replace(
    frame=jnp.zeros_like(group.frame),
    maps=first_frame(group.maps[:, f]),
    frame_basis=first_frame(group.frame_basis[:, f]),
  )


def fresh(group: FactorGroup, rows: int) -> int | None:
  """The frame that holds every one of the first ``rows`` tasks when nothing has moved it (its
  map the identity, its basis the current one, coordinates of the current size), else None."""
  held = np.asarray(group.frame)[:rows]
  f = int(held.max(initial=0))
  if held.size and held.min() != f or group.coef.shape[1] != group.basis.shape[2]:
    return None
  return f if bool(_unmoved(group, jnp.asarray(f))) else None


@jax.jit
def _unmoved(group: FactorGroup, f: jax.Array) -> jax.Array:
  eye = jnp.eye(group.basis.shape[2])
  same_basis = jnp.array_equal(group.frame_basis[:, f], group.basis)
  return jnp.all(group.maps[:, f] == eye) & same_basis


def _grams(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per task and slot, xᵀy over K: (L, K, c, P) twice → (c, L, P, Q), as a broadcast product
  reduced over K (XLA CPU fuses it; tiny batched dots are several times slower)."""
  return jnp.sum(x[..., :, None] * y[..., None, :], axis=1).swapaxes(0, 1)


@jax.jit
def drift_grams(group: FactorGroup, rows: jax.Array) -> dict[str, jax.Array]:
  """Per task row and slot, the p × p Grams (T, L, P, P) that give ‖ΔŴ_f − ΔŴ‖ of a kernel from
  its two sides (``fidelity``): for a side with columns X_f = β_f c in its frame's basis β_f and
  X = β M c now (M the frame's map), the drift D = X_f − X = β (W − M) c + R c with
  W = βᵀβ_f and R = β_f − β W ⟂ β. ``dd`` DᵀD, ``xx`` XᵀX, ``dx`` DᵀX, ``ff`` X_fᵀX_f and
  ``df`` DᵀX_f, all from K × K products (no d-sized work per task, no cancellation of large
  terms)."""
  w = mm("ldk,lfdj->lfkj", group.basis, group.frame_basis)  # (L, F, K, K)
  r = group.frame_basis - mm("ldk,lfkj->lfdj", group.basis, w)
  g = mm("lfdk,lfdj->lfkj", r, r)
  e = w - group.maps

  def fn(f, c):
    u, x, rc, wc = (mm("lkj,ljtp->lktp", a[:, f], c) for a in (e, group.maps, g, w))
    crc = _grams(c, rc)
    return {
      "dd": _grams(u, u) + crc,
      "xx": _grams(x, x),
      "dx": _grams(u, x),
      "ff": _grams(c, c),
      "df": _grams(u, wc) + crc,
    }

  n, _, t, p = group.coef.shape
  zeros = jnp.zeros((t, n, p, p))
  return over_frames(fn, group, rows, dict.fromkeys(("dd", "xx", "dx", "ff", "df"), zeros))


def next_frame(group: FactorGroup, rows: int) -> int:
  """The frame a merge's new tasks open: one after the newest held task's (host int)."""
  return int(np.max(np.asarray(group.frame)[:rows])) + 1 if rows else 0
