"""PEFT interop: module-name schemes, adapter round trips, clear import errors, and (with torch +
peft + transformers installed) imports and exports checked against real PEFT."""

from __future__ import annotations

import importlib.util
import json

import jax
import numpy as np
import pytest
import safetensors.numpy
from lora_adapters import KERNELS, bert_shapes, kernel_zeros, random_head, random_lora

import share_jax as sj
from share_jax.experiments.models.vit import ViT, ViTConfig
from share_jax.paths import flatten_with_paths
from share_jax.peft_io import (
  CONFIG_FILE,
  WEIGHTS_FILE,
  export_task,
  get_scheme,
  read_adapter,
  write_adapter,
)

INTEROP = ("torch", "peft", "transformers")
needs_peft = pytest.mark.skipif(
  any(importlib.util.find_spec(m) is None for m in INTEROP),
  reason="needs torch, peft and transformers (pip install torch==2.13.0 -e '.[interop]')",
)


def deltas(tree) -> dict[str, np.ndarray]:
  return {p: np.asarray(x.delta()) for p, x in sj.lora_leaves(tree).items()}


def assert_deltas_close(got: dict, want: dict) -> None:
  assert got.keys() == want.keys()
  for p in want:
    np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-5, err_msg=p)


# ----------------------------------------------------------------------------- schemes


@pytest.mark.parametrize(
  "scheme, module, path",
  [
    ("share_bert", "bert.encoder.layer.3.attention.self.query", "layer_3/attention/query/kernel"),
    (
      "share_bert",
      "roberta.encoder.layer.0.attention.output.dense",
      "layer_0/attention/output/kernel",
    ),
    ("share_bert", "encoder.layer.11.intermediate.dense", "layer_11/intermediate/kernel"),
    ("share_bert", "bert.encoder.layer.2.output.dense", "layer_2/output/kernel"),
    (
      "share_vit",
      "vit.encoder.layer.3.attention.attention.value",
      "layer_3/attention/value/kernel",
    ),
    ("share_vit", "vit.encoder.layer.1.attention.output.dense", "layer_1/attention/output/kernel"),
    ("hf_flax", "model.layers.3.self_attn.q_proj", "model/layers/3/self_attn/q_proj/kernel"),
    ("hf_flax", "model.layers.0.mlp.down_proj", "model/layers/0/mlp/down_proj/kernel"),
    (
      "hf_flax",
      "encoder.layer.3.attention.self.query",
      "encoder/layer/3/attention/self/query/kernel",
    ),
    (
      "hf_flax",
      "vit.encoder.layer.0.attention.attention.key",
      "vit/encoder/layer/0/attention/attention/key/kernel",
    ),
  ],
)
def test_scheme_maps_both_ways(scheme, module, path):
  s = get_scheme(scheme)
  assert s.to_flax(module) == path
  prefix = module[: module.index("encoder")] if scheme.startswith("share") else ""
  assert s.to_peft(path, prefix=prefix) == module


def test_share_schemes_name_real_model_kernels():
  """Every HF BERT / ViT projection maps to a kernel of share_jax's own models."""
  vit_shapes = jax.eval_shape(ViT(ViTConfig.tiny()).init, jax.random.key(0), np.zeros((1, 28, 28)))
  for scheme, params, attn in (
    ("share_bert", bert_shapes(), "attention.self"),
    ("share_vit", vit_shapes["params"], "attention.attention"),
  ):
    kernels = flatten_with_paths(params)
    names = [f"{attn}.{n}" for n in ("query", "key", "value")]
    names += ["attention.output.dense", "intermediate.dense", "output.dense"]
    for i in range(2):
      for name in names:
        path = get_scheme(scheme).to_flax(f"encoder.layer.{i}.{name}")
        assert kernels[path].ndim == 2, (scheme, name)


def test_unknown_modules_and_schemes_are_errors():
  with pytest.raises(
    sj.ShareError, match="'model.layers.0.self_attn.q_proj' has no Flax path in scheme 'share_bert'"
  ):
    get_scheme("share_bert").to_flax("model.layers.0.self_attn.q_proj")
  with pytest.raises(sj.ShareError, match="'embeddings/word/embedding' has no PEFT module name"):
    get_scheme("share_bert").to_peft("embeddings/word/embedding")
  with pytest.raises(sj.ShareError, match=r"unknown module-name scheme 'gpt'; known: \["):
    get_scheme("gpt")


