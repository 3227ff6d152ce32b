"""The Flax EfficientNet-Lite port against a torch.nn.functional forward of the same weights, the
weight conversion, and the ImageNet features against random-init ones on a linear probe."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from share_jax.experiments.models import efficientnet as en

torch = pytest.importorskip("torch")
F = torch.nn.functional


def random_state(config: en.EfficientNetConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """A torch state dict with lukemelas names for ``config`` (BN statistics not trivial)."""
  rng = np.random.default_rng(seed)
  state = {}

  def conv(name, c_out, c_in, k):
    state[f"{name}.weight"] = rng.normal(0, 1 / math.sqrt(c_in * k * k), (c_out, c_in, k, k))

  def bn(name, c):
    state[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
    state[f"{name}.bias"] = rng.normal(0, 0.1, c)
    state[f"{name}.running_mean"] = rng.normal(0, 0.1, c)
    state[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c)
    state[f"{name}.num_batches_tracked"] = np.array(7)

  conv("_conv_stem", config.stem, 3, 3)
  bn("_bn0", config.stem)
  for i, (k, _, e, c_in, c_out) in enumerate(config.blocks):
    b, width = f"_blocks.{i}", c_in * e
    if e != 1:
      conv(f"{b}._expand_conv", width, c_in, 1)
      bn(f"{b}._bn0", width)
    conv(f"{b}._depthwise_conv", width, 1, k)
    bn(f"{b}._bn1", width)
    conv(f"{b}._project_conv", c_out, width, 1)
    bn(f"{b}._bn2", c_out)
  conv("_conv_head", config.head, config.blocks[-1][-1], 1)
  bn("_bn1", config.head)
  state["_fc.weight"] = rng.normal(0, 0.05, (config.num_classes, config.head))
  state["_fc.bias"] = rng.normal(0, 0.05, config.num_classes)
  return {k: np.asarray(v, np.float32 if v.ndim else np.int64) for k, v in state.items()}


def torch_forward(state: dict, config: en.EfficientNetConfig, x: np.ndarray) -> np.ndarray:
  """Reference: NHWC images -> logits with torch.nn.functional, TF "SAME" padding."""
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}

  def conv(h, name, stride=1, groups=1):
    w = sd[f"{name}.weight"]
    k, size = w.shape[-1], h.shape[-1]
    pad = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
    h = F.pad(h, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return F.conv2d(h, w, stride=stride, groups=groups)

  def bn(h, name):
    p = [sd[f"{name}.{s}"] for s in ("running_mean", "running_var", "weight", "bias")]
    return F.batch_norm(h, *p, training=False, eps=config.eps)

  h = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)
  h = F.relu6(bn(conv(h, "_conv_stem", 2), "_bn0"))
  for i, (_, s, e, c_in, c_out) in enumerate(config.blocks):
    b, y = f"_blocks.{i}", h
    if e != 1:
      y = F.relu6(bn(conv(y, f"{b}._expand_conv"), f"{b}._bn0"))
    y = F.relu6(bn(conv(y, f"{b}._depthwise_conv", s, groups=y.shape[1]), f"{b}._bn1"))
    y = bn(conv(y, f"{b}._project_conv"), f"{b}._bn2")
    h = y + h if s == 1 and c_in == c_out else y
  h = F.relu6(bn(conv(h, "_conv_head"), "_bn1")).mean(dim=(2, 3))
  return F.linear(h, sd["_fc.weight"], sd["_fc.bias"]).numpy()


def flax_logits(variables, config, x):
  return np.asarray(en.EfficientNet(config, classify=True).apply(variables, jnp.asarray(x)))


@pytest.mark.parametrize("size", [32, 29])  # even and odd sizes: both SAME-padding cases
def test_tiny_port_equals_torch_forward(size):
  config = en.EfficientNetConfig.tiny()
  state = random_state(config)
  x = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  want = torch_forward(state, config, x)
  got = flax_logits(en.torch_to_flax(state), config, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_parts_compose_to_the_whole_model():
  config = en.EfficientNetConfig.tiny()
  variables = en.torch_to_flax(random_state(config))
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  whole = en.EfficientNet(config).apply(variables, x)
  hidden = en.EfficientNet(config, stop=2).apply(variables, x)
  top = en.EfficientNet(config, start=2).apply(variables, hidden)
  np.testing.assert_allclose(np.asarray(top), np.asarray(whole), rtol=1e-5, atol=1e-6)


def test_conversion_refuses_unknown_tensors():
  state = random_state(en.EfficientNetConfig.tiny())
  state["_blocks.0._se_reduce.weight"] = np.zeros((2, 8, 1, 1), np.float32)
  with pytest.raises(ValueError, match="_se_reduce"):
    en.torch_to_flax(state)


def test_missing_weights_name_the_setup_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="--convert"):
    en.load_lite0(tmp_path)


# ----------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def lite0():
  try:
    pth = en.package_weights()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  state = {k: v.numpy() for k, v in torch.load(pth, map_location="cpu", weights_only=True).items()}
  return state, en.torch_to_flax(state)


def test_lite0_port_equals_torch_forward(lite0, tmp_path):
  state, variables = lite0
  config = en.EfficientNetConfig.lite0()
  x = np.random.default_rng(3).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  want = torch_forward(state, config, x)
  got = flax_logits(variables, config, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # the converted file (what the runner reads) holds the same variables
  en.convert(tmp_path)
  loaded = en.load_lite0(tmp_path)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded, variables))


def centroid_accuracy(train, test) -> float:
  """Nearest class mean on standardised features: test accuracy."""
  (xa, ya), (xb, yb) = train, test
  mu, sd = xa.mean(0), xa.std(0) + 1e-6
  xa, xb = (xa - mu) / sd, (xb - mu) / sd
  means = np.stack([xa[ya == c].mean(0) for c in range(ya.max() + 1)])
  return float(np.mean(((xb[:, None] - means[None]) ** 2).sum(-1).argmin(1) == yb))


@pytest.mark.slow  # ~1000 images through 12 blocks, twice
def test_lite0_features_beat_random_features_on_a_linear_probe(lite0):
  """Mid-level features (blocks 0-11, mean-pooled) of 10-class Fashion-MNIST at 64 px: measured
  81.8 % (ImageNet) vs 68.5 % (random init) with nearest class means. Other sizes, probes, MNIST
  and the final 1280-d features: ``python -m benchmarks.efficientnet_probe`` (RESULTS.md)."""
  from share_jax.experiments.data import split_fashion_mnist
  from share_jax.experiments.vision_efficientnet import to_rgb

  try:
    (task,) = split_fashion_mnist(
      n_train_per_class=60, n_test_per_class=40, splits=[tuple(range(10))]
    )
  except FileNotFoundError as e:
    pytest.skip(str(e))
  model = en.EfficientNet(en.EfficientNetConfig.lite0(), stop=12)
  pooled = jax.jit(lambda v, x: model.apply(v, x).mean(axis=(1, 2)))
  random_vars = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  acc = {}
  for name, variables in (("imagenet", lite0[1]), ("random", random_vars)):
    feats = [np.asarray(pooled(variables, to_rgb(x, 64))) for x in (task.x_train, task.x_test)]
    acc[name] = centroid_accuracy((feats[0], task.y_train), (feats[1], task.y_test))
  assert acc["imagenet"] > acc["random"] + 0.08, acc


# ----------------------------------------------------------------------------- runner


def test_quick_vision_config_runs_conv_lora_end_to_end(tmp_path, monkeypatch):
  """configs/efficientnet_vision.py in quick mode: a tiny random EfficientNet, synthetic images
  (as on a bare CI machine), Share and LoRA on 1×1 conv kernels."""
  import importlib.util
  import json
  from pathlib import Path

  from share_jax.experiments import run as runner
  from share_jax.experiments import vision_efficientnet

  def missing(*args, **kwargs):
    raise FileNotFoundError("dataset-fashion-mnist is not installed")

  monkeypatch.setattr(vision_efficientnet, "fashion_then_mnist", missing)
  path = Path(__file__).parents[1] / "configs" / "efficientnet_vision.py"
  spec = importlib.util.spec_from_file_location("efficientnet_vision", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("quick")
  config.methods = ("lora_per_task", "share")
  config.quick_overrides.data.num_tasks = 2
  backbone = runner.make_backbone(runner.resolve(config))
  kernels = runner.select_kernels(backbone.params, backbone.target)
  assert sorted(kernels) == [
    "params/block_2/expand_conv/kernel",
    "params/block_2/project_conv/kernel",
    "params/block_3/expand_conv/kernel",
    "params/block_3/project_conv/kernel",
    "params/head_conv/kernel",
  ]
  assert all(k.ndim == 4 for k in kernels.values())
  runner.run(config, tmp_path)
  out = json.loads((tmp_path / "results.json").read_text())
  assert "SYNTHETIC" in out["data"] and "tiny random EfficientNet" in out["backbone"]
  for name, result in out["methods"].items():
    m = np.array(result["acc_matrix"], float)
    assert m.shape == (2, 2) and not np.isnan(np.tril(m)).any(), name
