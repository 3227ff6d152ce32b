"""Versioned subspace checkpoints: one Orbax checkpoint directory per version.

Each version ``<dir>/<n>`` holds two items: ``subspace``, the arrays (``StandardSave``), and
``meta``, the checksummed JSON of a ``CheckpointMeta`` record (``share_jax._ckpt_meta``): format
and library version, layout, task ids in learning order with per-task metadata, config, k and
energy per (kernel, side), array shapes/dtypes/SHA-256, and a fingerprint of the base parameter
structure. Orbax writes a version into a temporary directory and renames it when complete;
deleted versions are first renamed into ``.trash``, so a process killed at any point leaves every
listed version whole. Writers take an exclusive OS lock on the directory (one writes at a time,
the others wait); reads never write, and a failed restore leaves the directory untouched.
"""

from __future__ import annotations

import datetime
import errno
import json
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from share_jax import _ckpt_dir
from share_jax._ckpt_meta import (
  FORMAT_VERSION,
  CheckpointMeta,
  Invalid,
  check_consistent,
  describe,
  parse,
  rebuild,
  sha256,
  subspace_arrays,
)
from share_jax._fingerprint import digest, fingerprint, fingerprint_diff
from share_jax._validation import check_params
from share_jax._version import __version__
from share_jax.errors import CheckpointError, ShareError
from share_jax.fidelity import settle
from share_jax.paths import flatten_with_paths, nest
from share_jax.subspace import Subspace

__all__ = [
  "FORMAT_VERSION",
  "CheckpointError",
  "CheckpointMeta",
  "Checkpointer",
  "digest",
  "fingerprint",
  "fingerprint_diff",
]

Partition = Callable[[str, tuple[int, ...]], PartitionSpec]


def _orbax() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _reason(why: Any) -> str:
  return " ".join(str(why).split())[:300]


def _out_of_space(e: BaseException) -> bool:
  return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "RESOURCE_EXHAUSTED" in str(e)


