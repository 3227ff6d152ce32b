"""Encoded tasks, linear heads, minibatch loops and accuracy: the pieces every method shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from share_jax.errors import ShareError
from share_jax.experiments import metrics
from share_jax.experiments.backbones import Backbone, Inputs, batched
from share_jax.experiments.data import Task

Head = dict[str, jax.Array]  # {"w": (H, C), "b": (C,)}
Step = Callable[[Any, Any, dict], tuple[Any, Any, jax.Array]]


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedTask:
  """A task after ``Backbone.encode``: inputs {name: (N, ...)} and labels (N,): int32 classes,
  or float32 targets when ``metric`` is a regression metric (``num_classes`` is then 1)."""

  name: str
  num_classes: int
  x_train: Inputs
  y_train: np.ndarray
  x_test: Inputs
  y_test: np.ndarray
  metric: str = "accuracy"


def check_task(task: Task) -> None:
  """Every class must have examples in both splits; else a ShareError naming task and class."""
  if metrics.is_regression(task.metric):
    return
  for split, y in (("train", task.y_train), ("test", task.y_test)):
    missing = sorted(set(range(task.num_classes)) - set(np.asarray(y).tolist()))
    if missing:
      names = [task.class_names[c] for c in missing]
      raise ShareError(f"task {task.name!r}: class(es) {names} have no {split} example")


def encode_task(backbone: Backbone, task: Task) -> EncodedTask:
  """Checks the task, then encodes both splits once."""
  check_task(task)
  dtype = np.float32 if metrics.is_regression(task.metric) else np.int32
  return EncodedTask(
    task.name,
    task.num_classes,
    backbone.encode(task.x_train),
    np.asarray(task.y_train, dtype),
    backbone.encode(task.x_test),
    np.asarray(task.y_test, dtype),
    task.metric,
  )


def zero_head(feature_dim: int, num_classes: int) -> Head:
  return {"w": jnp.zeros((feature_dim, num_classes)), "b": jnp.zeros((num_classes,))}


def logits(head: Head, feats: jax.Array) -> jax.Array:
  """(B, H) features -> (B, C)."""
  return feats @ head["w"] + head["b"]


def head_classes(head: Head) -> int:
  return int(head["b"].shape[-1])


def head_loss(out: jax.Array, y: jax.Array) -> jax.Array:
  """Mean loss of head outputs (B, C): cross-entropy for integer labels, squared error of the
  single output for float targets (regression; chosen at trace time by the labels' dtype)."""
  if jnp.issubdtype(y.dtype, jnp.floating):
    return jnp.mean((out[:, 0] - y) ** 2)
  return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def classification_loss(features: Callable[[Any, Inputs], jax.Array]):
  """``loss(params, head, batch)``: ``head_loss`` of a linear head on ``features``."""

  def loss(params: Any, head: Head, batch: dict) -> jax.Array:
    return head_loss(logits(head, features(params, batch["inputs"])), batch["y"])

  return loss


def take(inputs: Inputs, rows: np.ndarray) -> Inputs:
  return {k: v[rows] for k, v in inputs.items()}


def minibatches(n: int, batch_size: int, rng: np.random.Generator):
  """Shuffled row indices, equal-sized batches (the remainder is dropped; one batch if n < size)."""
  size = min(batch_size, n)
  order = rng.permutation(n)
  for start in range(0, n - size + 1, size):
    yield order[start : start + size]


def fit(
  step: Step,
  trainable: Any,
  opt_state: Any,
  data: list[tuple[Inputs, np.ndarray, dict]],
  *,
  epochs: int,
  batch_size: int,
  seed: int,
  desc: str,
  prepare: Callable[[Inputs], Inputs] = lambda inputs: inputs,
) -> tuple[Any, Any]:
  """Runs ``step(trainable, opt_state, batch)`` over shuffled minibatches with a progress bar.

  ``data``: (inputs, labels, extra columns) per source; batches never mix sources. ``prepare``:
  ``Backbone.prepare``, applied to each batch's inputs.
  """
  rng = np.random.default_rng(seed)
  plan = [
    (i, rows)
    for _ in range(epochs)
    for i, (_, y, _) in enumerate(data)
    for rows in minibatches(len(y), batch_size, rng)
  ]
  order = rng.permutation(len(plan)) if len(data) > 1 else range(len(plan))
  bar = tqdm([plan[i] for i in order], desc=desc, leave=False, dynamic_ncols=True)
  for i, rows in bar:
    inputs, y, extra = data[i]
    batch = {
      "inputs": prepare(take(inputs, rows)),
      "y": y[rows],
      **{k: v[rows] for k, v in extra.items()},
    }
    trainable, opt_state, loss = step(trainable, opt_state, batch)
    bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
  return trainable, opt_state


def score_outputs(task: EncodedTask, out: np.ndarray) -> float:
  """The task's metric of head outputs (N, C) on its test split: argmax classes, or the single
  output of a regression head."""
  pred = out[:, 0] if metrics.is_regression(task.metric) else np.argmax(out, -1)
  return metrics.task_metric(task.metric)(task.y_test, pred)


def accuracy(
  predict,
  params: Any,
  head: Head,
  task: EncodedTask,
  batch_size: int,
  prepare: Callable[[Inputs], Inputs] = lambda inputs: inputs,
) -> float:
  """The task's test score (accuracy, or its ``metric``) of ``predict(params, head, inputs) ->
  (B, C) head outputs`` on batches of ``prepare``d inputs."""
  if head_classes(head) != task.num_classes:
    raise ShareError(
      f"task {task.name!r}: the head has {head_classes(head)} outputs, the task "
      f"{task.num_classes} classes"
    )
  out = batched(lambda x: predict(params, head, prepare(x)), task.x_test, batch_size)
  return score_outputs(task, out)
