"""HF Flax parameters of every model family the library targets (BERT, RoBERTa, Llama, Mistral,
ViT) take PEFT LoRA adapters trained in torch: ``read_adapter`` (hf_flax scheme) + ``apply_lora``,
and the same adapter stored in a Share subspace (``task_params``), give the torch PEFT model's
outputs to float32 round-off. Tiny random configs; the Flax weights are converted from torch."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import share_jax as sj
from share_jax.peft_io import read_adapter

pytestmark = pytest.mark.skipif(
  any(importlib.util.find_spec(m) is None for m in ("torch", "peft", "transformers")),
  reason="needs torch, peft and transformers (pip install torch==2.13.0 -e '.[interop]')",
)
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
DECODER = dict(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=32,
)


def family(name: str):
  """(torch model class, Flax model class, config, LoRA target modules, input kind)."""
  import transformers as tf

  return {
    "bert": (
      tf.BertModel,
      tf.FlaxBertModel,
      tf.BertConfig(vocab_size=64, **ENCODER),
      ["query", "value", "output.dense"],
      "text",
    ),
    "roberta": (
      tf.RobertaModel,
      tf.FlaxRobertaModel,
      tf.RobertaConfig(vocab_size=64, type_vocab_size=1, **ENCODER),
      ["query", "value"],
      "text",
    ),
    "llama": (
      tf.LlamaModel,
      tf.FlaxLlamaModel,
      tf.LlamaConfig(**DECODER),
      ["q_proj", "v_proj", "down_proj"],
      "text",
    ),
    "mistral": (
      tf.MistralModel,
      tf.FlaxMistralModel,
      tf.MistralConfig(**DECODER),
      ["q_proj", "k_proj", "v_proj", "o_proj"],
      "text",
    ),
    "vit": (
      tf.ViTModel,
      tf.FlaxViTModel,
      tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, **ENCODER),
      ["query", "value", "intermediate.dense"],
      "image",
    ),
  }[name]


@pytest.mark.parametrize("name", ["bert", "roberta", "llama", "mistral", "vit"])
def test_hf_flax_family_matches_torch_peft(tmp_path, name):
  import torch
  from peft import LoraConfig, get_peft_model

  torch_cls, flax_cls, config, targets, kind = family(name)
  torch.manual_seed(0)
  base = torch_cls(config).eval()
  base.save_pretrained(tmp_path / "base")
  flax_model = flax_cls.from_pretrained(tmp_path / "base", from_pt=True)
  peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
  with torch.no_grad():
    for n, p in peft_model.named_parameters():
      if "lora_" in n:
        p.normal_(0.0, 0.3)
  peft_model.save_pretrained(tmp_path / "adapter")
  peft_model.eval()

  rng = np.random.default_rng(0)
  if kind == "text":
    ids = rng.integers(3, 64, size=(2, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
  else:
    inputs = {"pixel_values": rng.normal(size=(2, 3, 16, 16)).astype(np.float32)}
  with torch.no_grad():
    want = peft_model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).last_hidden_state
    want = want.numpy()

  params = flax_model.params
  adapter = read_adapter(tmp_path / "adapter", scheme="hf_flax", params=params)
  adapted_modules = {
    n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")
  }
  assert set(adapter.modules.values()) == adapted_modules and len(adapted_modules) >= 4
  adapted = sj.apply_lora(params, adapter.lora)
  got = np.asarray(flax_model(**inputs, params=adapted).last_hidden_state)
  if kind == "text":  # padded positions are not comparable across implementations
    keep = inputs["attention_mask"].astype(bool)
    got, want = got[keep], want[keep]
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= 2e-6 * max(scale, 1.0), name

  sub = sj.init_subspace(
    params, [adapter.lora], task_ids=["task"], explained_variance=1.0, center=False
  )
  shared = np.asarray(
    flax_model(**inputs, params=sj.task_params(params, sub, "task")).last_hidden_state
  )
  shared = shared[keep] if kind == "text" else shared
  assert np.abs(shared - want).max() <= 1e-5 * max(scale, 1.0), name
