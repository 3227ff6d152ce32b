"""Building and growing a subspace from LoRAs: init_subspace, empty_subspace, absorb."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from share_jax._driver import bucket, merge_columns
from share_jax._factors import stack_factors
from share_jax._validation import (
  LoRAs,
  as_tasks,
  check_new_task_ids,
  check_tasks,
  layout_from_params,
)
from share_jax.lora import select_kernels, selects
from share_jax.paths import Target
from share_jax.subspace import FactorGroup, KernelSpec, Layout, Subspace, SubspaceConfig


def _empty_like(layout: Layout, config: SubspaceConfig, task_capacity: int = 1) -> Subspace:
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
  transposed: Target | None = None,
) -> Subspace:
  """A subspace with no task yet over the kernels ``target`` selects (a regex on the joined key
  path, or a predicate): the cold start, where the first task trains from its data directly.
  Convolution kernels adapt as (∏ window · c_in, c_out); ``transposed`` selects the kernels
  stored (d_out, d_in) (HF Flax GPT-2's Conv1D)."""
  config = SubspaceConfig(explained_variance, k, max_k, center)
  kernels = select_kernels(params, target)
  specs = tuple(KernelSpec.of(p, w, selects(transposed, p, w)) for p, w in sorted(kernels.items()))
  return _empty_like(Layout(specs), config, task_capacity)


def _empty_group(d: int, n: int, t_cap: int) -> FactorGroup:
  return FactorGroup(
    basis=jnp.zeros((n, d, 0), jnp.float32),
    rank=jnp.zeros((n,), jnp.int32),
    coef=jnp.zeros((t_cap, n, 0, 1), jnp.float32),
    ncols=jnp.zeros((t_cap, n), jnp.int32),
    scatter=jnp.zeros((n, 0, 0), jnp.float32),
    energy=jnp.ones((n,), jnp.float32),
  )


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
  return _merge(_empty_like(layout, config, task_capacity), tasks, config)


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
