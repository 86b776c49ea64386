"""Evaluation: greedy answers on a task's evaluation split (test, or validation), scored by the task's
metric from sufficient statistics summed over hosts (so the score is exact on any number of hosts); routing profiles."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from drex.data import metrics
from drex.data import pipeline
from drex.data import record as record_lib
from drex.models.generation import jitted_greedy_generate
from drex.models.vlm import VLM, model_inputs, prepared
from drex.parallel import Parallel


@dataclasses.dataclass
class EvalSet:
  """The first `size` readable records of a task's evaluation split (whole circular groups), golds on the
  host, and how the task is asked: its encoder (tiles per image), prompt length and answer length."""

  name: str
  metric: str
  source: Sequence[dict]  # drex.data.record records
  golds: list[list[str]]
  options: list[list[str]]
  groups: list[int]
  subsets: list[int]  # index into subset_names
  subset_names: tuple[str, ...] = ()
  encoder: pipeline.Encoder | None = None
  prompt_len: int = 0
  max_new_tokens: int = 0
  left_out: int = 0  # records of the first `size` whose images cannot be read (not scored)
  failed_decoding: int = 0  # records whose image headers read but whose pixels did not (not scored; this host)

  @property
  def size(self) -> int:
    return len(self.golds)

  @property
  def num_groups(self) -> int:
    return max(self.groups) + 1 if self.groups else 0

  @property
  def num_subsets(self) -> int:
    return max(len(self.subset_names), 1)


def make_eval_set(name: str, metric: str, source: Sequence[dict], limit: int | None = None,
                  subset_names: Sequence[str] = (), unreadable: Sequence[int] = ()) -> EvalSet:
  """The first `limit` records of `source` (all if None or 0) without the records listed in `unreadable`
  (their images cannot be read; counted in `left_out`). A circular question is never cut: the limit moves
  back to the question's start, or forward to its end if it would otherwise keep nothing. Only the golds,
  options, groups and subsets are kept in memory (the records stay in `source`)."""
  total = len(source)
  n = total if not limit else min(limit, total)

  def fields(i: int) -> tuple[list[str], list[str], int, str]:
    r = source[i]
    return list(r["golds"]), list(r["options"]), int(r["group"]), r["subset"]

  kept = [fields(i) for i in range(n)]
  following = fields(n) if n < total else None
  if following is not None and kept and following[2] == kept[-1][2]:  # the limit falls inside a question
    start = n
    while start > 0 and kept[start - 1][2] == following[2]:
      start -= 1
    if start > 0:
      kept = kept[:start]
    else:
      i = n
      while i < total and (following := fields(i))[2] == kept[-1][2]:
        kept.append(following)
        i += 1
  bad = set(unreadable)
  keep = [i for i in range(len(kept)) if i not in bad]
  names = tuple(subset_names)
  unknown = sorted({kept[i][3] for i in keep} - set(names)) if names else []
  if unknown:
    raise ValueError(f"{name}: records of subsets {unknown} outside the declared {names}")
  dense = np.unique([kept[i][2] for i in keep], return_inverse=True)[1].reshape(-1) if keep else []
  return EvalSet(name, metric, record_lib.Subset(source, keep), [kept[i][0] for i in keep], [kept[i][1] for i in keep],
                 [int(g) for g in dense], [names.index(kept[i][3]) if names else 0 for i in keep], names,
                 left_out=len(kept) - len(keep))


class Evaluator:
  """Generates answers with a jitted greedy decoder (one compile per model structure and shape)."""

  def __init__(self, batch_size: int, parallel: Parallel):
    self.batch_size = batch_size
    self.parallel = parallel

  def predictions(self, model: VLM, variables: dict, eval_set: EvalSet) -> tuple[list[int], list[str]]:
    """(record indices, answers) of this process's rows."""
    indices, answers, failed = [], [], 0
    spec = jax.sharding.PartitionSpec(self.parallel.batch_sharding().spec[0])
    encoder = eval_set.encoder
    for batch in pipeline.eval_batches(eval_set.source, encoder, eval_set.prompt_len, self.batch_size,
                                       eval_set.size, jax.process_index(), jax.process_count()):
      inputs = self.parallel.global_batch({k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")})
      with self.parallel.context():
        tokens = jitted_greedy_generate(model, variables, inputs["pixel_values"], inputs["input_ids"],
                                        inputs["attention_mask"], eval_set.max_new_tokens, encoder.eos_id,
                                        encoder.pad_id)
      local = np.asarray(multihost_utils.global_array_to_host_local_array(tokens, self.parallel.mesh, spec))
      for row, ok, index in zip(local, batch["valid"], batch["index"]):
        if ok:
          indices.append(int(index))
          answers.append(encoder.decode_answer(row))
        elif index < eval_set.size:
          failed += 1
    eval_set.failed_decoding = max(eval_set.failed_decoding, failed)
    return indices, answers

  def stats(self, model: VLM, variables: dict, eval_set: EvalSet) -> np.ndarray:
    """Sufficient statistics over this process's rows, summed over all processes."""
    indices, answers = self.predictions(model, variables, eval_set)
    s = metrics.sufficient_stats(eval_set.metric, answers, [eval_set.golds[i] for i in indices],
                                 [eval_set.groups[i] for i in indices], eval_set.num_groups,
                                 options=[eval_set.options[i] for i in indices],
                                 subsets=[eval_set.subsets[i] for i in indices], num_subsets=eval_set.num_subsets)
    if jax.process_count() > 1:
      s = np.asarray(multihost_utils.process_allgather(s)).sum(0)
    return s

  def score(self, model: VLM, variables: dict, eval_set: EvalSet) -> float:
    return metrics.score_from_stats(eval_set.metric, self.stats(model, variables, eval_set), eval_set.num_subsets)

  def scores(self, model: VLM, variables: dict, eval_set: EvalSet) -> tuple[float, dict[str, float | None]]:
    """The score and, for an eval set with subsets, each subset's score."""
    s = self.stats(model, variables, eval_set)
    subsets = {}
    if eval_set.subset_names:
      subsets = dict(zip(eval_set.subset_names,
                         metrics.subset_scores_from_stats(eval_set.metric, s, eval_set.num_subsets)))
    return metrics.score_from_stats(eval_set.metric, s, eval_set.num_subsets), subsets


_LAYER = re.compile(r"layers_(\d+)")


@functools.lru_cache(maxsize=8)
def _mean_gates_fn(model: VLM, mesh: jax.sharding.Mesh):
  """Jitted once per (model, mesh): {adapted linear path: mean gates [E]} of a batch, replicated."""

  def mean_gates(variables, px, ids, mask):
    variables, embeds = prepared(model, variables, px, ids, mask)
    positions, kv_mask = model_inputs(px, ids, mask)[2:]
    _, state = model.apply(variables, embeds, positions, kv_mask, method="decode", mutable=["intermediates"])
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
