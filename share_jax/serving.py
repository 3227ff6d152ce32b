"""Mixed-task batched inference: one forward pass in which every example uses its own task.

α and β are shared by all tasks, so an adapted ``nn.Dense`` serves a mixed batch with two shared
GEMMs and k × p work per example, its task's coefficients gathered by task index:

    y_i = x_i W + b + (((x_i α) ε_α[t_i]) ε_β[t_i]ᵀ) βᵀ

No ΔW is formed. Works on any Flax linen model through ``flax.linen.intercept_methods``: an
adapted 2-D kernel's module must map its first input's last axis linearly (``nn.Dense``, HF's
GPT-2 ``FlaxConv1D`` whose kernel is stored transposed); an adapted convolution kernel's module must
be an ``nn.Conv`` without feature groups, whose update is the two convolutions of PEFT's Conv LoRA
(α as a window → K_a conv, then 1×1 ones). Grouped or depthwise convolutions cannot be served
factored: serve them with ``task_params``.
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
  x: jax.Array, alpha: jax.Array | None, coef_a: jax.Array, beta: jax.Array, coef_b: jax.Array
) -> jax.Array:
  """(((x α) ε_α[b]) ε_β[b]ᵀ) βᵀ with each example b's own coefficients.

  x (B, ..., d_in); α (d_in, K_a), ε_α (K_a, B, P); β (d_out, K_b), ε_β (K_b, B, P)
  → (B, ..., d_out). ``alpha=None``: x is already x α (B, ..., K_a).
  """
  dtype = x.dtype
  z = x if alpha is None else x @ alpha.astype(dtype)  # shared GEMM (B, ..., K_a)
  u = jnp.einsum("b...k,kbp->b...p", z, coef_a.astype(dtype))
  w = jnp.einsum("b...p,jbp->b...j", u, coef_b.astype(dtype))
  return w @ beta.T.astype(dtype)  # shared GEMM (B, ..., d_out)


def _conv_alpha(module: nn.Conv, x: jax.Array, alpha: jax.Array, kernel_shape) -> jax.Array:
  """x convolved (the module's window, strides, padding, dilations) with α as a
  (*window, c_in, K_a) kernel: (B, *spatial', K_a)."""
  if module.feature_group_count != 1:
    raise ShareError(
      f"{'/'.join(module.path)!r}: a convolution with feature_group_count="
      f"{module.feature_group_count} (depthwise or grouped) cannot be served factored; "
      "serve it with task_params"
    )
  window = nn.Conv(
    features=alpha.shape[-1],
    kernel_size=tuple(kernel_shape[:-2]),
    strides=module.strides,
    padding=module.padding,
    input_dilation=module.input_dilation,
    kernel_dilation=module.kernel_dilation,
    use_bias=False,
    precision=module.precision,
  )
  kernel = alpha.reshape(*kernel_shape[:-1], alpha.shape[-1]).astype(x.dtype)
  return window.apply({"params": {"kernel": kernel}}, x)


@contextlib.contextmanager
def mixed_tasks(subspace: Subspace, tasks: jax.Array, *, prefix: str = "params/") -> Iterator[None]:
  """Inside, every module whose kernel the subspace adapts (``nn.Dense``, ``nn.Conv``, or any
  module mapping its input's last axis through a 2-D kernel) adds example i's task-``tasks[i]``
  update to its output (``tasks``: (B,) indices from ``task_indices``).

  A module at path ``m`` matches the kernel path ``prefix + m + "/kernel"``. On exit, an
  adapted kernel that no module matched is an error (e.g. a wrong ``prefix``).
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
    if context.method_name != "__call__" or key not in slots:
      return out
    x = args[0] if args else next(iter(kwargs.values()))
    if x.shape[:1] != tasks.shape:
      raise ShareError(
        f"{key!r}: inputs {x.shape} do not lead with the batch of tasks {tasks.shape}"
      )
    spec = layout.spec(prefix + key)
    reached.add(prefix + key)
    (ga, ra), (gb, rb) = ((subspace.groups[g], row) for g, row in slots[key])
    alpha = ga.basis[ra]
    if len(spec.stored_shape) > 2:
      if not isinstance(context.module, nn.Conv):
        raise ShareError(f"{key!r}: a convolution kernel outside an nn.Conv cannot be served")
      x, alpha = _conv_alpha(context.module, x, alpha, spec.stored_shape), None
    elif (x.shape[-1], out.shape[-1]) != spec.shape:
      raise ShareError(
        f"{key!r}: the module maps {x.shape} -> {out.shape}, not the last axis {spec.shape}"
      )
    term = low_rank_term(x, alpha, ga.rows(ra, tasks), gb.basis[rb], gb.rows(rb, tasks))
    return out + term.astype(out.dtype)

  with nn.intercept_methods(intercept):
    yield
  missing = sorted(set(layout.paths) - reached)
  if missing:
    raise ShareError(
      f"no nn.Dense was called (nor another module) for adapted kernels {missing} "
      f"(prefix {prefix!r})"
    )


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
