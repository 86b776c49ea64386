"""Task metrics, each exact to its official definition, computed as sufficient statistics (arrays that are
summed over hosts, then turned into a score) so that scores from several hosts add up exactly.

METRICS and their sources (per example; `golds` are a record's acceptable answers, `options` its
multiple-choice option texts in letter order A, B, ...):

* exact_match: prediction and gold stripped, lowercased and one trailing period removed (drex's own
  rule); 1 if equal to any gold.
* relaxed_accuracy (ChartQA): `relaxed_correctness(target, prediction, 0.05)` of google-research/pix2struct
  pix2struct/metrics.py, with the prediction stripped as OpenGVLab/InternVL
  internvl_chat/eval/vqa/evaluate_vqa.py does; max over golds. A string parses as float(text), or
  float(text.rstrip('%')) / 100 when it ends in '%'; a ValueError makes it non-numeric (so "1,000" is
  non-numeric). When the prediction parses and the gold parses to a nonzero number, right iff
  |p - t| / |t| <= 0.05; otherwise right iff the lowercased strings are equal (a gold of 0 needs "0").
  InternVL calls relaxed_correctness(prediction, target), i.e. with the arguments swapped, so its
  relative error is w.r.t. the model's answer; we keep pix2struct's order (error w.r.t. the gold).
* anls (DocVQA): the RRC / DocVQA evaluation script (as shipped in InternVL,
  internvl_chat/eval/vqa/infographicsvqa_eval.py): per gold a, d = lev(norm(a), norm(pred)) /
  max(len(a), len(pred)) with norm(s) = ' '.join(s.strip().lower().split()) but the *raw* lengths
  (d = 0 when both are empty); q = 1 - min over golds of d; q < 0.5 scores 0 (so q = 0.5 is kept).
* vqa_accuracy (TextVQA): M4C's TextVQAAccuracyEvaluator with EvalAIAnswerProcessor, as
  InternVL/LLaVA use it (internvl_chat/eval/vqa/textvqa_eval.py, copied from LLaVA's m4c_evaluator.py):
  prediction and every gold are normalized (`vqa_normalize`); for each unique gold answer its score is
  the mean over the leave-one-out subsets of the answers (drop answer j, j = 1..n) of
  min(1, matches among the remaining n - 1 / 3); the prediction gets its answer's score, or 0. The
  official evaluator asserts n = 10 answers; we accept any n >= 1 with the same n leave-one-out subsets
  (so a single gold answer always scores 0, as no other annotator can agree with it).
* mc_accuracy (ScienceQA): the option letter is extracted from the free-form prediction with
  VLMEvalKit's can_infer (open-compass/VLMEvalKit vlmeval/utils/matching_util.py; `extract_option_letter`);
  right iff it equals the gold letter golds[0]. Without option texts the candidates are A..E and only
  the letter rule (can_infer_option) applies.
* circular_mc (MMBench CircularEval, VLMEvalKit vlmeval/dataset/utils/multiple_choice.py
  mcq_circular_eval): the same letter extraction per rotation; a question (group) counts as right only
  if every rotation of its options was answered right; the score is over groups, not rotations. Its
  sufficient statistic is, per group, (rotations seen, rotations answered wrong), so rotations of one
  question may be scored on different hosts. (No judge LLM: an answer no rule can read is wrong.)

Subsets: the non-circular metrics keep (score sum, count) per subset of the eval set; the score is the
mean over non-empty subsets of their mean (ChartQA reports human and augmented separately, averaged).
"""

from __future__ import annotations

import re
import string
from typing import Sequence

import numpy as np

METRICS = ("exact_match", "relaxed_accuracy", "anls", "vqa_accuracy", "mc_accuracy", "circular_mc")

_Golds = str | Sequence[str]


def _gold_list(golds: _Golds) -> list[str]:
  golds = [golds] if isinstance(golds, str) else [str(g) for g in golds]
  if not golds:
    raise ValueError("no gold answers to score against")
  return golds


# ----------------------------------------------------------------------------- exact match


def normalize(text: str) -> str:
  text = text.strip().lower()
  return text[:-1].strip() if text.endswith(".") else text


def exact_match(pred: str, golds: _Golds) -> float:
  """1 if the normalized prediction equals any normalized gold."""
  p = normalize(pred)
  return float(any(p == normalize(g) for g in _gold_list(golds)))


# ----------------------------------------------------------------------------- relaxed accuracy


def _to_float(text: str) -> float | None:
  """pix2struct's parser: '12%' -> 0.12; anything float() rejects (e.g. '1,000') -> None."""
  try:
    return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
  except ValueError:
    return None


def _relaxed_correctness(target: str, prediction: str, max_relative_change: float) -> bool:
  p, t = _to_float(prediction), _to_float(target)
  if p is not None and t:  # t is neither None nor 0
    return abs(p - t) / abs(t) <= max_relative_change
  return prediction.lower() == target.lower()


