"""Mixed-task batched inference: one forward pass in which every example uses its own task.

α and β are shared by all tasks, so an adapted ``nn.Dense`` serves a mixed batch with two shared
GEMMs and k × p work per example, its task's coefficients gathered by task index:

    y_i = x_i W + b + (((x_i α) ε_α[t_i]) ε_β[t_i]ᵀ) βᵀ

No ΔW is formed. Works on any Flax linen model whose adapted kernels belong to ``nn.Dense``
layers, through ``flax.linen.intercept_methods``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from share_jax.errors import ShareError
from share_jax.subspace import SIDES, Subspace


def task_indices(subspace: Subspace, task_ids: Sequence[Hashable]) -> jax.Array:
  """Row of each example's task in the subspace: task ids (B,) → int32 (B,)."""
  return jnp.asarray([subspace.task_index(t) for t in task_ids], jnp.int32)


def low_rank_term(
  x: jax.Array,
  alpha: jax.Array,
  coef_a: jax.Array,
  beta: jax.Array,
  coef_b: jax.Array,
  tasks: jax.Array,
) -> jax.Array:
  """(((x α) ε_α[t]) ε_β[t]ᵀ) βᵀ for each example's task t.

  x (B, ..., d_in); α (d_in, K_a), ε_α (T, K_a, P); β (d_out, K_b), ε_β (T, K_b, P);
  tasks (B,) → (B, ..., d_out).
  """
  dtype = x.dtype
  z = x @ alpha.astype(dtype)  # shared GEMM (B, ..., K_a)
  u = jnp.einsum("b...k,bkp->b...p", z, coef_a[tasks].astype(dtype))
  w = jnp.einsum("b...p,bjp->b...j", u, coef_b[tasks].astype(dtype))
  return w @ beta.T.astype(dtype)  # shared GEMM (B, ..., d_out)


@contextlib.contextmanager
def mixed_tasks(subspace: Subspace, tasks: jax.Array, *, prefix: str = "params/") -> Iterator[None]:
  """Inside, every ``nn.Dense`` whose kernel the subspace adapts adds example i's task-``tasks[i]``
  update to its output (``tasks``: (B,) indices from ``task_indices``).

  A Dense at module path ``m`` matches the kernel path ``prefix + m + "/kernel"``. On exit, an
  adapted kernel that no Dense matched is an error (e.g. a wrong ``prefix``).
  """
  layout = subspace.layout
  slots = {
    path.removeprefix(prefix): [layout.slots[(path, side)] for side in SIDES]
    for path in layout.paths
    if path.startswith(prefix)
  }
  reached = set()

  def intercept(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    key = "/".join(context.module.path) + "/kernel"
    if not (
      isinstance(context.module, nn.Dense) and context.method_name == "__call__" and key in slots
    ):
      return out
    x = args[0] if args else kwargs["inputs"]
    if x.shape[:1] != tasks.shape:
      raise ShareError(
        f"{key!r}: inputs {x.shape} do not lead with the batch of tasks {tasks.shape}"
      )
    reached.add(prefix + key)
    (ga, ra), (gb, rb) = ((subspace.groups[g], row) for g, row in slots[key])
    term = low_rank_term(x, ga.basis[ra], ga.coef[:, ra], gb.basis[rb], gb.coef[:, rb], tasks)
    return out + term.astype(out.dtype)

  with nn.intercept_methods(intercept):
    yield
  missing = sorted(set(layout.paths) - reached)
  if missing:
    raise ShareError(f"no nn.Dense was called for adapted kernels {missing} (prefix {prefix!r})")


def mixed_task_apply(
  apply_fn: Callable[..., Any],
  variables: Any,
  subspace: Subspace,
  tasks: jax.Array,
  *args: Any,
  prefix: str = "params/",
  **kwargs: Any,
) -> Any:
  """``apply_fn(variables, *args, **kwargs)`` (e.g. ``model.apply``) with each example i adapted
  to task ``tasks[i]``; equals running it alone on ``task_params(variables, subspace, task)``.
  Jittable: ``jax.jit(functools.partial(mixed_task_apply, model.apply))``."""
  with mixed_tasks(subspace, tasks, prefix=prefix):
    return apply_fn(variables, *args, **kwargs)
