"""The ``Subspace`` state: shared bases, per-task coefficients and the task registry.

Every adapted kernel W (d_in, d_out) has two *sides*: ``a`` (columns in R^{d_in}, basis α) and
``b`` (columns in R^{d_out}, basis β). Sides of equal dimension d, across all kernels, are stacked
into one ``FactorGroup`` so that one vmapped decomposition serves them all.
Shapes are capacity buffers:

- ``basis``: (L, d, K) orthonormal columns, the first ``rank[l]`` active, the rest zero;
- ``coef``:  (L, Kc, T, P) coefficients of every task in its frame's coordinates (``FactorGroup``:
  a merge composes small per-frame maps instead of re-projecting every task; rows beyond
  ``rank``, columns beyond ``ncols`` and tasks beyond the registry are zero);
- ``ncols``: (T, L) the number of factor columns (the LoRA rank or pseudo-rank p) of each task;
- ``scatter``: (L, K, K) a factor S with S Sᵀ = the scatter of all stored coefficient columns
  (about their mean when the config centres), so a merge never re-decomposes the task stack;
- ``energy``: (L,) the fraction of the stored columns' energy (uncentred: what reconstruction
  sees) that the bases kept at the last merge;
- ``lost``: (L,) the energy, in the scatter's measure, that every merge so far dropped, so that
  ‖S‖² + lost is the scatter of all columns as they were absorbed (``fidelity.explained``).

Per task, a ``TaskTable`` holds the interned id, ‖ΔW‖_F of the adapter the task came from and an
upper bound of the error ‖ΔW − ΔW_stored‖_F when its frame began (``share_jax.fidelity`` adds
what later merges moved on read).

K, T and P grow in power-of-two buckets, so adding the 2nd or the 200th task reuses compiled code.
Nothing that changes per task lives in the pytree's static data: ids are arrays (interned codes),
so a user's ``jax.jit(f)(subspace)`` compiles once while tasks are added within capacity. Only a
task's head (a pytree of its own structure) adds leaves, hence a new treedef, when first stored.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import threading
from collections.abc import Hashable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from share_jax.errors import ShareError, UnknownTaskError
from share_jax.paths import join_path

SIDES = ("a", "b")
EXPLAINED_OF = ("stack", "absorbed")


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
  def of(cls, path: str, stored: tuple[int, ...], dtype: str, transposed: bool = False):
    """The spec of a kernel of shape ``stored`` at ``path``."""
    stored = tuple(int(s) for s in stored)
    conv = None if len(stored) == 2 else stored
    return cls(path, matrix_shape(stored, transposed), dtype, conv, bool(transposed))

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


def check_finite(tree: Any, what: str) -> None:
  """An error naming the first floating-point leaf of ``tree`` holding NaN or Inf."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    inexact = hasattr(x, "dtype") and np.issubdtype(x.dtype, np.inexact)
    if inexact and not bool(jnp.isfinite(x).all()):
      raise ShareError(f"{what} at {join_path(path)!r} contains NaN or Inf")


def group_name(d: int) -> str:
  return f"d{d}"


@dataclasses.dataclass(frozen=True)
class SubspaceConfig:
  """How k is chosen per kernel side, always capped at ``max_k`` and d.

  The rule is the first one set of: exactly ``k`` columns; the smallest k whose bases explain
  ``explained_variance`` of the stack's (centred, when ``center``) variance; the smallest k that
  keeps every stored task's relative ΔW error <= ``max_task_error``; else explained variance 0.6.
  When ``max_task_error`` is set but is not the rule (a fixed k or explained variance, or a k
  capped by ``max_k``), it is a threshold: a merge that leaves a task above it warns
  (``FidelityWarning``), or raises ``FidelityError`` when ``strict``, naming the tasks.
  ``center``: choose the bases from the mean-centred stack (the paper) plus the mean direction.
  ``explained_of``: what ``explained_variance`` is a fraction of: ``"stack"``, the stack a merge
  sees, whose old tasks are already projected (the paper; absorbing one task at a time then lets
  k shrink merge after merge), or ``"absorbed"``, every column as it was absorbed (what earlier
  merges dropped counts as lost, so the bases keep that fraction of all absorbed variance
  whatever the order and batch size, as far as ``max_k`` allows).
  """

  explained_variance: float | None = None
  k: int | None = None
  max_k: int | None = None
  center: bool = True
  max_task_error: float | None = None
  strict: bool = False
  explained_of: str = "stack"

  def __post_init__(self):
    ev = self.explained_variance
    if ev is not None and not (isinstance(ev, int | float) and 0.0 < ev <= 1.0):
      raise ShareError(f"explained_variance must be in (0, 1], got {ev!r}")
    for name in ("k", "max_k"):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1):
        raise ShareError(f"{name} must be an integer >= 1, got {v!r}")
    tau = self.max_task_error
    if tau is not None and (
      isinstance(tau, bool) or not isinstance(tau, int | float) or not 0.0 <= tau < math.inf
    ):
      raise ShareError(f"max_task_error must be a finite number >= 0, got {tau!r}")
    for name in ("center", "strict"):
      if not isinstance(getattr(self, name), bool | np.bool_):
        raise ShareError(f"{name} must be True or False, got {getattr(self, name)!r}")
    if self.explained_of not in EXPLAINED_OF:
      raise ShareError(f"explained_of must be one of {EXPLAINED_OF}, got {self.explained_of!r}")

  @property
  def rule(self) -> tuple[str, float | int]:
    """The k rule in force: ``("k", k)``, ``("explained_variance", ev)`` or
    ``("max_task_error", τ)``."""
    if self.k is not None:
      return "k", self.k
    if self.explained_variance is not None:
      return "explained_variance", self.explained_variance
    if self.max_task_error is not None:
      return "max_task_error", self.max_task_error
    return "explained_variance", 0.6

  def limit(self, d: int) -> int:
    """The largest k a side of dimension d may have."""
    cap = d if self.k is None else min(self.k, d)
    return cap if self.max_k is None else min(cap, self.max_k)

  def with_options(self, **options) -> SubspaceConfig:
    """A copy with the options that are not None replaced; a new k rule displaces the old one."""
    options = {n: v for n, v in options.items() if v is not None}
    rules = {"k", "explained_variance", "max_task_error"}
    if rules & options.keys():
      options = {n: None for n in rules - options.keys() - {"max_task_error"}} | options
    return dataclasses.replace(self, **options) if options else self