# ----------------------------------------------------------------------------- round trips


def test_write_read_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  lora, head = random_lora(rng), random_head(rng)
  config = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 16,
    "use_rslora": True,
    "alpha_pattern": {"layer.0.output.dense": 5},
    "target_modules": ["query", "value", "output.dense"],
    "modules_to_save": ["classifier"],
  }
  written = write_adapter(
    tmp_path / "ad", lora, scheme="share_bert", prefix="bert", config=config, heads=head
  )
  assert written["r"] == 4 and written["lora_alpha"] == 16 and written["use_rslora"]
  assert written["rank_pattern"] == {r"bert\.encoder\.layer\.1\.attention\.self\.value": 2}
  assert written["alpha_pattern"] == config["alpha_pattern"]
  tensors = safetensors.numpy.load_file(tmp_path / "ad" / WEIGHTS_FILE)
  a = tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"]
  b = tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"]
  assert a.shape == (4, 32) and b.shape == (32, 4)  # torch layout (r, in), (out, r)
  assert tensors["base_model.model.classifier.weight"].shape == (3, 32)

  adapter = read_adapter(tmp_path / "ad", scheme="share_bert", params=bert_shapes())
  assert_deltas_close(deltas(adapter.lora), deltas(lora))
  jax.tree.map(np.testing.assert_array_equal, adapter.heads, head)
  assert adapter.modules["layer_1/output/kernel"] == "bert.encoder.layer.1.output.dense"
  assert adapter.config == json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
  assert adapter.task_meta()["peft"]["scheme"] == "share_bert"


def test_export_task_at_effective_rank(tmp_path):
  """k = 3 < rank 4: the exported adapter has rank 3 (2 where the LoRA had rank 2) and the
  subspace's exact ΔW."""
  rng = np.random.default_rng(1)
  loras = [random_lora(rng, alpha=None) for _ in range(3)]
  sub = sj.init_subspace(kernel_zeros(), loras, k=3, task_ids=["x", "y", "z"])
  sub = sub.with_head("y", {"kernel": np.ones((32, 2), np.float32), "bias": np.zeros(2)})
  config = export_task(
    sub, "y", tmp_path / "y", scheme="share_bert", prefix="bert.", head_module="classifier"
  )
  assert (config["r"], config["lora_alpha"]) == (3, 3)
  assert config["rank_pattern"] == {r"bert\.encoder\.layer\.1\.attention\.self\.value": 2}
  assert config["modules_to_save"] == ["classifier"]
  assert sorted(config["target_modules"]) == sorted(
    get_scheme("share_bert").to_peft(p, "bert.") for p in KERNELS
  )
  back = read_adapter(tmp_path / "y", scheme="share_bert")
  assert_deltas_close(deltas(back.lora), deltas(sj.reconstruct(sub, "y")))
  assert back.heads["classifier"]["kernel"].shape == (32, 2)
  with pytest.raises(sj.ShareError, match="already exists and is not an empty directory"):
    export_task(sub, "y", tmp_path / "y", scheme="share_bert")
  with pytest.raises(sj.ShareError, match="head leaf 'bias' is not <module>/"):
    export_task(sub, "y", tmp_path / "bare", scheme="share_bert")
  assert not (tmp_path / "bare").exists()


# ----------------------------------------------------------------------------- import errors


def write_raw(directory, config: dict, tensors: dict) -> None:
  directory.mkdir()
  (directory / CONFIG_FILE).write_text(json.dumps(config))
  safetensors.numpy.save_file(tensors, str(directory / WEIGHTS_FILE))


GOOD = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "bias": "none"}
Q = "base_model.model.bert.encoder.layer.0.attention.self.query"
A, B = np.ones((2, 32), np.float32), np.ones((32, 2), np.float32)