def relaxed_accuracy(pred: str, golds: _Golds, tolerance: float = 0.05) -> float:
  """ChartQA's relaxed accuracy of a prediction (stripped) against any gold (taken as is)."""
  pred = pred.strip()
  return float(any(_relaxed_correctness(g, pred, tolerance) for g in _gold_list(golds)))


# ----------------------------------------------------------------------------- ANLS


def levenshtein(a: str, b: str) -> int:
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def _anls_normalize(text: str) -> str:
  return " ".join(text.strip().lower().split())


def anls(pred: str, golds: _Golds, threshold: float = 0.5) -> float:
  """ANLS of one question as the RRC script scores it (raw lengths in the denominator, q < threshold -> 0)."""
  p = _anls_normalize(pred)
  dists = []
  for gold in _gold_list(golds):
    length = max(len(gold.upper()), len(pred.upper()))  # the script's raw (un-normalized) lengths
    dists.append(0.0 if length == 0 else float(levenshtein(_anls_normalize(gold), p)) / float(length))
  q = 1 - min(dists)
  return 0.0 if q < threshold else q


# ----------------------------------------------------------------------------- VQA accuracy (M4C)

# EvalAIAnswerProcessor's tables (M4C / mmf pythia/tasks/processors.py), reproduced as they are.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
# The upstream pattern, typo included: "(?!<=\d)" is a lookahead that never fails before a '.', so this
# removes every '.' not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                 "?", "!")


def _process_punctuation(text: str) -> str:
  out = text
  for p in _PUNCTUATIONS:
    # The tests read the text as it came in, not as already processed (as upstream).
    if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  # Upstream passes re.UNICODE (32) positionally, i.e. as `count`: at most 32 periods are removed.
  return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _process_digit_article(text: str) -> str:
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_normalize(text: str) -> str:
  """EvalAIAnswerProcessor: lowercase; drop ',' and '?'; "'s" -> " 's"; punctuation deleted (when it
  touches a space) or turned into a space; '.' not followed by a digit removed; number words -> digits;
  articles dropped; missing apostrophes restored ("dont" -> "don't")."""
  text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(pred: str, golds: _Golds) -> float:
  """M4C/TextVQA soft accuracy of a prediction against the annotators' answers (any number >= 1)."""
  answers = [vqa_normalize(g) for g in _gold_list(golds)]
  p = vqa_normalize(pred)
  if p not in answers:
    return 0.0
  accs = []
  for j in range(len(answers)):  # leave annotator j out, count the others that gave the predicted answer
    matches = sum(1 for k, a in enumerate(answers) if k != j and a == p)
    accs.append(min(1, float(matches) / 3))
  return sum(accs) / len(accs)


# ----------------------------------------------------------------------------- multiple choice

_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_LETTER_SEPARATORS = ".()[],:;!*#{}"
DEFAULT_LETTERS = "ABCDE"


def _can_infer_option(answer: str, letters: Sequence[str]) -> str | None:
  """VLMEvalKit can_infer_option: the one candidate letter standing alone as a token near the end;
  'Z' for a refusal or a lone 'Z'; None otherwise. (Its VERBOSE-only 'A might be a quantifier' branch
  is off by default and left out.)"""
  if "Failed to obtain answer via API" in answer:
    return None
  if any(r in answer for r in _REFUSALS):
    return "Z"
  for c in _LETTER_SEPARATORS:
    answer = answer.replace(c, " ")
  splits = [x.strip() for x in answer.split()]
  found = [ch for ch in letters if ch in splits]
  if len(found) == 1:
    ch = found[0]
    return ch if splits.index(ch) > len(splits) - 5 else None
  if not found and "Z" in splits:
    return "Z"
  return None


def _can_infer_text(answer: str, choices: dict[str, str]) -> str | None:
  """VLMEvalKit can_infer_text: the one option whose (lowercased) text occurs in a not too long answer."""
  answer = answer.lower()
  if len(answer) > 2 * sum(len(v) for v in choices.values()):
    return None
  cands = [k for k, v in choices.items() if v.lower() in answer]
  return cands[0] if len(cands) == 1 else None


def extract_option_letter(pred: str, options: Sequence[str] = (), letters: str = DEFAULT_LETTERS) -> str | None:
  """The option letter a free-form answer picks, by VLMEvalKit's can_infer; None if none can be read.

  With option texts the candidates are the first len(options) letters of string.ascii_uppercase
  (`letters` is ignored) and a failed letter match falls back to matching an option's text; without,
  the candidates are `letters` and only the letter rule applies. A refusal (VLMEvalKit's 'Z') gives
  None, without the text fallback, as upstream.
  """
  pred, options = str(pred), [] if options is None else [str(o) for o in options]
  if options:
    candidates = list(string.ascii_uppercase[:len(options)])
  else:
    candidates = list(letters)
  letter = _can_infer_option(pred, candidates)
  if letter is None and options:
    letter = _can_infer_text(pred, dict(zip(candidates, options)))
  return letter if letter in candidates else None


def _mc_correct(pred: str, golds: _Golds, options: Sequence[str]) -> float:
  gold = _gold_list(golds)[0].strip()
  return float(extract_option_letter(pred, options) == gold)


