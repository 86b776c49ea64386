"""Task metrics as the official ones define them, computed as sufficient statistics (sum, count) so
scores from several hosts add up exactly.

* exact_match: lowercased, surrounding spaces and a trailing period stripped.
* relaxed_accuracy (ChartQA): a number within 5% relative error of a numeric gold is right; a gold of
  0 or a non-numeric string needs an exact (lowercased) match; "12%" parses as 0.12.
* anls (DocVQA): per question max over golds of 1 - NL if NL < 0.5 else 0, NL = Levenshtein
  distance / max length (lowercased, stripped); an empty gold scores 1 only for an empty answer.
* circular_mc (MMBench CircularEval): a question counts as right only if every rotation of its
  options was answered right; the score is over questions (groups), not rotations.
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


def sufficient_stats(metric: str, predictions: Sequence[str], golds: Sequence[str],
                     groups: Sequence[int]) -> np.ndarray:
  """[score sum, count] of a metric over (a host's share of) an evaluation set.

  `groups` ties the rotations of one circular multiple-choice question together (all of a group's
  rotations must be on the same host); other metrics ignore it.
  """
  if metric not in _PER_EXAMPLE:
    raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
  if not len(predictions) == len(golds) == len(groups):
    raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds and {len(groups)} group ids")
  scores = np.array([_PER_EXAMPLE[metric](p, g) for p, g in zip(predictions, golds)], np.float64)
  if metric != "circular_mc":
    return np.array([scores.sum(), len(scores)], np.float64)
  all_right: dict[int, bool] = {}
  for group, score in zip(groups, scores):
    all_right[group] = all_right.get(group, True) and score == 1.0
  return np.array([sum(all_right.values()), len(all_right)], np.float64)


def score_from_stats(stats: np.ndarray) -> float:
  """Mean score from summed [score sum, count]."""
  total, count = float(stats[0]), float(stats[1])
  if count == 0:
    raise ValueError("no examples were scored")
  return total / count
