"""The ``Subspace`` state: shared bases, per-task coefficients and the task registry.

Every adapted kernel W (d_in, d_out) has two *sides*: ``a`` (columns in R^{d_in}, basis α) and
``b`` (columns in R^{d_out}, basis β). Sides of equal dimension d, across all kernels, are stacked
into one ``FactorGroup`` so that one vmapped decomposition serves them all.
Shapes are capacity buffers:

- ``basis``: (L, d, K) orthonormal columns, the first ``rank[l]`` active, the rest zero;
- ``coef``:  (T, L, K, P) coefficients of every task (rows beyond ``rank``, columns beyond
  ``ncols`` and tasks beyond the registry are zero);
- ``ncols``: (T, L) the number of factor columns (the LoRA rank or pseudo-rank p) of each task;
- ``scatter``: (L, K, K) a factor S with S Sᵀ = the scatter of all stored coefficient columns
  (about their mean when the config centres), so a merge never re-decomposes the task stack;
- ``energy``: (L,) the fraction of (centred) energy the bases kept at the last decomposition.

K, T and P grow in power-of-two buckets, so adding the 2nd or the 200th task reuses compiled code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable
from typing import Any

import flax.struct
import jax
import numpy as np

from share_jax.errors import ShareError, UnknownTaskError

SIDES = ("a", "b")


def matrix_shape(kernel_shape: tuple[int, ...], transposed: bool = False) -> tuple[int, int]:
  """(d_in, d_out) of the matrix a kernel adapts as: an (in, out) kernel as it is; an (out, in)
  one (``transposed``, e.g. GPT-2's Conv1D in HF Flax) transposed; a convolution kernel
  (*window, c_in, c_out) as (∏ window · c_in, c_out), as PEFT's Conv LoRA does."""
  shape = tuple(int(s) for s in kernel_shape)
  if len(shape) < 2 or (transposed and len(shape) != 2):
    kind = "a 2-D (out, in)" if transposed else "a 2-D or convolution"
    raise ShareError(f"a kernel of shape {shape} is not {kind} kernel")
  if transposed:
    return shape[1], shape[0]
  return int(np.prod(shape[:-1])), shape[-1]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """An adapted kernel: its joined key path, the (d_in, d_out) matrix it adapts as, its dtype,
  and how it is stored: ``kernel_shape`` (None: ``shape``, or its reverse when ``transposed``)
  and ``transposed`` (stored (d_out, d_in)); ΔW is reshaped or transposed to it when added."""

  path: str
  shape: tuple[int, int]
  dtype: str
  kernel_shape: tuple[int, ...] | None = None
  transposed: bool = False

  @classmethod
  def of(cls, path: str, kernel: Any, transposed: bool = False) -> KernelSpec:
    """The spec of ``kernel`` (an array or ``ShapeDtypeStruct``) at ``path``."""
    stored = tuple(int(s) for s in kernel.shape)
    shape = matrix_shape(stored, transposed)
    conv = None if len(stored) == 2 else stored
    return cls(path, shape, str(np.dtype(kernel.dtype)), conv, bool(transposed))

  @property
  def stored_shape(self) -> tuple[int, ...]:
    """The kernel's own shape in the parameter tree."""
    if self.kernel_shape is not None:
      return tuple(self.kernel_shape)
    return tuple(self.shape[::-1]) if self.transposed else tuple(self.shape)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which (kernel, side) lives at which row of which group; static and hashable."""

  kernels: tuple[KernelSpec, ...]

  @functools.cached_property
  def slots(self) -> dict[tuple[str, str], tuple[str, int]]:
    """``{(path, side): (group, row)}``."""
    counts: dict[str, int] = {}
    out = {}
    for spec in self.kernels:
      for side, d in zip(SIDES, spec.shape, strict=True):
        g = group_name(d)
        out[(spec.path, side)] = (g, counts.get(g, 0))
        counts[g] = counts.get(g, 0) + 1
    return out

  @functools.cached_property
  def groups(self) -> dict[str, tuple[int, int]]:
    """``{group: (d, L)}``."""
    sizes: dict[str, int] = {}
    for g, _ in self.slots.values():
      sizes[g] = sizes.get(g, 0) + 1
    return {g: (int(g[1:]), n) for g, n in sorted(sizes.items())}

  @functools.cached_property
  def paths(self) -> tuple[str, ...]:
    return tuple(s.path for s in self.kernels)

  def spec(self, path: str) -> KernelSpec:
    return self.kernels[self.paths.index(path)]


def group_name(d: int) -> str:
  return f"d{d}"


@dataclasses.dataclass(frozen=True)
class SubspaceConfig:
  """How k is chosen: exactly ``k``, or the smallest k reaching ``explained_variance``; <= max_k."""

  explained_variance: float = 0.6
  k: int | None = None
  max_k: int | None = None
  center: bool = True

  def __post_init__(self):
    ev = self.explained_variance
    if not (isinstance(ev, int | float) and 0.0 < ev <= 1.0):
      raise ShareError(f"explained_variance must be in (0, 1], got {ev!r}")
    for name in ("k", "max_k"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int | np.integer) or v < 1):
        raise ShareError(f"{name} must be an integer >= 1, got {v!r}")

  def limit(self, d: int) -> int:
    """The largest k a side of dimension d may have."""
    cap = d if self.k is None else min(self.k, d)
    return cap if self.max_k is None else min(cap, self.max_k)


@flax.struct.dataclass
class FactorGroup:
  basis: jax.Array  # (L, d, K)
  rank: jax.Array  # (L,) int32
  coef: jax.Array  # (T, L, K, P)
  ncols: jax.Array  # (T, L) int32
  scatter: jax.Array  # (L, K, K)
  energy: jax.Array  # (L,)

  @property
  def capacity(self) -> tuple[int, int, int]:
    """(K, T, P)."""
    t, _, k, p = self.coef.shape
    return k, t, p


@flax.struct.dataclass
class Subspace:
  """Immutable Share state. ``groups`` and ``task_heads`` are pytree children; the rest is static.

  ``task_heads`` has one entry per task (None: no head), aligned with ``task_ids`` so that ids of
  mixed types (int and str) never have to be sorted as dict keys.
  """

  groups: dict[str, FactorGroup]
  task_heads: tuple[Any, ...]
  layout: Layout = flax.struct.field(pytree_node=False)
  task_ids: tuple[Hashable, ...] = flax.struct.field(pytree_node=False)
  config: SubspaceConfig = flax.struct.field(pytree_node=False)

  @classmethod
  def create(
    cls,
    groups: dict[str, FactorGroup],
    layout: Layout,
    task_ids: tuple[Hashable, ...],
    config: SubspaceConfig,
    heads: dict[Hashable, Any] | None = None,
  ) -> Subspace:
    heads = heads or {}
    unknown = [t for t in heads if t not in task_ids]
    if unknown:
      raise UnknownTaskError(f"heads for unknown task ids {unknown}")
    return cls(groups, tuple(heads.get(t) for t in task_ids), layout, tuple(task_ids), config)

  @property
  def num_tasks(self) -> int:
    return len(self.task_ids)

  @property
  def heads(self) -> dict[Hashable, Any]:
    """``{task id: head}`` of the tasks that have one."""
    return {t: h for t, h in zip(self.task_ids, self.task_heads, strict=True) if h is not None}

  @property
  def bases(self) -> dict[str, jax.Array]:
    """The shared bases, {group: (L, d, K)}."""
    return {g: grp.basis for g, grp in self.groups.items()}

  def task_index(self, task_id: Hashable) -> int:
    try:
      return self.task_ids.index(task_id)
    except ValueError:
      raise UnknownTaskError(
        f"unknown task id {task_id!r}; the subspace holds {list(self.task_ids)}"
      ) from None

  def coefs(self, task_id: Hashable) -> dict[str, jax.Array]:
    """One task's coefficients, ``{group: (L, K, P)}``."""
    i = self.task_index(task_id)
    return {g: grp.coef[i] for g, grp in self.groups.items()}

  def ranks(self) -> dict[tuple[str, str], int]:
    """Active k per (kernel path, side)."""
    host = {g: np.asarray(grp.rank) for g, grp in self.groups.items()}
    return {slot: int(host[g][row]) for slot, (g, row) in self.layout.slots.items()}

  def with_head(self, task_id: Hashable, head: Any) -> Subspace:
    """A copy that stores ``head`` (any pytree, e.g. a classifier's params) for a known task."""
    i = self.task_index(task_id)
    return self.replace(task_heads=self.task_heads[:i] + (head,) + self.task_heads[i + 1 :])

  def with_tasks(
    self, groups: dict[str, FactorGroup], task_ids, config: SubspaceConfig
  ) -> Subspace:
    """A copy with new groups holding ``task_ids`` appended (no heads yet) and ``config``."""
    return self.replace(
      groups=groups,
      task_ids=self.task_ids + tuple(task_ids),
      task_heads=self.task_heads + (None,) * len(task_ids),
      config=config,
    )
