"""Task metrics as the official ones define them, computed as sufficient statistics (sum, count) so
scores from several hosts add up exactly.

* exact_match: lowercased, surrounding spaces and a trailing period stripped.
* relaxed_accuracy (ChartQA): a number within 5% relative error of a numeric gold is right; a gold of
  0 or a non-numeric string needs an exact (lowercased) match; "12%" parses as 0.12.
* anls (DocVQA): per question max over golds of 1 - NL if NL < 0.5 else 0, NL = Levenshtein
  distance / max length (lowercased, stripped); an empty gold scores 1 only for an empty answer.
* circular_mc (MMBench CircularEval): a question counts as right only if every rotation of its
  options was answered right; the score is over questions (groups), not rotations. Its sufficient
  statistic is, per question, (rotations seen, rotations answered wrong), so rotations of one
  question may be scored on different hosts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

METRICS = ("exact_match", "relaxed_accuracy", "anls", "circular_mc")


def normalize(text: str) -> str:
  text = text.strip().lower()
  return text[:-1].strip() if text.endswith(".") else text


def exact_match(pred: str, gold: str) -> float:
  return float(normalize(pred) == normalize(gold))


def _to_float(text: str) -> float | None:
  text = text.strip().replace(",", "")
  try:
    return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
  except ValueError:
    return None


def relaxed_accuracy(pred: str, gold: str, tolerance: float = 0.05) -> float:
  p, g = _to_float(normalize(pred)), _to_float(normalize(gold))
  if p is None or g is None or g == 0:
    return exact_match(pred, gold)
  return float(abs(p - g) / abs(g) <= tolerance)


def levenshtein(a: str, b: str) -> int:
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def anls(pred: str, golds: str | Sequence[str], threshold: float = 0.5) -> float:
  golds = [golds] if isinstance(golds, str) else list(golds)
  p = pred.strip().lower()
  best = 0.0
  for gold in golds:
    g = gold.strip().lower()
    if not g:
      best = max(best, float(not p))
      continue
    dist = levenshtein(p, g) / max(len(p), len(g))
    best = max(best, 1.0 - dist if dist < threshold else 0.0)
  return best


_PER_EXAMPLE = {"exact_match": exact_match, "relaxed_accuracy": relaxed_accuracy, "anls": anls,
                "circular_mc": exact_match}


def sufficient_stats(metric: str, predictions: Sequence[str], golds: Sequence[str], groups: Sequence[int],
                     num_groups: int) -> np.ndarray:
  """Sufficient statistics of a metric over (a host's share of) an evaluation set; sum them over
  hosts, then `score_from_stats`.

  Returns [score sum, count], or for circular_mc [seen per group (num_groups), wrong per group
  (num_groups)]; `groups` are the group ids (0..num_groups-1) of the rotations.
  """
  if metric not in _PER_EXAMPLE:
    raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
  if not len(predictions) == len(golds) == len(groups):
    raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds and {len(groups)} group ids")
  scores = np.array([_PER_EXAMPLE[metric](p, g) for p, g in zip(predictions, golds)], np.float64)
  if metric != "circular_mc":
    return np.array([scores.sum(), len(scores)], np.float64)
  seen, wrong = np.zeros(num_groups), np.zeros(num_groups)
  np.add.at(seen, np.asarray(groups, np.int64), 1)
  np.add.at(wrong, np.asarray(groups, np.int64), (scores != 1.0).astype(np.float64))
  return np.concatenate([seen, wrong])


def score_from_stats(metric: str, stats: np.ndarray) -> float:
  """Mean score from summed sufficient statistics."""
  if metric == "circular_mc":
    seen, wrong = np.split(np.asarray(stats), 2)
    total, count = float(((wrong == 0) & (seen > 0)).sum()), float((seen > 0).sum())
  else:
    total, count = float(stats[0]), float(stats[1])
  if count == 0:
    raise ValueError("no examples were scored")
  return total / count
