"""The merge driver: plans capacities (power-of-two buckets of tasks, columns and k) and calls the
jitted per-group merge, growing k and merging again when the rule wants more columns."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from share_jax._profiling import call_kernel, phase
from share_jax.merge import Rule, merge_group
from share_jax.subspace import FactorGroup, Subspace, SubspaceConfig

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


@phase("merge")
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
    merged, want = call_kernel(merge_group, group, x, ncols, start, k_out=k_out, rule=rule)
    need = int(jnp.max(want))
    if need > k_out:
      k_out = min(rule.limit, bucket(need))
      merged, _ = call_kernel(merge_group, group, x, ncols, start, k_out=k_out, rule=rule)
    groups[g] = merged
  return subspace.with_tasks(groups, task_ids, config)
