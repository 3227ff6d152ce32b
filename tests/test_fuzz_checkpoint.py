"""Fuzz cases (issue 8 §2) on checkpoints: concurrent writers, the writer lock, metadata edits
and bit flips, stray entries, bad versions, a file as the directory, a full disk. Every failure
is a CheckpointError that names the version / path / key, and nothing on disk changes."""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ckpt_worker import subspace_for
from test_checkpoint import assert_same, snapshot

from share_jax._ckpt_dir import WriterLock
from share_jax.checkpoint import Checkpointer, CheckpointError
from share_jax.cli import main as cli

HERE = Path(__file__).parent


@pytest.fixture
def saved(tmp_path):
  """A directory holding versions 1 and 2."""
  ckpt = Checkpointer(tmp_path / "ckpt")
  for v in (1, 2):
    ckpt.save(subspace_for(v), task_meta={0: {"v": v}})
  return ckpt


# ----------------------------------------------------------------------------- writers

WRITER = textwrap.dedent(
  """
  import sys
  sys.path.insert(0, {tests!r})
  from ckpt_worker import subspace_for
  from share_jax.checkpoint import Checkpointer

  ckpt = Checkpointer({directory!r})
  for i in range(5):
    seed = 100 * {writer} + i
    print(ckpt.save(subspace_for(seed), task_meta={{0: {{"seed": seed}}}}), seed, flush=True)
  """
)


def test_concurrent_writers_get_distinct_versions_and_lose_nothing(tmp_path):
  directory = tmp_path / "ckpt"
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", WRITER.format(tests=str(HERE), directory=str(directory), writer=w)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for w in (1, 2)
  ]
  returned = {}
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    for version, seed in (map(int, line.split()) for line in out.strip().splitlines()):
      assert version not in returned, f"version {version} returned twice"
      returned[version] = seed
  ckpt = Checkpointer(directory)
  assert sorted(returned) == ckpt.versions() == list(range(1, 11))
  for version, seed in returned.items():  # each version holds what its writer saved
    assert ckpt.metadata(version).task_meta[0] == {"seed": seed}
  for version in (1, 10):
    assert_same(ckpt.restore(version), subspace_for(returned[version]))


def test_a_second_writer_times_out_naming_the_holder(saved):
  before = snapshot(saved.directory)
  waiting = Checkpointer(saved.directory, lock_timeout=0.2)
  with WriterLock(saved.directory, timeout=1):
    for call in (lambda: waiting.save(subspace_for(3)), lambda: waiting.rollback(1)):
      with pytest.raises(
        CheckpointError,
        match=r"being written by another writer \(pid \d+ on host .+ since .+\); gave up after "
        r"waiting 0.2 s",
      ):
        call()
    assert waiting.versions() == [1, 2]  # readers do not wait
  assert {k: v for k, v in snapshot(saved.directory).items() if k != ".lock"} == {
    k: v for k, v in before.items() if k != ".lock"
  }
  assert waiting.save(subspace_for(3)) == 3  # the lock is free again


# ----------------------------------------------------------------------------- metadata


def meta_file(ckpt: Checkpointer, version: int) -> Path:
  return ckpt.directory / str(version) / "meta" / "metadata"