class FidelityWarning(UserWarning):
  """A merge left stored tasks with a ΔW error above the configured ``max_task_error``."""


class FidelityError(ShareError):
  """As ``FidelityWarning``, raised instead when the config is ``strict``."""


FRAMES = 8  # frame slots per group: a merge opens one; when they run out young ones are folded
RUNTIME = ("frame", "maps", "frame_basis", "coef_sum")  # FactorGroup fields not checkpointed


@flax.struct.dataclass
class FactorGroup:
  """One group's bases and coefficients; see the module doc for the stored fields.

  Coefficients are lazy: a merge rotates the bases but not the stored tasks. Each task row
  belongs to a *frame* (the merge that stored it, the last fold or settle), and ``coef`` holds it in
  that frame's coordinates; ``maps[:, f]`` (K × Kc) takes frame f's coordinates to the current
  ones, so a merge updates F small maps instead of T tasks. ``frame_basis[f]`` is the basis
  frame f began with (per-task errors are measured against it on read, ``share_jax.fidelity``)
  and ``coef_sum`` the sum of every stored column in current coordinates (the mean a merge
  centres on). Frame coordinates have Kc rows, the largest K so far (a merge to a smaller k,
  e.g. ``compress``, leaves stored tasks as they are). Frames are non-decreasing over task rows.
  ``share_jax.settle`` folds every task into the current coordinates (frame 0). The frame fields
  default to None and are filled by ``Subspace.create``.
  """

  basis: jax.Array  # (L, d, K)
  rank: jax.Array  # (L,) int32
  coef: jax.Array  # (L, Kc, T, P), each task in its frame's coordinates (Kc >= every K so far)
  ncols: jax.Array  # (T, L) int32
  scatter: jax.Array  # (L, K, K)
  energy: jax.Array  # (L,)
  lost: jax.Array  # (L,)
  frame: Any = None  # (T,) int32
  maps: Any = None  # (L, F, K, Kc)
  frame_basis: Any = None  # F × (L, d, Kc): references to past bases, never copied
  coef_sum: Any = None  # (L, K)

  @property
  def capacity(self) -> tuple[int, int, int]:
    """(K, T, P): basis columns, task rows, columns per task."""
    _, _, t, p = self.coef.shape
    return self.basis.shape[2], t, p

  def task(self, index) -> jax.Array:
    """One task's coefficients (L, K, P) in current coordinates (``index`` an int or a traced
    scalar); one compiled call outside ``jax.jit``."""
    return _task_coef(self.maps, self.frame, self.coef, jnp.asarray(index, jnp.int32))

  def rows(self, row: int, tasks: jax.Array) -> jax.Array:
    """Slot ``row``'s coefficients of the tasks at rows ``tasks`` (B,), current: (K, B, P)."""
    maps = self.maps[row, self.frame[tasks]]
    return mm("bkj,jbp->kbp", maps, self.coef[row][:, tasks])

  def settled(self) -> FactorGroup:
    """With every frame field set for coefficients already in current coordinates (frame 0):
    one open frame whose basis is the current one."""
    n, d, k = self.basis.shape
    _, t, _ = self.capacity
    if not concrete({"": self}):  # shapes only (accounting)
      return self.replace(
        frame=jax.ShapeDtypeStruct((t,), jnp.int32),
        maps=jax.ShapeDtypeStruct((n, FRAMES, k, k), jnp.float32),
        frame_basis=(self.basis,) * FRAMES,
        coef_sum=jax.ShapeDtypeStruct((n, k), jnp.float32),
      )
    eye = jnp.broadcast_to(jnp.eye(k, dtype=jnp.float32), (n, k, k))
    return self.replace(
      frame=jnp.zeros((t,), jnp.int32),
      maps=first_frame(eye),
      frame_basis=(self.basis,) * FRAMES,  # frames not in use: any array of the shape, no copy
      coef_sum=jnp.sum(jnp.asarray(self.coef, jnp.float32), axis=(2, 3)),
    )

  def stored(self) -> FactorGroup:
    """Without the frame fields (for a checkpoint of a settled group)."""
    return self.replace(**dict.fromkeys(RUNTIME))


