"""A stream's data, made ready once: each task's and foundation member's source (drex.data.sources), its
encoder (tiles per image), its readable training records, its evaluation set (prompt and answer lengths),
and its training sequence length. Nothing about one task depends on the others in the stream.

Records whose images cannot be read are found before anything is trained (from the image headers) and
left out, counted in `left_out` and logged; a record that fails later, when decoded, is skipped and
counted by the pipeline. Prompt lengths are rounded up to PROMPT_BUCKET tokens (few compiled programs).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import ml_collections

from drex import evaluation
from drex.checkpoints import store
from drex.data import builder, fixtures, pipeline, record as record_lib, sources as sources_lib
from drex.errors import UserError

log = logging.getLogger(__name__)


# Prompt lengths are rounded up to a multiple of this: few compiled generation programs, and each set's length
# its own (a stream with one task less evaluates the others exactly as before: drex.forget relies on it).
PROMPT_BUCKET = 64


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass
class TaskData:
  """The data side of a stream run."""

  sources: dict[str, sources_lib.Source]  # every column's source
  encoders: dict[str, pipeline.Encoder]  # every column's encoder
  train: dict[str, Sequence[dict]]  # each task's readable training records
  train_prompt_len: dict[str, int]  # each task's longest prompt (routing statistics), rounded up
  eval_sets: dict[str, evaluation.EvalSet]
  columns: list[str]  # tasks in stream order, then the foundation members not among them
  seq_len: dict[str, int]  # each task's tokens per training sequence (its own longest example, rounded up)
  left_out: dict[str, int]  # '<name>/<split>' -> records left out (unreadable images; over-long examples)

  def train_seq_len(self, names: Sequence[str]) -> int:
    return max(self.seq_len[n] for n in names)

  def batches(self, names: Sequence[str], batch_size: int, seed: int, workers: int = 0):
    """The training batches of one task, or of several mixed evenly (multi-task learning)."""
    return pipeline.train_batches([self.train[n] for n in names], [self.encoders[n] for n in names],
                                  self.train_seq_len(names), batch_size, seed,
                                  weights=[1.0] * len(names) if len(names) > 1 else None,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  workers=workers)


def prepare(cfg: ml_collections.ConfigDict, base) -> TaskData:
  """Resolve, build (process 0 first) and scan the stream's sources for the base's tokenizer and tiling."""
  data_dir = cfg.data.data_dir or builder.DEFAULT_DATA_DIR
  if cfg.data.fixtures:
    if jax.process_index() == 0:
      fixtures.ensure(cfg.data.fixtures)
    store.sync("fixtures written")
  names = list(cfg.tasks) + [f for f in cfg.foundation if f not in cfg.tasks]
  srcs = {n: sources_lib.get(n, cfg.get("sources"), data_dir) for n in names}
  wanted = [(n, "train") for n in cfg.tasks] + [(n, cfg.data.eval_split) for n in names]
  if jax.process_index() == 0:  # build the datasets once, then every process reads them
    embedded = [n for n, _ in wanted if srcs[n].kind == "embedded"]
    builder.prepare_all(sorted(set(embedded)), data_dir)
    for name, split in wanted:
      srcs[name].records(split)
  store.sync("datasets prepared")
  encoders = {n: base.encoder(s.max_tiles or cfg.data.max_tiles) for n, s in srcs.items()}
  left_out: dict[str, int] = {}

  train, train_prompt, seq_len = {}, {}, {}
  for name in cfg.tasks:
    records = srcs[name].records("train")
    scan = encoders[name].scan(records)
    keep = [i for i in range(len(records)) if i not in scan.reasons]
    if cfg.data.seq_len:
      keep = [i for i in keep if scan.total[i] <= cfg.data.seq_len]
    _report(left_out, f"{name}/train", len(records) - len(keep), scan, cfg.data.seq_len)
    if not keep:
      raise UserError(f"{name}: no usable training record (all {len(records)} have unreadable images or exceed "
                      f"data.seq_len)")
    train[name] = records if len(keep) == len(records) else record_lib.Subset(records, keep)
    seq_len[name] = cfg.data.seq_len or round_up(int(scan.total[keep].max()), 8)
    train_prompt[name] = int(scan.prompt[keep].max())

  eval_sets = {}
  for name in names:
    src = srcs[name]
    records = src.records(cfg.data.eval_split)
    first = evaluation.make_eval_set(name, src.metric, records, cfg.data.eval_size, src.subsets)
    scan = encoders[name].scan(first.source)
    eval_set = first if not scan.reasons else evaluation.make_eval_set(
        name, src.metric, records, cfg.data.eval_size, src.subsets, unreadable=sorted(scan.reasons))
    _report(left_out, f"{name}/{cfg.data.eval_split}", eval_set.left_out, scan, 0)
    if not eval_set.size:
      raise UserError(f"{name}: no readable record in its {cfg.data.eval_split} split")
    if not any(g.strip() for golds in eval_set.golds for g in golds):
      raise UserError(f"{name}: its {cfg.data.eval_split} split has no answers (withheld, as on a benchmark's "
                      f"server-scored test split); set config.sources.{name}.{cfg.data.eval_split} to a split with "
                      f"answers")
    eval_set.encoder = encoders[name]
    eval_set.max_new_tokens = src.max_new_tokens or cfg.data.max_new_tokens
    eval_set.prompt_len = round_up(int(scan.prompt.max()), PROMPT_BUCKET)
    eval_sets[name] = eval_set
  train_prompt_len = {n: max(eval_sets[n].prompt_len, round_up(p, PROMPT_BUCKET)) for n, p in train_prompt.items()}
  log.info("data: tasks %s, foundation %s; seq_len %s, prompt_len %s", list(cfg.tasks), list(cfg.foundation),
           seq_len, {n: es.prompt_len for n, es in eval_sets.items()})
  return TaskData(srcs, encoders, train, train_prompt_len, eval_sets, names, seq_len, left_out)


def _report(left_out: dict[str, int], key: str, count: int, scan: pipeline.Scan, seq_len: int) -> None:
  if not count:
    return
  left_out[key] = count
  first = next(iter(scan.reasons.values()), f"longer than data.seq_len={seq_len}")
  log.warning("%s: %d records left out (%d unreadable images; first: %s)", key, count, len(scan.reasons), first)
