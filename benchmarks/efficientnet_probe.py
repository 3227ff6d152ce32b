"""EfficientNet-Lite0 features, ImageNet weights vs random init, on linear probes (issue 12).

10-class Fashion-MNIST (the library's split, seed 0) or MNIST-5k (seeded draw), 60 train / 40 test
images per class, grey 28×28 upsampled bilinearly to SIZE px, 3 channels in [-1, 1]. Features: the
mean-pooled output of blocks 0–11 ("mid") and the final 1280-d head features, from the converted
ImageNet weights and from ``init`` with key 0. Probes on features standardised with train
statistics: one-vs-all ridge with λ chosen by leave-one-out on the train set; the same ridge on 5
train images per class (mean of 10 draws); nearest class mean.

  python -m benchmarks.efficientnet_probe fashion:64 fashion:128 fashion:224 mnist:128 [--write]

Needs the weights (``python -m share_jax.experiments.models.efficientnet --convert``'s source
package) and the local datasets; ~7 CPU-minutes for the default jobs on a 2-core x86_64 VM.
``--quick``: fashion at 32 px, 10 / 10 images per class (a smoke run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.results_file import report
from share_jax.experiments.data import split_fashion_mnist
from share_jax.experiments.models import efficientnet as en
from share_jax.experiments.vision import load_mnist_5k
from share_jax.experiments.vision_efficientnet import to_rgb

HEADING = "## EfficientNet-Lite0 features vs random-init features, linear probes (issue 12)"
MID_BLOCKS = 12
CLASSES = 10
LAMBDAS = 10.0 ** np.arange(-2, 5)  # ridge penalties tried, × n train


def fashion(n_train: int, n_test: int):
  (task,) = split_fashion_mnist(
    n_train_per_class=n_train, n_test_per_class=n_test, splits=[tuple(range(CLASSES))]
  )
  return task.x_train, np.asarray(task.y_train), task.x_test, np.asarray(task.y_test)


def mnist(n_train: int, n_test: int):
  images, labels = load_mnist_5k()
  rng = np.random.default_rng(0)
  train, test = [], []
  for c in range(CLASSES):
    rows = rng.permutation(np.flatnonzero(labels == c))
    test.append(rows[:n_test])
    train.append(rows[n_test : n_test + n_train])
  train, test = np.concatenate(train), np.concatenate(test)
  return images[train], labels[train], images[test], labels[test]


def features(variables, images, size: int, batch: int = 50) -> tuple[np.ndarray, np.ndarray]:
  """(N, 28, 28) uint8 -> mid (N, 112) pooled block-11 features, final (N, 1280)."""
  config = en.EfficientNetConfig.lite0()
  low = en.EfficientNet(config, stop=MID_BLOCKS)
  high = en.EfficientNet(config, start=MID_BLOCKS)

  @jax.jit
  def run(x):
    mid = low.apply(variables, x)
    return mid.mean(axis=(1, 2)), high.apply(variables, mid)

  outs = [run(to_rgb(images[i : i + batch], size)) for i in range(0, len(images), batch)]
  return tuple(np.concatenate([np.asarray(o[k]) for o in outs]) for k in range(2))


def standardise(train, test):
  mu, sd = train.mean(0), train.std(0) + 1e-6
  return (train - mu) / sd, (test - mu) / sd


def ridge(xa, ya, xb, yb) -> float:
  """One-vs-all ridge (dual form), λ·n by leave-one-out accuracy on the train set: test accuracy."""
  xa, xb = standardise(xa, xb)
  y = np.eye(CLASSES)[ya] - 1 / CLASSES
  gram = xa @ xa.T
  w, v = np.linalg.eigh(gram)
  best = (-1.0, None)
  for lam in LAMBDAS * len(xa):
    hat = (v * (w / (w + lam))) @ v.T
    h = np.diag(hat)[:, None]
    loo = (hat @ y - h * y) / (1 - h)
    best = max(best, (float(np.mean(loo.argmax(1) == ya)), lam), key=lambda t: t[0])
  alpha = np.linalg.solve(gram + best[1] * np.eye(len(xa)), y)
  return float(np.mean((xb @ xa.T @ alpha).argmax(1) == yb))


def few_shot_ridge(xa, ya, xb, yb, shots: int = 5, draws: int = 10) -> float:
  accs = []
  for d in range(draws):
    rng = np.random.default_rng(d)
    rows = np.concatenate(
      [rng.choice(np.flatnonzero(ya == c), shots, replace=False) for c in range(CLASSES)]
    )
    accs.append(ridge(xa[rows], ya[rows], xb, yb))
  return float(np.mean(accs))


def nearest_mean(xa, ya, xb, yb) -> float:
  xa, xb = standardise(xa, xb)
  means = np.stack([xa[ya == c].mean(0) for c in range(CLASSES)])
  return float(np.mean(((xb[:, None] - means[None]) ** 2).sum(-1).argmin(1) == yb))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("jobs", nargs="*", default=["fashion:64", "fashion:128", "fashion:224"])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--cache", type=Path, help="folder for the features (.npz), reused if there")
  parser.add_argument("--write", action="store_true", help="put the table into RESULTS.md")
  args = parser.parse_args(argv)
  jobs, (n_train, n_test) = (["fashion:32"], (10, 10)) if args.quick else (args.jobs, (60, 40))
  import torch  # only to read the package's .pth

  state = torch.load(en.package_weights(), map_location="cpu", weights_only=True)
  weights = {
    "ImageNet": en.torch_to_flax({k: v.numpy() for k, v in state.items()}),
    "random init": en.EfficientNet(en.EfficientNetConfig.lite0()).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))
    ),
  }
  body = [
    "| data | px | features | weights | ridge probe | ridge, 5 shots/class | nearest class mean |",
    "|---|---|---|---|---|---|---|",
  ]
  for job in jobs:
    name, size = job.split(":")
    xa, ya, xb, yb = {"fashion": fashion, "mnist": mnist}[name](n_train, n_test)
    for label, variables in weights.items():
      cached = args.cache and args.cache / f"{name}_{size}_{label.split()[0].lower()}.npz"
      if cached and cached.exists():
        z = np.load(cached)
        mid, final = (z["ma"], z["mb"]), (z["fa"], z["fb"])
      else:
        start = time.process_time()
        (ma, fa), (mb, fb) = features(variables, xa, int(size)), features(variables, xb, int(size))
        print(f"{job} {label}: features in {time.process_time() - start:.0f} CPU s", flush=True)
        mid, final = (ma, mb), (fa, fb)
        if cached:
          cached.parent.mkdir(parents=True, exist_ok=True)
          np.savez(cached, ma=ma, fa=fa, mb=mb, fb=fb)
      for level, (a, b) in (("blocks 0–11", mid), ("final 1280-d", final)):
        accs = [f(a, ya, b, yb) for f in (ridge, few_shot_ridge, nearest_mean)]
        body.append(
          f"| {name} | {size} | {level} | {label} | "
          + " | ".join(f"{100 * x:.1f}" for x in accs)
          + " |"
        )
        print(body[-1], flush=True)
  report(HEADING, "benchmarks.efficientnet_probe", body, write=args.write)


if __name__ == "__main__":
  main()
