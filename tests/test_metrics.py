"""Task metrics (drex.data.metrics) against worked examples computed by hand from the official definitions."""

import numpy as np
import pytest

from drex.data import metrics


# ----------------------------------------------------------------------------- exact match


def test_exact_match_normalizes_case_space_and_one_period():
  assert metrics.exact_match(" Cat. ", "cat") == 1.0
  assert metrics.exact_match("cat..", "cat") == 0.0  # only one trailing period is stripped
  assert metrics.exact_match("dog", ["cat", "DOG"]) == 1.0
  assert metrics.score_example("exact_match", "dog", ["cat"]) == 0.0


# ----------------------------------------------------------------------------- relaxed accuracy (ChartQA)


@pytest.mark.parametrize("pred, gold, want", [
    ("104", "100", 1.0),  # 4% off
    ("106", "100", 0.0),  # 6% off
    ("105", "100", 1.0),  # exactly 5%: <= tolerance
    ("95.2", "100", 1.0),  # 4.8% of the gold (InternVL's swapped order: 4.8 / 95.2 = 5.04% -> wrong)
    ("105.2", "100", 0.0),  # 5.2% of the gold (swapped: 5.2 / 105.2 = 4.94% -> right)
    ("12%", "0.12", 1.0),  # percentages parse as fractions
    (" 104 ", "100", 1.0),  # the prediction is stripped
    ("0", "0", 1.0),  # a zero gold needs the same string
    ("0.0", "0", 0.0),
    ("0.01", "0", 0.0),
    ("1,000", "1000", 0.0),  # "1,000" does not parse: string comparison
    ("1,000", "1,000", 1.0),
    ("Yes", "yes", 1.0),  # non-numeric: lowercased equality
    ("Left.", "left", 0.0),  # no period stripping in the official rule
    ("30", "30", 1.0),  # the embedded chart_value task: integers
    ("40", "30", 0.0),
])
def test_relaxed_accuracy(pred, gold, want):
  assert metrics.relaxed_accuracy(pred, gold) == want
  assert metrics.score_example("relaxed_accuracy", pred, [gold]) == want


def test_relaxed_accuracy_takes_the_best_gold():
  assert metrics.relaxed_accuracy("7", ["six", "7"]) == 1.0
  assert metrics.relaxed_accuracy("8", ["six", "7"]) == 0.0


# ----------------------------------------------------------------------------- ANLS (DocVQA)


def test_anls_values():
  assert metrics.anls("cat", ["cat"]) == 1.0
  assert metrics.anls("  The   CAT ", ["the cat"]) == 1.0  # case and spaces normalized
  assert metrics.anls("cut", "cat") == pytest.approx(1 - 1 / 3)
  assert metrics.anls("dog", "cat") == 0.0  # similarity 0 < 0.5
  assert metrics.anls("dog", ["cat", "dot"]) == pytest.approx(2 / 3)  # best gold
  # Raw lengths in the denominator: lev("cat", "ca") = 1 over max(3, len("ca   ") = 5).
  assert metrics.anls("ca   ", ["cat"]) == pytest.approx(0.8)
  assert metrics.anls("", [""]) == 1.0 and metrics.anls("x", [""]) == 0.0


def test_anls_keeps_a_similarity_of_exactly_one_half():
  assert metrics.anls("43", ["42"]) == 0.5  # distance 1/2: similarity 0.5 is not < 0.5
  assert metrics.anls("abcxyz", ["abcdef"]) == 0.5
  assert metrics.anls("abxyz", ["abcde"]) == 0.0  # 3/5: similarity 0.4


# ----------------------------------------------------------------------------- VQA accuracy (TextVQA, M4C)


