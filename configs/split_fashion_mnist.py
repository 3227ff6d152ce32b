"""Split Fashion-MNIST: 5 tasks of 2 classes, one head per task, on a small ViT that
``share_jax.experiments.vision.vit_backbone`` pretrains on MNIST-5k (self-pretrained, not
ImageNet: a weak stand-in for a real pretrained base). The pretrained ViT is cached.

    python -m share_jax.run --config configs/split_fashion_mnist.py --workdir runs/fashion
    python -m share_jax.run --config configs/split_fashion_mnist.py --workdir /tmp/q \
      --config.quick=True
"""

import os

from share_jax.experiments.config import default_config


def get_config():
  config = default_config()
  config.data.name = "split_fashion_mnist"
  config.data.n_train_per_class = 200
  config.data.n_test_per_class = 100
  config.backbone = {"name": "vit", "cache_dir": os.path.expanduser("~/.cache/share_jax/vit")}
  config.quick_overrides.backbone = {"quick": True}
  return config
