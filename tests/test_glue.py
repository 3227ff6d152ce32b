"""GLUE from local files on a local HF checkpoint: the TSV reader with each task's quirks, the
GLUE metrics against SciPy / hand counts, the HF backbone, and configs/glue.py end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hf_assets import glue_folder, tiny_roberta

from share_jax.errors import ShareError
from share_jax.experiments import glue, hf_backbone, metrics
from share_jax.experiments import run as runner

CONFIGS = Path(__file__).parent.parent / "configs"
needs_transformers = pytest.mark.skipif(
  importlib.util.find_spec("transformers") is None, reason="needs transformers (interop extra)"
)


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  return glue_folder(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
  return tiny_roberta(tmp_path_factory.mktemp("roberta"))


# ----------------------------------------------------------------------------- metrics


def test_glue_metrics_match_references():
  from scipy import stats

  rng = np.random.default_rng(0)
  y, pred = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
  tp, tn = np.sum((y == 1) & (pred == 1)), np.sum((y == 0) & (pred == 0))
  fp, fn = np.sum((y == 0) & (pred == 1)), np.sum((y == 1) & (pred == 0))
  mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  assert metrics.matthews(y, pred) == pytest.approx(mcc, rel=1e-12)
  assert metrics.f1(y, pred) == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-12)
  assert metrics.accuracy(y, pred) == pytest.approx((tp + tn) / 200)
  assert metrics.matthews(y, np.ones_like(y)) == 0.0  # a constant prediction
  s, t = rng.uniform(0, 5, 100), rng.uniform(0, 5, 100)
  t[:10] = t[10:20]  # ties
  s = np.round(s, 1)
  assert metrics.pearson(s, t) == pytest.approx(stats.pearsonr(s, t)[0], rel=1e-10)
  assert metrics.spearman(s, t) == pytest.approx(stats.spearmanr(s, t)[0], rel=1e-10)
  assert metrics.is_regression("pearson") and not metrics.is_regression("matthews")
  with pytest.raises(ValueError, match="unknown task metric 'auc'"):
    metrics.task_metric("auc")


# ----------------------------------------------------------------------------- reader


def test_reader_handles_every_task_layout(glue_dir):
  tasks = glue.glue_sequence(glue_dir)
  assert [t.name for t in tasks] == list(glue.PAPER_SEQUENCE)
  by = {t.name: t for t in tasks}
  assert {n: t.metric for n, t in by.items()} == {
    "CoLA": "matthews",
    "MRPC": "accuracy",
    "RTE": "accuracy",
    "STS-B": "pearson",
    "QNLI": "accuracy",
    "SST-2": "accuracy",
  }
  cola_line = (glue_dir / "CoLA" / "train.tsv").read_text().splitlines()[0].split("\t")
  assert by["CoLA"].x_train[0] == cola_line[3] and by["CoLA"].y_train[0] == int(cola_line[1])
  mrpc_line = (glue_dir / "MRPC" / "train.tsv").read_text("utf-8").splitlines()[1].split("\t")
  assert by["MRPC"].x_train[0] == (mrpc_line[3], mrpc_line[4])  # header had a BOM
  for name in ("MRPC", "RTE", "QNLI", "STS-B"):
    assert all(isinstance(x, tuple) and len(x) == 2 for x in by[name].x_train)
  sts = by["STS-B"]
  assert sts.y_train.dtype == np.float32 and sts.num_classes == 1
  assert sts.y_train[0] == pytest.approx(
    float((glue_dir / "STS-B" / "train.tsv").read_text().splitlines()[1].split("\t")[-1])
  )
  assert sts.x_train[-1] == ("the cat", "a dog") and sts.y_train[-1] == np.float32(4.25)
  assert by["RTE"].class_names == ("entailment", "not_entailment")
  assert len(by["SST-2"].x_test) == 8  # dev.tsv is the test split


def test_subsample_keeps_every_class_and_is_seeded(glue_dir):
  a = glue.glue_task(glue_dir, "QNLI", max_train=4, max_test=2, seed=1)
  b = glue.glue_task(glue_dir, "QNLI", max_train=4, max_test=2, seed=1)
  assert a.x_train == b.x_train and len(a.x_train) == 4
  assert sorted(a.y_train.tolist()) == [0, 0, 1, 1] and sorted(a.y_test.tolist()) == [0, 1]
  assert len(glue.glue_task(glue_dir, "STS-B", max_train=5).x_train) == 5
  assert glue.glue_task(glue_dir, "MRPC", metric="f1").metric == "f1"


def test_reader_errors_name_what_is_wrong(tmp_path, glue_dir):
  with pytest.raises(ShareError, match="pass --config.data_dir="):
    glue.glue_sequence(None)
  with pytest.raises(ShareError, match="does not exist"):
    glue.glue_sequence(tmp_path / "nowhere")
  with pytest.raises(ShareError, match=r"lacks the task folder\(s\) \['CoLA', 'MRPC'"):
    glue.glue_sequence(tmp_path)
  with pytest.raises(ShareError, match="unknown GLUE task 'MNLI-x'"):
    glue.glue_task(glue_dir, "MNLI-x")
  with pytest.raises(ShareError, match=r"metrics given for GLUE tasks \['WNLI'\]"):
    glue.glue_sequence(glue_dir, metrics={"WNLI": "accuracy"})
  bad = glue_folder(tmp_path / "bad")
  (bad / "RTE" / "dev.tsv").unlink()
  with pytest.raises(ShareError, match=r"GLUE RTE: missing .*RTE/dev.tsv"):
    glue.glue_task(bad, "RTE")
  rows = (bad / "CoLA" / "train.tsv").read_text().splitlines()
  (bad / "CoLA" / "train.tsv").write_text("\n".join([rows[0], "gj04\t1\tonly three"]))
  with pytest.raises(
    ShareError, match="CoLA/train.tsv, line 2: 3 tab-separated fields, expected 4"
  ):
    glue.glue_task(bad, "CoLA")
  (bad / "SST-2" / "train.tsv").write_text("sentence\tlabel\nthe film\tpositive\n")
  with pytest.raises(ShareError, match=r"line 2: label 'positive' is not one of \['0', '1'\]"):
    glue.glue_task(bad, "SST-2")
  (bad / "STS-B" / "dev.tsv").write_text("sentence1\tsentence2\tgenre\n")
  with pytest.raises(ShareError, match=r"lacks the column\(s\) \['score'\]"):
    glue.glue_task(bad, "STS-B")
  with pytest.raises(ShareError, match="GLUE MRPC with metric 'pearson'"):
    glue.glue_task(glue_dir, "MRPC", metric="pearson")


# ----------------------------------------------------------------------------- HF backbone


def test_model_dir_errors_name_what_is_missing(tmp_path, roberta_dir):
  with pytest.raises(ShareError, match="no model_dir: pass --config.model_dir="):
    hf_backbone.check_model_dir(None)
  with pytest.raises(ShareError, match="does not exist"):
    hf_backbone.check_model_dir(tmp_path / "nowhere")
  (tmp_path / "partial").mkdir()
  (tmp_path / "partial" / "config.json").write_text((roberta_dir / "config.json").read_text())
  with pytest.raises(ShareError, match=r"lacks weights \(one of flax_model.msgpack.*; tokenizer"):
    hf_backbone.check_model_dir(tmp_path / "partial")


@needs_transformers
def test_hf_backbone_frozen_prefix_gives_the_same_features(roberta_dir, glue_dir):
  pairs = glue.glue_task(glue_dir, "RTE").x_train[:5]
  full = hf_backbone.hf_backbone(roberta_dir, max_len=24)
  split = hf_backbone.hf_backbone(roberta_dir, max_len=24, frozen_layers=1)
  inputs = full.encode(pairs)
  assert (inputs["input_ids"][:, 0] == 0).all()  # <s> … </s></s> … </s>
  assert (np.sum(inputs["input_ids"] == 2, axis=1) == 3).all()
  np.testing.assert_allclose(
    np.asarray(split.features(split.params, split.encode(pairs))),
    np.asarray(full.features(full.params, inputs)),
    atol=2e-5,
  )
  assert set(split.params) == {"encoder"} and set(split.params["encoder"]["layer"]) == {"1"}


@needs_transformers
def test_text_config_takes_a_model_dir(roberta_dir):
  config = runner.resolve(quick_config("text_domains"))
  config.model_dir = str(roberta_dir)
  backbone = runner.make_backbone(config)
  assert backbone.name.startswith("hf:roberta") and "max_len=16" in backbone.name
  assert "encoder/layer/1/attention/self/value/kernel" in sj_paths(backbone.params)
  config.backbone.frozen_layers = 3
  with pytest.raises(ShareError, match=r"frozen_layers=3 must be in \[0, 2\)"):
    runner.make_backbone(config)


def sj_paths(params) -> set[str]:
  from share_jax.paths import flatten_with_paths

  return set(flatten_with_paths(params))


# ----------------------------------------------------------------------------- end to end


@needs_transformers
def test_glue_config_end_to_end_in_quick_mode(tmp_path, glue_dir, roberta_dir):
  argv = [
    f"--config={CONFIGS / 'glue.py'}",
    f"--workdir={tmp_path}",
    "--config.quick=True",
    f"--config.data_dir={glue_dir}",
    f"--config.model_dir={roberta_dir}",
    "--config.methods=('head_only', 'share')",
  ]
  assert runner.main(argv) == 0
  out = json.loads((tmp_path / "results.json").read_text())
  assert out["tasks"] == list(glue.PAPER_SEQUENCE)
  assert out["task_metrics"] == ["matthews", "accuracy", "accuracy", "pearson", "accuracy"] + [
    "accuracy"
  ]
  assert out["backbone"].startswith("hf:") and "roberta" in out["backbone"]
  for name, result in out["methods"].items():
    final = np.array(result["acc_matrix"][-1], float)
    assert np.isfinite(final).all(), name
    assert -100 <= final[0] <= 100 and -100 <= final[3] <= 100  # correlations
    assert all(0 <= final[j] <= 100 for j in (1, 2, 4, 5))
  assert out["methods"]["share"]["strict"] and out["methods"]["share"]["BWT"] is not None
  report = json.loads((tmp_path / "diagnostics_share" / "diagnostics.json").read_text())
  assert report["tasks"] == list(glue.PAPER_SEQUENCE)
  assert (tmp_path / "diagnostics_share" / "similarity_cka.png").is_file()


def test_regression_and_classification_tasks_train_together():
  """Per-task and joint LoRA on a classification task then a regression task (tiny BERT)."""
  from share_jax.experiments.backbones import tiny_bert_backbone
  from share_jax.experiments.data import Task
  from share_jax.experiments.fitting import encode_task
  from share_jax.experiments.methods import METHODS, Context
  from share_jax.experiments.synthetic import synthetic_text_tasks

  cls, other = synthetic_text_tasks(2, num_classes=2, n_train=8, n_test=8)
  reg = Task(
    "synthetic_regression",
    other.x_train,
    other.y_train.astype(np.float32) * 2.5,
    other.x_test,
    other.y_test.astype(np.float32) * 2.5,
    ("score",),
    metric="pearson",
  )
  config = runner.resolve(quick_config("glue"))
  config.methods = ("head_only", "lora_per_task", "lora_joint")
  backbone = tiny_bert_backbone(max_len=16, frozen_layers=1)
  tasks = [encode_task(backbone, t) for t in (cls, reg)]
  assert tasks[1].y_train.dtype == np.float32 and tasks[1].metric == "pearson"
  ctx = Context(backbone, config, 0)
  for name in config.methods:
    method = METHODS[name](ctx)
    r = runner.accuracy_matrix(method, tasks)
    assert np.isfinite(r[-1]).all() and -100 <= r[-1, 1] <= 100, name
    if name == "lora_per_task":
      lora, head = method.models[1]
      assert head["w"].shape == (backbone.feature_dim, 1)


def quick_config(name):
  """configs/<name>.py with ``quick=True``."""
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.quick = True
  return config