class Checkpointer:
  """Versions of a subspace in ``directory``: save, list, restore, roll back.

  Args:
    directory: the checkpoint root (created on the first save).
    max_to_keep: keep only the newest versions (``None``: keep all).
    lock_timeout: seconds a writer waits for another writer of the directory before a
      ``CheckpointError`` naming it.
  """

  def __init__(
    self, directory: str | Path, *, max_to_keep: int | None = None, lock_timeout: float = 60.0
  ):
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ShareError(f"max_to_keep must be an integer >= 1, got {max_to_keep!r}")
    self.directory = Path(directory).absolute()
    self.max_to_keep = max_to_keep
    self.lock_timeout = lock_timeout

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Nothing is held between calls; kept so a ``Checkpointer`` reads as a context manager."""

  # --------------------------------------------------------------------------- reading

  def versions(self) -> list[int]:
    """The complete versions on disk, oldest first (``[]`` for a missing directory)."""
    return list(_ckpt_dir.scan(self.directory).versions)

  def strays(self) -> list[str]:
    """Numbered entries that are not complete versions (ignored by every operation)."""
    return list(_ckpt_dir.scan(self.directory).strays)

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

  def _where(self, version: int) -> str:
    return f"version {version} in {self.directory}"

  def _corrupted(self, version: int, what: str, why: Any) -> CheckpointError:
    return CheckpointError(
      f"{self._where(version)} is corrupted: cannot read its {what} ({_reason(why)})"
    )

  def metadata(self, version: int | None = None) -> CheckpointMeta:
    """The metadata record of ``version`` (default: the latest), checksummed and validated."""
    version = self._resolve(version)
    try:
      args = ocp.args.Composite(meta=ocp.args.JsonRestore())
      meta = _orbax().restore(self.directory / str(version), args=args).meta
    except Exception as e:  # orbax raises many types for unreadable files
      raise self._corrupted(version, "metadata", e) from None
    return parse(meta, self._where(version))

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

    specs = {p: (a.shape, np.dtype(a.dtype)) for p, a in meta.arrays.items()}
    stored = {p: s for p, s in specs.items() if np.prod(s[0]) > 0}
    abstract = {p: jax.ShapeDtypeStruct(*s, sharding=sharding(p, s[0])) for p, s in stored.items()}
    try:
      args = ocp.args.Composite(subspace=ocp.args.StandardRestore(nest(abstract)))
      restored = _orbax().restore(self.directory / str(version), args=args).subspace
      arrays = flatten_with_paths(restored)
    except Exception as e:  # orbax raises many types for unreadable files
      raise self._corrupted(version, "arrays", e) from None
    for p, (shape, dtype) in specs.items():
      if p not in stored:
        arrays[p] = jnp.zeros(shape, dtype, device=sharding(p, shape))
      elif arrays.get(p) is None or tuple(arrays[p].shape) != shape:
        raise self._corrupted(version, "arrays", f"{p!r} is missing or mis-shaped")
      if arrays[p].is_fully_addressable and sha256(arrays[p]) != meta.arrays[p].sha256:
        raise self._corrupted(version, "arrays", f"checksum mismatch in {p!r}")
      if meta.format_version == 2 and p.startswith("groups/") and p.endswith("/coef"):
        arrays[p] = jnp.transpose(arrays[p], (1, 2, 0, 3))  # format 2 stored (T, L, K, P)
    if meta.format_version < 4:  # no record of what earlier merges dropped
      for g, (_, n) in meta.layout.groups.items():
        p = f"groups/{g}/lost"
        arrays[p] = jnp.zeros((n,), jnp.float32, device=sharding(p, (n,)))
    try:
      subspace = rebuild(meta, arrays)
      check_consistent(meta, subspace)
    except (Invalid, TypeError, ShareError) as e:
      raise self._corrupted(version, "arrays", e) from None
    return subspace

  def _check_base(self, version: int, meta: CheckpointMeta, base: Any) -> None:
    given, saved = fingerprint(base), meta.base
    if saved is None:  # built without the model (e.g. from adapters): check kernel shapes only
      saved = {s.path: f"[{','.join(map(str, s.shape))}]" for s in meta.layout.kernels}
      given = {p: v[v.index("[") :] for p, v in given.items() if p in saved}
    diffs = fingerprint_diff(saved, given)
    if diffs:
      raise CheckpointError(
        f"{self._where(version)} was built on another base model: " + "; ".join(diffs)
      )

  # --------------------------------------------------------------------------- writing

  def save(
    self,
    subspace: Subspace,
    *,
    base: Any = None,
    task_meta: Mapping[Hashable, Any] | None = None,
    version: int | None = None,
  ) -> int:
    """Write ``subspace`` as a new version (default: latest + 1, the first is 1); returns it.

    Holds the directory's writer lock throughout, so concurrent writers get distinct versions
    and none is lost.

    Args:
      base: the base model's params (or ``ShapeDtypeStruct`` tree), fingerprinted; default: the
        latest version's fingerprint.
      task_meta: JSON-able metadata per task id (e.g. its PEFT config); tasks left out keep the
        latest version's.
      version: an integer >= 1 after the latest version and any stray numbered entry.
    """
    bad = isinstance(version, bool) or not isinstance(version, int | np.integer) or version < 1
    if version is not None and bad:
      raise CheckpointError(f"version must be an integer >= 1, got {version!r}")
    task_meta = dict(task_meta or {})
    unknown = [t for t in task_meta if t not in subspace.task_ids]
    if unknown:
      raise ShareError(f"task_meta for task ids {unknown} that the subspace does not hold")
    for t, m in task_meta.items():
      try:
        json.dumps(m)
      except (TypeError, ValueError) as e:
        raise ShareError(f"task_meta of task {t!r} must be JSON-serialisable: {e}") from None
    base_fp = None
    if base is not None:
      check_params(base, subspace.layout)
      base_fp = fingerprint(base)
    subspace = settle(subspace)
    arrays = subspace_arrays(subspace)
    _ckpt_dir.check_directory(self.directory)
    with _ckpt_dir.WriterLock(self.directory, self.lock_timeout):
      _ckpt_dir.clean(self.directory)
      listing = _ckpt_dir.scan(self.directory)
      latest = listing.versions[-1] if listing.versions else None
      version = self._next_version(listing, version)
      previous = self.metadata(latest) if latest is not None else None
      inherited = dict(zip(previous.task_ids, previous.task_meta, strict=True)) if previous else {}
      meta = describe(
        subspace,
        arrays,
        task_meta=[task_meta.get(t, inherited.get(t)) for t in subspace.task_ids],
        base=base_fp if base_fp is not None else (previous.base if previous else None),
        library_version=__version__,
        saved_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      ).to_json()
      self._write(version, arrays, meta)
      if self.max_to_keep is not None:
        kept = _ckpt_dir.scan(self.directory).versions
        _ckpt_dir.discard(self.directory, list(kept[: -self.max_to_keep]))
    return version

  def _next_version(self, listing: _ckpt_dir.Listing, version: int | None) -> int:
    """``version``, or after every numbered entry; an error if an entry is in the way."""
    if version is None:
      return listing.top + 1
    if listing.versions and version <= listing.versions[-1]:
      raise CheckpointError(
        f"version {version} is not after the latest version {listing.versions[-1]}"
      )
    if version <= listing.top:
      raise CheckpointError(
        f"version {version} is not after the stray entries {list(listing.strays)} in "
        f"{self.directory} (numbered entries that are not complete versions)"
      )
    return int(version)

  def _write(self, version: int, arrays: dict[str, jax.Array], meta: dict) -> None:
    stored = nest({p: x for p, x in arrays.items() if x.size > 0})
    args = ocp.args.Composite(subspace=ocp.args.StandardSave(stored), meta=ocp.args.JsonSave(meta))
    try:
      _orbax().save(self.directory / str(version), args=args)
    except Exception as e:  # orbax and tensorstore raise many types (disk full, permissions)
      _ckpt_dir.clean(self.directory)
      cause = "no space left on the device" if _out_of_space(e) else "write failed"
      raise CheckpointError(
        f"cannot write version {version} in {self.directory}: {cause} ({_reason(e)}); "
        f"earlier versions are intact"
      ) from None

  def rollback(self, version: int) -> list[int]:
    """Drop every version after ``version`` (newest first, each an atomic rename); returns them."""
    self._resolve(version)
    with _ckpt_dir.WriterLock(self.directory, self.lock_timeout):
      versions = self.versions()
      if version not in versions:
        raise CheckpointError(f"no version {version} in {self.directory}; versions: {versions}")
      dropped = [v for v in reversed(versions) if v > version]
      _ckpt_dir.discard(self.directory, dropped)
    return dropped
