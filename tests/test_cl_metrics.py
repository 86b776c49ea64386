"""Continual-learning summaries of an accuracy matrix, against values worked out by hand."""

import pytest

from drex import cl_metrics

# rows: base, after task 1, 2, 3; columns: tasks 1-3, then one foundation member
MATRIX = [[0.1, 0.2, 0.0, 0.9],
          [0.8, 0.2, 0.1, 0.8],
          [0.6, 0.9, 0.1, 0.7],
          [0.5, 0.7, 1.0, 0.6]]


def test_drex_and_mcitlib_summaries():
  s = cl_metrics.summarize(MATRIX, 3)
  assert s["MFT"] == pytest.approx((0.8 + 0.9 + 1.0) / 3)  # each task right after it is learned
  assert s["MFN"] == s["average_accuracy"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
  assert s["MAA"] == s["average_incremental_accuracy"] == pytest.approx((0.8 + 0.75 + (0.5 + 0.7 + 1.0) / 3) / 3)
  assert s["BWT"] == s["backward_transfer"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
  assert s["forgetting"] == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)
  assert s["forward_transfer"] == pytest.approx(((0.2 - 0.2) + (0.1 - 0.0)) / 2)
  assert s["foundation"] == pytest.approx(0.6) and s["foundation_retention"] == pytest.approx(0.6 - 0.9)


def test_multi_task_learning_has_only_final_metrics():
  s = cl_metrics.summarize([MATRIX[0], MATRIX[-1]], 3, sequential=False)
  assert s["MFN"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
  assert s["MFT"] is None and s["MAA"] is None and s["BWT"] is None and s["forgetting"] is None
