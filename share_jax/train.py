"""Training a task in the shared subspace: trainable state, adapted params, the step, the merge.

A new task trains, per adapted kernel and side, coefficients ε (K × p) on the frozen shared basis
plus φ temporary factors T (d × φ) with their coefficients ε_T (φ × p) (paper §1.5): the side's
factor columns are ``basis @ ε + T @ ε_T`` and ΔW = F_a F_bᵀ. The step (``make_train_step``)
adds (x F_a) F_bᵀ to each adapted Dense's output rather than forming ΔW where the model allows it
(``low_rank_loss``). ``finish_task`` folds the trained factor columns into the bases (what T
learned survives) and re-projects every old task. ``make_step`` is the one gradient → update →
apply step every training loop (the runner's, ViT pretraining) reuses.

A state remembers the bases it was begun (or read) on, ``TaskState.origin``: a static field, not
trained, that ``make_train_step``'s step keeps out of its compiled signature. So a task that
trained while another was merged (e.g. an adapter absorbed meanwhile) is merged exactly as it
trained: its ΔW on its own bases, not its coefficients read against bases they were not fitted
to. ``set_task`` cannot re-base coefficients without changing the bases, so it refuses a stale
state instead.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from share_jax._driver import merge_columns
from share_jax._validation import check_new_task_ids, check_params
from share_jax.apply import apply_factors
from share_jax.errors import ShareError
from share_jax.fidelity import norms, settle
from share_jax.frames import current, fresh
from share_jax.lora import add_deltas
from share_jax.merge import mm, scatter_factor, side_factors
from share_jax.paths import flatten_with_paths
from share_jax.subspace import SIDES, Layout, Subspace, check_finite


@dataclasses.dataclass(frozen=True, eq=False)
class Origin:
  """The shared bases ``{group: (L, d, K)}`` a ``TaskState`` was begun (or read) on.

  Static and compared by identity: the state's coefficients mean something only on these bases,
  so ``finish_task`` merges the ΔW they give on them and ``set_task`` refuses other bases.
  Holding the arrays costs no copy (they are immutable).
  """

  bases: dict[str, jax.Array]


@flax.struct.dataclass
class TaskState:
  """The trainable state of one task; every leaf is trained.

  coef: {group: (L, K, p)} coefficients on the shared bases.
  temp: {group: (L, d, φ)} temporary factors; temp_coef: {group: (L, φ, p)}.
  head: any pytree trained with the task (e.g. a classifier), or None.
  origin: the bases it was begun on (static, not trained; ``None`` for a hand-made state).
  """

  coef: dict[str, jax.Array]
  temp: dict[str, jax.Array]
  temp_coef: dict[str, jax.Array]
  head: Any = None
  origin: Origin | None = flax.struct.field(pytree_node=False, default=None)


def _is_state(x: Any) -> bool:
  return isinstance(x, TaskState)


def _with_origin(tree: Any, origin: Origin | None) -> Any:
  """``tree`` (a state, or an optimizer state holding state-shaped trees) with ``origin``."""
  return jax.tree.map(
    lambda x: x.replace(origin=origin) if _is_state(x) else x, tree, is_leaf=_is_state
  )


def _keeping_origin(step: Callable) -> Callable:
  """``step`` run on states without their (per-task) origin, so it compiles once for every
  task; the origin comes back on the outputs."""

  @functools.wraps(step)
  def run(trainable, opt_state, *args):
    origin = trainable.origin
    trainable, opt_state, *rest = step(
      _with_origin(trainable, None), _with_origin(opt_state, None), *args
    )
    return (_with_origin(trainable, origin), _with_origin(opt_state, origin), *rest)

  return run


def _side_rows(layout: Layout, side: str) -> dict[str, np.ndarray]:
  """{group: (L,) bool} rows of each group that hold ``side``."""
  rows = {g: np.zeros(n, bool) for g, (_, n) in layout.groups.items()}
  for (_, s), (g, row) in layout.slots.items():
    rows[g][row] = s == side
  return rows


@functools.partial(jax.jit, static_argnames=("p", "phi", "std"))
def _init_group(basis, rank, on_a, rng, *, p: int, phi: int, std: float):
  """(coef (L, K, p), temp (L, d, φ), temp_coef (L, φ, p)) of one group; ``on_a``: (L,) bool.

  Temporary factors are the top-φ active basis columns, random unit columns beyond the rank.
  """
  n, d, k = basis.shape
  k1, k2, k3 = jax.random.split(rng, 3)
  on_a = on_a[:, None, None]
  active = jnp.arange(k)[None, :, None] < rank[:, None, None]
  coef = jnp.where(on_a & active, std * jax.random.normal(k1, (n, k, p)), 0.0)
  top = jnp.pad(basis, ((0, 0), (0, 0), (0, max(phi - k, 0))))[:, :, :phi]
  rand = jax.random.normal(k2, (n, d, phi)) / jnp.sqrt(d)
  temp = jnp.where(jnp.arange(phi)[None, None, :] < rank[:, None, None], top, rand)
  temp_coef = jnp.where(on_a, std * jax.random.normal(k3, (n, phi, p)), 0.0)
  return coef, temp, temp_coef


def _positive_finite(x: Any) -> bool:
  return isinstance(x, int | float | np.number) and not isinstance(x, bool) and 0 < x < np.inf


def begin_task(
  subspace: Subspace,
  task_id: Hashable,
  *,
  rng: jax.Array,
  p: int = 1,
  phi: int = 2,
  head: Any = None,
  scale: float | None = None,
) -> TaskState:
  """The trainable state of a new task, with ΔW exactly zero but a non-zero gradient.

  Side ``a`` starts with small random coefficients (std ``scale``, default 1/√(k + φ)), side
  ``b`` with zeros, as LoRA does with its A and B. Temporary factors start as the top-φ basis
  columns (random unit columns on a cold start with no basis).
  """
  check_new_task_ids(subspace, [task_id])
  for name, value, low in (("p", p, 1), ("phi", phi, 0)):
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
      raise ShareError(f"begin_task {task_id!r}: {name} must be an integer >= {low}, got {value!r}")
  if scale is not None and not _positive_finite(scale):
    raise ShareError(f"begin_task {task_id!r}: scale must be a finite number > 0, got {scale!r}")
  if head is not None:
    check_finite(head, f"task {task_id!r}: head")
  try:
    jax.random.split(rng)
  except (TypeError, ValueError):
    raise ShareError(
      f"begin_task {task_id!r}: rng must be a PRNG key (e.g. jax.random.key(0)), got {rng!r:.80}"
    ) from None
  a_rows = _side_rows(subspace.layout, "a")
  coef, temp, temp_coef = {}, {}, {}
  for g, grp in subspace.groups.items():
    rng, key = jax.random.split(rng)
    std = scale if scale is not None else 1.0 / float(np.sqrt(max(grp.basis.shape[-1], 1) + phi))
    coef[g], temp[g], temp_coef[g] = _init_group(
      grp.basis, grp.rank, jnp.asarray(a_rows[g]), key, p=p, phi=phi, std=std
    )
  return TaskState(coef, temp, temp_coef, head, Origin(subspace.bases))


def trained_factors(bases: dict[str, jax.Array], trainable: TaskState) -> dict[str, jax.Array]:
  """Factor columns of the task being trained, {group: (L, d, p)}, from bases {group: (L, d, K)}."""
  return {
    g: side_factors(basis, trainable.coef[g])
    + mm("ldf,lfp->ldp", trainable.temp[g], trainable.temp_coef[g])
    for g, basis in bases.items()
  }


def adapted_params(params: Any, subspace: Subspace, trainable: TaskState) -> Any:
  """``params`` with W + ΔW of the task being trained (differentiable in ``trainable``)."""
  check_params(params, subspace.layout)
  return apply_factors(params, subspace.layout, trained_factors(subspace.bases, trainable))


def make_step(objective: Callable[..., jax.Array], optimizer: optax.GradientTransformation):
  """A jitted ``step(trainable, opt_state, *args) -> (trainable, opt_state, loss)``: one update of
  ``optimizer`` on the gradient of ``loss = objective(trainable, *args)``.

  Only ``trainable`` is differentiated; ``opt_state`` is ``optimizer.init(trainable)``. Callable
  inside another jitted function or a ``jax.lax.scan`` body.
  """

  @jax.jit
  def step(trainable, opt_state, *args):
    loss, grads = jax.value_and_grad(objective)(trainable, *args)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step


def make_train_step(
  loss_fn: Callable[[Any, Any, Any], jax.Array],
  optimizer: optax.GradientTransformation,
  layout: Layout,
  *,
  factored: bool | None = None,
) -> Callable:
  """A jitted step ``(trainable, opt_state, params, bases, batch) -> (trainable, opt_state, loss)``.

  Only ``trainable`` is differentiated; params and bases (``subspace.bases``) are inputs, so the
  step compiles once for every task of equal shapes. ``loss_fn(adapted_params, head, batch)``;
  the optimizer state, ``optimizer.init(trainable)``, exists only for trainable leaves. The loss
  is ``low_rank_loss``'s: factored (no ΔW formed) wherever the model allows, see ``factored``
  there.
  """

  def objective(trainable, params, bases, batch):
    factors = trained_factors(bases, trainable)
    pairs = {
      path: tuple(factors[g][row] for g, row in (layout.slots[(path, s)] for s in SIDES))
      for path in layout.paths
    }
    return low_rank_loss(loss_fn, params, pairs, trainable.head, batch, factored=factored)

  return _keeping_origin(make_step(objective, optimizer))


def low_rank_loss(
  loss_fn: Callable[..., jax.Array],
  params: Any,
  factors: Mapping[str, tuple[jax.Array, jax.Array]],
  *args: Any,
  factored: bool | None = None,
) -> jax.Array:
  """``loss_fn(params with W + a bᵀ at every kernel path of factors, *args)``; ``factors``:
  ``{joined kernel path: (a (d_in, p), b (d_out, p))}``. Differentiable in the factors.

  ``factored`` (default: wherever it applies): each ``flax.linen.Dense`` whose kernel is one of
  these leaves of ``params`` adds ``(x a) bᵀ`` to its output and ``loss_fn`` runs on ``params``
  unchanged, so neither ΔW nor its dense gradient xᵀ dy (2·B·T·d_in·d_out flops per kernel) is
  formed; value and gradients equal the materialised ones. It applies when every kernel reaches
  the loss through an ``nn.Dense`` call (Linen models, HF Flax models); otherwise (NNX, plain
  functions) W + a bᵀ is built. Pass ``factored=False`` if the loss also reads an adapted kernel
  outside its Dense (weight tying, a penalty on params); ``factored=True`` makes a kernel that no
  Dense used an error.
  """
  if factored is not False:
    loss, missing = _factored_loss(loss_fn, params, factors, args)
    if not missing:
      return loss
    if factored:
      raise ShareError(f"factored loss: no nn.Dense used the adapted kernels {missing}")
  deltas = {path: mm("ip,op->io", a, b) for path, (a, b) in factors.items()}
  return loss_fn(add_deltas(params, deltas), *args)


def _factored_loss(loss_fn, params, factors, args) -> tuple[jax.Array, list[str]]:
  """(loss, kernel paths that no Dense used): ``loss_fn(params, *args)`` inside an interceptor
  that adds ``(x a) bᵀ`` to every ``nn.Dense`` whose kernel is a leaf of ``params`` at a path of
  ``factors`` (matched by identity: only kernels the model takes from ``params`` as they are)."""
  leaves = flatten_with_paths(params)
  owner = {id(leaves[path]): path for path in factors if path in leaves}
  reached = set()

  def intercept(next_fun, call_args, kwargs, context):
    out = next_fun(*call_args, **kwargs)
    module = context.module
    if not (isinstance(module, nn.Dense) and context.method_name == "__call__"):
      return out
    path = owner.get(id(module.get_variable("params", "kernel")))
    if path is None:
      return out
    reached.add(path)
    a, b = factors[path]
    x = (call_args[0] if call_args else kwargs["inputs"]).astype(jnp.float32)
    return out + ((x @ a.astype(jnp.float32)) @ b.T.astype(jnp.float32)).astype(out.dtype)

  with nn.intercept_methods(intercept):
    loss = loss_fn(params, *args)
  return loss, sorted(set(factors) - reached)


def finish_task(
  subspace: Subspace, trainable: TaskState, task_id: Hashable, *, donate: bool = False
) -> Subspace:
  """Merge the trained task: its factor columns (temporary factors included) are folded into
  the bases, k is re-chosen, every old task is re-projected, and its head is stored.

  The columns are computed on the bases the state was begun on (``trainable.origin``), so a
  state begun before another task was merged is merged exactly as trained. ``donate`` as in
  ``absorb``: the task is written into ``subspace``'s buffers, and ``subspace`` is gone.
  """
  check_new_task_ids(subspace, [task_id])
  _check_state(subspace, trainable, task_id)
  bases = trainable.origin.bases if trainable.origin is not None else subspace.bases
  factors = trained_factors(bases, trainable)
  for g, f in factors.items():
    if not bool(jnp.all(jnp.isfinite(f))):
      raise ShareError(f"task {task_id!r}: trained factors of group {g} contain NaN or Inf")
  columns = {
    g: (f[None], jnp.full((1, f.shape[0]), f.shape[-1], jnp.int32)) for g, f in factors.items()
  }
  out = merge_columns(subspace, [task_id], columns, donate=donate)
  return out if trainable.head is None else out.with_head(task_id, trainable.head)


def _check_state(subspace: Subspace, trainable: TaskState, task_id: Hashable) -> None:
  """An error naming the task and group of a state that does not fit ``subspace``'s groups or
  holds NaN or Inf (coefficients, temporary factors, head)."""
  if not isinstance(trainable, TaskState):
    raise ShareError(f"task {task_id!r}: expected a TaskState, got {type(trainable).__name__}")
  groups = {g: grp.basis.shape[:2] for g, grp in subspace.groups.items()}
  if any(
    set(part) != set(groups) for part in (trainable.coef, trainable.temp, trainable.temp_coef)
  ):
    raise ShareError(
      f"task {task_id!r}: the state has groups {sorted(trainable.coef)}, the subspace "
      f"{sorted(groups)}"
    )
  for g, (n, d) in groups.items():
    coef, temp, temp_coef = trainable.coef[g], trainable.temp[g], trainable.temp_coef[g]
    if coef.ndim != 3 or temp.shape[:2] != (n, d) or coef.shape[0] != n:
      raise ShareError(
        f"task {task_id!r}: group {g}: coefficients {coef.shape} and temporary factors "
        f"{temp.shape} do not fit (L, d) = {(n, d)}"
      )
    for name, x in (("coefficients", coef), ("temporary factors", temp), ("temp_coef", temp_coef)):
      if not bool(jnp.all(jnp.isfinite(x))):
        raise ShareError(f"task {task_id!r}: {name} of group {g} contain NaN or Inf")
  if trainable.head is not None:
    check_finite(trainable.head, f"task {task_id!r}: head")


def _same_bases(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> bool:
  """Whether two bases dicts hold the same arrays (by identity, else by value: a restore)."""
  if a.keys() != b.keys():
    return False
  return all(
    a[g] is b[g] or (a[g].shape == b[g].shape and bool(jnp.array_equal(a[g], b[g]))) for g in a
  )


def task_state(subspace: Subspace, task_id: Hashable) -> TaskState:
  """A stored task as a trainable state (coefficients and head, no temporary factors): for the
  fine-tune after a merge, or Share-full's fine-tune of old tasks."""
  i = subspace.task_index(task_id)
  coef, temp, temp_coef = {}, {}, {}
  for g, grp in subspace.groups.items():
    n, d, _ = grp.basis.shape
    p = max(int(jnp.max(grp.ncols[i])), 1)
    coef[g] = grp.task(i)[:, :, :p]
    temp[g] = jnp.zeros((n, d, 0), jnp.float32)
    temp_coef[g] = jnp.zeros((n, 0, p), jnp.float32)
  return TaskState(coef, temp, temp_coef, subspace.heads.get(task_id), Origin(subspace.bases))


