"""Evaluation: greedy answers on a task's test split, scored by the task's metric from summed
sufficient statistics (so the score is exact across hosts); and per-layer routing profiles."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from drex.data import metrics
from drex.data import pipeline
from drex.models.generation import greedy_generate, prompt_positions
from drex.models.vlm import VLM


@dataclasses.dataclass
class EvalSet:
  """A task's test split and this host's share of it (whole groups, contiguous)."""

  name: str
  metric: str
  source: Any
  golds: list[str]
  groups: list[int]
  start: int
  stop: int


def make_eval_set(name: str, metric: str, source, process_index: int = 0, process_count: int = 1,
                  limit: int | None = None) -> EvalSet:
  """Read golds and group ids; give this process a contiguous block of whole groups."""
  n = len(source) if limit is None else min(limit, len(source))
  records = [source[i] for i in range(n)]
  golds = [pipeline._text(r["answer"]) for r in records]  # pylint: disable=protected-access
  groups = [int(r["group"]) for r in records]
  boundaries = [i for i in range(n) if i == 0 or groups[i] != groups[i - 1]] + [n]
  per = -(-(len(boundaries) - 1) // process_count)
  first = min(process_index * per, len(boundaries) - 1)
  last = min(first + per, len(boundaries) - 1)
  return EvalSet(name, metric, source, golds, groups, boundaries[first], boundaries[last])


class Evaluator:
  """Generates answers with a jitted greedy decoder (one compile per model structure and shape)."""

  def __init__(self, encoder: pipeline.Encoder, prompt_len: int, batch_size: int, max_new_tokens: int):
    self.encoder = encoder
    self.prompt_len = prompt_len
    self.batch_size = batch_size
    self.max_new_tokens = max_new_tokens
    self._compiled: dict[Any, Any] = {}

  def _generate_fn(self, model: VLM):
    key = (model.config, model.adapter)
    if key not in self._compiled:
      fn = functools.partial(greedy_generate, model, max_new_tokens=self.max_new_tokens,
                             eos_id=self.encoder.eos_id, pad_id=self.encoder.pad_id)
      self._compiled[key] = jax.jit(lambda variables, px, ids, mask: fn(variables, px, ids, mask))
    return self._compiled[key]

  def predictions(self, model: VLM, variables: dict, eval_set: EvalSet) -> list[str]:
    generate = self._generate_fn(model)
    out: list[str] = []
    for batch in pipeline.eval_batches(eval_set.source, self.encoder, self.prompt_len, self.batch_size,
                                       eval_set.start, eval_set.stop):
      tokens = np.asarray(generate(variables, batch["pixel_values"], batch["input_ids"], batch["attention_mask"]))
      out += [self.encoder.decode_answer(t) for t, ok in zip(tokens, batch["valid"]) if ok]
    return out

  def stats(self, model: VLM, variables: dict, eval_set: EvalSet) -> np.ndarray:
    """[score sum, count] over this host's share, summed over all hosts."""
    preds = self.predictions(model, variables, eval_set)
    s = metrics.sufficient_stats(eval_set.metric, preds, eval_set.golds[eval_set.start:eval_set.stop],
                                 eval_set.groups[eval_set.start:eval_set.stop])
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      s = np.asarray(multihost_utils.process_allgather(s)).sum(0)
    return s

  def score(self, model: VLM, variables: dict, eval_set: EvalSet) -> float:
    return metrics.score_from_stats(self.stats(model, variables, eval_set))


_LAYER = re.compile(r"layers_(\d+)")


def routing_profile(model: VLM, variables: dict, batch: dict) -> np.ndarray:
  """Mean routing weight per decoder layer and expert over the real prompt tokens of a batch.

  Averages the gates of all adapted linears of a layer. Returns [num_layers, E].
  """
  mask = batch["attention_mask"]

  @jax.jit
  def gates(variables, px, ids, mask):
    _, state = model.apply(variables, px, ids, prompt_positions(mask), mask.astype(bool), mutable=["intermediates"])
    return state["intermediates"]

  inter = flax.traverse_util.flatten_dict(gates(variables, batch["pixel_values"], batch["input_ids"], mask))
  weight = jnp.asarray(mask, jnp.float32)[..., None]
  per_layer: dict[int, list[np.ndarray]] = {}
  for path, value in inter.items():
    if path[-1] != "gates":
      continue
    layer = int(_LAYER.fullmatch(next(p for p in path if _LAYER.fullmatch(p))).group(1))
    g = value[0] if isinstance(value, tuple) else value
    per_layer.setdefault(layer, []).append(np.asarray((g * weight).sum((0, 1)) / weight.sum()))
  return np.stack([np.mean(per_layer[i], 0) for i in sorted(per_layer)])
