"""Split Fashion-MNIST (5 tasks) then Split MNIST-5k (5 tasks), 2 classes each, one head per
task, on EfficientNet-Lite0 with its real ImageNet-1k weights: images upsampled to 96 px and
3 channels; the stem and the first 14 blocks run once (cached), adapters on the 1×1 convs of
the last 2 blocks and the head conv. Convert the weights once first (scripts/setup.sh does):

    python -m share_jax.experiments.models.efficientnet --convert
    python -m share_jax.run --config configs/efficientnet_vision.py --workdir runs/effnet
    python -m share_jax.run --config configs/efficientnet_vision.py --workdir /tmp/q \
      --config.quick=True
"""

from share_jax.experiments.config import default_config


def get_config(arg=None):
  config = default_config()
  config.data.name = "fashion_then_mnist"
  config.data.n_train_per_class = 200
  config.data.n_test_per_class = 100
  config.backbone = {"name": "efficientnet", "image_size": 96, "adapt_blocks": 2}
  config.quick_overrides.backbone = {"quick": True}
  config.quick = arg == "quick"
  return config
