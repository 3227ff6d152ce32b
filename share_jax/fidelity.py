"""How much of each task is kept: per-task ΔW error, exact when stored, bounded on read.

Storing a task keeps, per adapted kernel, Â = P_α A and B̂ = P_β B (P: the orthogonal projector
on a basis), so ΔW = A Bᵀ becomes P_α ΔW P_β: an orthogonal projection of matrices. Its error is
exact from small Gram matrices, with no cancellation:

    ‖ΔW − ΔŴ‖² = ⟨R_a, F_b⟩ + ⟨F_a, R_b⟩ − ⟨R_a, R_b⟩,

with F = XᵀX the p × p Gram of a side's columns before the projection and R = X⊥ᵀX⊥ that of the
part the projection drops (``merge_group`` returns R per new task and side). The task table's
``error`` is that loss for a task's own merge, and ``norm`` is ‖ΔW‖.

Later merges do not touch stored tasks (coefficients are lazy, ``share_jax.frames``), so their
loss is measured on read: the stored ΔŴ_f of a task in frame f and the current ΔŴ differ by
Δ = D_a B_fᵀ + A D_bᵀ per kernel (D = X_f − X per side), whose norm comes exactly from p × p
Grams (``frames.drift_grams``), and the triangle inequality bounds the error by ``error`` + ‖Δ‖
(one step per frame, not per merge: never looser than adding every merge's loss). A fold of
the young frames (``fold_blocks``) and ``settle`` add that bound to ``error`` when they move tasks
into the current coordinates; frame 0's tasks, seldom settled, keep one step for many merges.
``set_task`` stores new coefficients exactly: norm is theirs, error 0.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np

from share_jax.frames import current, drift_grams, fresh, relabel, settle_group
from share_jax.merge import task_grams
from share_jax.subspace import (
  SIDES,
  FidelityError,
  FidelityWarning,
  Layout,
  Subspace,
  concrete,
  mm,
  pad_to,
)

_SLACK = 1e-5  # float32 round-off allowed over a threshold (relative error)


def _pairs(layout: Layout) -> list[tuple[tuple[str, int], tuple[str, int]]]:
  """Per kernel, the (group, row) of its side ``a`` and of its side ``b``."""
  return [tuple(layout.slots[(s.path, side)] for side in SIDES) for s in layout.kernels]


def grams(coef: jax.Array) -> jax.Array:
  """p × p Grams of every task's coefficients: (L, K, T, P) → (T, L, P, P)."""
  return jnp.swapaxes(jax.vmap(task_grams)(coef), 0, 1)


def column_grams(x: jax.Array) -> jax.Array:
  """p × p Grams of new tasks' factor columns: (m, L, d, P) → (m, L, P, P)."""
  return mm("tldp,tldq->tlpq", x, x)


def _partner_grams(full: dict[str, jax.Array], layout: Layout) -> dict[str, jax.Array]:
  """For each row of each group, the Grams (T, P, P) of the other side of the same kernel."""
  rows: dict[str, list] = {g: [None] * n for g, (_, n) in layout.groups.items()}
  for (ga, ra), (gb, rb) in _pairs(layout):
    rows[ga][ra] = full[gb][:, rb]
    rows[gb][rb] = full[ga][:, ra]
  return {g: jnp.stack(r, axis=1) for g, r in rows.items()}


@functools.partial(jax.jit, static_argnames=("layout",))
def before_merge(coefs: dict, new: dict, start: jax.Array, layout: Layout):
  """What the ``max_task_error`` rule needs before a merge, from the stored coefficients
  {group: (L, K, T, P)} and the new tasks' columns {group: (m, L, d, P)} that go in rows
  ``start``…: the Grams {group: (T, L, P, P)} of each row's other side, and ‖ΔW‖² per task (T,)."""
  full = {
    g: jax.lax.dynamic_update_slice_in_dim(grams(c), column_grams(new[g]), start, axis=0)
    for g, c in coefs.items()
  }
  return _partner_grams(full, layout), _delta_norm2(full, layout)