@jax.jit
def _write(coef, index, value):
  value = jnp.pad(value, ((0, 0), (0, 0), (0, coef.shape[-1] - value.shape[-1])))
  return jax.lax.dynamic_update_index_in_dim(coef, value, index, axis=2)


def set_task(subspace: Subspace, task_id: Hashable, trainable: TaskState) -> Subspace:
  """Store fine-tuned coefficients (and head) of a task already held; bases are unchanged.

  The trainable must carry no temporary factors (their span is not in the bases): merge with
  ``finish_task`` first. The scatter statistics the next merge needs are refreshed, and the
  task's fidelity record restarts from the stored coefficients (``task_errors`` then measures
  later merges' loss against them).
  """
  i = subspace.task_index(task_id)
  _check_state(subspace, trainable, task_id)
  if trainable.origin is not None and not _same_bases(trainable.origin.bases, subspace.bases):
    raise ShareError(
      f"task {task_id!r}: the state was read on bases that a later merge replaced, so its "
      "coefficients mean something else now; read it again with task_state"
    )
  # Row i is written in current coordinates: into its own frame when no merge has moved it
  # (nor any row after it: frames stay ordered), e.g. right after the merge that stored it;
  # else every task is settled first.
  rows = subspace.num_tasks
  if any(fresh(grp, rows, first=i) is None for grp in subspace.groups.values()):
    subspace = settle(subspace)
  groups, now = {}, {}
  for g, grp in subspace.groups.items():
    if trainable.temp[g].shape[-1]:
      raise ShareError(f"task {task_id!r}: temporary factors must be merged (finish_task) first")
    shape = trainable.coef[g].shape
    n, k, _, p = grp.coef.shape
    if shape[:2] != (n, k) or shape[2] > p:
      raise ShareError(
        f"task {task_id!r}: coefficients {shape} do not fit group {g} (L, K, P) = {(n, k, p)}"
      )
    grp = grp.replace(
      coef=_write(grp.coef, jnp.asarray(i, jnp.int32), trainable.coef[g].astype(jnp.float32))
    )
    now[g] = current(grp, jnp.asarray(rows, jnp.int32))
    scatter = scatter_factor(now[g], grp.ncols, center=subspace.config.center)
    groups[g] = grp.replace(scatter=scatter, coef_sum=jnp.sum(now[g], axis=(2, 3)))
  # Stored exactly: the new original, error 0.
  norm = norms({g: c[:, :, i : i + 1] for g, c in now.items()}, subspace.layout)[0]
  tasks = subspace.tasks.replace(
    norm=subspace.tasks.norm.at[i].set(norm), error=subspace.tasks.error.at[i].set(0.0)
  )
  out = subspace.replace(groups=groups, tasks=tasks)
  return out if trainable.head is None else out.with_head(task_id, trainable.head)
