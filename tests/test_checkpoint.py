"""Versioned subspace checkpoints: round trips, retention, rollback, sharded restore, clear
errors that leave the directory untouched, and SIGKILL mid-save."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ckpt_worker import MAX_TO_KEEP, save_forever, subspace_for
from lora_adapters import kernel_zeros, random_lora

import share_jax as sj
from share_jax import checkpoint
from share_jax.checkpoint import (
  FORMAT_VERSION,
  Checkpointer,
  CheckpointError,
  CheckpointMeta,
  fingerprint,
  fingerprint_diff,
)

HERE = Path(__file__).parent

PARAMS = kernel_zeros()  # the kernels of tests/lora_adapters.py, plus leaves no LoRA adapts
PARAMS["layer_0"]["output"]["bias"] = np.zeros(32, np.float32)
PARAMS["embed"] = {"embedding": np.zeros((10, 32), np.float32)}


@pytest.fixture(scope="module")
def subspaces():
  """Two states of a subspace over tasks ("a", 7): without heads, then with a head on 7."""
  rng = np.random.default_rng(0)
  s1 = sj.init_subspace(PARAMS, [random_lora(rng), random_lora(rng)], task_ids=["a", 7], k=3)
  s2 = s1.with_head(7, {"classifier": {"kernel": jnp.ones((32, 3)), "bias": jnp.zeros(3)}})
  return s1, s2


def assert_same(a: sj.Subspace, b: sj.Subspace) -> None:
  """Equal stored state (frames are a cache that a checkpoint rebuilds, not stores)."""
  a, b = (s.replace(groups={g: grp.stored() for g, grp in s.groups.items()}) for s in (a, b))
  assert a.task_ids == b.task_ids
  assert [type(t) for t in a.task_ids] == [type(t) for t in b.task_ids]
  assert (a.layout, a.config) == (b.layout, b.config)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):  # every array leaf
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert a.heads.keys() == b.heads.keys()
  for t in a.heads:
    jax.tree.map(np.testing.assert_array_equal, a.heads[t], b.heads[t])


@pytest.mark.parametrize("version", [2, 3])
def test_reads_older_formats(tmp_path, subspaces, monkeypatch, version):
  """Formats 2 and 3 hold no ``lost`` (and 2 stores coefficients (T, L, K, P)): they restore as
  the same subspace with nothing recorded as lost."""
  s1, _ = subspaces
  arrays_of = checkpoint.subspace_arrays

  def as_saved(s):
    arrays = {p: x for p, x in arrays_of(s).items() if not p.endswith("/lost")}
    if version == 2:  # coefficients (T, L, K, P)
      arrays = {
        p: jnp.transpose(x, (2, 0, 1, 3)) if p.endswith("/coef") else x for p, x in arrays.items()
      }
    return arrays

  monkeypatch.setattr(checkpoint, "subspace_arrays", as_saved)
  Checkpointer(tmp_path).save(s1)
  monkeypatch.undo()
  meta = tmp_path / "1" / "meta" / "metadata"
  body = json.loads(meta.read_text())
  assert body["format_version"] == FORMAT_VERSION == 4
  meta.write_text(json.dumps({**body, "format_version": version}))  # checksum: the body only
  want = s1.replace(
    groups={g: grp.replace(lost=jnp.zeros_like(grp.lost)) for g, grp in s1.groups.items()}
  )
  assert any(float(jnp.max(grp.lost)) > 0 for grp in s1.groups.values())
  assert_same(Checkpointer(tmp_path).restore(1), want)


def snapshot(directory: Path) -> dict[str, str]:
  """Every file and directory under ``directory`` with a hash of its content and its mtime."""
  out = {}
  for p in sorted(directory.rglob("*")):
    rel = str(p.relative_to(directory))
    stat = p.stat()
    content = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    out[rel] = f"{content}:{stat.st_mtime_ns}"
  return out


def test_save_restore_round_trip(tmp_path, subspaces):
  s1, s2 = subspaces
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.versions() == [] and ckpt.latest() is None
    assert ckpt.save(s1, base=PARAMS, task_meta={"a": {"source": "peft", "r": 4}}) == 1
    assert ckpt.save(s2, task_meta={7: {"source": "jax"}}) == 2
    assert ckpt.versions() == [1, 2]
    assert_same(ckpt.restore(1, base=PARAMS), s1)
    assert_same(ckpt.restore(), s2)
    meta = ckpt.metadata(2)
  assert isinstance(meta, CheckpointMeta)
  assert meta.library_version == sj.__version__
  assert meta.task_ids == ("a", 7)
  # per-task metadata: given for 7, inherited from the previous version for "a"
  assert meta.task_meta == ({"source": "peft", "r": 4}, {"source": "jax"})
  assert meta.meta_of(7) == {"source": "jax"}
  assert meta.base == fingerprint(PARAMS)  # inherited as well
  assert {(r.path, r.side): r.k for r in meta.ranks} == s2.ranks()
  assert all(0 < r.energy <= 1 for r in meta.ranks)
  assert meta.config == s2.config and meta.layout == s2.layout
  errors = sj.task_errors(s2)
  np.testing.assert_allclose(meta.task_errors, [errors["a"], errors[7]], rtol=1e-6)


def test_fingerprint_names_differences():
  fp = fingerprint(PARAMS)
  assert fp["layer_0/output/kernel"] == "float32[64,32]"
  assert fp == fingerprint(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS))
  other = jax.tree.map(lambda x: x, PARAMS)
  other["layer_0"]["output"] = {"kernel": np.zeros((64, 8), np.float32)}
  other["embed"]["embedding"] = other["embed"]["embedding"].astype(np.float16)
  other["extra"] = np.zeros(2)
  diffs = fingerprint_diff(fp, fingerprint(other))
  assert diffs[0] == "missing 'layer_0/output/bias'"
  assert diffs[1] == "unexpected 'extra'"
  assert "'embed/embedding' is float16[10,32], saved float32[10,32]" in diffs
  assert "'layer_0/output/kernel' is float32[64,8], saved float32[64,32]" in diffs


def test_max_to_keep_and_rollback(tmp_path, subspaces):
  s1, s2 = subspaces
  with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for s in (s1, s2, s1, s2):
      ckpt.save(s)
    assert ckpt.versions() == [3, 4]
    with pytest.raises(CheckpointError, match=r"no version 2 .*versions: \[3, 4\]"):
      ckpt.rollback(2)
    assert ckpt.rollback(3) == [4]
    assert ckpt.versions() == [3]
    assert_same(ckpt.restore(), s1)
    assert ckpt.save(s2) == 4  # numbering continues after the latest kept version
    with pytest.raises(CheckpointError, match="not after the latest version 4"):
      ckpt.save(s2, version=4)
  assert_same(Checkpointer(tmp_path).restore(4), s2)
  assert not (tmp_path / ".trash").exists()


def test_save_rejects_bad_task_meta_and_base(tmp_path, subspaces):
  s1, _ = subspaces
  ckpt = Checkpointer(tmp_path / "ckpt")
  with pytest.raises(sj.ShareError, match=r"task ids \['zzz'\]"):
    ckpt.save(s1, task_meta={"zzz": {}})
  with pytest.raises(sj.ShareError, match="JSON-serialisable"):
    ckpt.save(s1, task_meta={"a": {"x": object()}})
  with pytest.raises(sj.ShareError, match="params have no kernel at 'layer_0/attention/output"):
    ckpt.save(s1, base={"other": np.zeros(3)})
  assert not (tmp_path / "ckpt").exists()  # nothing was written


def test_zero_size_arrays_round_trip(tmp_path, subspaces):
  s1, _ = subspaces
  group = next(iter(s1.groups))
  empty = s1.groups[group].replace(scatter=jnp.zeros((s1.groups[group].scatter.shape[0], 0, 0)))
  s = s1.replace(groups={**s1.groups, group: empty})
  ckpt = Checkpointer(tmp_path)
  ckpt.save(s)
  assert_same(ckpt.restore(), s)


def test_failed_restores_are_clear_and_touch_nothing(tmp_path, subspaces):
  s1, s2 = subspaces
  ckpt = Checkpointer(tmp_path)
  for s in (s1, s2, s2, s2, s2):
    ckpt.save(s, base=PARAMS)

  def largest_array_file(version: int) -> Path:
    files = (p for p in (tmp_path / str(version) / "subspace").rglob("*") if p.is_file())
    return max(files, key=lambda p: p.stat().st_size)

  # flip bytes in version 2's arrays, delete an array file of version 5, break version 3's
  # metadata, and give version 4 a future format
  blob = bytearray(largest_array_file(2).read_bytes())
  blob[len(blob) // 2 : len(blob) // 2 + 16] = bytes(16)
  largest_array_file(2).write_bytes(bytes(blob))
  largest_array_file(5).unlink()
  (tmp_path / "3" / "meta" / "metadata").write_text("{not json")
  meta4 = tmp_path / "4" / "meta" / "metadata"
  meta4.write_text(json.dumps({**json.loads(meta4.read_text()), "format_version": 99}))
  other = jax.tree.map(lambda x: x, PARAMS)
  other["layer_0"]["attention"]["query"]["kernel"] = np.zeros((32, 8), np.float32)
  before = snapshot(tmp_path)

  fresh = Checkpointer(tmp_path)
  assert fresh.versions() == [1, 2, 3, 4, 5]
  cases = [
    (dict(version=6), r"no version 6 in .*versions: \[1, 2, 3, 4, 5\]"),
    (dict(version=2), r"version 2 in .* is corrupted: .* arrays \(checksum mismatch in 'groups/"),
    (dict(version=5), r"version 5 in .* is corrupted: cannot read its arrays \(.+\)"),
    (dict(version=3), r"version 3 in .* is corrupted: cannot read its metadata"),
    (
      dict(version=4),
      rf"version 4 .* format_version 99 .* reads format_version 2 or 3 or {FORMAT_VERSION}",
    ),
    (
      dict(version=1, base=other),
      r"version 1 .* another base model: 'layer_0/attention/query/kernel' is float32\[32,8\], "
      r"saved float32\[32,32\]",
    ),
  ]
  for kwargs, message in cases:
    with pytest.raises(CheckpointError, match=message):
      fresh.restore(**kwargs)
  assert snapshot(tmp_path) == before
  assert_same(fresh.restore(1, base=PARAMS), s1)


def test_base_check_without_fingerprint(tmp_path, subspaces):
  """A subspace saved without the model (CLI from adapters) checks the adapted kernels only."""
  s1, _ = subspaces
  ckpt = Checkpointer(tmp_path)
  ckpt.save(s1)
  assert ckpt.metadata().base is None
  ckpt.restore(base={**PARAMS, "anything": np.zeros(3)})
  small = {"layer_0": {"attention": {"query": {"kernel": np.zeros((32, 8))}}}}
  with pytest.raises(
    CheckpointError,
    match=r"missing 'layer_0/attention/output/kernel', .* and 3 more; "
    r"'layer_0/attention/query/kernel' is \[32,8\], saved \[32,32\]",
  ):
    ckpt.restore(base=small)


SHARDED = textwrap.dedent(
  """
  import sys
  import jax, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  sys.path.insert(0, {tests!r})
  from ckpt_worker import subspace_for
  from share_jax.checkpoint import Checkpointer

  s = subspace_for(3)
  ckpt = Checkpointer({directory!r})
  ckpt.save(s)
  mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  split = lambda path, shape: P("x") if path.endswith("/basis") else P()
  r = ckpt.restore(mesh=mesh, partition=split)
  basis = r.groups["d256"].basis
  assert basis.sharding == NamedSharding(mesh, P("x")), basis.sharding
  assert len({{sh.data.shape for sh in basis.addressable_shards}}) == 1
  assert basis.addressable_shards[0].data.shape == (2, 256, 32)
  assert r.groups["d256"].coef.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(basis), np.asarray(s.groups["d256"].basis))
  print("ok")
  """
)


def test_restore_into_sharded_arrays(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  env["JAX_PLATFORMS"] = "cpu"
  code = SHARDED.format(tests=str(HERE), directory=str(tmp_path / "ckpt"))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "ok"


def _lines(path: Path) -> list[str]:
  return path.read_text().split() if path.exists() else []


def _partial(directory: Path) -> bool:
  """Whether a killed writer left a temporary or trash directory behind."""
  return any(not p.name.isdigit() and p.name != ".lock" for p in directory.iterdir())


def test_sigkill_mid_save_keeps_every_version(tmp_path, request):
  """SIGKILL a saving process at random moments, and (every other time) from inside at the
  moment a version is being written; every listed version must restore exactly, and the
  directory must stay usable."""
  directory, rng = tmp_path / "ckpt", np.random.default_rng(0)
  ctx = multiprocessing.get_context("forkserver")
  ctx.set_forkserver_preload(["share_jax.checkpoint"])
  request.addfinalizer(multiprocessing.forkserver._forkserver._stop)  # else it outlives the test
  saved, kills, interrupted, mid_write = 0, 0, 0, 0
  for kills in range(1, 13):
    progress = tmp_path / f"progress{kills}"
    wanted = int(rng.integers(0, 3))  # completed saves (in this process) before the kill window
    inside = kills % 2 == 0  # the worker kills itself mid-write after ``wanted`` saves
    worker = ctx.Process(
      target=save_forever, args=(str(directory), str(progress), wanted if inside else None)
    )
    worker.start()
    deadline = time.monotonic() + 60
    while not inside and len(_lines(progress)) <= wanted and worker.is_alive():
      assert time.monotonic() < deadline, "the worker stopped saving"
      time.sleep(0.005)
    if not inside:
      time.sleep(rng.uniform(0.0, 0.2))
      worker.kill()
    worker.join(timeout=120)
    assert worker.exitcode == -signal.SIGKILL
    mid_write += inside
    saved = max([saved, *(int(v) for v in _lines(progress)[1:])])
    ckpt = Checkpointer(directory)
    versions = ckpt.versions()
    partial = _partial(directory)
    assert partial or not inside  # a kill from inside always lands mid-write
    interrupted += partial
    if not versions:  # killed before any save completed
      assert saved == 0
      continue
    # versions are contiguous, include every completed save, and retention holds
    assert versions == list(range(versions[0], versions[-1] + 1))
    assert versions[-1] >= saved and len(versions) <= MAX_TO_KEEP + 1
    for v in versions:
      assert_same(ckpt.restore(v), subspace_for(v))
      assert ckpt.metadata(v).task_meta[0] == {"version": v}
  print(f"{kills} kills ({mid_write} from inside), {interrupted} partial, {saved} saves completed")
  assert saved > MAX_TO_KEEP  # completed saves between the kills, so retention deleted too
  assert interrupted >= mid_write >= 6
  with Checkpointer(directory, max_to_keep=MAX_TO_KEEP) as ckpt:
    version = ckpt.save(subspace_for(saved + 100))
    assert len(ckpt.versions()) == MAX_TO_KEEP
    assert_same(ckpt.restore(version), subspace_for(saved + 100))
  assert not _partial(directory)  # no temporary or trash directories once a writer has run
