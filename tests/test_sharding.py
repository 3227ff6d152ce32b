"""Sharded merges and data-parallel steps on 8 simulated CPU devices.

The ``multidevice`` tests need 8 devices, which must be requested before JAX starts: in a plain
run, ``test_multidevice_checks`` runs them in a child pytest with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import sharded_run
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from numpy_reference import Planted

import share_jax as sj
from share_jax import ShareError, _driver, merge, sharding, train

DEVICES = 8
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)")


@pytest.fixture
def mesh():
  if jax.device_count() < DEVICES:
    pytest.skip(f"needs {DEVICES} devices (test_multidevice_checks provides them)")
  return sharding.make_mesh()


def test_multidevice_checks():
  """Runs this file's multidevice tests in a child process that has 8 CPU devices."""
  if jax.device_count() >= DEVICES:
    pytest.skip("this process has the devices: the multidevice tests run here")
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
  env = os.environ | {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "pytest", "-q", "-m", "multidevice", "-p", "no:cacheprovider"]
  proc = subprocess.run(
    [*cmd, __file__],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    cwd=Path(__file__).parent,
  )
  summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary


def test_make_mesh_states_axis_types_and_merges_need_auto():
  mesh = sharding.make_mesh()
  assert mesh.shape == {"data": jax.device_count()} and mesh.axis_types == (AxisType.Auto,)
  explicit = sharding.make_mesh(axis_types=(AxisType.Explicit,))
  assert explicit.axis_types == (AxisType.Explicit,)
  _, sub, _, _ = sharded_run.problem()
  with pytest.raises(ShareError, match="mesh axis 'data' must be Auto"):
    sharding.shard_subspace(sub, explicit)


@pytest.mark.multidevice
def test_two_axis_mesh(mesh):
  two = sharding.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  assert two.shape == {"data": 4, "model": 2}
  grp = sharding.shard_subspace(sharded_run.problem()[1], two, "model").groups["d24"]
  assert grp.basis.sharding.spec == P("model")
  assert {s.data.shape[0] for s in grp.basis.addressable_shards} == {16 // 2}


@pytest.mark.multidevice
def test_sharded_absorb_equals_unsharded_without_collectives(mesh, monkeypatch):
  programs = []

  def spy(*args, **kwargs):  # the exact programs absorb runs, compiled for their inputs
    programs.append(merge.merge_group.lower(*args, **kwargs).compile().as_text())
    return merge.merge_group(*args, **kwargs)

  monkeypatch.setattr(_driver, "merge_group", spy)
  merged = sharded_run.sharded_merge(mesh)
  assert programs and not [COLLECTIVE.findall(p) for p in programs if COLLECTIVE.search(p)]
  # Layers stay split: each device holds 2 of group d24's 16 rows; L = 1 groups are replicated.
  grp = merged.groups["d24"]
  assert grp.basis.sharding.spec == P("data") and grp.coef.sharding.spec == P("data")
  assert {s.data.shape[0] for s in grp.basis.addressable_shards} == {16 // DEVICES}
  assert merged.groups["d16"].basis.sharding.is_fully_replicated
  want = sharded_run.reference()
  for g, grp in merged.groups.items():
    for name, leaf in sharded_run.fields(grp).items():
      np.testing.assert_allclose(leaf, want[f"merge/{g}/{name}"], 1e-5, 1e-5, err_msg=f"{g}/{name}")


@pytest.mark.multidevice
def test_donated_sharded_absorb_writes_in_place_and_keeps_the_layout(mesh):
  pl = Planted(seed=7, shapes=sharded_run.SHAPES)
  sub = sj.init_subspace(pl.params, pl.loras(3), k=4, task_capacity=8)  # room: no growth
  new = pl.loras(2)
  want = sj.absorb(sub, new, task_ids=["x", "y"])
  placed = sharding.shard_subspace(sub, mesh)
  merged = sj.absorb(placed, new, task_ids=["x", "y"], donate=True)
  assert all(grp.coef.is_deleted() for grp in placed.groups.values())
  assert merged.groups["d24"].coef.sharding.spec == P("data")
  for g, grp in merged.groups.items():
    ref = sharded_run.fields(want.groups[g])
    for name, leaf in sharded_run.fields(grp).items():
      np.testing.assert_allclose(leaf, ref[name], 1e-5, 1e-5, err_msg=f"{g}/{name}")


@pytest.mark.multidevice
def test_data_parallel_steps_equal_one_device(mesh):
  got, want = sharded_run.run(mesh), sharded_run.reference()
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.multidevice
def test_data_parallel_step_splits_the_batch(mesh):
  params, sub, _, batch = sharded_run.problem()
  step = sharding.data_parallel_step(sharded_run.loss_fn, sharded_run.OPTIMIZER, sub.layout, mesh)
  trainable = train.task_state(sub, 0)
  args = (trainable, sharded_run.OPTIMIZER.init(trainable), params, sub.bases, batch)
  compiled = step.lower(*args).compile()
  assert compiled.input_shardings[0][-1][0].spec == P("data")
  assert "all-reduce" in compiled.as_text()  # gradients summed over the batch shards


@pytest.mark.multidevice
def test_finish_task_on_the_mesh_after_data_parallel_steps(mesh):
  params, sub, _, batch = sharded_run.problem()
  sharded, opt = sharding.shard_subspace(sub, mesh), sharded_run.OPTIMIZER
  step = sharding.data_parallel_step(sharded_run.loss_fn, opt, sub.layout, mesh)
  trainable = train.task_state(sub, 0)
  state = sharding.replicate((trainable, opt.init(trainable), params, sharded.bases), mesh)
  trained, _, _ = step(*state, batch)
  got = train.finish_task(sharded, trained, "new")
  want = train.finish_task(sub, jax.device_get(trained), "new")
  assert got.groups["d24"].basis.sharding.spec == P("data")
  for g, grp in want.groups.items():
    have = sharded_run.fields(got.groups[g])
    for name, leaf in sharded_run.fields(grp).items():
      np.testing.assert_allclose(have[name], leaf, 1e-5, 1e-5, err_msg=f"{g}/{name}")
