"""Routing statistics made from data (no training): what the `topk` router's options and the `identify` router
read beside the trained routing vectors. Each is made from one task's or one foundation member's own prompts
through the frozen base; the null-expert prototypes and the identification statistics are kept in the workdir
as caches (drex.workdir), the routing vectors' score statistics with the task's adapter.

  leaves = routing_statistics.data_leaves(run, router, tasks)   # what `router` reads, over these tasks' experts
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import flax
import jax
import numpy as np

from drex import task_data
from drex import workdir as workdir_lib
from drex.adapters import lora, prototypes, routers
from drex.checkpoints import store
from drex.data import pipeline, record as record_lib
from drex.errors import UserError

if TYPE_CHECKING:
  from drex.stream import Run

log = logging.getLogger(__name__)


def _sample_batches(run: Run, records, encoder: pipeline.Encoder, prompt_len: int):
  """Unlabeled prompts of a source (router.null_sample of them)."""
  return pipeline.eval_batches(records, encoder, prompt_len, run.cfg.data.eval_batch_size, workdir_lib.routing_sample_size(run.cfg),
                               jax.process_index(), jax.process_count())


def _moments(run: Run, batches, vectors: dict | None = None) -> dict:
  variables = run.place({"params": None, "experts": run.new_expert("base")})  # B = 0: the base's inputs
  return prototypes.input_moments(run.model(), variables, batches, run.parallel, vectors)


def vector_statistics(run: Run, router: Any, task: str) -> Any:
  """v_stats [1, 2] per adapted linear: the score statistics of a task's routing vector on its data."""
  batches = _sample_batches(run, run.data.train[task], run.data.encoders[task], run.data.train_prompt_len[task])
  moments = _moments(run, batches, prototypes.by_path(router, "v"))
  return prototypes.as_tree(prototypes.stats_array(moments), "v_stats")


def _foundation_sample(run: Run, name: str) -> tuple:
  """(records, encoder, prompt length) of a foundation member's unlabeled prompts: its train split, or its
  validation split when it has none (MMBench: the prototypes then see the prompts, not the answers, of the
  questions it is scored on)."""
  source, encoder = run.data.sources[name], run.data.encoders[name]
  try:
    records = source.records("train")
  except UserError:
    log.warning("%s has no train split: its routing statistics (null-expert prototype, identification) are made "
                "from its validation prompts", name)
    records = source.records("validation")
  sample = record_lib.Subset(records, range(min(len(records), workdir_lib.routing_sample_size(run.cfg))))
  longest = encoder.scan(sample).prompt_max
  return sample, encoder, max(run.data.eval_sets[name].prompt_len, task_data.round_up(longest, 8))


def null_prototypes(run: Run) -> Any:
  """The base as a zero-output expert: per adapted linear, the mean standardized input over unlabeled prompts
  of each foundation-suite member, null_v [K, d_in] (K = suite size), and each prototype's score statistics on
  its member's prompts, null_stats [K, 2]. Made once per suite and sample size (workdir_lib.null_expert_dir)."""
  directory = workdir_lib.null_expert_dir(run.workdir, run.cfg)
  k = len(run.cfg.foundation)
  shapes = jax.eval_shape(lambda: lora.init_router(lora.stack([run.new_expert("shapes")] * k), ("v", "v_stats")))
  expected = _rename_leaves(_rename_leaves(shapes, "v", "null_v"), "v_stats", "null_stats")
  if store.isdir(directory):
    return store.load_tree(directory, expected, "null-expert prototypes")
  samples = [_foundation_sample(run, f) for f in run.cfg.foundation]
  means = [{key: m["mean"] for key, m in _moments(run, _sample_batches(run, *s)).items()} for s in samples]
  protos = {key: np.stack([m[key] for m in means]) for key in means[0]}
  stats = [prototypes.stats_array(_moments(run, _sample_batches(run, *s), {key: p[i:i + 1] for key, p in protos.items()}))
           for i, s in enumerate(samples)]
  tree = lora.merge_trees(prototypes.as_tree(protos, "null_v"),
                          prototypes.as_tree({key: np.concatenate([s[key] for s in stats]) for key in protos},
                                             "null_stats"))
  store.save_tree(directory, tree)  # a cache of what the base and the data determine
  return tree


def identification_statistics(run: Run, name: str) -> None:
  """Make (once) a class's identification statistics: the pooled_moments of the identifying linears' inputs
  over its own prompts (a task's training prompts; a foundation member's, as for the null expert)."""
  directory = workdir_lib.identification_dir(run.workdir, run.cfg, name)
  if store.isdir(directory):
    return
  sample = ((run.data.train[name], run.data.encoders[name], run.data.train_prompt_len[name]) if name in run.data.train
            else _foundation_sample(run, name))
  linears = prototypes.by_path(run.expert_shapes(), "lora_a")
  paths = prototypes.identifying_paths(linears, run.cfg.router.identify_layers)
  if not paths:
    raise UserError(f"router 'identify' reads the inputs of q_proj, which config.lora.target_modules "
                    f"{tuple(run.cfg.lora.target_modules)} does not adapt; add 'q_proj'")
  variables = run.place({"params": None, "experts": run.new_expert("base")})  # B = 0: the base's inputs
  moments = prototypes.pooled_moments(run.model(), variables, _sample_batches(run, *sample), run.parallel, paths)
  count = int(moments[paths[0]]["count"])
  if count < 2:
    raise UserError(f"{name}: router 'identify' needs at least 2 readable prompts of it to make its statistics, "
                    f"found {count}; give the source more records or use --config.router.kind=topk")
  store.save_tree(directory, prototypes.nest(moments))  # a cache of what the base and the data determine


def data_leaves(run: Run, router: routers.Router, tasks: Sequence[str]) -> dict:
  """The router leaves made from data that `router` reads, over these tasks' experts: the null-expert
  prototypes, the identification discriminants ({} when it reads neither)."""
  trees = []
  if "null_v" in router.reads():
    trees.append(null_prototypes(run))
  if "id_w" in router.reads():
    for name in workdir_lib.identification_classes(run.cfg, tasks):
      identification_statistics(run, name)
    trees.append(workdir_lib.identification_tree(run.workdir, run.cfg, tasks))
  return lora.merge_trees(*trees)


def _rename_leaves(tree: dict, old: str, new: str) -> dict:
  flat = flax.traverse_util.flatten_dict(tree)
  return flax.traverse_util.unflatten_dict({(p[:-1] + (new,) if p[-1] == old else p): v for p, v in flat.items()})
