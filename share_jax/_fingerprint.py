"""Fingerprints of a parameter tree's structure (paths, dtypes, shapes; no values): what a
checkpointed subspace is tied to, and a short phrase per kind of difference."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from share_jax.paths import flatten_with_paths


def fingerprint(params: Any) -> dict[str, str]:
  """``{joined path: "float32[768,768]"}`` for every leaf of ``params`` (arrays or
  ``jax.ShapeDtypeStruct``): the structure a subspace is tied to, without any values."""
  out = {}
  for path, leaf in flatten_with_paths(params).items():
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    out[path] = f"{np.dtype(dtype).name}[{','.join(str(int(s)) for s in np.shape(leaf))}]"
  return out


def digest(fp: Mapping[str, str]) -> str:
  """A short, order-independent hash of a fingerprint."""
  return hashlib.sha256(json.dumps(sorted(fp.items())).encode()).hexdigest()[:16]


def listing(names: list[str], limit: int = 4) -> str:
  """``'a', 'b', 'c', 'd' and 3 more``."""
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def fingerprint_diff(saved: Mapping[str, str], given: Mapping[str, str]) -> list[str]:
  """What differs between two fingerprints, one short phrase per kind of difference."""
  missing = [p for p in saved if p not in given]
  extra = [p for p in given if p not in saved]
  changed = [
    f"{p!r} is {given[p]}, saved {saved[p]}" for p in saved if given.get(p, saved[p]) != saved[p]
  ]
  out = [f"missing {listing(missing)}"] if missing else []
  out += [f"unexpected {listing(extra)}"] if extra else []
  return out + changed[:4] + ([f"{len(changed) - 4} more changed"] if len(changed) > 4 else [])