@jax.jit
def _task_coef(maps: jax.Array, frame: jax.Array, coef: jax.Array, index: jax.Array) -> jax.Array:
  return mm("lkj,ljp->lkp", maps[:, frame[index]], coef[:, :, index])


def first_frame(x: jax.Array) -> jax.Array:
  """(L, ...) → (L, FRAMES, ...) with ``x`` as frame 0 and zeros after it (a pad, so that a
  sharded x keeps its layer sharding)."""
  x = jnp.asarray(x, jnp.float32)[:, None]
  return jnp.pad(x, [(0, 0), (0, FRAMES - 1)] + [(0, 0)] * (x.ndim - 2))


def concrete(groups: dict) -> bool:
  """Whether the groups hold arrays (not ``jax.ShapeDtypeStruct`` shapes for accounting)."""
  return all(isinstance(grp.coef, jax.Array | np.ndarray) for grp in groups.values())


def mm(spec: str, *args: jax.Array) -> jax.Array:
  """``jnp.einsum`` at full float32 precision (TPU/TF32 defaults would ruin the merge)."""
  return jnp.einsum(spec, *args, precision=jax.lax.Precision.HIGHEST)


def pad_to(x: jax.Array, axes: tuple[int, ...], size: int) -> jax.Array:
  """``x`` zero-padded to ``size`` along ``axes`` (no copy when it is that size)."""
  pads = [(0, size - x.shape[a] if a in axes else 0) for a in range(x.ndim)]
  return jnp.pad(x, pads) if any(p for _, p in pads) else x


# ----------------------------------------------------------------------------- task ids as arrays

_EMPTY = -1
_REGISTRY: dict[tuple[int, int], Hashable] = {}
_LOCK = threading.Lock()


def id_code(task_id: Hashable) -> tuple[int, int]:
  """Two non-negative int32 words identifying ``task_id`` (an int or a str) in every process."""
  text = f"{type(task_id).__name__}:{task_id!r}".encode()
  h = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
  code = (h & 0x7FFFFFFF, (h >> 32) & 0x7FFFFFFF)
  with _LOCK:
    known = _REGISTRY.setdefault(code, task_id)
  if known != task_id or type(known) is not type(task_id):
    raise ShareError(f"task ids {known!r} and {task_id!r} share a hash code; rename one")
  return code


def _id_of(code) -> Hashable:
  return _REGISTRY[(int(code[0]), int(code[1]))]


@flax.struct.dataclass
class TaskTable:
  """Per task row (T, capacity-bucketed like the coefficients); empty rows have code -1.

  code: (T, 2) int32, the task id as ``id_code`` words.
  norm: (T,) float32, ‖ΔW‖_F (all adapted kernels) of the adapter the task came from.
  error: (T,) float32, an upper bound of ‖ΔW − ΔW_stored‖_F (exact after the storing merge).
  """

  code: jax.Array
  norm: jax.Array
  error: jax.Array

  @classmethod
  def empty(cls, capacity: int) -> TaskTable:
    return cls(
      jnp.full((capacity, 2), _EMPTY, jnp.int32),
      jnp.zeros((capacity,), jnp.float32),
      jnp.zeros((capacity,), jnp.float32),
    )

  def grow(self, capacity: int) -> TaskTable:
    pad = capacity - self.norm.shape[0]
    if pad <= 0:
      return self
    return TaskTable(
      jnp.pad(self.code, ((0, pad), (0, 0)), constant_values=_EMPTY),
      jnp.pad(self.norm, (0, pad)),
      jnp.pad(self.error, (0, pad)),
    )


