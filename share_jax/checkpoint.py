"""Versioned subspace checkpoints on an Orbax ``CheckpointManager``.

Each version (an Orbax step) holds two items: ``subspace``, the arrays (``StandardSave``), and
``meta``, JSON (``JsonSave``) with everything needed to rebuild the ``Subspace`` without the model:
format version, library version, layout, task ids in learning order with per-task metadata,
config, k and energy per (kernel, side), array shapes/dtypes/SHA-256, and a fingerprint of the base
parameter structure. Orbax writes a step into a temporary directory and renames it when complete;
deleted versions are first renamed into ``.trash``, so a process killed at any point leaves every
listed version whole. Reads never write: a failed restore leaves the directory untouched.
One process writes a checkpoint directory at a time.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import shutil
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from share_jax._validation import check_params
from share_jax._version import __version__
from share_jax.errors import ShareError
from share_jax.paths import flatten_with_paths, nest
from share_jax.subspace import FactorGroup, KernelSpec, Layout, Subspace, SubspaceConfig

FORMAT = "share_jax.subspace"
FORMAT_VERSION = 1
TRASH = ".trash"
_EMPTY = {"task_ids": [], "task_meta": [], "base": None}
_REQUIRED = ("task_ids", "task_meta", "config", "layout", "ranks", "arrays", "heads", "base")


class CheckpointError(ShareError):
  """A checkpoint that is missing, corrupted, of an unknown format or of another base model."""


# ----------------------------------------------------------------------------- fingerprints


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


def _listing(names: list[str], limit: int = 4) -> str:
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def fingerprint_diff(saved: Mapping[str, str], given: Mapping[str, str]) -> list[str]:
  """What differs between two fingerprints, one short phrase per kind of difference."""
  missing = [p for p in saved if p not in given]
  extra = [p for p in given if p not in saved]
  changed = [
    f"{p!r} is {given[p]}, saved {saved[p]}" for p in saved if given.get(p, saved[p]) != saved[p]
  ]
  out = [f"missing {_listing(missing)}"] if missing else []
  out += [f"unexpected {_listing(extra)}"] if extra else []
  return out + changed[:4] + ([f"{len(changed) - 4} more changed"] if len(changed) > 4 else [])


# ----------------------------------------------------------------------------- pytree <-> JSON


def _sha256(x: Any) -> str:
  return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def _head_leaves(task: Hashable, head: Any) -> dict[str, Any]:
  leaves = flatten_with_paths(head)
  if jax.tree.structure(head) != jax.tree.structure(nest(leaves)):
    raise ShareError(f"head of task {task!r}: only nested dicts with str keys can be checkpointed")
  return leaves


def _flat_arrays(subspace: Subspace) -> dict[str, jax.Array]:
  """``{"groups/<g>/<field>" | "heads/<task index>/<path>": array}``."""
  out = {}
  for g, group in subspace.groups.items():
    for f in dataclasses.fields(group):
      out[f"groups/{g}/{f.name}"] = jnp.asarray(getattr(group, f.name))
  for i, t in enumerate(subspace.task_ids):
    if t in subspace.heads:
      for path, x in _head_leaves(t, subspace.heads[t]).items():
        out[f"heads/{i}/{path}"] = jnp.asarray(x)
  return out


def _meta(subspace: Subspace, arrays: dict, task_meta: list, base: dict | None) -> dict:
  energy = {g: np.asarray(grp.energy) for g, grp in subspace.groups.items()}
  ranks = subspace.ranks()
  return {
    "format": FORMAT,
    "format_version": FORMAT_VERSION,
    "library_version": __version__,
    "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "task_ids": list(subspace.task_ids),
    "task_meta": task_meta,
    "config": dataclasses.asdict(subspace.config),
    "layout": [
      {"path": s.path, "shape": list(s.shape), "dtype": s.dtype}
      | ({"kernel_shape": list(s.stored_shape)} if s.kernel_shape else {})
      | ({"transposed": True} if s.transposed else {})
      for s in subspace.layout.kernels
    ],
    "ranks": [
      {"path": p, "side": side, "k": ranks[(p, side)], "energy": float(energy[g][row])}
      for (p, side), (g, row) in subspace.layout.slots.items()
    ],
    "arrays": {
      p: {"shape": list(x.shape), "dtype": x.dtype.name, "sha256": _sha256(x)}
      for p, x in arrays.items()
    },
    "heads": [i for i, t in enumerate(subspace.task_ids) if t in subspace.heads],
    "base": base,
  }


def _subspace(meta: dict, arrays: dict[str, jax.Array]) -> Subspace:
  tree = nest(arrays)
  task_ids = tuple(meta["task_ids"])
  return Subspace.create(
    groups={g: FactorGroup(**fields) for g, fields in tree["groups"].items()},
    heads={task_ids[i]: tree.get("heads", {}).get(str(i), {}) for i in meta["heads"]},
    layout=Layout(
      tuple(
        KernelSpec(
          s["path"],
          tuple(s["shape"]),
          s["dtype"],
          tuple(s["kernel_shape"]) if "kernel_shape" in s else None,
          bool(s.get("transposed", False)),
        )
        for s in meta["layout"]
      )
    ),
    task_ids=task_ids,
    config=SubspaceConfig(**meta["config"]),
  )


# ----------------------------------------------------------------------------- checkpointer

Partition = Callable[[str, tuple[int, ...]], PartitionSpec]


class Checkpointer:
  """Versions of a subspace in ``directory``: save, list, restore, roll back.

  Args:
    directory: the checkpoint root (created on the first save).
    max_to_keep: keep only the newest versions (``None``: keep all).
  """

  def __init__(self, directory: str | Path, *, max_to_keep: int | None = None):
    if max_to_keep is not None and max_to_keep < 1:
      raise ShareError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = Path(directory).absolute()
    self.max_to_keep = max_to_keep
    self._writer: ocp.CheckpointManager | None = None

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  # --------------------------------------------------------------------------- managers

  def _reader(self) -> ocp.CheckpointManager:
    """A manager that never writes (no directory creation, cleanup or root metadata)."""
    options = ocp.CheckpointManagerOptions(
      create=False, enable_async_checkpointing=False, save_root_metadata=False
    )
    return ocp.CheckpointManager(self.directory, options=options)

  def _writer_manager(self) -> ocp.CheckpointManager:
    if self._writer is None:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=self.max_to_keep,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
        todelete_subdir=TRASH,
        save_root_metadata=False,
      )
      self._writer = ocp.CheckpointManager(self.directory, options=options)
      self._empty_trash()
    return self._writer

  def _empty_trash(self) -> None:
    shutil.rmtree(self.directory / TRASH, ignore_errors=True)

  # --------------------------------------------------------------------------- reading

  def versions(self) -> list[int]:
    """The complete versions on disk, oldest first (``[]`` for a missing directory)."""
    if not self.directory.is_dir():
      return []
    with self._reader() as m:
      return sorted(int(s) for s in m.all_steps())

  def latest(self) -> int | None:
    versions = self.versions()
    return versions[-1] if versions else None

  def _resolve(self, version: int | None) -> int:
    versions = self.versions()
    if not versions:
      raise CheckpointError(f"no checkpoint version in {self.directory}")
    if version is None:
      return versions[-1]
    if version not in versions:
      raise CheckpointError(f"no version {version} in {self.directory}; versions: {versions}")
    return version

  def metadata(self, version: int | None = None) -> dict:
    """The JSON metadata of ``version`` (default: the latest), checked for format and keys."""
    version = self._resolve(version)
    try:
      with self._reader() as m:
        meta = m.restore(version, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax raises many types for unreadable files
      raise self._corrupted(version, "metadata", e) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise self._corrupted(version, "metadata", "not share_jax subspace metadata")
    if meta.get("format_version") != FORMAT_VERSION:
      raise CheckpointError(
        f"version {version} in {self.directory} has metadata format_version "
        f"{meta.get('format_version')!r} (written by share_jax {meta.get('library_version')}); "
        f"this share_jax reads format_version {FORMAT_VERSION}"
      )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
      raise self._corrupted(version, "metadata", f"missing keys {missing}")
    return meta

  def _corrupted(self, version: int, what: str, why: Any) -> CheckpointError:
    reason = " ".join(str(why).split())[:300]
    return CheckpointError(
      f"version {version} in {self.directory} is corrupted: cannot read its {what} ({reason})"
    )

  def restore(
    self,
    version: int | None = None,
    *,
    base: Any = None,
    mesh: Mesh | None = None,
    partition: Partition | None = None,
  ) -> Subspace:
    """The subspace saved as ``version`` (default: the latest).

    Args:
      base: the base model's params (or ``ShapeDtypeStruct`` tree); an error names what differs
        from the saved fingerprint (or, without one, from the adapted kernels).
      mesh: restore straight into ``NamedSharding(mesh, partition(array path, shape))`` arrays,
        replicated when ``partition`` is ``None``. Array paths: ``groups/d768/basis``, ….
    """
    version = self._resolve(version)
    meta = self.metadata(version)
    if base is not None:
      self._check_base(version, meta, base)

    def sharding(path: str, shape: tuple[int, ...]):
      if mesh is None:
        return None
      return NamedSharding(mesh, partition(path, shape) if partition else PartitionSpec())

    specs = {p: (tuple(s["shape"]), np.dtype(s["dtype"])) for p, s in meta["arrays"].items()}
    stored = {p: s for p, s in specs.items() if np.prod(s[0]) > 0}
    abstract = {p: jax.ShapeDtypeStruct(*s, sharding=sharding(p, s[0])) for p, s in stored.items()}
    try:
      with self._reader() as m:
        args = ocp.args.Composite(subspace=ocp.args.StandardRestore(nest(abstract)))
        arrays = flatten_with_paths(m.restore(version, args=args).subspace)
    except Exception as e:  # orbax raises many types for unreadable files
      raise self._corrupted(version, "arrays", e) from None
    for p, (shape, dtype) in specs.items():
      if p not in stored:
        arrays[p] = jnp.zeros(shape, dtype, device=sharding(p, shape))
      elif arrays.get(p) is None or tuple(arrays[p].shape) != shape:
        raise self._corrupted(version, "arrays", f"{p!r} is missing or mis-shaped")
      if arrays[p].is_fully_addressable and _sha256(arrays[p]) != meta["arrays"][p]["sha256"]:
        raise self._corrupted(version, "arrays", f"checksum mismatch in {p!r}")
    return _subspace(meta, arrays)

  def _check_base(self, version: int, meta: dict, base: Any) -> None:
    given, saved = fingerprint(base), meta["base"]
    if saved is None:  # built without the model (e.g. from adapters): check kernel shapes only
      saved = {s["path"]: f"[{','.join(map(str, s['shape']))}]" for s in meta["layout"]}
      given = {p: v[v.index("[") :] for p, v in given.items() if p in saved}
    diffs = fingerprint_diff(saved, given)
    if diffs:
      raise CheckpointError(
        f"version {version} in {self.directory} was built on another base model: "
        + "; ".join(diffs)
      )

  # --------------------------------------------------------------------------- writing

  def save(
    self,
    subspace: Subspace,
    *,
    base: Any = None,
    task_meta: Mapping[Hashable, dict] | None = None,
    version: int | None = None,
  ) -> int:
    """Write ``subspace`` as a new version (default: latest + 1, the first is 1); returns it.

    Args:
      base: the base model's params (or ``ShapeDtypeStruct`` tree), fingerprinted; default: the
        latest version's fingerprint.
      task_meta: JSON-able metadata per task id (e.g. its PEFT config); tasks left out keep the
        latest version's.
    """
    latest = self.latest()
    version = (latest or 0) + 1 if version is None else version
    if latest is not None and version <= latest:
      raise CheckpointError(f"version {version} is not after the latest version {latest}")
    previous = self.metadata(latest) if latest is not None else _EMPTY
    task_meta = dict(task_meta or {})
    unknown = [t for t in task_meta if t not in subspace.task_ids]
    if unknown:
      raise ShareError(f"task_meta for task ids {unknown} that the subspace does not hold")
    base_fp = previous["base"]
    if base is not None:
      check_params(base, subspace.layout)
      base_fp = fingerprint(base)
    inherited = dict(zip(previous["task_ids"], previous["task_meta"], strict=True))
    metas = [task_meta.get(t, inherited.get(t)) for t in subspace.task_ids]
    arrays = _flat_arrays(subspace)
    meta = _meta(subspace, arrays, metas, base_fp)
    try:
      json.dumps(meta)
    except TypeError as e:
      raise ShareError(f"task_meta must be JSON-serialisable: {e}") from None
    stored = nest({p: x for p, x in arrays.items() if x.size > 0})
    args = ocp.args.Composite(subspace=ocp.args.StandardSave(stored), meta=ocp.args.JsonSave(meta))
    writer = self._writer_manager()
    if not writer.save(version, args=args):
      raise CheckpointError(f"orbax declined to save version {version} in {self.directory}")
    writer.wait_until_finished()
    self._empty_trash()
    return version

  def rollback(self, version: int) -> list[int]:
    """Drop every version after ``version`` (newest first, each an atomic rename); returns them."""
    versions = self.versions()
    if version not in versions:
      raise CheckpointError(f"no version {version} in {self.directory}; versions: {versions}")
    dropped = [v for v in reversed(versions) if v > version]
    writer = self._writer_manager()
    for v in dropped:
      writer.delete(v)
    self._empty_trash()
    return dropped
