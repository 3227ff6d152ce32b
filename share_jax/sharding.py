"""Sharding Share over a device mesh: merges split by layer, data-parallel training steps.

Every merge decomposes each (kernel, side) slot on its own, so splitting a group's stacked layer
axis L across devices lets each device merge its own layers with no communication: place the
subspace with ``shard_subspace`` and call ``share_jax.absorb`` (or ``train.finish_task``) as
usual. A training step splits the batch and all-reduces the gradients of the small trainable
state. The helpers work unchanged across processes after ``jax.distributed.initialize``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from share_jax.errors import ShareError
from share_jax.fidelity import settle
from share_jax.subspace import FRAMES, FactorGroup, Layout, Subspace
from share_jax.train import make_train_step


def make_mesh(
  axis_shapes: Sequence[int] | None = None,
  axis_names: Sequence[str] = ("data",),
  *,
  axis_types: Sequence[AxisType] | None = None,
) -> Mesh:
  """A mesh over the global devices (all on one axis by default) with its axis types stated.

  Auto unless given (``jax.make_mesh`` now defaults to Explicit): a merge receives its new
  columns unsharded and the compiler propagates the layer sharding to them, which Explicit axes
  reject. A data-parallel step works on either.
  """
  shapes = tuple(axis_shapes) if axis_shapes is not None else (jax.device_count(),)
  types = tuple(axis_types) if axis_types is not None else (AxisType.Auto,) * len(shapes)
  return jax.make_mesh(shapes, tuple(axis_names), axis_types=types)


def layer_specs(axis: str | None) -> FactorGroup:
  """Partition specs of a group with its layer axis L on mesh ``axis`` (None: replicated); no
  frame bases (``shard_subspace`` points them at the placed basis)."""
  layer = P(axis)
  return FactorGroup(layer, layer, layer, P(None, axis), layer, layer, layer, P(None), layer)


def shard_subspace(subspace: Subspace, mesh: Mesh, axis: str = "data") -> Subspace:
  """The subspace with each group's layer axis L split over mesh ``axis`` (an Auto axis).

  A group whose L the axis size does not divide is replicated (every device merges it whole).
  Merges of the result (``absorb``, ``train.finish_task``) run each device's layers there with
  no collective, and keep the sharding.
  """
  if mesh.axis_types[mesh.axis_names.index(axis)] != AxisType.Auto:
    raise ShareError(f"mesh axis {axis!r} must be Auto for sharded merges (see make_mesh)")
  subspace = settle(subspace)  # one frame: its basis is the basis, placed once
  groups = {}
  for g, grp in subspace.groups.items():
    specs = layer_specs(axis if grp.basis.shape[0] % mesh.shape[axis] == 0 else None)
    specs = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    placed = jax.device_put(grp.replace(frame_basis=None), specs)
    groups[g] = placed.replace(frame_basis=(placed.basis,) * FRAMES)
  return subspace.replace(groups=groups)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every array leaf of ``tree`` (the same value on every process) copied to all devices."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(local_batch: Any, mesh: Mesh, axis: str = "data") -> Any:
  """Global arrays split along their leading axis over mesh ``axis``, from each process's own
  slice of the batch (the whole batch on one process)."""
  sharding = NamedSharding(mesh, P(axis))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def data_parallel_step(
  loss_fn: Callable[[Any, Any, Any], jax.Array],
  optimizer: optax.GradientTransformation,
  layout: Layout,
  mesh: Mesh,
  axis: str = "data",
) -> Callable:
  """``train.make_train_step``'s step with the batch split over mesh ``axis`` and the trainable
  state, optimizer state, params and bases replicated; gradients are all-reduced, so it gives the
  one-device result. Same signature: ``(trainable, opt_state, params, bases, batch)``."""
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))
  return jax.jit(
    make_train_step(loss_fn, optimizer, layout),
    in_shardings=(rep, rep, rep, rep, data),
    out_shardings=(rep, rep, rep),
  )
