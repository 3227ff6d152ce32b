"""Public operations: init_subspace, absorb, project, reconstruct, task_params, apply_factors."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from share_jax.errors import ShareError
from share_jax.lora import LoRA, lora_leaves, nest, select_kernels
from share_jax.merge import Rule, merge_group, mm, project_group, side_factors
from share_jax.paths import Target, flatten_with_paths, join_path, leaf_shape
from share_jax.subspace import (
  SIDES,
  FactorGroup,
  KernelSpec,
  Layout,
  Subspace,
  SubspaceConfig,
)

LoRAs = Sequence[Any] | Mapping[Hashable, Any]
_MIN_K = 8


def bucket(n: int) -> int:
  """The smallest power of two >= n (>= 1): capacity sizes that rarely change."""
  return 1 << max(n - 1, 0).bit_length()


# ----------------------------------------------------------------------------- validation


def _as_tasks(loras: LoRAs, task_ids: Sequence[Hashable] | None) -> list[tuple[Hashable, dict]]:
  """``[(task id, {path: LoRA})]`` from a sequence or a mapping of LoRA trees."""
  if isinstance(loras, Mapping):
    if task_ids is not None:
      raise ShareError("give task ids either as the keys of a mapping or as task_ids, not both")
    task_ids, trees = list(loras.keys()), list(loras.values())
  else:
    trees = list(loras)
  if not trees:
    raise ShareError("no LoRAs given: need at least one LoRA tree")
  if task_ids is None:
    raise ShareError("task_ids are required")
  task_ids = list(task_ids)
  if len(task_ids) != len(trees):
    raise ShareError(f"{len(task_ids)} task ids for {len(trees)} LoRA trees")
  seen = set()
  for t in task_ids:
    if not isinstance(t, str | int) or isinstance(t, bool):
      raise ShareError(f"task id {t!r} must be a str or an int")
    if t in seen:
      raise ShareError(f"duplicate task id {t!r}")
    seen.add(t)
  out = []
  for t, tree in zip(task_ids, trees, strict=True):
    try:
      leaves = lora_leaves(tree)
    except ShareError as e:
      raise ShareError(f"task {t!r}: {e}") from None
    if not leaves:
      raise ShareError(f"task {t!r}: the LoRA tree adapts no kernel")
    out.append((t, leaves))
  return out


def _check_factors(task: Hashable, path: str, lora: LoRA, shape: tuple[int, int]) -> None:
  a, b = np.asarray(lora.a), np.asarray(lora.b)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise ShareError(
      f"task {task!r}, {path!r}: factors a {a.shape}, b {b.shape} are not (d_in, r), (r, d_out)"
    )
  if (a.shape[0], b.shape[1]) != tuple(shape):
    raise ShareError(
      f"task {task!r}, {path!r}: LoRA maps {a.shape[0]} -> {b.shape[1]} but the kernel is {shape}"
    )
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    raise ShareError(f"task {task!r}, {path!r}: LoRA factors contain NaN or Inf")


def _check_tasks(layout: Layout, tasks: list[tuple[Hashable, dict]]) -> None:
  want = set(layout.paths)
  for t, leaves in tasks:
    have = set(leaves)
    if have != want:
      extra, missing = sorted(have - want), sorted(want - have)
      raise ShareError(
        f"task {t!r} adapts a different set of kernels: unexpected {extra}, missing {missing}"
      )
    for path, lora in leaves.items():
      _check_factors(t, path, lora, layout.spec(path).shape)


def _layout_from_params(params: Any, tasks: list[tuple[Hashable, dict]]) -> Layout:
  kernels = flatten_with_paths(params)
  first_task, first = tasks[0]
  specs = []
  for path in sorted(first):
    if path not in kernels:
      raise ShareError(f"task {first_task!r}: LoRA at {path!r}, which the params do not have")
    w = kernels[path]
    if len(leaf_shape(w)) != 2:
      raise ShareError(f"{path!r} is not a 2-D kernel (shape {leaf_shape(w)})")
    specs.append(KernelSpec(path, tuple(int(s) for s in w.shape), str(jnp.dtype(w.dtype))))
  return Layout(tuple(specs))


def check_params(params: Any, layout: Layout) -> dict[str, Any]:
  """The adapted kernels of ``params``; an error names any path missing or of the wrong shape."""
  leaves = flatten_with_paths(params)
  for spec in layout.kernels:
    if spec.path not in leaves:
      raise ShareError(f"params have no kernel at {spec.path!r}")
    if leaf_shape(leaves[spec.path]) != spec.shape:
      raise ShareError(
        f"kernel {spec.path!r} has shape {leaf_shape(leaves[spec.path])}, not {spec.shape}"
      )
  return leaves


def check_new_task_ids(subspace: Subspace, task_ids: Sequence[Hashable]) -> None:
  """An error naming any id the subspace already holds."""
  for t in task_ids:
    if t in subspace.task_ids:
      raise ShareError(f"duplicate task id {t!r}: the subspace already holds it")


# ----------------------------------------------------------------------------- factor stacks


def factor_columns(lora: LoRA) -> dict[str, np.ndarray]:
  """Side ``a``: a (d_in, r); side ``b``: (b · scale)ᵀ (d_out, r), as float32 host arrays."""
  a = np.asarray(lora.a, np.float32)
  b = np.asarray(lora.b, np.float32) * np.float32(lora.scale)
  return {"a": a, "b": b.T}


def _stack(layout: Layout, tasks: list[dict], m_cap: int, p: int) -> dict[str, tuple]:
  """``{group: (x (m_cap, L, d, p), ncols (m_cap, L))}`` from the tasks' LoRA leaves."""
  out = {
    g: (np.zeros((m_cap, n, d, p), np.float32), np.zeros((m_cap, n), np.int32))
    for g, (d, n) in layout.groups.items()
  }
  for i, leaves in enumerate(tasks):
    for path, lora in leaves.items():
      for side, cols in factor_columns(lora).items():
        g, row = layout.slots[(path, side)]
        out[g][0][i, row, :, : cols.shape[1]] = cols
        out[g][1][i, row] = cols.shape[1]
  return out


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