def rewrite(path: Path, edit, *, fix_checksum: bool) -> None:
  meta = json.loads(path.read_text())
  edit(meta)
  if fix_checksum:
    body = {k: v for k, v in meta.items() if k not in ("format", "format_version", "checksum")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    meta["checksum"] = hashlib.sha256(canonical).hexdigest()
  path.write_text(json.dumps(meta))


def read_back(ckpt: Checkpointer, version: int):
  ckpt.metadata(version)
  return ckpt.restore(version)


def _set_k(meta):
  meta["ranks"][0]["k"] = (meta["ranks"][0]["k"] + 1) % 32


def _set_shape(meta):
  meta["layout"][0]["shape"] = [128, 256]


def _set_dtype(meta):
  meta["arrays"]["groups/d256/basis"]["dtype"] = "float36"


EDITS = {
  "renamed task": lambda m: m["task_ids"].__setitem__(0, "renamed"),
  "duplicated task": lambda m: m["task_ids"].__setitem__(1, m["task_ids"][0]),
  "dropped task": lambda m: m["task_ids"].pop(),
  "changed k": _set_k,
  "changed layout": _set_shape,
  "dropped sha256": lambda m: m["arrays"]["groups/d256/basis"].pop("sha256"),
  "unknown dtype": _set_dtype,
  "head of no task": lambda m: m["heads"].append(99),
}
STRUCTURAL = {  # with the checksum recomputed, validation still names the problem
  "duplicated task": r"duplicate task ids",
  "dropped task": r"task_meta does not hold one entry per task",
  "changed k": r"cannot read its arrays \('layer_0/kernel' \[a\]: k=\d+, arrays hold \d+\)",
  "changed layout": r"layout.*|groups/d256/basis does not fit \(L, d\)|array groups",
  "dropped sha256": r"array 'groups/d256/basis'",
  "unknown dtype": r"array 'groups/d256/basis': dtype 'float36'",
  "head of no task": r"heads \[0, 99\] are not sorted indices of tasks",
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_metadata_edits_are_caught(saved, name):
  path = meta_file(saved, 2)
  original = path.read_text()
  rewrite(path, EDITS[name], fix_checksum=False)
  before = snapshot(saved.directory)
  with pytest.raises(CheckpointError, match=r"version 2 in .* fails its checksum"):
    read_back(saved, 2)
  if name in STRUCTURAL:
    path.write_text(original)
    rewrite(path, EDITS[name], fix_checksum=True)
    before = snapshot(saved.directory)
    with pytest.raises(
      CheckpointError, match=rf"version 2 in .* is corrupted: .*{STRUCTURAL[name]}"
    ):
      read_back(saved, 2)
  assert snapshot(saved.directory) == before
  assert_same(saved.restore(1), subspace_for(1))


def test_random_bit_flips_in_metadata_never_raise_raw_errors(saved):
  path = meta_file(saved, 2)
  original = path.read_bytes()
  rng = np.random.default_rng(0)
  caught = 0
  for bit in rng.choice(8 * len(original), size=40, replace=False):
    blob = bytearray(original)
    blob[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(blob))
    try:
      restored = read_back(saved, 2)
    except CheckpointError as e:
      assert "version 2 in" in str(e)
      caught += 1
    else:  # a flip that leaves the content equal (e.g. "1e-05" -> "1E-05") is harmless
      assert_same(restored, subspace_for(2))
  path.write_bytes(original)
  assert caught >= 36
  assert_same(saved.restore(2), subspace_for(2))


def test_restore_refuses_non_finite_arrays(tmp_path):
  s = subspace_for(1)
  group = s.groups["d256"]
  bad = s.replace(groups={"d256": group.replace(scatter=group.scatter.at[0, 0, 0].set(np.nan))})
  ckpt = Checkpointer(tmp_path)
  ckpt.save(bad)
  with pytest.raises(CheckpointError, match=r"version 1 .*\('groups/d256/scatter' holds NaN"):
    ckpt.restore()


# ----------------------------------------------------------------------------- directory


def test_stray_numbered_entries_are_ignored_and_named(saved, capsys):
  (saved.directory / "7").mkdir()
  (saved.directory / "007").mkdir()
  (saved.directory / "9").write_text("not a version")
  assert saved.versions() == [1, 2]
  assert saved.strays() == ["007", "7", "9"]
  with pytest.raises(CheckpointError, match=r"version 8 is not after the stray entries \['007'"):
    saved.save(subspace_for(3), version=8)
  assert saved.save(subspace_for(3)) == 10  # numbered after every entry: nothing is overwritten
  assert saved.versions() == [1, 2, 10]
  assert_same(saved.restore(), subspace_for(3))
  assert saved.metadata().task_meta[0] == {"v": 2}  # inherited from the latest version
  with pytest.raises(CheckpointError, match=r"version 8 is not after the latest version 10"):
    saved.save(subspace_for(3), version=8)
  assert cli(["versions", str(saved.directory)]) == 0
  assert "7\tignored: a numbered entry that is not a complete version" in capsys.readouterr().out


@pytest.mark.parametrize("version", [-1, 0, True, 1.5, "3"])
def test_bad_versions_are_refused(saved, version):
  before = snapshot(saved.directory)
  with pytest.raises(CheckpointError, match=r"version must be an integer >= 1, got"):
    saved.save(subspace_for(3), version=version)
  assert snapshot(saved.directory) == before


def test_a_file_as_the_checkpoint_path(tmp_path, capsys):
  path = tmp_path / "file"
  path.write_text("x")
  ckpt = Checkpointer(path)
  for call in (ckpt.versions, ckpt.latest, lambda: ckpt.save(subspace_for(1)), ckpt.restore):
    with pytest.raises(CheckpointError, match=f"{path} is a file, not a checkpoint directory"):
      call()
  assert path.read_text() == "x"
  assert cli(["info", str(path)]) == 1
  err = capsys.readouterr().err
  assert err == f"share-jax info: error: {path} is a file, not a checkpoint directory\n"


@pytest.mark.parametrize(
  "error",
  [ValueError("RESOURCE_EXHAUSTED: write failed"), OSError(errno.ENOSPC, "No space left")],
)
def test_a_full_disk_is_a_checkpoint_error_and_keeps_earlier_versions(saved, monkeypatch, error):
  before = snapshot(saved.directory)

  def failing(self, path, *args, **kwargs):
    (path.parent / f"{path.name}.orbax-checkpoint-tmp-1").mkdir()  # half-written, as Orbax
    raise error

  monkeypatch.setattr(ocp.Checkpointer, "save", failing)
  with pytest.raises(
    CheckpointError,
    match=r"cannot write version 3 in .*: no space left on the device .*earlier versions are "
    r"intact",
  ):
    saved.save(subspace_for(3))
  monkeypatch.undo()
  assert {k: v for k, v in snapshot(saved.directory).items() if k != ".lock"} == {
    k: v for k, v in before.items() if k != ".lock"
  }
  assert saved.versions() == [1, 2]
  assert_same(saved.restore(2), subspace_for(2))
  assert saved.save(subspace_for(3)) == 3


def test_saved_arrays_are_every_leaf_by_key_path(saved):
  """Serialisation is generic: the arrays saved are exactly the subspace's pytree leaves, less
  the frames (a cache that restore rebuilds)."""
  s = subspace_for(2)
  s = s.replace(groups={g: grp.stored() for g, grp in s.groups.items()})
  meta = saved.metadata(2)
  leaves = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(s)[0]}
  assert len(meta.arrays) == len(leaves)
  assert set(meta.arrays) >= {f"groups/d256/{f}" for f in ("basis", "coef", "rank", "scatter")}


def _paths(node):
  """Every (container, key) position of a JSON tree."""
  items = node.items() if isinstance(node, dict) else enumerate(node)
  for key, value in list(items):
    yield node, key
    if isinstance(value, dict | list) and value:
      yield from _paths(value)


def test_random_structural_edits_with_a_valid_checksum_never_raise_raw_errors(saved):
  """Rewritten metadata (checksum recomputed): any value replaced by a value of another type is
  read back or refused as a CheckpointError, never a raw Python error."""
  path = meta_file(saved, 2)
  original = path.read_text()
  rng = np.random.default_rng(1)
  replacements = [None, -1, 0, 7, 1.5, True, "x", "float36", [], {}, [1, 2], {"a": 1}]
  for _ in range(40):
    path.write_text(original)

    def edit(meta):
      positions = [p for p in _paths(meta) if p[1] not in ("format", "format_version")]
      node, key = positions[rng.integers(len(positions))]
      node[key] = replacements[rng.integers(len(replacements))]

    rewrite(path, edit, fix_checksum=True)
    try:
      read_back(saved, 2)
    except CheckpointError as e:
      assert "version 2 in" in str(e)
  path.write_text(original)
