"""Random LoRA trees over the tiny share_jax BERT and PEFT adapter directories made from them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import share_jax as sj
from share_jax.experiments.models.bert import BertEncoder, tiny_config
from share_jax.paths import nest
from share_jax.peft_io import write_adapter

# Kernels a query/value/output.dense LoRA adapts in ``tiny_config()`` (H=32, FFN 64, 2 layers).
KERNELS = {
  f"layer_{i}/{name}/kernel": shape
  for i in range(2)
  for name, shape in (
    ("attention/query", (32, 32)),
    ("attention/value", (32, 32)),
    ("attention/output", (32, 32)),
    ("output", (64, 32)),
  )
}


def bert_shapes() -> dict:
  """The tiny share_jax BERT's params as ``jax.ShapeDtypeStruct``s."""
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(BertEncoder(tiny_config()).init, jax.random.key(0), ids, ids)["params"]


def kernel_zeros() -> dict:
  """Zero kernels at ``KERNELS`` (what ``init_subspace`` needs as params)."""
  return nest({p: np.zeros(s, np.float32) for p, s in KERNELS.items()})


def random_lora(rng: np.random.Generator, rank: int = 4, alpha: float | None = 8.0) -> dict:
  """A LoRA tree over ``KERNELS``; ``layer_1/attention/value`` gets rank ``rank // 2``."""
  leaves = {}
  for path, (d_in, d_out) in KERNELS.items():
    r = rank // 2 if path == "layer_1/attention/value/kernel" else rank
    a, b = rng.normal(size=(d_in, r)), rng.normal(size=(r, d_out))
    leaves[path] = sj.LoRA(a.astype(np.float32), b.astype(np.float32), alpha)
  return nest(leaves)


def random_head(rng: np.random.Generator, classes: int = 3) -> dict:
  kernel = rng.normal(size=(32, classes)).astype(np.float32)
  return {"classifier": {"kernel": kernel, "bias": rng.normal(size=classes).astype(np.float32)}}


def write_random_adapter(directory, rng: np.random.Generator, **config) -> tuple[dict, dict]:
  """A PEFT adapter (module names ``bert.encoder.layer.…``) with a classifier head; returns the
  LoRA tree and head written."""
  lora, head = random_lora(rng), random_head(rng)
  base = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["query", "value", "output.dense"],
    "bias": "none",
    "modules_to_save": ["classifier"],
    **config,
  }
  write_adapter(directory, lora, scheme="share_bert", prefix="bert.", config=base, heads=head)
  return lora, head