def _inner(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.einsum("tpq,tpq->t", x, y, precision=jax.lax.Precision.HIGHEST)


def _delta_norm2(full: dict[str, jax.Array], layout: Layout) -> jax.Array:
  """‖ΔW‖² per task (T,), all kernels, from the Grams of both sides (‖A Bᵀ‖² = ⟨AᵀA, BᵀB⟩)."""
  return sum(_inner(full[ga][:, ra], full[gb][:, rb]) for (ga, ra), (gb, rb) in _pairs(layout))


@functools.partial(jax.jit, static_argnames=("layout",))
def merge_record(kept: dict, res: dict, layout: Layout) -> tuple[jax.Array, jax.Array]:
  """Per new task (m,), from the Grams of what a merge kept and dropped ({group: (m, L, P, P)}):
  ‖ΔW − P_α ΔW P_β‖ (the merge's loss) and ‖ΔW‖ before it."""
  # The rotation is orthonormal, so the Gram before is the sum of two PSD parts: no cancelling.
  full = {g: kept[g] + res[g] for g in kept}
  total = 0.0
  for (ga, ra), (gb, rb) in _pairs(layout):
    fa, fb, qa, qb = full[ga][:, ra], full[gb][:, rb], res[ga][:, ra], res[gb][:, rb]
    total = total + _inner(qa, fb) + _inner(fa, qb) - _inner(qa, qb)
  return _root(total), _root(_delta_norm2(full, layout))


def _root(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.maximum(x, 0.0))


@functools.partial(jax.jit, static_argnames=("layout", "with_current"))
def _drift(
  groups: dict, rows: jax.Array, layout: Layout, with_current: bool = False, first: jax.Array = 0
):
  """‖ΔŴ_f − ΔŴ‖ per task row (T,): how far each stored ΔW moved since its frame began; with
  ``with_current`` also every group's current coefficients {group: (L, K, T, P)}. Rows of
  frames before ``first`` are left out (zero)."""
  q = {g: drift_grams(grp, rows, with_current, first) for g, grp in groups.items()}
  total = 0.0
  for (ga, ra), (gb, rb) in _pairs(layout):
    a = {n: x[ra] for n, x in q[ga].items()}
    b = {n: x[rb] for n, x in q[gb].items()}
    # Δ = D_a B_fᵀ + A D_bᵀ, with B_f = D_b + B: B_fᵀB_f = dd + dx + dxᵀ + xx, D_bᵀB_f = dd + dx.
    ff_b = b["dd"] + b["dx"] + jnp.swapaxes(b["dx"], 1, 2) + b["xx"]
    df_b = b["dd"] + b["dx"]
    cross = _inner(a["dx"], jnp.swapaxes(df_b, 1, 2))
    total = total + _inner(a["dd"], ff_b) + _inner(a["xx"], b["dd"]) + 2.0 * cross
  return _root(total), {g: x.get("coef") for g, x in q.items()}


def bounds(groups: dict, tasks, layout: Layout, rows: int) -> jax.Array:
  """The error bound (T,) of every task row now: its ``error`` plus its drift (groups of shapes
  only, for accounting, have no drift)."""
  if not concrete(groups):
    return tasks.error
  return tasks.error + _drift(groups, jnp.asarray(rows, jnp.int32), layout)[0]


def settle_groups(groups: dict, tasks, layout: Layout, rows: int):
  """The groups with every task in current coordinates in frame 0 and the error bounds (T,)
  that then become the task table's ``error``. When one frame that no merge has moved holds
  every task, nothing moved: it is only relabelled (settling twice changes nothing)."""
  same = {g: fresh(grp, rows) for g, grp in groups.items()}
  if all(f is not None for f in same.values()):
    return {g: relabel(grp, same[g]) for g, grp in groups.items()}, tasks.error
  drift, coefs = _drift(groups, jnp.asarray(rows, jnp.int32), layout, with_current=True)
  settled = {g: settle_group(grp, coefs[g]) for g, grp in groups.items()}
  return settled, tasks.error + drift


@functools.partial(jax.jit, static_argnames=("layout", "size"))
def fold_blocks(groups: dict, error, rows, lo, first, layout: Layout, size: int):
  """For a fold of frames >= ``first`` (their held rows ``lo`` … ``rows`` − 1): a window of
  ``size`` >= rows − lo task rows from s = min(lo, T − size), per group {group: (L, Kc, size, P)}
  with those rows in current coordinates (zero-padded to Kc), s, and ``error`` (T,) with their
  drift added (triangle inequality, as ``settle_groups``). Work follows ``size``, not T."""
  t = next(iter(groups.values())).frame.shape[0]
  s = jnp.minimum(lo, t - size)
  cut = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, s, size, axis)  # noqa: E731
  view = {
    g: grp.replace(coef=cut(grp.coef, 2), frame=cut(grp.frame, 0)) for g, grp in groups.items()
  }
  drift, now = _drift(view, rows - s, layout, True, first)
  r = s + jnp.arange(size)
  move = ((r >= lo) & (r < rows))[None, None, :, None]
  blocks = {}
  for g, v in view.items():  # folded rows in current coordinates, the others as they were
    blocks[g] = jnp.where(move, pad_to(now[g], (1,), v.coef.shape[1]), v.coef)
  return blocks, s, jax.lax.dynamic_update_slice_in_dim(error, cut(error, 0) + drift, s, 0)


