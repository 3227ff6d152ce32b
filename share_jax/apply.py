"""Reading tasks back: project, reconstruct, task_params (W + ΔW) and apply_factors."""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from share_jax._factors import stack_factors
from share_jax._validation import as_tasks, check_params, check_tasks
from share_jax.lora import LoRA, add_deltas
from share_jax.merge import mm, project_group, side_factors
from share_jax.paths import nest
from share_jax.subspace import SIDES, Layout, Subspace


def project(subspace: Subspace, lora_tree: Any) -> dict[str, jax.Array]:
  """Coefficients of a LoRA tree in the current bases, ``{group: (L, K, r)}``; bases unchanged."""
  ((_, leaves),) = as_tasks([lora_tree], ["<projected>"])
  check_tasks(subspace.layout, [("<projected>", leaves)])
  r = max(lora.rank for lora in leaves.values())
  stacks = stack_factors(subspace.layout, [leaves], 1, r)
  return {
    g: project_group(grp.basis, jnp.asarray(stacks[g][0][0])) for g, grp in subspace.groups.items()
  }


def reconstruct(subspace: Subspace, task_id: Hashable) -> dict:
  """The task's LoRA tree (rank = its number of factor columns, alpha folded in), in the
  kernels' dtype."""
  i = subspace.task_index(task_id)
  out = {}
  for g, grp in subspace.groups.items():
    f = np.asarray(_task_factors(grp, jnp.asarray(i, jnp.int32)))
    n = np.asarray(grp.ncols[i])
    for slot, (gg, row) in subspace.layout.slots.items():
      if gg == g:
        out.setdefault(slot[0], {})[slot[1]] = f[row, :, : n[row]]
  leaves = {}
  for spec in subspace.layout.kernels:
    sides = out[spec.path]
    dtype = jnp.dtype(spec.dtype)
    a, b = jnp.asarray(sides["a"], dtype), jnp.asarray(sides["b"].T, dtype)
    leaves[spec.path] = LoRA(a, b, transposed=spec.transposed)
  return nest(leaves)


def apply_factors(params: Any, layout: Layout, factors: Mapping[str, jax.Array]) -> Any:
  """W + a bᵀ on every adapted kernel (reshaped or transposed to it), from side factors
  ``{group: (L, d, p)}``; dtypes kept."""
  deltas = {}
  for spec in layout.kernels:
    (ga, ra), (gb, rb) = (layout.slots[(spec.path, s)] for s in SIDES)
    deltas[spec.path] = mm("ip,op->io", factors[ga][ra], factors[gb][rb])

  return add_deltas(params, deltas, {s.path for s in layout.kernels if s.transposed})


@jax.jit
def _task_factors(group, index):
  """One task's side factors (L, d, P) in a group."""
  return side_factors(group.basis, group.task(index))


@functools.partial(jax.jit, static_argnames=("layout",))
def _task_params(params, groups, index, layout):
  factors = {g: _task_factors(grp, index) for g, grp in groups.items()}
  return apply_factors(params, layout, factors)


def task_params(params: Any, subspace: Subspace, task_id: Hashable) -> Any:
  """``params`` with W + ΔW_task on the adapted kernels; other leaves untouched."""
  index = jnp.asarray(subspace.task_index(task_id), jnp.int32)
  check_params(params, subspace.layout)
  return _task_params(params, subspace.groups, index, subspace.layout)
