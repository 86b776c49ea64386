"""Evaluation: greedy answers on a task's evaluation split (test, or validation), scored by the task's
metric from sufficient statistics summed over hosts (so the score is exact on any number of hosts); routing profiles."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from drex.data import metrics
from drex.data import pipeline
from drex.models.generation import jitted_greedy_generate, prompt_positions
from drex.models.vlm import VLM
from drex.parallel import Parallel


@dataclasses.dataclass
class EvalSet:
  """The first `size` records of a task's evaluation split (whole circular groups), golds on the host."""

  name: str
  metric: str
  source: Any
  golds: list[str]
  groups: list[int]

  @property
  def size(self) -> int:
    return len(self.golds)

  @property
  def num_groups(self) -> int:
    return max(self.groups) + 1 if self.groups else 0


def make_eval_set(name: str, metric: str, source, limit: int | None = None) -> EvalSet:
  n = len(source) if limit is None else min(limit, len(source))
  records = [source[i] for i in range(min(n + 8, len(source)))]
  groups = [int(r["group"]) for r in records]
  while 0 < n < len(groups) and groups[n] == groups[n - 1]:  # never cut a circular question
    n -= 1
  golds = [pipeline._text(r["answer"]) for r in records[:n]]  # pylint: disable=protected-access
  first = groups[0] if groups else 0
  return EvalSet(name, metric, source, golds, [g - first for g in groups[:n]])


class Evaluator:
  """Generates answers with a jitted greedy decoder (one compile per model structure and shape)."""

  def __init__(self, encoder: pipeline.Encoder, prompt_len: int, batch_size: int, max_new_tokens: int,
               parallel: Parallel):
    self.encoder = encoder
    self.prompt_len = prompt_len
    self.batch_size = batch_size
    self.max_new_tokens = max_new_tokens
    self.parallel = parallel

  def predictions(self, model: VLM, variables: dict, eval_set: EvalSet) -> tuple[list[int], list[str]]:
    """(record indices, answers) of this process's rows."""
    indices, answers = [], []
    spec = jax.sharding.PartitionSpec(self.parallel.batch_sharding().spec[0])
    for batch in pipeline.eval_batches(eval_set.source, self.encoder, self.prompt_len, self.batch_size,
                                       eval_set.size, jax.process_index(), jax.process_count()):
      inputs = self.parallel.global_batch({k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")})
      with self.parallel.context():
        tokens = jitted_greedy_generate(model, variables, inputs["pixel_values"], inputs["input_ids"],
                                        inputs["attention_mask"], self.max_new_tokens, self.encoder.eos_id,
                                        self.encoder.pad_id)
      local = np.asarray(multihost_utils.global_array_to_host_local_array(tokens, self.parallel.mesh, spec))
      for row, ok, index in zip(local, batch["valid"], batch["index"]):
        if ok:
          indices.append(int(index))
          answers.append(self.encoder.decode_answer(row))
    return indices, answers

  def stats(self, model: VLM, variables: dict, eval_set: EvalSet) -> np.ndarray:
    """Sufficient statistics over this process's rows, summed over all processes."""
    indices, answers = self.predictions(model, variables, eval_set)
    s = metrics.sufficient_stats(eval_set.metric, answers, [eval_set.golds[i] for i in indices],
                                 [eval_set.groups[i] for i in indices], eval_set.num_groups)
    if jax.process_count() > 1:
      s = np.asarray(multihost_utils.process_allgather(s)).sum(0)
    return s

  def score(self, model: VLM, variables: dict, eval_set: EvalSet) -> float:
    return metrics.score_from_stats(eval_set.metric, self.stats(model, variables, eval_set))


_LAYER = re.compile(r"layers_(\d+)")


@functools.lru_cache(maxsize=8)
def _mean_gates_fn(model: VLM, mesh: jax.sharding.Mesh):
  """Jitted once per (model, mesh): {adapted linear path: mean gates [E]} of a batch, replicated."""

  def mean_gates(variables, px, ids, mask):
    _, state = model.apply(variables, px, ids, prompt_positions(mask), mask.astype(bool), mutable=["intermediates"])
    weight = mask.astype(jnp.float32)[..., None]
    flat = flax.traverse_util.flatten_dict(state["intermediates"])
    return {"/".join(k): (v[0] * weight).sum((0, 1)) / weight.sum() for k, v in flat.items() if k[-1] == "gates"}

  return jax.jit(mean_gates, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def routing_profile(model: VLM, variables: dict, batch: dict, parallel: Parallel) -> np.ndarray:
  """Mean routing weight per decoder layer and expert over the real prompt tokens of a (global) batch.

  Averages the gates of all adapted linears of a layer. Returns [num_layers, E].
  """
  inputs = parallel.global_batch({k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")})
  with parallel.context():
    per_linear = _mean_gates_fn(model, parallel.mesh)(variables, inputs["pixel_values"], inputs["input_ids"],
                                                      inputs["attention_mask"])
  per_layer: dict[int, list[np.ndarray]] = {}
  for path, value in per_linear.items():
    layer = int(next(m.group(1) for m in map(_LAYER.fullmatch, path.split("/")) if m))
    per_layer.setdefault(layer, []).append(np.asarray(value))
  return np.stack([np.mean(per_layer[i], 0) for i in sorted(per_layer)])
