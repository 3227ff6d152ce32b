"""Continual-learning metrics against hand-computed matrices."""

import numpy as np
import pytest

from share_jax.experiments import metrics

NAN = np.nan
R = np.array([[90.0, NAN, NAN], [80.0, 70.0, NAN], [60.0, 75.0, 50.0]])


def test_acc_bwt_forgetting_fwt_by_hand():
  assert metrics.acc(R) == pytest.approx((60 + 75 + 50) / 3)
  assert metrics.bwt(R) == pytest.approx(((60 - 90) + (75 - 70)) / 2)
  # task 0: best before the end max(90, 80) = 90 -> 30; task 1: 70 -> -5 (it improved)
  assert metrics.forgetting(R) == pytest.approx((30 - 5) / 2)
  assert metrics.fwt(R, np.array([85.0, 72.0, 55.0])) == pytest.approx(((70 - 72) + (50 - 55)) / 2)


def test_forgetting_takes_the_best_earlier_row_not_the_diagonal():
  r = np.array([[50.0, NAN, NAN], [80.0, 60.0, NAN], [70.0, 60.0, 40.0]])
  assert metrics.forgetting(r) == pytest.approx(((80 - 70) + (60 - 60)) / 2)
  assert metrics.bwt(r) == pytest.approx(((70 - 50) + 0) / 2)


def test_no_forgetting_when_every_column_is_constant():
  r = np.array([[90.0, NAN], [90.0, 80.0]])
  s = metrics.summary(r, np.array([90.0, 80.0]))
  assert s == {"ACC": 85.0, "BWT": 0.0, "forgetting": 0.0, "FWT": 0.0}


def test_final_row_only_gives_acc_only():
  r = np.array([[NAN, NAN], [70.0, 90.0]])
  assert metrics.summary(r, np.array([1.0, 2.0])) == {
    "ACC": 80.0,
    "BWT": None,
    "forgetting": None,
    "FWT": None,
  }


def test_single_task_and_missing_reference():
  assert metrics.summary(np.array([[75.0]]), None) == {
    "ACC": 75.0,
    "BWT": None,
    "forgetting": None,
    "FWT": None,
  }
  assert metrics.fwt(R, None) is None


def test_non_square_matrix_is_an_error():
  with pytest.raises(ValueError, match="square"):
    metrics.acc(np.zeros((2, 3)))
