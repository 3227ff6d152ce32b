"""Building and growing a subspace: init_subspace, empty_subspace, absorb and the merge driver
that plans capacities (power-of-two buckets) and calls the jitted per-group merge."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from share_jax.factors import stack_factors
from share_jax.lora import select_kernels
from share_jax.merge import Rule, merge_group
from share_jax.paths import Target
from share_jax.subspace import FactorGroup, KernelSpec, Layout, Subspace, SubspaceConfig
from share_jax.validation import (
  LoRAs,
  as_tasks,
  check_new_task_ids,
  check_tasks,
  layout_from_params,
)

_MIN_K = 8


def bucket(n: int) -> int:
  """The smallest power of two >= n (>= 1): capacity sizes that rarely change."""
  return 1 << max(n - 1, 0).bit_length()


def _grow(group: FactorGroup, t_cap: int, p_cap: int) -> FactorGroup:
  """Zero-pad the task and column capacities of a group."""
  t, _, _, p = group.coef.shape
  if (t, p) == (t_cap, p_cap):
    return group
  coef = jnp.pad(group.coef, ((0, t_cap - t), (0, 0), (0, 0), (0, p_cap - p)))
  return group.replace(coef=coef, ncols=jnp.pad(group.ncols, ((0, t_cap - t), (0, 0))))


def empty_like(layout: Layout, config: SubspaceConfig, task_capacity: int = 1) -> Subspace:
  """A subspace with no task and empty bases (k = 0) over ``layout``."""
  groups = {g: _empty_group(d, n, bucket(task_capacity)) for g, (d, n) in layout.groups.items()}
  return Subspace.create(groups, layout, (), config)


def empty_subspace(
  params: Any,
  target: Target,
  *,
  k: int | None = None,
  explained_variance: float = 0.6,
  max_k: int | None = None,
  center: bool = True,
  task_capacity: int = 1,
) -> Subspace:
  """A subspace with no task yet over the kernels ``target`` selects (a regex on the joined key
  path, or a predicate): the cold start, where the first task trains from its data directly."""
  config = SubspaceConfig(explained_variance, k, max_k, center)
  kernels = select_kernels(params, target)
  specs = tuple(
    KernelSpec(p, tuple(int(s) for s in w.shape), str(jnp.dtype(w.dtype)))
    for p, w in sorted(kernels.items())
  )
  return empty_like(Layout(specs), config, task_capacity)


def _empty_group(d: int, n: int, t_cap: int) -> FactorGroup:
  return FactorGroup(
    basis=jnp.zeros((n, d, 0), jnp.float32),
    rank=jnp.zeros((n,), jnp.int32),
    coef=jnp.zeros((t_cap, n, 0, 1), jnp.float32),
    ncols=jnp.zeros((t_cap, n), jnp.int32),
    scatter=jnp.zeros((n, 0, 0), jnp.float32),
    energy=jnp.ones((n,), jnp.float32),
  )


def merge_columns(
  subspace: Subspace,
  task_ids: Sequence[Hashable],
  columns: Mapping[str, tuple[Any, Any]],
  config: SubspaceConfig | None = None,
) -> Subspace:
  """Fold new tasks, given as factor columns ``{group: (x (m, L, d, p), ncols (m, L))}``, into the
  bases; every stored task is re-projected. Callers validate ids and shapes."""
  config = config or subspace.config
  t0, m = subspace.num_tasks, len(task_ids)
  m_cap = bucket(m)
  _, t_cur, p_cur = next(iter(subspace.groups.values())).capacity
  p_new = max(x.shape[-1] for x, _ in columns.values())
  t_cap, p_cap = max(t_cur, bucket(t0 + m_cap)), max(p_cur, bucket(p_new))
  start = jnp.asarray(t0, jnp.int32)
  groups = {}
  for g, group in subspace.groups.items():
    d, _ = subspace.layout.groups[g]
    rule = Rule(float(config.explained_variance), config.k, config.limit(d), config.center)
    group = _grow(group, t_cap, p_cap)
    x, ncols = columns[g]
    x = jnp.pad(
      jnp.asarray(x, jnp.float32), ((0, m_cap - m), (0, 0), (0, 0), (0, p_cap - x.shape[-1]))
    )
    ncols = jnp.pad(jnp.asarray(ncols, jnp.int32), ((0, m_cap - m), (0, 0)))
    k_out = rule.limit if config.k is not None else max(group.capacity[0], min(rule.limit, _MIN_K))
    merged, want = merge_group(group, x, ncols, start, k_out=k_out, rule=rule)
    need = int(jnp.max(want))
    if need > k_out:
      k_out = min(rule.limit, bucket(need))
      merged, _ = merge_group(group, x, ncols, start, k_out=k_out, rule=rule)
    groups[g] = merged
  return subspace.with_tasks(groups, task_ids, config)


def _merge(
  subspace: Subspace, tasks: list[tuple[Hashable, dict]], config: SubspaceConfig
) -> Subspace:
  leaves = [lv for _, lv in tasks]
  r_max = max(lora.rank for lv in leaves for lora in lv.values())
  columns = stack_factors(subspace.layout, leaves, len(leaves), r_max)
  return merge_columns(subspace, [t for t, _ in tasks], columns, config)


def init_subspace(
  params: Any,
  loras: LoRAs,
  *,
  k: int | None = None,
  explained_variance: float = 0.6,
  max_k: int | None = None,
  center: bool = True,
  task_ids: Sequence[Hashable] | None = None,
  task_capacity: int = 1,
) -> Subspace:
  """A subspace from existing LoRAs: per kernel and side, the top singular vectors of the
  (mean-centred) stack of all factors, and every task projected onto them.

  Args:
    params: the frozen model's parameter pytree (it fixes paths, shapes and dtypes).
    loras: LoRA trees (a sequence, or a mapping task id → tree); ranks may differ.
    k: keep exactly k columns per side (capped by ``max_k`` and d); else ``explained_variance``.
    task_ids: ids for a sequence of trees (default 0, 1, …).
    task_capacity: tasks to reserve room for; merges recompile only when the task count passes a
      power of two above it.
  """
  config = SubspaceConfig(explained_variance, k, max_k, center)
  if task_ids is None and not isinstance(loras, Mapping):
    task_ids = list(range(len(loras)))
  tasks = as_tasks(loras, task_ids)
  layout = layout_from_params(params, tasks)
  check_tasks(layout, tasks)
  return _merge(empty_like(layout, config, task_capacity), tasks, config)


def absorb(
  subspace: Subspace,
  loras: LoRAs,
  *,
  task_ids: Sequence[Hashable] | None = None,
  explained_variance: float | None = None,
  k: int | None = None,
  max_k: int | None = None,
) -> Subspace:
  """Fold new LoRAs (one or a batch) into the shared bases: k is re-chosen and every existing
  task is re-projected. Options left ``None`` keep the subspace's config."""
  tasks = as_tasks(loras, task_ids)
  check_new_task_ids(subspace, [t for t, _ in tasks])
  check_tasks(subspace.layout, tasks)
  config = subspace.config
  changes = {
    n: v
    for n, v in (("explained_variance", explained_variance), ("k", k), ("max_k", max_k))
    if v is not None
  }
  if changes:
    config = dataclasses.replace(config, **changes)
  return _merge(subspace, tasks, config)
