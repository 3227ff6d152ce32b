"""Defaults shared by the ``configs/*.py`` continual-learning experiments."""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

# The strict methods carry the demo's conclusions (Share within noise of per-task LoRA,
# sequential LoRA forgetting); the two that train on old data (Share-full's fine-tunes of old tasks,
# joint LoRA) cost 40 % of the run and come with ``all_methods=True``.
STRICT_METHODS = ("head_only", "lora_per_task", "share", "lora_sequential")
ALL_METHODS = ("head_only", "lora_per_task", "share", "share_full", "lora_sequential", "lora_joint")


def default_config() -> ml_collections.ConfigDict:
  """Every field the runner reads; experiment configs override ``data``, ``backbone`` and more.

  ``quick=True`` (``--config.quick=True``) applies ``quick_overrides`` at run time: a tiny
  random backbone and a few examples per class, for smoke tests. ``all_methods=True``
  (``--config.all_methods=True``) runs ``ALL_METHODS`` instead of ``methods``.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.quick = False
  c.methods = STRICT_METHODS
  c.all_methods = False
  c.data = ml_collections.ConfigDict(
    {"name": "", "n_train_per_class": 100, "n_test_per_class": 50, "num_tasks": 0}  # 0: all
  )
  c.backbone = ml_collections.ConfigDict({"name": ""})
  # A local HF checkpoint folder (config.json + weights + tokenizer): replaces the backbone by
  # ``hf_backbone`` with the backbone section's max_len / frozen_layers / pooling / target.
  c.model_dir = placeholder(str)
  c.target = ""  # regex of the adapted kernels; "" = the backbone's (attention query/value)
  c.train = ml_collections.ConfigDict({"batch_size": 32, "eval_batch_size": 128, "epochs": 4})
  c.probe = ml_collections.ConfigDict({"steps": 300, "lr": 1e-2})  # linear heads on features
  c.lora = ml_collections.ConfigDict({"rank": 8, "lr": 2e-3})
  c.share = ml_collections.ConfigDict(
    {
      "cold_start": "data",
      "p": 1,
      "phi": 2,
      "k": placeholder(int),
      "explained_variance": 0.9,
      "max_k": placeholder(int),
      "center": True,
      "lr": 5e-3,
      "finetune_epochs": 1,
      "finetune_lr": 5e-3,
      "full_finetune_epochs": 1,
    }
  )
  c.quick_overrides = ml_collections.ConfigDict(
    {
      "data": {"n_train_per_class": 8, "n_test_per_class": 8, "num_tasks": 3},
      "train": {"batch_size": 8, "eval_batch_size": 16},
      "probe": {"steps": 50},
    }
  )
  return c
