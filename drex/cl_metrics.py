"""Continual-learning metrics from an accuracy matrix.

R has one row per moment (row 0 = the base before any task, row i = after learning task i) and
one column per specialized task (first T columns, in stream order) then one per foundation-suite
member. Scores are in [0, 1]. For a method with fewer rows (e.g. multi-task learning: base, after
all), only the metrics that make sense are given; the others are None.
"""

from __future__ import annotations

import numpy as np


def summarize(matrix, num_tasks: int, sequential: bool = True) -> dict[str, float | None]:
  """average_accuracy, forgetting (Chaudhry: max earlier score minus final), backward_transfer
  (Lopez-Paz: final minus right-after), forward_transfer (right-before minus base),
  average_incremental_accuracy, foundation_retention (final mean foundation minus base's); and the same
  ideas under the names multimodal continual-instruction-tuning papers report (MCITlib, arXiv 2508.07307),
  with A[t, i] the accuracy on task i after learning task t (1-based):
    MFT = mean_i A[i, i]   (mean fine-tune accuracy: each task right after it is learned)
    MFN = mean_i A[T, i]   (mean final accuracy; = average_accuracy)
    MAA = mean_t mean_{i<=t} A[t, i]   (mean average accuracy over the stream; = average_incremental_accuracy)
    BWT = mean_{i<T} A[T, i] - A[i, i]   (backward transfer; = backward_transfer)
  A method without per-task rows (multi-task learning) gets MFN only."""
  r = np.asarray(matrix, np.float64)
  t = num_tasks
  last = r[-1]
  out: dict[str, float | None] = {"average_accuracy": float(last[:t].mean())}
  has_foundation = r.shape[1] > t
  out["foundation"] = float(last[t:].mean()) if has_foundation else None
  out["foundation_retention"] = float(last[t:].mean() - r[0, t:].mean()) if has_foundation else None
  if sequential and r.shape[0] == t + 1 and t > 1:
    out["forgetting"] = float(np.mean([r[j + 1:t, j].max() - r[t, j] for j in range(t - 1)]))
    out["backward_transfer"] = float(np.mean([r[t, j] - r[j + 1, j] for j in range(t - 1)]))
    out["forward_transfer"] = float(np.mean([r[j, j] - r[0, j] for j in range(1, t)]))
    out["average_incremental_accuracy"] = float(np.mean([r[i, :i].mean() for i in range(1, t + 1)]))
  else:
    out.update(forgetting=None, backward_transfer=None, forward_transfer=None, average_incremental_accuracy=None)
  per_task_rows = sequential and r.shape[0] == t + 1
  out["MFT"] = float(np.mean([r[i + 1, i] for i in range(t)])) if per_task_rows else None
  out["MFN"] = out["average_accuracy"]
  out["MAA"] = float(np.mean([r[i, :i].mean() for i in range(1, t + 1)])) if per_task_rows else None
  out["BWT"] = out["backward_transfer"]
  return out
