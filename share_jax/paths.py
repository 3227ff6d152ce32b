"""Key paths of parameter pytrees, joined with "/" (e.g. ``encoder/layer_0/query/kernel``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

Target = str | Callable[[str, Any], bool]


def key_name(key: Any) -> str:
  """One path entry as text: dict keys, attribute names and sequence indices."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def join_path(path: tuple) -> str:
  return "/".join(key_name(k) for k in path)


def flatten_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
  """``{joined path: leaf}`` in tree order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {join_path(p): leaf for p, leaf in leaves}


def leaf_shape(x: Any) -> tuple[int, ...]:
  """The shape of an array, a ``jax.ShapeDtypeStruct`` or a Python scalar."""
  return tuple(x.shape) if hasattr(x, "shape") else ()


def as_predicate(target: Target) -> Callable[[str, Any], bool]:
  """A regex (searched in the joined path) or a ``(path, leaf) -> bool`` predicate."""
  if callable(target):
    return target
  pattern = re.compile(target)
  return lambda path, _leaf: pattern.search(path) is not None


def nest(leaves: dict[str, Any]) -> dict:
  """A nested dict holding ``leaves`` at their joined paths (other paths simply absent)."""
  out: dict = {}
  for path, leaf in leaves.items():
    node = out
    *parents, last = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = leaf
  return out
