"""Building and growing a subspace from LoRAs: init_subspace, empty_subspace, absorb."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from share_jax._driver import bucket, merge_columns
from share_jax._factors import stack_factors
from share_jax._validation import (
  LoRAs,
  as_tasks,
  check_new_task_ids,
  check_tasks,
  kernel_spec,
  layout_from_params,
)
from share_jax.errors import ShareError
from share_jax.lora import select_kernels, selects
from share_jax.paths import Target
from share_jax.subspace import FactorGroup, Layout, Subspace, SubspaceConfig


def _empty_like(layout: Layout, config: SubspaceConfig, task_capacity: int = 1) -> Subspace:
  """A subspace with no task and empty bases (k = 0) over ``layout``."""
  groups = {g: _empty_group(d, n, bucket(task_capacity)) for g, (d, n) in layout.groups.items()}
  return Subspace.create(groups, layout, (), config)


def resolve_config(base: SubspaceConfig | None, **options) -> SubspaceConfig:
  """``base`` (default ``SubspaceConfig()``) with the keyword options that are not None; a k rule
  given as a keyword displaces the base's rule (``SubspaceConfig.with_options``)."""
  if base is not None and not isinstance(base, SubspaceConfig):
    raise ShareError(f"config must be a SubspaceConfig, got {type(base).__name__}")
  return (base or SubspaceConfig()).with_options(**options)


def empty_subspace(
  params: Any,
  target: Target,
  *,
  config: SubspaceConfig | None = None,
  task_capacity: int = 1,
  transposed: Target | None = None,
  **options,
) -> Subspace:
  """A subspace with no task yet over the kernels ``target`` selects (a regex on the joined key
  path, or a predicate): the cold start, where the first task trains from its data directly.

  ``config`` (a ``SubspaceConfig``) and/or its fields as keywords (``k``, ``explained_variance``,
  ``max_task_error``, ``max_k``, ``center``, ``strict``) set how k is chosen at each merge.
  Convolution kernels adapt as (∏ window · c_in, c_out); ``transposed`` selects the kernels
  stored (d_out, d_in) (HF Flax GPT-2's Conv1D).
  """
  config = resolve_config(config, **_options(options))
  kernels = select_kernels(params, target)
  specs = tuple(kernel_spec(p, w, selects(transposed, p, w)) for p, w in sorted(kernels.items()))
  return _empty_like(Layout(specs), config, task_capacity)


_FIELDS = frozenset(f.name for f in dataclasses.fields(SubspaceConfig))


def _options(options: dict) -> dict:
  unknown = sorted(options.keys() - _FIELDS)
  if unknown:
    raise ShareError(f"unknown options {unknown}; SubspaceConfig fields are {sorted(_FIELDS)}")
  return options


def _empty_group(d: int, n: int, t_cap: int) -> FactorGroup:
  return FactorGroup(
    basis=jnp.zeros((n, d, 0), jnp.float32),
    rank=jnp.zeros((n,), jnp.int32),
    coef=jnp.zeros((n, 0, t_cap, 1), jnp.float32),
    ncols=jnp.zeros((t_cap, n), jnp.int32),
    scatter=jnp.zeros((n, 0, 0), jnp.float32),
    energy=jnp.ones((n,), jnp.float32),
    lost=jnp.zeros((n,), jnp.float32),
  )


def _merge(
  subspace: Subspace,
  tasks: list[tuple[Hashable, dict]],
  config: SubspaceConfig,
  donate: bool,
) -> Subspace:
  leaves = [lv for _, lv in tasks]
  r_max = max(lora.rank for lv in leaves for lora in lv.values())
  columns = stack_factors(subspace.layout, leaves, len(leaves), r_max)
  return merge_columns(subspace, [t for t, _ in tasks], columns, config, donate)


def init_subspace(
  params: Any,
  loras: LoRAs,
  *,
  config: SubspaceConfig | None = None,
  task_ids: Sequence[Hashable] | None = None,
  task_capacity: int = 1,
  **options,
) -> Subspace:
  """A subspace from existing LoRAs: per kernel and side, the bases chosen from the stack of all
  factors (``share_jax.merge``), and every task projected onto them.

  Args:
    params: the frozen model's parameter pytree (it fixes paths, shapes and dtypes).
    loras: LoRA trees (a sequence, or a mapping task id → tree); ranks may differ.
    config: a ``SubspaceConfig``; its fields may also be given as keywords (``k``,
      ``explained_variance``, ``max_task_error``, ``max_k``, ``center``, ``strict``), which
      override it.
    task_ids: ids for a sequence of trees (default 0, 1, …).
    task_capacity: tasks to reserve room for; merges recompile only when the task count passes a
      power of two above it.
  """
  config = resolve_config(config, **_options(options))
  if task_ids is None and not isinstance(loras, Mapping):
    task_ids = list(range(len(loras)))
  tasks = as_tasks(loras, task_ids)
  layout = layout_from_params(params, tasks)
  check_tasks(layout, tasks)
  return _merge(_empty_like(layout, config, task_capacity), tasks, config, donate=False)


def absorb(
  subspace: Subspace,
  loras: LoRAs,
  *,
  task_ids: Sequence[Hashable] | None = None,
  config: SubspaceConfig | None = None,
  donate: bool = False,
  **options,
) -> Subspace:
  """Fold new LoRAs (one or a batch) into the shared bases: k is re-chosen and every existing
  task is re-projected (lazily, ``share_jax.frames``). ``config`` replaces the subspace's
  config; keyword options (fields of ``SubspaceConfig``) override single fields of it. Absorbing
  in pieces: with ``explained_variance`` set ``explained_of="absorbed"`` so earlier losses
  count; with a fixed k, absorb at a larger k and ``compress`` once all adapters are in.

  ``donate=True`` writes the new tasks into ``subspace``'s coefficient buffers instead of a copy
  of every stored task (as ``jax.jit``'s ``donate_argnums``): ``subspace`` must not be used
  afterwards (``sub = absorb(sub, lora, donate=True)``). Under a strict ``max_task_error``
  config it copies, so that a failed check leaves ``subspace`` whole."""
  config = resolve_config(config or subspace.config, **_options(options))
  tasks = as_tasks(loras, task_ids)
  check_new_task_ids(subspace, [t for t, _ in tasks])
  check_tasks(subspace.layout, tasks)
  return _merge(subspace, tasks, config, donate)


def compress(subspace: Subspace, *, config: SubspaceConfig | None = None, **options) -> Subspace:
  """Re-choose k from the stored tasks alone: a merge with no new adapter. Absorb at a generous
  k, then compress to the k you want once the adapters are in: the bases are then chosen from
  everything at once (as ``init_subspace`` would from the stored tasks), not from early batches.
  Every task is re-projected and its error bound grows by what it loses (measured on read).
  ``config`` and keyword options as in ``absorb``."""
  config = resolve_config(config or subspace.config, **_options(options))
  if not subspace.task_ids:
    raise ShareError("compress needs a subspace that holds at least one task")
  none = {
    g: (np.zeros((0, n, d, 1), np.float32), np.zeros((0, n), np.int32))
    for g, (d, n) in subspace.layout.groups.items()
  }
  return merge_columns(subspace, [], none, config)