@flax.struct.dataclass
class Subspace:
  """Immutable Share state. ``groups``, ``tasks`` and ``task_heads`` are pytree children; the
  layout and config are static.

  ``task_heads`` maps a task's row to its head (tasks without a head have no entry).
  Task ids are read on the host (``task_ids``, ``task_index``), never inside ``jax.jit``: look
  a task's row up outside and pass it in.
  """

  groups: dict[str, FactorGroup]
  tasks: TaskTable
  task_heads: dict[int, Any]
  layout: Layout = flax.struct.field(pytree_node=False)
  config: SubspaceConfig = flax.struct.field(pytree_node=False)

  @classmethod
  def create(
    cls,
    groups: dict[str, FactorGroup],
    layout: Layout,
    task_ids: tuple[Hashable, ...],
    config: SubspaceConfig,
    heads: dict[Hashable, Any] | None = None,
    *,
    norm: Any = None,
    error: Any = None,
  ) -> Subspace:
    """A subspace holding ``task_ids`` in rows 0, 1, … of ``groups``. ``norm`` and ``error``
    (T,): the fidelity record; by default the stored ΔW counts as the original (error 0). Groups
    may hold ``jax.ShapeDtypeStruct`` leaves (for accounting), then norms are zero."""
    from share_jax.fidelity import stored_norms  # fidelity builds on this module

    heads = heads or {}
    for g, grp in groups.items():
      stale = grp.frame is not None and (
        grp.frame.shape[0] != grp.capacity[1]
        or tuple(grp.maps.shape[2:]) != (grp.basis.shape[2], grp.coef.shape[1])
      )
      if stale:
        raise ShareError(
          f"group {g}: its frames do not fit its coefficients (T, K changed?); build groups "
          "from FactorGroup.stored() (no frames) so that Subspace.create sets them up"
        )
    groups = {g: grp if grp.frame is not None else grp.settled() for g, grp in groups.items()}
    unknown = [t for t in heads if t not in task_ids]
    if unknown:
      raise UnknownTaskError(f"heads for unknown task ids {unknown}")
    capacity = next(iter(groups.values())).capacity[1] if groups else max(len(task_ids), 1)
    table = TaskTable.empty(capacity)
    rows = np.asarray([id_code(t) for t in task_ids], np.int32).reshape(-1, 2)
    code = table.code.at[: len(task_ids)].set(rows)
    if norm is None and task_ids and concrete(groups):
      norm = stored_norms(groups, layout, len(task_ids))
    if norm is None:
      norm = jnp.zeros((capacity,), jnp.float32)
    if error is None:
      error = jnp.zeros((capacity,), jnp.float32)
    table = TaskTable(code, jnp.asarray(norm, jnp.float32), jnp.asarray(error, jnp.float32))
    rows_of = {t: i for i, t in enumerate(task_ids)}
    return cls(groups, table, {rows_of[t]: h for t, h in heads.items()}, layout, config)

  def _codes(self) -> np.ndarray:
    if isinstance(self.tasks.code, jax.core.Tracer):
      raise ShareError(
        "task ids are host-side: look up a task's row (subspace.task_index) outside jax.jit"
      )
    codes = np.asarray(self.tasks.code)
    return codes[codes[:, 0] != _EMPTY]

  @functools.cached_property
  def task_ids(self) -> tuple[Hashable, ...]:
    """Ids in learning order (row order); read once per (immutable) subspace."""
    return tuple(_id_of(c) for c in self._codes())

  @property
  def num_tasks(self) -> int:
    return len(self.task_ids)

  @property
  def heads(self) -> dict[Hashable, Any]:
    """``{task id: head}`` of the tasks that have one."""
    ids = self.task_ids
    return {ids[i]: h for i, h in sorted(self.task_heads.items())}

  @property
  def bases(self) -> dict[str, jax.Array]:
    """The shared bases, {group: (L, d, K)}."""
    return {g: grp.basis for g, grp in self.groups.items()}

  def task_index(self, task_id: Hashable) -> int:
    ids = self.task_ids
    try:
      return ids.index(task_id)
    except ValueError:
      raise UnknownTaskError(
        f"unknown task id {task_id!r}; the subspace holds {list(ids)}"
      ) from None

  def coefs(self, task_id: Hashable) -> dict[str, jax.Array]:
    """One task's coefficients, ``{group: (L, K, P)}``."""
    i = self.task_index(task_id)
    return {g: grp.task(i) for g, grp in self.groups.items()}

  def ranks(self) -> dict[tuple[str, str], int]:
    """Active k per (kernel path, side)."""
    host = {g: np.asarray(grp.rank) for g, grp in self.groups.items()}
    return {slot: int(host[g][row]) for slot, (g, row) in self.layout.slots.items()}

  def with_head(self, task_id: Hashable, head: Any) -> Subspace:
    """A copy that stores ``head`` (any pytree, e.g. a classifier's params) for a known task."""
    i = self.task_index(task_id)
    check_finite(head, f"task {task_id!r}: head")
    return self.replace(task_heads={**self.task_heads, i: head})
