"""Input checks shared by every entry point: task ids, LoRA trees against a layout, params."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from share_jax._profiling import phase
from share_jax.errors import ShareError
from share_jax.lora import LoRA, factor_problem, lora_leaves
from share_jax.paths import flatten_with_paths, leaf_shape
from share_jax.subspace import KernelSpec, Layout, Subspace

LoRAs = Sequence[Any] | Mapping[Hashable, Any]


@phase("validate")
def as_tasks(loras: LoRAs, task_ids: Sequence[Hashable] | None) -> list[tuple[Hashable, dict]]:
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
    check_id(t)
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


def _factor(task: Hashable, path: str, name: str, x: Any) -> np.ndarray:
  """A factor as a host array; an error for anything but a real floating-point array."""
  problem = factor_problem(x)
  if problem:
    raise ShareError(f"task {task!r}, {path!r}: factor {name} {problem}")
  return np.asarray(x)


def check_factors(task: Hashable, path: str, lora: LoRA, spec: KernelSpec) -> None:
  a, b = _factor(task, path, "a", lora.a), _factor(task, path, "b", lora.b)
  shape = spec.shape
  if lora.transposed != spec.transposed:
    raise ShareError(
      f"task {task!r}, {path!r}: LoRA transposed={lora.transposed} but the kernel is stored "
      f"{'(out, in)' if spec.transposed else '(in, out)'}"
    )
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise ShareError(
      f"task {task!r}, {path!r}: factors a {a.shape}, b {b.shape} are not (d_in, r), (r, d_out)"
    )
  if a.shape[1] < 1:
    raise ShareError(f"task {task!r}, {path!r}: LoRA of rank 0 (factors a {a.shape}, b {b.shape})")
  if lora.alpha is not None and not (
    isinstance(lora.alpha, int | float | np.number) and np.isfinite(lora.alpha)
  ):
    raise ShareError(f"task {task!r}, {path!r}: alpha {lora.alpha!r} is not a finite number")
  if (a.shape[0], b.shape[1]) != tuple(shape):
    raise ShareError(
      f"task {task!r}, {path!r}: LoRA maps {a.shape[0]} -> {b.shape[1]} but the kernel is {shape}"
    )
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    raise ShareError(f"task {task!r}, {path!r}: LoRA factors contain NaN or Inf")


@phase("validate")
def check_tasks(layout: Layout, tasks: list[tuple[Hashable, dict]]) -> None:
  want = set(layout.paths)
  for t, leaves in tasks:
    have = set(leaves)
    if have != want:
      extra, missing = sorted(have - want), sorted(want - have)
      raise ShareError(
        f"task {t!r} adapts a different set of kernels: unexpected {extra}, missing {missing}"
      )
    for path, lora in leaves.items():
      check_factors(t, path, lora, layout.spec(path))


@phase("validate")
def layout_from_params(params: Any, tasks: list[tuple[Hashable, dict]]) -> Layout:
  kernels = flatten_with_paths(params)
  first_task, first = tasks[0]
  specs = []
  for path in sorted(first):
    if path not in kernels:
      raise ShareError(f"task {first_task!r}: LoRA at {path!r}, which the params do not have")
    w = kernels[path]
    specs.append(kernel_spec(path, w, first[path].transposed))
  return Layout(tuple(specs))


def kernel_spec(path: str, w: Any, transposed: bool = False) -> KernelSpec:
  """The spec of an adapted kernel (stored (d_out, d_in) when ``transposed``); an error for
  integer or boolean kernels (W + ΔW would be truncated) or a shape that is no kernel."""
  dtype = jnp.dtype(w.dtype) if hasattr(w, "dtype") else np.asarray(w).dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ShareError(
      f"kernel {path!r} has dtype {dtype}: only floating-point kernels can be adapted"
    )
  try:
    return KernelSpec.of(path, w.shape, str(dtype), transposed)
  except ShareError as e:
    raise ShareError(f"{path!r}: {e}") from None


def check_params(params: Any, layout: Layout) -> dict[str, Any]:
  """The adapted kernels of ``params``; an error names any path missing or of the wrong shape."""
  leaves = flatten_with_paths(params)
  for spec in layout.kernels:
    if spec.path not in leaves:
      raise ShareError(f"params have no kernel at {spec.path!r}")
    if leaf_shape(leaves[spec.path]) != spec.stored_shape:
      raise ShareError(
        f"kernel {spec.path!r} has shape {leaf_shape(leaves[spec.path])}, not {spec.stored_shape}"
      )
  return leaves


@phase("validate")
def check_id(task_id: Any) -> None:
  if not isinstance(task_id, str | int) or isinstance(task_id, bool):
    raise ShareError(f"task id {task_id!r} must be a str or an int")


def check_new_task_ids(subspace: Subspace, task_ids: Sequence[Hashable]) -> None:
  """An error naming any id that is not a str or an int, or that the subspace already holds."""
  for t in task_ids:
    check_id(t)
    if t in subspace.task_ids:
      raise ShareError(f"duplicate task id {t!r}: the subspace already holds it")
