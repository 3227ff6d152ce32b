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
