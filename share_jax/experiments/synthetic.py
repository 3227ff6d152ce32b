"""Synthetic data: task sequences for smoke runs when the dataset packages are not installed,
and random LoRA trees for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

import share_jax as sj
from share_jax.experiments.data import Task

_NOISE_WORDS = 40
_KEYWORDS = 4


def _sequence(
  name: str,
  num_tasks: int,
  num_classes: int,
  n_train: int,
  n_test: int,
  rng: np.random.Generator,
  task_inputs: Callable[[int], Callable[[np.ndarray], Any]],
) -> list[Task]:
  """Tasks ``{name}_{t}`` with shuffled balanced labels (``n_*`` per class); ``task_inputs(t)``
  returns the function mapping task t's labels to its inputs."""
  names = tuple(f"class{c}" for c in range(num_classes))
  tasks = []
  for t in range(num_tasks):
    inputs = task_inputs(t)

    def split(n, inputs=inputs):
      y = np.repeat(np.arange(num_classes, dtype=np.int32), n)
      rng.shuffle(y)
      return inputs(y), y

    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    tasks.append(Task(f"{name}_{t}", x_train, y_train, x_test, y_test, names))
  return tasks


def synthetic_text_tasks(
  num_tasks: int = 3, num_classes: int = 3, n_train: int = 16, n_test: int = 8, seed: int = 0
) -> list[Task]:
  """Sentences of 3 class keywords among 5 shared noise words; ``n_*`` are per class."""
  rng = np.random.default_rng(seed)
  noise = [f"noise{i}" for i in range(_NOISE_WORDS)]

  def task_inputs(t):
    keys = [[f"t{t}c{c}k{k}" for k in range(_KEYWORDS)] for c in range(num_classes)]

    def sentences(y):
      words = [list(rng.choice(keys[c], 3)) + list(rng.choice(noise, 5)) for c in y]
      return [" ".join(rng.permutation(w)) for w in words]

    return sentences

  return _sequence("synthetic_text", num_tasks, num_classes, n_train, n_test, rng, task_inputs)


def synthetic_image_tasks(
  num_tasks: int = 3, num_classes: int = 2, n_train: int = 16, n_test: int = 8, seed: int = 0
) -> list[Task]:
  """uint8 (N, 28, 28) images: a random template per class plus noise; ``n_*`` are per class."""
  rng = np.random.default_rng(seed)

  def task_inputs(t):
    templates = rng.uniform(0, 160, size=(num_classes, 28, 28))
    return lambda y: (templates[y] + rng.uniform(0, 95, size=(len(y), 28, 28))).astype(np.uint8)

  return _sequence("synthetic_image", num_tasks, num_classes, n_train, n_test, rng, task_inputs)


def random_loras(
  params: Any,
  target: str | Callable[[str, Any], bool],
  n: int,
  *,
  rank: int,
  seed: int,
  b_scale: float = 1.0,
) -> list[dict]:
  """``n`` LoRA trees on the kernels ``target`` selects, float32, both factors non-zero:
  a ~ N(0, 1/d_in) (d_in, rank), b ~ N(0, b_scale²/rank) (rank, d_out)."""
  rng = np.random.default_rng(seed)
  kernels = sj.select_kernels(params, target)
  trees = []
  for _ in range(n):
    leaves = {}
    for path, w in kernels.items():
      d_in, d_out = w.shape
      a = rng.normal(size=(d_in, rank)) / np.sqrt(d_in)
      b = b_scale * rng.normal(size=(rank, d_out)) / np.sqrt(rank)
      leaves[path] = sj.LoRA(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    trees.append(sj.nest(leaves))
  return trees