@pytest.mark.parametrize("text, want", [
    ("Two", "2"),
    ("none", "0"),
    ("the cat", "cat"),
    ("An apple", "apple"),
    ("dont", "don't"),
    ("isnt it", "isn't it"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("yes.", "yes"),
    ("a.m.", "am"),
    ("Hello, World?", "hello world"),
    ("1,000", "1000"),
    ("x-ray", "x ray"),  # punctuation inside a word becomes a space
    ("well - known", "well known"),  # punctuation next to a space is deleted
    ("(hello)", "hello"),
    ("it's\tred", "it 's red"),
])
def test_vqa_normalize(text, want):
  assert metrics.vqa_normalize(text) == want


def test_vqa_accuracy_leave_one_out():
  golds = ["2", "two"] + ["three"] * 8
  # 2 annotators say "2": leaving out one of them leaves 1 match (1/3), the other 8 subsets 2 (2/3):
  # (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
  assert metrics.vqa_accuracy("Two.", golds) == pytest.approx(0.6)
  assert metrics.vqa_accuracy("3", golds) == 1.0  # 8 agree: always >= 3 others
  assert metrics.vqa_accuracy("four", golds) == 0.0
  one = ["cat"] + ["dog"] * 9  # (1 * 0 + 9 * 1/3) / 10
  assert metrics.vqa_accuracy("the cat", one) == pytest.approx(0.3)
  three = ["cat"] * 3 + ["dog"] * 7  # (3 * 2/3 + 7 * 1) / 10
  assert metrics.vqa_accuracy("cat", three) == pytest.approx(0.9)


def test_vqa_accuracy_with_other_answer_counts():
  assert metrics.vqa_accuracy("cat", ["cat", "dog", "dog", "dog", "dog"]) == pytest.approx(4 / 15)  # (0 + 4/3) / 5
  assert metrics.vqa_accuracy("cat", ["cat"]) == 0.0  # no other annotator can agree
  with pytest.raises(ValueError, match="no gold"):
    metrics.vqa_accuracy("cat", [])


# ----------------------------------------------------------------------------- option letters


@pytest.mark.parametrize("pred, options, want", [
    ("B", ["red", "blue", "green"], "B"),
    ("The answer is B.", ["red", "blue", "green"], "B"),
    ("(C) green", ["red", "blue", "green"], "C"),
    ("blue", ["red", "blue", "green"], "B"),  # only the option's text matches
    ("It is Blue", ["red", "blue", "green"], "B"),
    ("A or B", ["cat", "dog", "cow"], None),  # two letters: ambiguous
    ("dark red", ["red", "dark red"], None),  # two option texts match
    ("I think a cat", ["cat", "dog"], None),  # 13 characters > 2 * (3 + 3): too long for a text match
    ("a cat", ["cat", "dog"], "A"),
    ("B is right because it is the biggest one", ["x", "y", "z"], None),  # the letter is too far from the end
    ("Cannot determine the answer", ["red", "blue"], None),  # a refusal (VLMEvalKit's 'Z')
    ("D", ["red", "blue", "green"], None),  # not one of the three letters
    ("A", [], "A"),  # no option texts: letters A..E, letter rule only
    ("E.", [], "E"),
    ("3", [], None),
    ("", [], None),
    ("a", [], None),  # letters are matched case-sensitively
    ("blue", [], None),
])
def test_extract_option_letter(pred, options, want):
  assert metrics.extract_option_letter(pred, options) == want


def test_mc_accuracy_compares_with_the_gold_letter():
  options = ["red", "blue", "green"]
  assert metrics.score_example("mc_accuracy", "The answer is B.", ["B"], options) == 1.0
  assert metrics.score_example("mc_accuracy", "green", ["C"], options) == 1.0
  assert metrics.score_example("mc_accuracy", "C", ["B"], options) == 0.0
  assert metrics.score_example("mc_accuracy", "A or B", ["A"], options) == 0.0
  stats = metrics.sufficient_stats("mc_accuracy", ["B", "blue", "x"], ["B", "B", "B"], [0, 1, 2], 3,
                                   options=[options] * 3)
  np.testing.assert_array_equal(stats, [2.0, 3.0])


# ----------------------------------------------------------------------------- circular multiple choice


def test_circular_group_with_one_wrong_rotation_scores_zero():
  preds = ["A", "(B)", "C.", "D", "A", "A", "3", "C"]
  golds = ["A", "B", "C", "D", "A", "B", "C", "C"]
  groups = [0, 0, 0, 0, 1, 1, 2, 3]
  stats = metrics.sufficient_stats("circular_mc", preds, golds, groups, 4)
  np.testing.assert_array_equal(stats, [4, 2, 1, 1, 0, 1, 1, 0])  # seen per group, wrong per group
  assert metrics.score_from_stats("circular_mc", stats) == 0.5  # groups 0 and 3 right, 1 and 2 wrong
  assert metrics.subset_scores_from_stats("circular_mc", stats, 1) == [0.5]
  # Group ids never seen are not counted.
  wider = metrics.sufficient_stats("circular_mc", preds, golds, groups, 6)
  assert metrics.score_from_stats("circular_mc", wider) == 0.5


def test_circular_mc_takes_no_subsets():
  with pytest.raises(ValueError, match="num_subsets must be 1"):
    metrics.sufficient_stats("circular_mc", ["A"], ["A"], [0], 1, subsets=[0], num_subsets=2)
  with pytest.raises(ValueError, match="group ids"):
    metrics.sufficient_stats("circular_mc", ["A"], ["A"], [3], 2)


# ----------------------------------------------------------------------------- subsets and hosts


def test_subsets_are_averaged():
  # ChartQA: human 1 of 2 right, augmented 2 of 2 right -> (0.5 + 1.0) / 2, not 3 / 4 of the examples.
  preds, golds, subsets = ["10", "99", "20", "30"], ["10", "50", "20", "30"], [0, 0, 1, 1]
  stats = metrics.sufficient_stats("relaxed_accuracy", preds, golds, [0, 1, 2, 3], 4, subsets=subsets,
                                   num_subsets=2)
  np.testing.assert_array_equal(stats, [1, 2, 2, 2])
  assert metrics.score_from_stats("relaxed_accuracy", stats, 2) == 0.75
  assert metrics.subset_scores_from_stats("relaxed_accuracy", stats, 2) == [0.5, 1.0]
  # An empty subset is left out of the mean.
  three = metrics.sufficient_stats("relaxed_accuracy", preds, golds, [0, 1, 2, 3], 4, subsets=subsets,
                                   num_subsets=3)
  assert metrics.subset_scores_from_stats("relaxed_accuracy", three, 3) == [0.5, 1.0, None]
  assert metrics.score_from_stats("relaxed_accuracy", three, 3) == 0.75
  # Without subsets: the plain mean.
  plain = metrics.sufficient_stats("relaxed_accuracy", preds, golds, [0, 1, 2, 3], 4)
  assert metrics.score_from_stats("relaxed_accuracy", plain) == 0.75 and plain.shape == (2,)
  unbalanced = metrics.sufficient_stats("exact_match", ["a", "b", "c"], ["a", "x", "x"], [0, 1, 2], 3,
                                        subsets=[0, 1, 1], num_subsets=2)
  assert metrics.score_from_stats("exact_match", unbalanced, 2) == 0.5  # (1/1 + 0/2) / 2, not 1/3


def test_stats_summed_over_hosts_equal_the_stats_of_all_examples():
  preds = ["2", "cat", "four", "3", "two"]
  golds = [["2"] * 3 + ["1"] * 7, ["cat"] * 10, ["4", "four", "x"] + ["y"] * 7, ["3", "3"] + ["z"] * 8,
           ["2", "2"] + ["1"] * 8]
  subsets = [0, 1, 0, 1, 1]
  args = dict(num_groups=5, num_subsets=2)
  whole = metrics.sufficient_stats("vqa_accuracy", preds, golds, range(5), subsets=subsets, **args)
  split = (metrics.sufficient_stats("vqa_accuracy", preds[:2], golds[:2], range(2), subsets=subsets[:2], **args)
           + metrics.sufficient_stats("vqa_accuracy", preds[2:], golds[2:], range(2, 5), subsets=subsets[2:], **args))
  np.testing.assert_allclose(split, whole)
  scores = [metrics.vqa_accuracy(p, g) for p, g in zip(preds, golds)]
  want = (np.mean([scores[0], scores[2]]) + np.mean([scores[1], scores[3], scores[4]])) / 2
  assert metrics.score_from_stats("vqa_accuracy", split, 2) == pytest.approx(want)

  preds, golds, groups = ["A", "B", "C", "D", "A", "A"], ["A", "B", "C", "D", "A", "B"], [0, 0, 0, 0, 1, 1]
  whole = metrics.sufficient_stats("circular_mc", preds, golds, groups, 2)
  for cut in range(len(preds) + 1):  # anywhere, even inside a question
    split = (metrics.sufficient_stats("circular_mc", preds[:cut], golds[:cut], groups[:cut], 2)
             + metrics.sufficient_stats("circular_mc", preds[cut:], golds[cut:], groups[cut:], 2))
    np.testing.assert_array_equal(split, whole)
  assert metrics.score_from_stats("circular_mc", whole) == 0.5


def test_golds_may_be_strings_or_lists_and_options_none():
  a = metrics.sufficient_stats("anls", ["cut", "dog"], ["cat", ["dog"]], [0, 1], 2)
  b = metrics.sufficient_stats("anls", ["cut", "dog"], [["cat"], ["dog"]], [0, 1], 2, options=[[], []])
  np.testing.assert_array_equal(a, b)
  assert a[0] == pytest.approx(1 + 2 / 3) and a[1] == 2


def test_errors():
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.sufficient_stats("bleu", [], [], [], 0)
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.score_example("bleu", "a", ["a"])
  with pytest.raises(ValueError, match="no examples"):
    metrics.score_from_stats("exact_match", metrics.sufficient_stats("exact_match", [], [], [], 0))
  with pytest.raises(ValueError, match="no examples"):
    metrics.score_from_stats("circular_mc", np.zeros(4))
  with pytest.raises(ValueError, match="shape"):
    metrics.score_from_stats("exact_match", np.array([1.0, 2.0]), num_subsets=2)
  with pytest.raises(ValueError, match="subset ids"):
    metrics.sufficient_stats("exact_match", ["a"], ["a"], [0], 1, subsets=[2], num_subsets=2)
  with pytest.raises(ValueError, match="predictions"):
    metrics.sufficient_stats("exact_match", ["a", "b"], ["a"], [0], 1)
