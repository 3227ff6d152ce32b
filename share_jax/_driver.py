"""The merge driver: plans capacities (power-of-two buckets of tasks, columns and k), calls the
jitted per-group merge (growing k and merging again when the rule wants more columns) and keeps
each task's fidelity record (``share_jax.fidelity``)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from share_jax import fidelity
from share_jax._profiling import call_kernel, phase
from share_jax.frames import fold_from, fold_group, next_frame
from share_jax.merge import Rule, merge_group, write_rows
from share_jax.subspace import (
  FRAMES,
  FactorGroup,
  Subspace,
  SubspaceConfig,
  TaskTable,
  id_code,
  pad_to,
)

_MIN_K = 8
_MIN_FOLD = 64  # rows a fold reads at least (capacity permitting): few window sizes to compile


def bucket(n: int) -> int:
  """The smallest power of two >= n (>= 1): capacity sizes that rarely change."""
  return 1 << max(n - 1, 0).bit_length()


def batch_rows(m: int) -> int:
  """Rows for a batch of m new tasks: a power of two up to 16, then the next multiple of 8. Every
  padded row widens the merge's small space, whose SVD costs its cube (a batch of 50 padded to
  56 instead of 64 merges 20–25 % faster); big batches come in few sizes, so few compiles."""
  return bucket(m) if m <= 16 else -(-m // 8) * 8


def _grow(group: FactorGroup, t_cap: int, p_cap: int) -> FactorGroup:
  """Zero-pad the task and column capacities of a group."""
  _, _, t, p = group.coef.shape
  if (t, p) == (t_cap, p_cap):
    return group
  coef = jnp.pad(group.coef, ((0, 0), (0, 0), (0, t_cap - t), (0, p_cap - p)))
  return group.replace(
    coef=coef,
    ncols=jnp.pad(group.ncols, ((0, t_cap - t), (0, 0))),
    frame=jnp.pad(group.frame, (0, t_cap - t)),
  )


def _open_frame(merged: FactorGroup, bases: tuple, frame: int) -> FactorGroup:
  """The merged group with the frame bases it had before (``bases``, references: a merge copies
  none) and its new basis as frame ``frame``'s, all padded to the frame coordinates' width Kc
  when the merge widened them."""
  kc = merged.coef.shape[1]
  bases = [pad_to(b, (2,), kc) for b in bases]
  bases[frame] = pad_to(merged.basis, (2,), kc)
  return merged.replace(frame_basis=tuple(bases))


def _fold(groups: dict, tasks: TaskTable, layout, held: np.ndarray, first: int, donate: bool):
  """Frames >= ``first`` folded into one (``frames.fold_from``; ``held`` the held rows' frames,
  host side): their rows are re-expressed in current coordinates and their drift added to their
  error; the other rows are not read. ``donate``: the rows are written into the groups'
  coefficient buffers. Returns (groups, error)."""
  rows = held.size
  lo = int(np.searchsorted(held, first))  # frames are non-decreasing over rows
  size = min(tasks.error.shape[0], max(bucket(rows - lo), _MIN_FOLD))
  args = (tasks.error, jnp.asarray(rows), jnp.asarray(lo), jnp.asarray(first))
  blocks, start, error = fidelity.fold_blocks(groups, *args, layout, size=size)
  out = {}
  for g, grp in groups.items():
    coef = write_rows(grp.coef, blocks[g], start, donate)
    out[g] = fold_group(grp, coef, rows, first)
  return out, error


def _budget(tasks: TaskTable, norm2: jnp.ndarray, config: SubspaceConfig) -> jnp.ndarray:
  """Each task's squared error budget for this merge, relative to its current ‖ΔW‖² (T,), under
  the ``max_task_error`` rule."""
  _, tau = config.rule
  room = jnp.maximum(tau * tasks.norm - tasks.error, 0.0)
  return jnp.where(norm2 > 0, room**2 / jnp.where(norm2 > 0, norm2, 1.0), 0.0)


@phase("merge")
def merge_columns(
  subspace: Subspace,
  task_ids: Sequence[Hashable],
  columns: Mapping[str, tuple[Any, Any]],
  config: SubspaceConfig | None = None,
  donate: bool = False,
) -> Subspace:
  """Fold new tasks, given as factor columns ``{group: (x (m, L, d, p), ncols (m, L))}``, into the
  bases; the new tasks open a frame, and when the frame slots run out the young frames are
  folded into one, or every task settled (``share_jax.frames``). Callers validate ids and
  shapes. ``donate``: the new rows are written into ``subspace``'s coefficient buffers
  (``merge.write_rows``), which are then gone; not under a strict ``max_task_error``, whose
  check may raise after the write."""
  config = config or subspace.config
  layout = subspace.layout
  t0, m = subspace.num_tasks, len(task_ids)
  m_cap = batch_rows(m)
  _, t_cur, p_cur = next(iter(subspace.groups.values())).capacity
  p_new = max(x.shape[-1] for x, _ in columns.values())
  t_cap, p_cap = max(t_cur, bucket(t0 + m_cap)), max(p_cur, bucket(p_new))
  start = jnp.asarray(t0, jnp.int32)
  grown, new = {}, {}
  for g, group in subspace.groups.items():
    grown[g] = _grow(group, t_cap, p_cap)
    x, ncols = columns[g]
    x = jnp.pad(
      jnp.asarray(x, jnp.float32), ((0, m_cap - m), (0, 0), (0, 0), (0, p_cap - x.shape[-1]))
    )
    new[g] = (x, jnp.pad(jnp.asarray(ncols, jnp.int32), ((0, m_cap - m), (0, 0))))
  tasks = subspace.tasks.grow(t_cap)
  tasks = tasks.replace(
    code=tasks.code.at[t0 : t0 + m].set(np.asarray([id_code(t) for t in task_ids], np.int32))
  )
  kind, value = config.rule
  in_place = donate and not (config.strict and config.max_task_error is not None)
  own = in_place or (t_cap, p_cap) != (t_cur, p_cur)  # the coefficient buffers are ours to reuse
  held = np.asarray(next(iter(grown.values())).frame)[:t0]  # every group has the same frames
  frame = next_frame(held)
  first = fold_from(held) if frame >= FRAMES else None
  if t0 and (kind == "max_task_error" or first == 0):
    settled, error = fidelity.settle_groups(grown, tasks, layout, t0)
    own = own or any(settled[g].coef is not grown[g].coef for g in grown)  # not relabelled
    grown, tasks, frame = settled, tasks.replace(error=error), 1  # all held tasks in frame 0
  elif first:  # the frame slots are full: fold the young frames into one
    grown, error = _fold(grown, tasks, layout, held, first, own)
    tasks, frame, own = tasks.replace(error=error), first + 1, True
  partner, beta = {g: None for g in grown}, None
  if kind == "max_task_error":  # the only rule that reads every task's Grams before merging
    partner, norm2 = fidelity.before_merge(
      {g: grp.coef for g, grp in grown.items()}, {g: x for g, (x, _) in new.items()}, start, layout
    )
    is_new = (np.arange(t_cap) >= t0) & (np.arange(t_cap) < t0 + m)
    fresh = tasks.replace(
      norm=jnp.where(is_new, jnp.sqrt(norm2), tasks.norm),
      error=jnp.where(is_new, 0.0, tasks.error),
    )
    beta = _budget(fresh, norm2, config)
  groups, res, kept = {}, {}, {}
  absorbed = config.explained_of == "absorbed"
  for g, group in grown.items():
    d, _ = layout.groups[g]
    rule = Rule(kind, float(value), config.limit(d), config.center, absorbed)
    x, ncols = new[g]
    k_out = rule.limit if kind == "k" else max(group.capacity[0], min(rule.limit, _MIN_K))
    # The merge does not read the frame bases: they stay out of the call (no copy of them).
    args = (group.replace(frame_basis=None), x, ncols, start, jnp.asarray(frame, jnp.int32))
    args += (partner[g], beta)
    merged, rows, want, res[g], kept[g] = call_kernel(merge_group, *args, k_out=k_out, rule=rule)
    need = int(jnp.max(want))
    if need > k_out:
      k_out = min(rule.limit, bucket(need))
      merged, rows, _, res[g], kept[g] = call_kernel(merge_group, *args, k_out=k_out, rule=rule)
    merged = merged.replace(coef=write_rows(group.coef, rows, start, own))
    groups[g] = _open_frame(merged, group.frame_basis, frame)
  loss, before = fidelity.merge_record(kept, res, layout)
  tasks = tasks.replace(
    norm=jax.lax.dynamic_update_slice_in_dim(tasks.norm, before[:m], t0, 0),
    error=jax.lax.dynamic_update_slice_in_dim(tasks.error, loss[:m], t0, 0),
  )
  out = subspace.replace(groups=groups, tasks=tasks, config=config)
  fidelity.check_threshold(out)
  return out
