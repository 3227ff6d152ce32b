"""The checkpoint schema: a subspace as ``{key path: array}`` plus a typed, checksummed metadata
record, parsed and validated in one place.

Arrays: every array leaf of the ``Subspace`` pytree by key path (``groups/d768/basis``, any
other pytree field ``<field>/<path>``), heads as ``heads/<task index>/<path>``; rebuilt from the
record, so new fields of ``FactorGroup`` or ``Subspace`` round-trip unchanged.
Metadata JSON: the record's fields plus ``format``, ``format_version`` and ``checksum`` (SHA-256
of the canonical JSON of everything else), so any edit or bit flip is caught.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from share_jax.errors import CheckpointError, ShareError
from share_jax.fidelity import relative_errors
from share_jax.paths import flatten_with_paths, join_path, nest
from share_jax.subspace import SIDES, FactorGroup, KernelSpec, Layout, Subspace, SubspaceConfig

FORMAT = "share_jax.subspace"
FORMAT_VERSION = 4  # 2: checksum, validated structure; 3: coefficients (L, K, T, P); 4: lost
# 2 is read by moving its (T, L, K, P) coefficients to (L, K, T, P); 2 and 3 with lost = 0
READABLE = (2, 3, 4)
_LAYOUT_KEYS = {"dtype", "path", "shape", "kernel_shape", "transposed"}
_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "bool")
_SHA = re.compile(r"[0-9a-f]{64}")


def sha256(x: Any) -> str:
  return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ArrayRecord:
  shape: tuple[int, ...]
  dtype: str
  sha256: str


@dataclasses.dataclass(frozen=True)
class RankRecord:
  """Active k and the energy its basis kept, of one (kernel path, side)."""

  path: str
  side: str
  k: int
  energy: float


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
  """Everything needed to rebuild a saved subspace without the model.

  ``task_meta``: per task (learning order) the JSON given to ``save`` or ``None``;
  ``heads``: indices of the tasks that have a head; ``base``: the base model's fingerprint
  (``None`` when saved without one); ``task_errors``: per task the relative ΔW error
  ``sj.task_errors`` reported when saved (informative: the arrays carry the record itself).
  """

  library_version: str
  saved_at: str
  task_ids: tuple[Hashable, ...]
  task_meta: tuple[Any, ...]
  config: SubspaceConfig
  layout: Layout
  ranks: tuple[RankRecord, ...]
  arrays: Mapping[str, ArrayRecord]
  heads: tuple[int, ...]
  base: Mapping[str, str] | None
  task_errors: tuple[float, ...]
  format_version: int = FORMAT_VERSION  # of the metadata read (written: always the current)

  def meta_of(self, task_id: Hashable) -> Any:
    """The metadata of one task (``None`` if none was given)."""
    return self.task_meta[self.task_ids.index(task_id)]

  def to_json(self) -> dict:
    body = {
      "library_version": self.library_version,
      "saved_at": self.saved_at,
      "task_ids": list(self.task_ids),
      "task_meta": list(self.task_meta),
      "config": dataclasses.asdict(self.config),
      "layout": [
        {"path": s.path, "shape": list(s.shape), "dtype": s.dtype}
        | ({"kernel_shape": list(s.stored_shape)} if s.kernel_shape else {})
        | ({"transposed": True} if s.transposed else {})
        for s in self.layout.kernels
      ],
      "ranks": [dataclasses.asdict(r) for r in self.ranks],
      "arrays": {
        p: {"shape": list(a.shape), "dtype": a.dtype, "sha256": a.sha256}
        for p, a in self.arrays.items()
      },
      "heads": list(self.heads),
      "base": dict(self.base) if self.base is not None else None,
      "task_errors": [float(e) for e in self.task_errors],
    }
    try:
      body = json.loads(json.dumps(body))  # JSON's own view (str keys, lists), as read back
    except (TypeError, ValueError) as e:
      raise ShareError(f"task_meta must be JSON-serialisable: {e}") from None
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **body, "checksum": _checksum(body)}


def _checksum(body: dict) -> str:
  return hashlib.sha256(
    json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
  ).hexdigest()


# ----------------------------------------------------------------------------- parsing


class Invalid(Exception):
  """A structural problem; ``parse`` turns it into a ``CheckpointError``."""


def need(ok: bool, why: str) -> None:
  if not ok:
    raise Invalid(why)


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _shape(x: Any, what: str) -> tuple[int, ...]:
  need(isinstance(x, list) and all(_is_int(s) and s >= 0 for s in x), f"{what}: bad shape {x!r}")
  return tuple(x)


def parse(obj: Any, where: str) -> CheckpointMeta:
  """The record in metadata JSON ``obj``; a ``CheckpointError`` (prefixed ``where``) for a
  foreign format, another format version, a checksum mismatch or any structural problem."""
  if not isinstance(obj, dict) or obj.get("format") != FORMAT:
    raise CheckpointError(f"{where} is corrupted: not share_jax subspace metadata")
  if obj.get("format_version") not in READABLE:
    raise CheckpointError(
      f"{where} has metadata format_version {obj.get('format_version')!r} (written by share_jax "
      f"{obj.get('library_version')}); this share_jax reads format_version "
      f"{' or '.join(map(str, READABLE))}"
    )
  body = {k: v for k, v in obj.items() if k not in ("format", "format_version", "checksum")}
  if obj.get("checksum") != _checksum(body):
    raise CheckpointError(f"{where} is corrupted: its metadata fails its checksum (edited?)")
  try:
    return dataclasses.replace(_record(body), format_version=obj["format_version"])
  except (Invalid, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
    raise CheckpointError(f"{where} is corrupted: invalid metadata ({e})") from None


def _record(body: dict) -> CheckpointMeta:
  fields = [f.name for f in dataclasses.fields(CheckpointMeta) if f.name != "format_version"]
  need(sorted(body) == sorted(fields), f"keys {sorted(body)}, expected {sorted(fields)}")
  for key in ("library_version", "saved_at"):
    need(isinstance(body[key], str), f"{key} is not a string")
  task_ids = body["task_ids"]
  need(isinstance(task_ids, list), "task_ids is not a list")
  need(all(_is_int(t) or isinstance(t, str) for t in task_ids), "task ids must be str or int")
  need(len(set(task_ids)) == len(task_ids), f"duplicate task ids in {task_ids}")
  task_meta = body["task_meta"]
  need(
    isinstance(task_meta, list) and len(task_meta) == len(task_ids),
    f"task_meta does not hold one entry per task ({len(task_ids)})",
  )
  config = body["config"]
  need(isinstance(config, dict), "config is not an object")
  try:
    config = SubspaceConfig(**config)
  except (TypeError, ShareError) as e:
    raise Invalid(f"config: {e}") from None
  layout = _layout(body["layout"])
  ranks = _ranks(body["ranks"], layout)
  heads = body["heads"]
  need(
    isinstance(heads, list)
    and all(_is_int(i) and 0 <= i < len(task_ids) for i in heads)
    and heads == sorted(set(heads)),
    f"heads {heads!r} are not sorted indices of tasks",
  )
  arrays = _arrays(body["arrays"], layout, heads)
  base = body["base"]
  need(
    base is None or (isinstance(base, dict) and all(isinstance(v, str) for v in base.values())),
    "base is not a fingerprint",
  )
  errors = body["task_errors"]
  need(
    isinstance(errors, list)
    and len(errors) == len(task_ids)
    and all(
      isinstance(e, int | float) and not isinstance(e, bool) and 0 <= e < 1e30 for e in errors
    ),
    f"task_errors does not hold one error >= 0 per task ({len(task_ids)})",
  )
  return CheckpointMeta(
    library_version=body["library_version"],
    saved_at=body["saved_at"],
    task_ids=tuple(task_ids),
    task_meta=tuple(task_meta),
    config=config,
    layout=layout,
    ranks=ranks,
    arrays=arrays,
    heads=tuple(heads),
    base=base,
    task_errors=tuple(float(e) for e in errors),
  )


def _layout(items: Any) -> Layout:
  need(isinstance(items, list) and items, "layout is not a non-empty list")
  specs = []
  for s in items:
    need(
      isinstance(s, dict) and {"dtype", "path", "shape"} <= set(s) <= _LAYOUT_KEYS,
      f"layout entry {s!r}",
    )
    shape = _shape(s["shape"], f"layout {s['path']!r}")
    need(isinstance(s["path"], str) and len(shape) == 2 and min(shape) > 0, f"layout entry {s!r}")
    need(s["dtype"] in _DTYPES[:4], f"layout {s['path']!r}: dtype {s['dtype']!r}")
    flip = s.get("transposed", False)
    need(flip in (True, False), f"layout {s['path']!r}: transposed {flip!r}")
    default = list(shape[::-1] if flip else shape)
    stored = _shape(s.get("kernel_shape", default), f"layout {s['path']!r}")
    try:
      spec = KernelSpec.of(s["path"], stored, s["dtype"], flip)
    except ShareError:
      spec = None
    need(spec is not None and spec.shape == shape, f"layout entry {s!r}: kernel_shape vs shape")
    specs.append(spec)
  paths = [s.path for s in specs]
  need(len(set(paths)) == len(paths), "duplicate kernel paths in layout")
  return Layout(tuple(specs))


def _ranks(items: Any, layout: Layout) -> tuple[RankRecord, ...]:
  need(isinstance(items, list), "ranks is not a list")
  out = []
  for r in items:
    need(isinstance(r, dict) and sorted(r) == ["energy", "k", "path", "side"], f"rank {r!r}")
    need(isinstance(r["path"], str) and r["side"] in SIDES, f"rank {r!r}")
    need((r["path"], r["side"]) in layout.slots, f"rank of {r['path']!r} not in the layout")
    d = layout.spec(r["path"]).shape[SIDES.index(r["side"])]
    need(_is_int(r["k"]) and 0 <= r["k"] <= d, f"{r['path']!r} [{r['side']}]: k={r['k']!r}")
    e = r["energy"]
    need(isinstance(e, int | float) and 0 <= e <= 1 + 1e-6, f"{r['path']!r}: energy {e!r}")
    out.append(RankRecord(r["path"], r["side"], r["k"], float(e)))
  need(
    sorted((r.path, r.side) for r in out) == sorted(layout.slots),
    "ranks do not cover every (kernel, side) of the layout once",
  )
  return tuple(out)


def _arrays(items: Any, layout: Layout, heads: list[int]) -> dict[str, ArrayRecord]:
  need(isinstance(items, dict), "arrays is not an object")
  out = {}
  for p, a in items.items():
    need(isinstance(a, dict) and sorted(a) == ["dtype", "sha256", "shape"], f"array {p!r}")
    need(a["dtype"] in _DTYPES, f"array {p!r}: dtype {a['dtype']!r}")
    need(isinstance(a["sha256"], str) and _SHA.fullmatch(a["sha256"]), f"array {p!r}: sha256")
    out[p] = ArrayRecord(_shape(a["shape"], f"array {p!r}"), a["dtype"], a["sha256"])
  groups = {p.split("/")[1] for p in out if p.startswith("groups/") and p.count("/") >= 2}
  need(groups == set(layout.groups), f"array groups {sorted(groups)}, layout {list(layout.groups)}")
  for g, (d, n) in layout.groups.items():
    basis = out.get(f"groups/{g}/basis")
    need(basis is not None and basis.shape[:2] == (n, d), f"groups/{g}/basis does not fit (L, d)")
  with_heads = {p.split("/")[1] for p in out if p.startswith("heads/")}
  need(all(i.isdigit() for i in with_heads), f"head arrays {sorted(with_heads)}")
  with_heads = {int(i) for i in with_heads}
  need(with_heads <= set(heads), f"head arrays of tasks {sorted(with_heads - set(heads))}")
  return out


# ----------------------------------------------------------------------------- subspace arrays


def _pytree_fields(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.metadata.get("pytree_node", True)]


def subspace_arrays(subspace: Subspace) -> dict[str, jax.Array]:
  """Every array leaf of a settled subspace (``fidelity.settle``) by key path, without the frame
  fields (see the module docstring)."""
  out = {}
  for name in _pytree_fields(Subspace):
    if name == "task_heads":
      for t, head in subspace.heads.items():
        leaves = flatten_with_paths(head)
        if jax.tree.structure(head) != jax.tree.structure(nest(leaves)):
          raise ShareError(
            f"head of task {t!r}: only nested dicts with str keys can be checkpointed"
          )
        i = subspace.task_index(t)
        out.update({f"heads/{i}/{p}": jnp.asarray(x) for p, x in leaves.items()})
    else:
      value = getattr(subspace, name)
      if name == "groups":  # frames are a cache of a settled subspace: not stored
        value = {g: grp.stored() for g, grp in value.items()}
      for p, x in flatten_with_paths(value).items():
        out[f"{name}/{p}" if p else name] = jnp.asarray(x)
  return out


def rebuild(meta: CheckpointMeta, arrays: dict[str, jax.Array]) -> Subspace:
  """The subspace of ``meta`` from ``subspace_arrays``' output: groups from their fields, heads
  by task index, and every other pytree field as ``Subspace.create`` builds it with each saved
  leaf put back at its key path (so its node types need no knowledge here)."""
  tree = nest(arrays)
  heads = tree.pop("heads", {})
  groups = {g: FactorGroup(**f) for g, f in tree.pop("groups", {}).items()}
  slots = next(iter(groups.values())).capacity[1] if groups else max(len(meta.task_ids), 1)
  subspace = Subspace.create(
    groups=groups,
    heads={meta.task_ids[i]: heads.get(str(i), {}) for i in meta.heads},
    layout=meta.layout,
    task_ids=meta.task_ids,
    config=meta.config,
    norm=np.zeros(slots, np.float32),  # the saved record is put back below
  )
  extra = [n for n in _pytree_fields(Subspace) if n not in ("groups", "task_heads")]
  unknown = sorted(tree.keys() - set(extra))
  if unknown:
    raise TypeError(f"arrays of no Subspace field: {unknown}")
  saved = {name: _put_back(getattr(subspace, name), name, arrays) for name in extra if name in tree}
  return subspace.replace(**saved) if saved else subspace


def _put_back(template: Any, name: str, arrays: dict[str, jax.Array]) -> Any:
  """``template`` with each leaf replaced by the saved array at ``name/<its path>``."""
  missing = []

  def leaf(path, x):
    key = f"{name}/{join_path(path)}" if path else name
    if key not in arrays:
      missing.append(key)
      return x
    if tuple(arrays[key].shape) != tuple(np.shape(x)):
      raise TypeError(f"{key!r} is {tuple(arrays[key].shape)}, expected {tuple(np.shape(x))}")
    return arrays[key]

  out = jax.tree_util.tree_map_with_path(leaf, template)
  if missing:
    raise TypeError(f"arrays missing: {missing}")
  return out


def describe(
  subspace: Subspace,
  arrays: dict[str, jax.Array],
  *,
  task_meta: list,
  base: Mapping[str, str] | None,
  library_version: str,
  saved_at: str,
) -> CheckpointMeta:
  energy = {g: np.asarray(grp.energy) for g, grp in subspace.groups.items()}
  ranks = subspace.ranks()
  return CheckpointMeta(
    library_version=library_version,
    saved_at=saved_at,
    task_ids=tuple(subspace.task_ids),
    task_meta=tuple(task_meta),
    config=subspace.config,
    layout=subspace.layout,
    ranks=tuple(
      RankRecord(p, side, ranks[(p, side)], float(energy[g][row]))
      for (p, side), (g, row) in subspace.layout.slots.items()
    ),
    arrays={p: ArrayRecord(tuple(x.shape), x.dtype.name, sha256(x)) for p, x in arrays.items()},
    heads=tuple(sorted(subspace.task_index(t) for t in subspace.heads)),
    base=base,
    task_errors=tuple(float(e) for e in relative_errors(subspace)),
  )


def check_consistent(meta: CheckpointMeta, subspace: Subspace) -> None:
  """``Invalid`` when arrays and metadata disagree (k per slot, task slots) or hold NaN/Inf."""
  ranks = subspace.ranks()
  for r in meta.ranks:
    need(
      ranks[(r.path, r.side)] == r.k,
      f"{r.path!r} [{r.side}]: k={r.k}, arrays hold {ranks[(r.path, r.side)]}",
    )
  for g, grp in subspace.groups.items():
    slots = grp.coef.shape[2] if hasattr(grp, "coef") else len(meta.task_ids)
    need(
      slots >= len(meta.task_ids),
      f"group {g} holds {slots} task slots for {len(meta.task_ids)} tasks",
    )
  for p, x in flatten_with_paths(subspace).items():
    if jnp.issubdtype(x.dtype, jnp.inexact) and x.is_fully_addressable:
      need(bool(jnp.isfinite(x).all()), f"{p!r} holds NaN or Inf")