# ----------------------------------------------------------------------------- per example / statistics


def score_example(metric: str, prediction: str, golds: _Golds, options: Sequence[str] = ()) -> float:
  """One example's score (circular_mc: whether this rotation was answered right, 0 or 1)."""
  if metric == "exact_match":
    return exact_match(prediction, golds)
  if metric == "relaxed_accuracy":
    return relaxed_accuracy(prediction, golds)
  if metric == "anls":
    return anls(prediction, golds)
  if metric == "vqa_accuracy":
    return vqa_accuracy(prediction, golds)
  if metric in ("mc_accuracy", "circular_mc"):
    return _mc_correct(prediction, golds, () if options is None else options)
  raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")


def sufficient_stats(metric: str, predictions: Sequence[str], golds: Sequence[_Golds], groups: Sequence[int],
                     num_groups: int, options: Sequence[Sequence[str]] | None = None,
                     subsets: Sequence[int] | None = None, num_subsets: int = 1) -> np.ndarray:
  """Sufficient statistics of a metric over (a host's share of) an evaluation set; sum them over hosts,
  then `score_from_stats`.

  golds[i]: one gold (str) or the acceptable answers; options[i]: the option texts (None: all []);
  subsets[i]: the subset id in [0, num_subsets) (None: all 0); groups[i]: the group id in
  [0, num_groups) (used by circular_mc only).

  Returns, for circular_mc, [seen per group (num_groups), wrong per group (num_groups)]; otherwise the
  concatenation over subsets of [score sum, count] (shape [2 * num_subsets]).
  """
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
  n = len(predictions)
  if not n == len(golds) == len(groups):
    raise ValueError(f"{n} predictions for {len(golds)} golds and {len(groups)} group ids")
  if options is not None and len(options) != n:
    raise ValueError(f"{n} predictions for {len(options)} option lists")
  if subsets is not None and len(subsets) != n:
    raise ValueError(f"{n} predictions for {len(subsets)} subset ids")
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  if metric == "circular_mc" and num_subsets != 1:
    raise ValueError("circular_mc is scored over groups and takes no subsets (num_subsets must be 1)")
  opts = options if options is not None else [()] * n
  scores = np.array([score_example(metric, p, g, o) for p, g, o in zip(predictions, golds, opts)], np.float64)
  if metric == "circular_mc":
    ids = np.asarray(groups, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= num_groups):
      raise ValueError(f"group ids must lie in [0, {num_groups})")
    seen, wrong = np.zeros(num_groups), np.zeros(num_groups)
    np.add.at(seen, ids, 1)
    np.add.at(wrong, ids, (scores != 1.0).astype(np.float64))
    return np.concatenate([seen, wrong])
  sub = np.zeros(n, np.int64) if subsets is None else np.asarray(subsets, np.int64).reshape(-1)
  if sub.size and (sub.min() < 0 or sub.max() >= num_subsets):
    raise ValueError(f"subset ids must lie in [0, {num_subsets})")
  stats = np.zeros((num_subsets, 2))
  np.add.at(stats[:, 0], sub, scores)
  np.add.at(stats[:, 1], sub, 1.0)
  return stats.reshape(-1)


def _circular_totals(stats: np.ndarray) -> tuple[float, float]:
  if stats.ndim != 1 or stats.size % 2:
    raise ValueError(f"circular_mc statistics must be [seen per group, wrong per group], got shape {stats.shape}")
  seen, wrong = np.split(stats, 2)
  return float(((wrong == 0) & (seen > 0)).sum()), float((seen > 0).sum())


def _subset_pairs(stats: np.ndarray, num_subsets: int) -> np.ndarray:
  if stats.shape != (2 * num_subsets,):
    raise ValueError(f"expected statistics of shape ({2 * num_subsets},) for {num_subsets} subsets, "
                     f"got {stats.shape}")
  return stats.reshape(num_subsets, 2)


def subset_scores_from_stats(metric: str, stats: np.ndarray, num_subsets: int) -> list[float | None]:
  """Each subset's score from summed statistics (None for a subset with nothing scored)."""
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; use one of {METRICS}")
  stats = np.asarray(stats, np.float64)
  if metric == "circular_mc":
    if num_subsets != 1:
      raise ValueError("circular_mc is scored over groups and takes no subsets (num_subsets must be 1)")
    total, count = _circular_totals(stats)
    return [total / count if count else None]
  return [float(s) / float(c) if c > 0 else None for s, c in _subset_pairs(stats, num_subsets)]


def score_from_stats(metric: str, stats: np.ndarray, num_subsets: int = 1) -> float:
  """The score from summed statistics: the mean over non-empty subsets of each subset's mean score
  (circular_mc: the fraction of groups with every seen rotation right)."""
  scores = [s for s in subset_scores_from_stats(metric, stats, num_subsets) if s is not None]
  if not scores:
    raise ValueError("no examples were scored")
  return float(sum(scores) / len(scores))