def settle(subspace: Subspace) -> Subspace:
  """The same subspace with every task in current coordinates and one open frame."""
  groups, error = settle_groups(
    subspace.groups, subspace.tasks, subspace.layout, subspace.num_tasks
  )
  return subspace.replace(groups=groups, tasks=subspace.tasks.replace(error=error))


@functools.partial(jax.jit, static_argnames=("layout",))
def norms(coefs: dict, layout: Layout) -> jax.Array:
  """‖ΔW_stored‖_F per task (T,) from current coefficients {group: (L, K, T, P)} (the bases are
  orthonormal)."""
  return _root(_delta_norm2({g: grams(c) for g, c in coefs.items()}, layout))


def stored_norms(groups: dict, layout: Layout, rows: int) -> jax.Array:
  """``norms`` of the first ``rows`` task rows of the groups (T,)."""
  rows = jnp.asarray(rows, jnp.int32)
  return norms({g: current(grp, rows) for g, grp in groups.items()}, layout)


def relative_errors(subspace: Subspace) -> np.ndarray:
  """Relative error bound of each held task now, in row order (host array)."""
  n = subspace.num_tasks
  error = bounds(subspace.groups, subspace.tasks, subspace.layout, n)
  norm = np.asarray(subspace.tasks.norm[:n], np.float64)
  error = np.asarray(error[:n], np.float64)
  return np.where(norm > 0, error / np.where(norm > 0, norm, 1.0), 0.0)


def explained(subspace: Subspace) -> dict[tuple[str, str], float]:
  """``{(kernel path, side): fraction}`` of the scatter of every column absorbed so far, as it was
  absorbed (about the mean when the config centres), that the stored columns still hold:
  ‖S‖² / (‖S‖² + lost), with S the scatter factor and ``lost`` what the merges dropped (1 when
  nothing was). Unlike a merge's own ``energy``, losses of earlier merges count."""
  frac = {}
  for g, grp in subspace.groups.items():
    held = np.sum(np.square(np.asarray(grp.scatter, np.float64)), axis=(1, 2))
    total = held + np.asarray(grp.lost, np.float64)
    frac[g] = np.where(total > 0, held / np.where(total > 0, total, 1.0), 1.0)
  return {slot: float(frac[g][row]) for slot, (g, row) in subspace.layout.slots.items()}


def task_errors(subspace: Subspace) -> dict[Hashable, float]:
  """``{task id: relative ‖ΔW − ΔW_stored‖_F / ‖ΔW‖_F}`` over all adapted kernels, versus the
  adapter the task came from (ingested LoRA, or the factors ``finish_task`` merged).

  Exact right after the merge that stored a task; a guaranteed upper bound after later merges.
  """
  return dict(zip(subspace.task_ids, map(float, relative_errors(subspace)), strict=True))


def check_threshold(subspace: Subspace) -> None:
  """Warn (or raise ``FidelityError`` when the config is strict) if a task's error exceeds the
  config's ``max_task_error``."""
  tau = subspace.config.max_task_error
  if tau is None:
    return
  errors = task_errors(subspace)
  over = {t: e for t, e in errors.items() if e > tau * (1 + _SLACK) + _SLACK}
  if not over:
    return
  named = ", ".join(f"{t!r} ({e:.3g})" for t, e in list(over.items())[:8])
  more = f" and {len(over) - 8} more" if len(over) > 8 else ""
  rule, value = subspace.config.rule
  msg = (
    f"{len(over)} task(s) exceed max_task_error={tau:g} under {rule}={value} "
    f"(max_k={subspace.config.max_k}): {named}{more}"
  )
  if subspace.config.strict:
    raise FidelityError(msg)
  warnings.warn(msg, FidelityWarning, stacklevel=3)
