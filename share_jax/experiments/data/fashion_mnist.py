"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from share_jax.experiments.data.builder import LocalBuilder
from share_jax.experiments.data.sources import FASHION_MNIST_DIR, require

CLASS_NAMES = (
  "t-shirt/top", "trouser", "pullover", "dress", "coat",
  "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
  """A gzipped IDX file of unsigned bytes as an array of its stored shape."""
  data = gzip.open(path, "rb").read()
  if data[:3] != b"\x00\x00\x08":
    raise ValueError(f"{path}: not an IDX file of unsigned bytes")
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class FashionMnistLocal(LocalBuilder):
  """Fashion-MNIST: 28×28 uint8 images, 10 classes, splits train/test.

  ``source``: a folder with the four ``*-ubyte.gz`` files (default: Debian's).
  """

  def default_source(self) -> Path:
    return FASHION_MNIST_DIR

  def _info(self) -> tfds.core.DatasetInfo:
    return self._info_for(
      {
        "image": tfds.features.Tensor(shape=(28, 28), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=CLASS_NAMES),
      },
      "Fashion-MNIST (Zalando, MIT), read from local IDX files.",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    source = self.source
    return {
      split: self._generate_examples(*(require(source / f, self.name) for f in files))
      for split, files in FILES.items()
    }

  def _generate_examples(self, images_path: Path, labels_path: Path):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
      raise ValueError(f"{images_path}: images {images.shape} do not match labels {labels.shape}")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield i, {"image": image, "label": int(label)}