@pytest.mark.parametrize(
  "config, tensors, message",
  [
    ({"peft_type": "IA3"}, {}, "peft_type 'IA3' is not supported"),
    ({"bias": "all"}, {}, "bias='all' is not supported"),
    ({"use_dora": True}, {}, r"unsupported LoRA variant options \['use_dora'\]"),
    ({"init_lora_weights": "pissa_niter_4"}, {}, "changed the base weights"),
    ({"r": 0}, {}, "r must be a positive number"),
    ({"r": 8}, {}, f"{Q[17:]}' has rank 2 but adapter_config.json says 8"),
    ({"rank_pattern": {"query": 3}}, {}, "has rank 2 but adapter_config.json says 3"),
    ({}, {f"{Q}.lora_B.weight": None}, "has lora_A only"),
    ({}, {f"{Q}.lora_A.weight": np.ones((3, 32), np.float32)}, r"lora_A \(3, 32\) and lora_B"),
    (
      {},
      {"base_model.model.bert.embeddings.word_embeddings.lora_embedding_A": A},
      "neither LoRA factors nor modules_to_save",
    ),
    (
      {},
      {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": A,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": B,
      },
      r"no Flax path in scheme 'share_bert': \['model.layers.0.self_attn.q_proj'\]",
    ),
    (
      {},
      {f"{Q}.lora_B.weight": np.ones((64, 2), np.float32)},
      r"maps 32 -> 64 but the base kernel 'layer_0/attention/query/kernel' is \(32, 32\)",
    ),
  ],
)
def test_bad_adapters_are_clear_errors(tmp_path, config, tensors, message):
  tensors = {f"{Q}.lora_A.weight": A, f"{Q}.lora_B.weight": B, **tensors}
  write_raw(
    tmp_path / "ad", {**GOOD, **config}, {k: v for k, v in tensors.items() if v is not None}
  )
  with pytest.raises(sj.ShareError, match=message):
    read_adapter(tmp_path / "ad", scheme="share_bert", params=bert_shapes())


def test_adapter_name_in_keys_and_bare_module_names(tmp_path):
  """``…lora_A.<adapter>.weight`` keys and a model without a task head (no ``bert.`` prefix)."""
  q = "base_model.model.encoder.layer.0.attention.self.query"
  write_raw(
    tmp_path / "ad", GOOD, {f"{q}.lora_A.default.weight": A, f"{q}.lora_B.default.weight": B}
  )
  adapter = read_adapter(tmp_path / "ad", scheme="share_bert")
  assert adapter.modules == {"layer_0/attention/query/kernel": q.removeprefix("base_model.model.")}
  np.testing.assert_allclose(
    deltas(adapter.lora)["layer_0/attention/query/kernel"], (A.T @ B.T) * 2
  )


def test_export_refuses_configs_that_skip_modules(tmp_path):
  lora = random_lora(np.random.default_rng(0))
  for config in (
    {**GOOD, "target_modules": ["query"]},
    {**GOOD, "target_modules": ["query", "value", "output.dense"], "exclude_modules": ["value"]},
  ):
    with pytest.raises(sj.ShareError, match=r"would leave modules \['bert.encoder.layer.0"):
      write_adapter(tmp_path / "ad", lora, scheme="share_bert", prefix="bert.", config=config)
  assert not (tmp_path / "ad").exists()


def test_missing_files_are_clear_errors(tmp_path):
  (tmp_path / "ad").mkdir()
  (tmp_path / "ad" / CONFIG_FILE).write_text(json.dumps(GOOD))
  with pytest.raises(sj.ShareError, match=f"no {WEIGHTS_FILE}"):
    read_adapter(tmp_path / "ad")


# ----------------------------------------------------------------------------- real PEFT


def torch_bert(seed: int):
  import torch
  from transformers import BertConfig, BertForSequenceClassification

  torch.manual_seed(seed)
  config = BertConfig(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    num_labels=3,
  )
  return BertForSequenceClassification(config)


def peft_adapter(model, directory, seed: int, **config):
  """Wrap ``model`` with a PEFT LoRA (random, nonzero B), save it to ``directory``."""
  import torch
  from peft import LoraConfig, get_peft_model

  peft_model = get_peft_model(model, LoraConfig(**config))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name or "modules_to_save" in name:
        p.normal_()
  peft_model.save_pretrained(directory)
  return peft_model


BERT_LORA = dict(
  r=4,
  lora_alpha=8,
  target_modules=["query", "value", "output.dense"],
  modules_to_save=["classifier"],
  rank_pattern={"layer.1.attention.self.value": 2},
  alpha_pattern={"query": 3},
)