# ----------------------------------------------------------------------------- merge


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
  columns = _stack(subspace.layout, leaves, len(leaves), r_max)
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
  tasks = _as_tasks(loras, task_ids)
  layout = _layout_from_params(params, tasks)
  _check_tasks(layout, tasks)
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
  tasks = _as_tasks(loras, task_ids)
  check_new_task_ids(subspace, [t for t, _ in tasks])
  _check_tasks(subspace.layout, tasks)
  config = subspace.config
  changes = {
    n: v
    for n, v in (("explained_variance", explained_variance), ("k", k), ("max_k", max_k))
    if v is not None
  }
  if changes:
    config = dataclasses.replace(config, **changes)
  return _merge(subspace, tasks, config)


# ----------------------------------------------------------------------------- apply


def project(subspace: Subspace, lora_tree: Any) -> dict[str, jax.Array]:
  """Coefficients of a LoRA tree in the current bases, ``{group: (L, K, r)}``; bases unchanged."""
  ((_, leaves),) = _as_tasks([lora_tree], ["<projected>"])
  _check_tasks(subspace.layout, [("<projected>", leaves)])
  r = max(lora.rank for lora in leaves.values())
  stacks = _stack(subspace.layout, [leaves], 1, r)
  return {
    g: project_group(grp.basis, jnp.asarray(stacks[g][0][0])) for g, grp in subspace.groups.items()
  }


def reconstruct(subspace: Subspace, task_id: Hashable) -> dict:
  """The task's LoRA tree (rank = its number of factor columns, alpha folded in), in the
  kernels' dtype."""
  i = subspace.task_index(task_id)
  out = {}
  for g, grp in subspace.groups.items():
    f = np.asarray(side_factors(grp.basis, grp.coef[i]))
    n = np.asarray(grp.ncols[i])
    for slot, (gg, row) in subspace.layout.slots.items():
      if gg == g:
        out.setdefault(slot[0], {})[slot[1]] = f[row, :, : n[row]]
  leaves = {}
  for spec in subspace.layout.kernels:
    sides = out[spec.path]
    dtype = jnp.dtype(spec.dtype)
    leaves[spec.path] = LoRA(jnp.asarray(sides["a"], dtype), jnp.asarray(sides["b"].T, dtype))
  return nest(leaves)


def apply_factors(params: Any, layout: Layout, factors: Mapping[str, jax.Array]) -> Any:
  """W + a bᵀ on every adapted kernel, from side factors ``{group: (L, d, p)}``; dtypes kept."""
  deltas = {}
  for spec in layout.kernels:
    (ga, ra), (gb, rb) = (layout.slots[(spec.path, s)] for s in SIDES)
    deltas[spec.path] = mm("ip,op->io", factors[ga][ra], factors[gb][rb])

  def add(path, w):
    delta = deltas.get(join_path(path))
    return w if delta is None else (w.astype(jnp.float32) + delta).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(add, params)


@functools.partial(jax.jit, static_argnames=("layout",))
def _task_params(params, groups, index, layout):
  factors = {g: side_factors(grp.basis, grp.coef[index]) for g, grp in groups.items()}
  return apply_factors(params, layout, factors)


def task_params(params: Any, subspace: Subspace, task_id: Hashable) -> Any:
  """``params`` with W + ΔW_task on the adapted kernels; other leaves untouched."""
  index = jnp.asarray(subspace.task_index(task_id), jnp.int32)
  check_params(params, subspace.layout)
  return _task_params(params, subspace.groups, index, subspace.layout)
