"""The ``share-jax`` command line: every verb end to end, ``--help`` everywhere, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest
from lora_adapters import write_random_adapter

import share_jax as sj
from share_jax.checkpoint import Checkpointer
from share_jax.cli import main
from share_jax.peft_io import read_adapter

VERBS = ("init", "absorb", "export", "info", "versions", "rollback", "run")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def fails(capsys, *argv: str) -> str:
  """The one-line error of a failing command."""
  code, _, err = run_cli(capsys, *argv)
  assert code == 1 and err.count("\n") == 1, err
  return err


@pytest.mark.parametrize("verb", [None, *VERBS])
def test_help_on_every_verb(capsys, verb):
  with pytest.raises(SystemExit) as exit_:
    main([verb, "--help"] if verb else ["--help"])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: share-jax {verb or ''}".rstrip())
  assert all(v in out for v in VERBS) if verb is None else "--help" in out


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("adapters")
  rng = np.random.default_rng(0)
  for name in ("sst2", "mnli", "rte"):
    write_random_adapter(root / name, rng)
  return root


def test_verbs_end_to_end(capsys, tmp_path, adapter_dirs):
  ckpt, a = tmp_path / "ckpt", adapter_dirs
  code, out, _ = run_cli(
    capsys, "init", a / "sst2", a / "mnli", "--out", ckpt, "--k", "3", "--scheme", "share_bert"
  )
  assert code == 0 and "version 1, 2 tasks ['sst2', 'mnli']" in out
  code, out, _ = run_cli(
    capsys, "absorb", ckpt, a / "rte", "--task-ids", "rte-v2", "--explained-of", "absorbed"
  )
  assert code == 0 and "version 2, 3 tasks (added ['rte-v2'])" in out

  code, out, _ = run_cli(capsys, "versions", ckpt)
  lines = out.splitlines()
  assert code == 0 and len(lines) == 2
  assert lines[0].startswith("1\t2 tasks") and lines[1].startswith("2\t3 tasks")
  assert lines[1].endswith("(latest)")

  code, out, _ = run_cli(capsys, "info", ckpt, "--json")
  info = json.loads(out)
  assert code == 0 and info["version"] == 2 and info["tasks"] == ["sst2", "mnli", "rte-v2"]
  assert {r["k"] for r in info["ranks"]} == {3} and info["config"]["k"] == 3
  assert info["config"]["explained_of"] == "absorbed"
  assert all(0 < r["explained"] < 1 for r in info["ranks"])  # k = 3 drops some of 3 rank-r tasks
  assert info["storage"]["ratio_per_task"] > 1 and info["base"] is None
  code, out, _ = run_cli(capsys, "info", ckpt, "--version", "1")
  assert code == 0 and "tasks (2, in learning order): ['sst2', 'mnli']" in out
  assert "layer_0/attention/query/kernel [a]: k=3" in out and "storage:" in out
  assert "variance explained" in out

  code, out, _ = run_cli(capsys, "export", ckpt, "mnli", "--out", tmp_path / "mnli")
  assert code == 0 and "r=3" in out
  exported = read_adapter(tmp_path / "mnli", scheme="share_bert")
  original = read_adapter(a / "mnli", scheme="share_bert")
  subspace = Checkpointer(ckpt).restore()
  want = sj.lora_leaves(sj.reconstruct(subspace, "mnli"))
  for path, lora in sj.lora_leaves(exported.lora).items():
    np.testing.assert_allclose(lora.delta(), want[path].delta(), rtol=1e-5, atol=1e-5)
  assert exported.modules == original.modules
  assert exported.config["target_modules"] == original.config["target_modules"]
  head = subspace.heads["mnli"]["classifier"]["kernel"]
  np.testing.assert_array_equal(exported.heads["classifier"]["kernel"], head)

  code, out, _ = run_cli(capsys, "rollback", ckpt, "1")
  assert code == 0 and "dropped versions [2]" in out
  assert Checkpointer(ckpt).versions() == [1]


def test_errors_are_one_line(capsys, tmp_path, adapter_dirs):
  ckpt, a = tmp_path / "ckpt", adapter_dirs
  assert "share-jax info: error: no checkpoint versions in" in fails(capsys, "info", ckpt)
  assert f"{tmp_path}: no adapter_config.json" in fails(capsys, "init", tmp_path, "--out", ckpt)
  assert not ckpt.exists()  # a failed init writes nothing
  assert "2 task ids for 1 adapter directories" in fails(
    capsys, "init", a / "rte", "--out", ckpt, "--task-ids", "x", "y"
  )
  init = ("init", a / "sst2", a / "mnli", "--out", ckpt, "--k", "3", "--scheme", "share_bert")
  assert run_cli(capsys, *init)[0] == 0
  assert "already holds versions [1]; use absorb" in fails(capsys, *init)
  assert "duplicate task id 'mnli'" in fails(capsys, "absorb", ckpt, a / "mnli")
  assert "unknown task id 'zzz'; the checkpoint holds ['sst2', 'mnli']" in fails(
    capsys, "export", ckpt, "zzz", "--out", tmp_path / "x"
  )
  assert "no version 7" in fails(capsys, "rollback", ckpt, "7")
  # usage errors: argparse's status 2, still one line
  with pytest.raises(SystemExit) as exit_:
    main(["init", str(a / "rte")])
  err = capsys.readouterr().err
  assert exit_.value.code == 2
  assert err == "share-jax init: error: the following arguments are required: --out\n"


def test_run_delegates_to_the_runner(capsys, monkeypatch):
  # as if the module did not exist
  monkeypatch.setitem(sys.modules, "share_jax.experiments.run", None)
  assert "share_jax.experiments.run) is not available" in fails(capsys, "run", "--config", "c.py")
  seen = []
  runner = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0)
  monkeypatch.setitem(sys.modules, "share_jax.experiments.run", runner)
  assert run_cli(capsys, "run", "--config", "c.py", "--steps", "3")[0] == 0
  assert seen == [["--config", "c.py", "--steps", "3"]]


def test_python_dash_m_exit_status(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "share_jax", "versions", str(tmp_path / "missing")],
    capture_output=True,
    text=True,
  )
  assert out.returncode == 1
  missing = tmp_path / "missing"
  assert out.stderr == f"share-jax versions: error: no checkpoint versions in {missing}\n"
