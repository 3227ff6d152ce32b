"""Backbones: a Flax BERT encoder (loads MiniLM) and a small ViT for 28×28 images."""

from share_jax.experiments.models.bert import (
  BertConfig,
  BertEncoder,
  load_bert_params,
  load_tokenizer,
  mean_pool,
  minilm_path,
  tiny_config,
  tokenize,
)
from share_jax.experiments.models.vit import ViT, ViTConfig, pretrain_vit

__all__ = [
  "BertConfig",
  "BertEncoder",
  "ViT",
  "ViTConfig",
  "load_bert_params",
  "load_tokenizer",
  "mean_pool",
  "minilm_path",
  "pretrain_vit",
  "tiny_config",
  "tokenize",
]
