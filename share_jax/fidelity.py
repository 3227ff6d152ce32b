"""How much of each task is kept: per-task ΔW error, tracked through every merge.

Storing a task keeps, per adapted kernel, Â = P_α A and B̂ = P_β B (P: the orthogonal projector
on a basis), so ΔW = A Bᵀ becomes P_α ΔW P_β: an orthogonal projection of matrices. Its error is
exact from small Gram matrices, with no cancellation:

    ‖ΔW − ΔŴ‖² = ⟨R_a, F_b⟩ + ⟨F_a, R_b⟩ − ⟨R_a, R_b⟩,

with F = XᵀX the p × p Gram of a side's columns before the projection and R = X⊥ᵀX⊥ that of the
part the projection drops (``merge_group`` returns R per task and side). A later merge projects
the stored ΔŴ again; its loss is the same formula, and the triangle inequality adds it to the
bound. A second bound holds too: with N = ‖ΔW‖, e the previous bound and s = ‖ΔŴ_new‖, Π the
new projection and ⟨ΔŴ, Π ΔŴ⟩ = s², ‖ΔW − ΔŴ_new‖² = N² − s² − 2⟨ΔW − ΔŴ, ΔŴ_new⟩
<= N² − s² + 2 e s; it is the tighter one when a merge drops most of what was left. So ``error``
is exact right after the merge that stored a task and an upper bound (the smaller of the two)
after every later one, without keeping any original factor. ``norm`` is ‖ΔW‖ when the task was
stored (``set_task`` stores new coefficients exactly: norm is theirs, error 0).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np

from share_jax.merge import mm, task_grams
from share_jax.subspace import SIDES, FidelityError, FidelityWarning, Layout, Subspace

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
def merge_record(kept: dict, res: dict, layout: Layout) -> tuple[jax.Array, ...]:
  """Per task (T,), from the Grams of what a merge kept and dropped ({group: (T, L, P, P)}):
  ‖ΔW − P_α ΔW P_β‖ (the merge's loss), ‖ΔW‖ before it and ‖P_α ΔW P_β‖ after it."""
  # The rotation is orthonormal, so the Gram before is the sum of two PSD parts: no cancelling.
  full = {g: kept[g] + res[g] for g in kept}
  total = 0.0
  for (ga, ra), (gb, rb) in _pairs(layout):
    fa, fb, qa, qb = full[ga][:, ra], full[gb][:, rb], res[ga][:, ra], res[gb][:, rb]
    total = total + _inner(qa, fb) + _inner(fa, qb) - _inner(qa, qb)
  root = lambda x: jnp.sqrt(jnp.maximum(x, 0.0))  # noqa: E731
  return root(total), root(_delta_norm2(full, layout)), root(_delta_norm2(kept, layout))


@functools.partial(jax.jit, static_argnames=("layout",))
def _stored_norms(coefs: dict, layout: Layout) -> jax.Array:
  return jnp.sqrt(jnp.maximum(_delta_norm2({g: grams(c) for g, c in coefs.items()}, layout), 0.0))


def next_bound(tasks, loss: jax.Array, stored: jax.Array) -> jax.Array:
  """The error bound (T,) after a merge that moved each stored ΔŴ by ``loss`` (exact) and left
  it with norm ``stored``: the smaller of the triangle inequality and the expansion above."""
  n, e = tasks.norm, tasks.error
  slack = 64 * float(jnp.finfo(jnp.float32).eps) * n**2  # float32 round-off of n² − s²
  expansion = jnp.sqrt(jnp.maximum(n**2 - stored**2 + 2.0 * e * stored + slack, 0.0))
  return jnp.minimum(e + loss, expansion)


def stored_norms(groups: dict, layout: Layout) -> jax.Array:
  """‖ΔW_stored‖_F per task row (T,), from the coefficients (the bases are orthonormal)."""
  return _stored_norms({g: grp.coef for g, grp in groups.items()}, layout)


def relative_errors(subspace: Subspace) -> np.ndarray:
  """Relative error bound of each held task, in row order (host array)."""
  n = subspace.num_tasks
  norm = np.asarray(subspace.tasks.norm[:n], np.float64)
  error = np.asarray(subspace.tasks.error[:n], np.float64)
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
