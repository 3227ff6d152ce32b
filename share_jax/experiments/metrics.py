"""Continual-learning metrics of an accuracy matrix R (T, T): R[i, j] is the accuracy on task j
after learning tasks 0..i; entries above the diagonal (tasks not seen yet) are NaN.

- ACC: mean of the final row, ``mean_j R[T-1, j]``.
- BWT (backward transfer): ``mean_{j<T-1} R[T-1, j] - R[j, j]``; negative means forgetting.
- forgetting: ``mean_{j<T-1} max_{j<=l<T-1} R[l, j] - R[T-1, j]`` (best accuracy before the end
  minus the final one; negative when a task ends above all its earlier accuracies).
- FWT (forward transfer, our definition): ``mean_{j>0} R[j, j] - ref[j]``, where ``ref[j]`` is
  the accuracy of a model trained on task j alone (per-task LoRA when that baseline ran, else the
  head-only linear probe). Negative: what the method learned before, or its constraints, made
  task j worse than learning it in isolation; the first task (nothing learned before) is left out.

Methods that only produce a final row (joint training) get ACC only; the rest are None.
"""

from __future__ import annotations

import numpy as np


def _final_and_diag(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  r = np.asarray(r, np.float64)
  if r.ndim != 2 or r.shape[0] != r.shape[1]:
    raise ValueError(f"accuracy matrix must be square (T, T), got shape {r.shape}")
  return r[-1], np.diag(r)


def acc(r: np.ndarray) -> float:
  final, _ = _final_and_diag(r)
  return float(np.mean(final))


def has_history(r: np.ndarray) -> bool:
  """Whether the matrix holds the rows before the last (a sequential run, T >= 2)."""
  r = np.asarray(r, np.float64)
  return r.shape[0] >= 2 and not np.isnan(np.diag(r)).any()


def bwt(r: np.ndarray) -> float | None:
  final, diag = _final_and_diag(r)
  if not has_history(r):
    return None
  return float(np.mean(final[:-1] - diag[:-1]))


def forgetting(r: np.ndarray) -> float | None:
  final, _ = _final_and_diag(r)
  if not has_history(r):
    return None
  r = np.asarray(r, np.float64)
  best = [np.max(r[j:-1, j]) for j in range(r.shape[0] - 1)]
  return float(np.mean(np.asarray(best) - final[:-1]))


def fwt(r: np.ndarray, reference: np.ndarray | None) -> float | None:
  """``reference``: (T,) accuracies of isolated per-task models."""
  _, diag = _final_and_diag(r)
  if reference is None or not has_history(r):
    return None
  return float(np.mean(diag[1:] - np.asarray(reference, np.float64)[1:]))


def summary(r: np.ndarray, reference: np.ndarray | None) -> dict[str, float | None]:
  """{"ACC", "BWT", "forgetting", "FWT"} of one accuracy matrix."""
  return {"ACC": acc(r), "BWT": bwt(r), "forgetting": forgetting(r), "FWT": fwt(r, reference)}


# ----------------------------------------------------------------------------- per-task scores
# A task's score after each step (the entries of R). Classification metrics take integer
# predictions, regression metrics (``REGRESSION``) real-valued ones; all return a fraction
# (correlations in [-1, 1]) that the runner reports ×100, as GLUE does.


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
  return float(np.mean(np.asarray(y) == np.asarray(pred)))


def f1(y: np.ndarray, pred: np.ndarray) -> float:
  """F1 of the positive class 1 (0 when there is no true or predicted positive)."""
  y, pred = np.asarray(y) == 1, np.asarray(pred) == 1
  tp = float(np.sum(y & pred))
  return 0.0 if tp == 0 else 2 * tp / (float(np.sum(y)) + float(np.sum(pred)))


def matthews(y: np.ndarray, pred: np.ndarray) -> float:
  """Matthews correlation of binary labels (0 when a marginal is constant, as sklearn)."""
  y, pred = np.asarray(y) == 1, np.asarray(pred) == 1
  tp, tn = float(np.sum(y & pred)), float(np.sum(~y & ~pred))
  fp, fn = float(np.sum(~y & pred)), float(np.sum(y & ~pred))
  denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def pearson(y: np.ndarray, pred: np.ndarray) -> float:
  """Pearson correlation (0 when either side is constant)."""
  y, pred = (np.asarray(v, np.float64) - np.mean(v) for v in (y, pred))
  denom = np.sqrt(np.sum(y * y) * np.sum(pred * pred))
  return 0.0 if denom == 0 else float(np.sum(y * pred) / denom)


def _ranks(v: np.ndarray) -> np.ndarray:
  """Ranks 1..n, ties sharing their mean rank."""
  v = np.asarray(v, np.float64)
  order = np.argsort(v, kind="stable")
  ranks = np.empty(len(v))
  ranks[order] = np.arange(1, len(v) + 1)
  _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return sums[inverse] / counts[inverse]


def spearman(y: np.ndarray, pred: np.ndarray) -> float:
  """Spearman rank correlation (ties get mean ranks)."""
  return pearson(_ranks(y), _ranks(pred))


TASK_METRICS = {
  "accuracy": accuracy,
  "f1": f1,
  "matthews": matthews,
  "pearson": pearson,
  "spearman": spearman,
}
REGRESSION = frozenset({"pearson", "spearman"})


def task_metric(name: str):
  """The score function ``(y, pred) -> float`` called ``name``; ValueError lists the known."""
  if name not in TASK_METRICS:
    raise ValueError(f"unknown task metric {name!r}; known: {sorted(TASK_METRICS)}")
  return TASK_METRICS[name]


def is_regression(metric: str) -> bool:
  """Whether tasks scored by ``metric`` have real-valued labels and a 1-output head."""
  task_metric(metric)
  return metric in REGRESSION
