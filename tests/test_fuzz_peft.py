"""Fuzz cases (issue 8 §2) on PEFT adapters: duplicated factors, patterns that could hang or do
not compile, non-float tensors, task metadata records, and the CLI absorbing an adapter of
other kernels. Each is a ShareError naming the keys / pattern / kernels."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import safetensors.numpy
from lora_adapters import write_random_adapter

from share_jax.checkpoint import Checkpointer
from share_jax.cli import main as cli
from share_jax.errors import ShareError
from share_jax.peft_io import CONFIG_FILE, WEIGHTS_FILE, AdapterMeta, export_task, read_adapter

MODULE = "bert.encoder.layer.0.attention.self.query"
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"]}


def write_raw(directory, tensors: dict, **config) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).write_text(json.dumps({**CONFIG, **config}))
  safetensors.numpy.save_file(tensors, str(directory / WEIGHTS_FILE))


def factors(module: str = MODULE, name: str = "", dtype=np.float32, prefix="base_model.model."):
  rng = np.random.default_rng(0)
  tag = f".{name}" if name else ""
  return {
    f"{prefix}{module}.lora_A{tag}.weight": rng.normal(size=(2, 32)).astype(dtype),
    f"{prefix}{module}.lora_B{tag}.weight": rng.normal(size=(32, 2)).astype(dtype),
  }


@pytest.mark.parametrize(
  "extra, first, second",
  [
    (  # with and without the base_model.model. prefix
      factors(prefix=""),
      f"base_model.model.{MODULE}.lora_A.weight",
      f"{MODULE}.lora_A.weight",
    ),
    (  # two adapter names in one file
      factors(name="other"),
      f"base_model.model.{MODULE}.lora_A.default.weight",
      f"base_model.model.{MODULE}.lora_A.other.weight",
    ),
  ],
)
def test_the_same_factor_twice_is_refused_naming_both_keys(tmp_path, extra, first, second):
  base = factors(name="default") if "default" in first else factors()
  write_raw(tmp_path, {**base, **extra})
  with pytest.raises(ShareError) as error:
    read_adapter(tmp_path, scheme="share_bert")
  message = str(error.value)
  assert "are the same factor of module" in message
  assert repr(first) in message and repr(second) in message


@pytest.mark.parametrize(
  "patterns, message",
  [
    ({"(a|a)+b": 2}, r"rank_pattern: pattern '\(a\|a\)\+b': a repetition of a repetition"),
    ({"(a+)+$": 2}, r"rank_pattern: pattern '\(a\+\)\+\$': a repetition of a repetition"),
    ({".*.*.*.*b": 2}, r"more than 3 unbounded repetitions"),
    ({"(a)\\1": 2}, r"back-references are not supported"),
    ({"[": 2}, r"rank_pattern: pattern '\[': invalid regular expression"),
    ({"query": "two"}, r"rank_pattern\['query'\] must be a positive number, got 'two'"),
  ],
)
def test_rank_patterns_from_a_file_never_hang_or_raise_raw_errors(tmp_path, patterns, message):
  module = "a" * 40 + "." + "a" * 200  # a long name, where (a|a)+b backtracks for ever
  write_raw(tmp_path, factors(module=module), rank_pattern=patterns)
  start = time.monotonic()
  with pytest.raises(ShareError, match=message):
    read_adapter(tmp_path)
  assert time.monotonic() - start < 5


def test_alpha_pattern_and_target_modules_are_checked_too(tmp_path):
  write_raw(tmp_path / "a", factors(), alpha_pattern={"(x+)*": 2})
  with pytest.raises(ShareError, match=r"alpha_pattern: pattern '\(x\+\)\*'"):
    read_adapter(tmp_path / "a", scheme="share_bert")
  write_raw(tmp_path / "b", factors(), target_modules="(q|u)+ery(")
  with pytest.raises(ShareError, match=r"target_modules: pattern '\(q\|u\)\+ery\(': invalid"):
    read_adapter(tmp_path / "b", scheme="share_bert")


def test_rank_pattern_keeps_peft_suffix_semantics(tmp_path):
  """A key matches the whole module name or a suffix after a dot (PEFT's re.match rule)."""
  rng = np.random.default_rng(1)
  tensors = {
    f"base_model.model.{MODULE}.lora_A.weight": rng.normal(size=(3, 32)).astype(np.float32),
    f"base_model.model.{MODULE}.lora_B.weight": rng.normal(size=(32, 3)).astype(np.float32),
  }
  for key in (
    "query",
    "self.query",
    "layer.0.attention.self.query",
    r"layer\.\d+\..*query",
    MODULE,
  ):
    write_raw(tmp_path / str(hash(key)), tensors, rank_pattern={key: 3})
    assert read_adapter(tmp_path / str(hash(key)), scheme="share_bert").modules
  write_raw(tmp_path / "partial", tensors, rank_pattern={"uery": 3})  # not at a dot: no match
  with pytest.raises(ShareError, match="has rank 3 but adapter_config.json says 2"):
    read_adapter(tmp_path / "partial", scheme="share_bert")


@pytest.mark.parametrize("dtype", [np.int8, np.bool_, np.int32])
def test_non_float_factor_tensors_are_refused(tmp_path, dtype):
  write_raw(tmp_path, factors(dtype=dtype))
  with pytest.raises(ShareError, match=r"tensors of a non-floating-point dtype: .*lora_A.weight"):
    read_adapter(tmp_path, scheme="share_bert")


def test_adapter_meta_records(tmp_path):
  write_random_adapter(tmp_path / "a", np.random.default_rng(0))
  adapter = read_adapter(tmp_path / "a", scheme="share_bert")
  meta = AdapterMeta.parse(adapter.task_meta())
  assert meta == adapter.meta and meta.scheme == "share_bert"
  assert AdapterMeta.parse(json.loads(json.dumps(adapter.task_meta()))) == meta
  assert AdapterMeta.parse(None) is None and AdapterMeta.parse({"source": "jax"}) is None
  with pytest.raises(ShareError, match=r"task 3: 'peft' is not \{scheme, config, modules\}"):
    AdapterMeta.parse({"peft": {"scheme": "share_bert"}}, "task 3")
  with pytest.raises(ShareError, match=r"task 0: 'peft' is not"):
    export_task(None, 0, tmp_path / "out", meta={"peft": ["bad"]})


def test_cli_absorb_of_other_kernels_names_them(tmp_path, capsys):
  rng = np.random.default_rng(2)
  qv, qk = tmp_path / "qv", tmp_path / "qk"
  write_random_adapter(qv, rng)
  write_random_adapter(qk, rng)
  # qk adapts key instead of value: rename its value modules
  config = json.loads((qk / CONFIG_FILE).read_text().replace("self\\\\.value", "self\\\\.key"))
  tensors = safetensors.numpy.load_file(str(qk / WEIGHTS_FILE))
  renamed = {k.replace("attention.self.value", "attention.self.key"): v for k, v in tensors.items()}
  safetensors.numpy.save_file(renamed, str(qk / WEIGHTS_FILE))
  config["target_modules"] = ["query", "key", "output.dense"]
  (qk / CONFIG_FILE).write_text(json.dumps(config))
  ckpt = tmp_path / "ckpt"
  assert cli(["init", str(qv), "--out", str(ckpt), "--k", "2", "--scheme", "share_bert"]) == 0
  capsys.readouterr()
  assert cli(["absorb", str(ckpt), str(qk)]) == 1
  err = capsys.readouterr().err
  assert "task 'qk' adapts a different set of kernels: unexpected ['layer_0/attention/key" in err
  assert "missing ['layer_0/attention/value/kernel'" in err
  assert "not in the base params" not in err
  assert Checkpointer(ckpt).versions() == [1]  # nothing written
