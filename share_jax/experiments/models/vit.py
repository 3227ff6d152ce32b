"""A small pre-LN ViT for 28×28 grayscale images, and a short supervised pretraining loop.

Every projection is a plain ``nn.Dense``. Param paths: ``patch_embed``, ``cls_token``,
``pos_embedding``, ``layer_{i}/attention_norm``, ``layer_{i}/attention/{query,key,value,output}``,
``layer_{i}/mlp_norm``, ``layer_{i}/intermediate``, ``layer_{i}/output``, ``final_norm``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import share_jax as sj
from share_jax.experiments.models.bert import SelfAttention


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int = 28
  channels: int = 1
  patch_size: int = 7
  hidden_size: int = 128
  num_layers: int = 4
  num_heads: int = 4
  mlp_size: int = 256
  pool: Literal["cls", "mean"] = "cls"
  layer_norm_eps: float = 1e-6

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def tiny(cls, **overrides) -> ViTConfig:
    """A 2-layer, H=32 config for unit tests."""
    return cls(**{"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_size": 64} | overrides)


class ViTLayer(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, N, H) -> (B, N, H)."""
    c = self.config
    x = x + SelfAttention(c.num_heads, name="attention")(
      nn.LayerNorm(c.layer_norm_eps, name="attention_norm")(x)
    )
    y = nn.LayerNorm(c.layer_norm_eps, name="mlp_norm")(x)
    y = nn.gelu(nn.Dense(c.mlp_size, name="intermediate")(y), approximate=False)
    return x + nn.Dense(c.hidden_size, name="output")(y)


class ViT(nn.Module):
  """Backbone only: (B, 28, 28[, 1]) images -> (B, H) features (CLS token or mean of patches)."""

  config: ViTConfig = ViTConfig()

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c, p = self.config, self.config.patch_size
    if images.ndim == 3:
      images = images[..., None]
    b, h, w, ch = images.shape
    if (h, w, ch) != (c.image_size, c.image_size, c.channels) or h % p:
      raise ValueError(
        f"images of shape {images.shape[1:]} do not fit ViTConfig(image_size={c.image_size}, "
        f"channels={c.channels}, patch_size={p})"
      )
    patches = images.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5)
    x = nn.Dense(c.hidden_size, name="patch_embed")(patches.reshape(b, c.num_patches, p * p * ch))
    if c.pool == "cls":
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, c.hidden_size))
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]))
    for i in range(c.num_layers):
      x = ViTLayer(c, name=f"layer_{i}")(x)
    x = nn.LayerNorm(c.layer_norm_eps, name="final_norm")(x)
    return x[:, 0] if c.pool == "cls" else x.mean(1)


def pretrain_vit(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  num_classes: int,
  steps: int,
  batch_size: int,
  lr: float,
  seed: int,
  config: ViTConfig = ViTConfig(),
  weight_decay: float = 1e-4,
) -> dict:
  """Trains ViT + a temporary linear head with AdamW on (N, 28, 28[, 1]) images, (N,) int labels.

  Images should already be scaled (e.g. to [0, 1]). Returns the backbone's ``{"params": ...}``;
  the head is discarded.
  """
  if len(images) != len(labels) or len(images) < batch_size:
    raise ValueError(
      f"need as many labels as images and at least batch_size={batch_size} of them, "
      f"got {len(images)} images and {len(labels)} labels"
    )
  model, head = ViT(config), nn.Dense(num_classes)
  init_key, head_key = jax.random.split(jax.random.key(seed))
  x0 = jnp.asarray(images[:1], jnp.float32)
  params = {"backbone": model.init(init_key, x0)}
  params["head"] = head.init(head_key, jnp.zeros((1, config.hidden_size)))
  tx = optax.adamw(lr, weight_decay=weight_decay)
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    logits = head.apply(params["head"], model.apply(params["backbone"], x))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  step = sj.make_step(loss_fn, tx)

  rng = np.random.default_rng(seed)
  order, pos = rng.permutation(len(images)), 0
  for _ in range(steps):
    if pos + batch_size > len(order):
      order, pos = rng.permutation(len(images)), 0
    idx = order[pos : pos + batch_size]
    pos += batch_size
    x = jnp.asarray(images[idx], jnp.float32)
    params, opt_state, _ = step(params, opt_state, x, jnp.asarray(labels[idx], jnp.int32))
  return params["backbone"]
