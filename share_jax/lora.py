"""LoRA factors in Flax's kernel layout and LoRA trees that mirror a parameter tree."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp

from share_jax.errors import ShareError
from share_jax.paths import Target, as_predicate, flatten_with_paths, join_path, leaf_shape, nest
from share_jax.subspace import matrix_shape


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA:
  """A low-rank update of a kernel that adapts as the matrix (d_in, d_out).

  ``a``: (d_in, r), ``b``: (r, d_out); ΔW = a @ b · (alpha / r if alpha is given, else 1).
  A convolution kernel (kh, kw, c_in, c_out) has d_in = kh·kw·c_in, ΔW reshaped to it; a
  ``transposed`` one is stored (d_out, d_in) (GPT-2's Conv1D, PEFT's fan_in_fan_out) and gets ΔWᵀ.
  """

  a: jax.Array
  b: jax.Array
  alpha: float | None = dataclasses.field(default=None, metadata=dict(static=True))
  transposed: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def scale(self) -> float:
    if self.alpha is None:
      return 1.0
    if self.rank == 0:
      raise ShareError(f"a LoRA of rank 0 has no alpha / r scale (alpha={self.alpha!r})")
    return self.alpha / self.rank

  def delta(self) -> jax.Array:
    """ΔW, (d_in, d_out)."""
    return (self.a @ self.b) * self.scale


def is_lora(x: Any) -> bool:
  return isinstance(x, LoRA)


def lora_leaves(tree: Any) -> dict[str, LoRA]:
  """``{kernel path: LoRA}`` of a LoRA tree; any non-LoRA leaf is an error."""
  leaves = flatten_with_paths(tree, is_leaf=is_lora)
  for path, leaf in leaves.items():
    if not is_lora(leaf):
      raise ShareError(f"LoRA tree has a non-LoRA leaf at {path!r} ({type(leaf).__name__})")
  return leaves


def factor_problem(x: Any) -> str | None:
  """What makes ``x`` unfit as a LoRA factor (``None``: a floating-point array)."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    return f"is a {type(x).__name__}, not an array"
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return f"has dtype {x.dtype}, not a floating-point dtype"
  return None


def select_kernels(params: Any, target: Target) -> dict[str, jax.Array]:
  """The leaves of rank >= 2 of ``params`` whose joined path ``target`` selects: 2-D kernels, and
  convolution kernels (*window, c_in, c_out), which adapt as (∏ window · c_in, c_out)."""
  if not (isinstance(target, str) or callable(target)):
    raise ShareError(f"target must be a regex string or a predicate, got {target!r}")
  pred = as_predicate(target)
  chosen = {
    p: x for p, x in flatten_with_paths(params).items() if len(leaf_shape(x)) >= 2 and pred(p, x)
  }
  if not chosen:
    raise ShareError(
      f"target {target!r} selects no 2-D kernel of the parameter tree (nor a convolution kernel)"
    )
  return chosen


def selects(target: Target | None, path: str, leaf: Any) -> bool:
  """Whether an optional ``target`` (None: nothing) selects ``path``."""
  return target is not None and as_predicate(target)(path, leaf)


def init_lora_tree(
  params: Any,
  target: Target,
  *,
  rank: int,
  rng: jax.Array,
  alpha: float | None = None,
  transposed: Target | None = None,
) -> dict:
  """A trainable LoRA tree for the kernels ``target`` selects: ``a`` ~ N(0, 1/d_in), ``b`` = 0.

  ``transposed`` selects the kernels stored (d_out, d_in) (e.g. ``"c_attn|c_proj|c_fc"`` for HF
  Flax GPT-2); convolution kernels adapt as (∏ window · c_in, c_out).
  """
  if rank < 1:
    raise ShareError(f"rank must be >= 1, got {rank}")
  kernels = select_kernels(params, target)
  keys = jax.random.split(rng, len(kernels))
  leaves = {}
  for key, (path, w) in zip(keys, kernels.items(), strict=True):
    flip = selects(transposed, path, w)
    d_in, d_out = matrix_shape(w.shape, flip)
    a = jax.random.normal(key, (d_in, rank), jnp.float32) / jnp.sqrt(d_in)
    leaves[path] = LoRA(a.astype(w.dtype), jnp.zeros((rank, d_out), w.dtype), alpha, flip)
  return nest(leaves)


def add_deltas(params: Any, deltas: dict[str, jax.Array], transposed: Collection[str] = ()) -> Any:
  """``params`` with W + ΔW at every joined path of ``deltas`` (computed in float32, or float64
  for float64 kernels; the kernel's dtype kept). ΔW is the (d_in, d_out) matrix: reshaped to a
  convolution kernel, transposed for a path in ``transposed``. An error names a path the params
  lack or a ΔW of the wrong shape."""
  kernels = flatten_with_paths(params)
  for path, delta in deltas.items():
    if path not in kernels:
      raise ShareError(f"ΔW for {path!r}, which the params do not have")
    shape = leaf_shape(kernels[path])
    flip = path in transposed
    if len(shape) < 2 or (flip and len(shape) != 2) or matrix_shape(shape, flip) != delta.shape:
      how = " (stored transposed)" if flip else ""
      raise ShareError(f"ΔW for {path!r} is {delta.shape}, the kernel {shape}{how}")
    if not jnp.issubdtype(kernels[path].dtype, jnp.floating):
      raise ShareError(
        f"kernel {path!r} has dtype {kernels[path].dtype}: W + ΔW would be truncated; "
        "only floating-point kernels can be adapted"
      )

  def add(path, w):
    key = join_path(path)
    delta = deltas.get(key)
    if delta is None:
      return w
    delta = delta.T if key in transposed else delta.reshape(w.shape)
    wide = jnp.promote_types(w.dtype, jnp.float32)
    return (w.astype(wide) + delta.astype(wide)).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(add, params)


def apply_lora(params: Any, lora_tree: Any) -> Any:
  """``params`` with W + ΔW on every kernel ``lora_tree`` adapts (matched by joined key path);
  dtypes kept, other leaves untouched. Differentiable in ``lora_tree``."""
  leaves = lora_leaves(lora_tree)
  for path, lora in leaves.items():
    for name in ("a", "b"):
      problem = factor_problem(getattr(lora, name))
      if problem:
        raise ShareError(f"LoRA at {path!r}: factor {name} {problem}")
  flipped = {path for path, lora in leaves.items() if lora.transposed}
  return add_deltas(params, {path: lora.delta() for path, lora in leaves.items()}, flipped)