@needs_peft
@pytest.mark.parametrize(
  "config",
  [
    BERT_LORA,
    dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["key", "intermediate.dense"]),
  ],
  ids=["patterns+head", "rslora"],
)
def test_import_matches_peft_delta_weight(tmp_path, config):
  peft_model = peft_adapter(torch_bert(0), tmp_path / "ad", seed=1, **config)
  adapter = read_adapter(tmp_path / "ad", scheme="share_bert", params=bert_shapes())
  got = deltas(adapter.lora)
  adapted = {n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
  assert set(adapter.modules.values()) == adapted
  for path, module in adapter.modules.items():
    layer = peft_model.base_model.model.get_submodule(module)
    want = layer.get_delta_weight("default").detach().numpy().T  # torch (out, in) -> Flax
    np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=1e-6, err_msg=path)
  if "modules_to_save" in config:
    classifier = peft_model.base_model.model.classifier.modules_to_save["default"]
    np.testing.assert_array_equal(
      adapter.heads["classifier"]["kernel"], classifier.weight.T.detach()
    )
    np.testing.assert_array_equal(adapter.heads["classifier"]["bias"], classifier.bias.detach())
  # the same adapter under HF Flax naming
  hf = read_adapter(tmp_path / "ad", scheme="hf_flax")
  assert set(hf.modules) == {f"{m.replace('.', '/')}/kernel" for m in adapted}


@needs_peft
def test_import_llama_q_v_proj(tmp_path):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  model = LlamaForCausalLM(
    LlamaConfig(
      vocab_size=32,
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
    )
  )
  peft_model = peft_adapter(
    model, tmp_path / "ad", seed=2, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]
  )
  adapter = read_adapter(tmp_path / "ad", scheme="hf_flax")
  got = deltas(adapter.lora)
  assert got["model/layers/1/self_attn/v_proj/kernel"].shape == (16, 8)  # grouped-query kv
  for path, module in adapter.modules.items():
    want = peft_model.base_model.model.get_submodule(module).get_delta_weight("default")
    np.testing.assert_allclose(got[path], want.detach().numpy().T, rtol=1e-5, atol=1e-6)


@needs_peft
def test_export_loads_in_peft(tmp_path):
  """Tasks exported from a subspace load in PEFT; the merged weights move by the subspace's ΔW."""
  import torch
  from peft import PeftModel

  adapters = []
  for seed in range(3):
    peft_adapter(torch_bert(0), tmp_path / f"in{seed}", seed=seed, **BERT_LORA)
    adapters.append(read_adapter(tmp_path / f"in{seed}", scheme="share_bert", params=bert_shapes()))
  sub = sj.init_subspace(kernel_zeros(), [a.lora for a in adapters], k=3, task_ids=[0, 1, 2])
  sub = sub.with_head(0, adapters[0].heads)

  exports = {
    0: export_task(sub, 0, tmp_path / "out0", meta=adapters[0].task_meta()),
    1: export_task(sub, 1, tmp_path / "out1", scheme="share_bert", prefix="bert."),  # no metadata
  }
  c = exports[0]
  assert (c["r"], c["lora_alpha"], c["alpha_pattern"]) == (3, 8, BERT_LORA["alpha_pattern"])
  assert sorted(c["target_modules"]) == sorted(BERT_LORA["target_modules"])
  assert c["rank_pattern"] == {r"bert\.encoder\.layer\.1\.attention\.self\.value": 2}
  assert c["modules_to_save"] == ["classifier"] and exports[1]["modules_to_save"] is None

  for task in exports:
    base = torch_bert(0)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, tmp_path / f"out{task}").merge_and_unload()
    want = deltas(sj.reconstruct(sub, task))
    for path, module in adapters[0].modules.items():
      with torch.no_grad():
        moved = merged.get_submodule(module).weight - before[f"{module}.weight"]
      np.testing.assert_allclose(moved.numpy().T, want[path], rtol=1e-5, atol=1e-5, err_msg=path)
    classifier = merged.classifier.weight.detach().numpy().T
    if task == 0:
      np.testing.assert_array_equal(classifier, adapters[0].heads["classifier"]["kernel"])
    else:
      np.testing.assert_array_equal(classifier, before["classifier.weight"].numpy().T)
