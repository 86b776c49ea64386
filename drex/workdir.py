"""What a drex.train workdir holds, and the rules for using one again.

  config.json, config.<n>.json   the run's config (earlier, different ones kept, numbered)
  base/, base_source.json        the frozen base as used (written once), and where it came from
  adapters/<task>/               each task's expert and routing vectors: experts/, router/, metadata.json
  baselines/sequential/<i>_<task>/, baselines/mtl/   the baselines' LoRAs
  null_expert/<suite>-n<sample>/ prototypes of the base as a zero-output expert (router option null_expert), one
                                 per foundation suite and router.null_sample (a cache of what base and data make)
  identification/<name>-n<sample>-l<layers>/   statistics of one task's (or foundation member's) prompts for the
                                 router `identify` (a cache of what base and data make)
  state/<stage>/                 resume points of the stage in progress (removed once committed)
  results.json, report.md, plots/, tensorboard/

Every committed directory carries a manifest (drex.checkpoints.store). Nothing is written before the
checks here have passed: a refused command leaves the workdir as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections

from drex import base as base_lib
from drex.checkpoints import store
from drex.errors import UserError
from drex.parallel import Parallel

log = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
  """Stable hash of the config parts an artifact was trained with."""
  text = json.dumps(parts, sort_keys=True, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where an adapter lives in the workdir, and the fingerprint of the config that makes it."""

  directory: str
  fingerprint: str


def base_source(cfg: ml_collections.ConfigDict) -> str:
  return store.absolute(cfg.base.checkpoint or base_lib.shipped_path())


def load_base(cfg: ml_collections.ConfigDict, workdir: str, eval_only: bool, parallel: Parallel) -> base_lib.Base:
  """The frozen base: the workdir's copy (base/) or recorded source when it has one, else the config's
  (stored by `record_run`, once the run is known to fit the workdir). Writes nothing."""
  source = base_source(cfg)
  record = os.path.join(workdir, "base_source.json")
  if store.exists(record) or eval_only:
    recorded = store.read_json(record, "base record")["source"] if store.exists(record) else source
    if recorded != source and not eval_only:
      raise UserError(f"{workdir} was made with base {recorded}, the config names {source}; use a new --workdir")
    return base_lib.load_from_workdir(workdir, parallel)
  return base_lib.load(source, parallel)


def check_fits(slots: list[Slot]) -> None:
  """Refuse, before anything is written, a config that does not match the adapters already committed."""
  for slot in slots:
    meta_path = os.path.join(slot.directory, "metadata.json")
    if store.exists(meta_path):
      stored = store.read_json(meta_path, "adapter metadata").get("fingerprint")
      if stored != slot.fingerprint:
        raise UserError(f"{slot.directory} was trained with a different config or by an earlier drex (fingerprint "
                        f"{stored} != {slot.fingerprint}); use a new --workdir, or the config it was made with "
                        "(WORKDIR/config.json)")


def record_run(cfg: ml_collections.ConfigDict, workdir: str, base: base_lib.Base) -> None:
  """What a run that fits the workdir writes first: the base (once) and its config. A config that differs
  from the workdir's config.json replaces it; the earlier one is kept as config.<n>.json."""
  if jax.process_index() == 0:
    store.makedirs(workdir)
  store.sync("workdir made")
  record = os.path.join(workdir, "base_source.json")
  if not store.exists(record):
    if cfg.base.store:
      store.save_base(os.path.join(workdir, "base"), base.params, base.info, base.tokenizer)
    if jax.process_index() == 0:
      store.write_json(record, {"source": base_source(cfg)})
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  new = json.loads(json.dumps(cfg.to_dict(), default=str))
  if store.exists(path):
    if store.read_json(path, "run config") == new:
      return
    log.info("the config differs from this workdir's last one, kept as %s", store.keep_aside(path))
  store.write_json(path, new)


def load_or_train(slot: Slot, expected_experts: Any, expected_router: Any | None, eval_only: bool,
                  train: Callable[[], tuple[Any, Any, dict, list]]) -> tuple[Any, Any]:
  """An adapter's (experts, router), from where it can come, in this order:

  1. the workdir's committed adapter (`slot.directory`) when its fingerprint is the config's — reused;
     a different fingerprint is refused (one line: use another workdir or the workdir's config);
  2. in eval-only mode, nowhere else: a missing adapter is an error;
  3. training (`train()` -> experts, router, metadata, the stages' checkpoints): each stage resumes from the
     newest good step of its own resume points under state/ (drex.checkpoints.stage), else starts afresh.
     The result is committed (atomically, with its manifest), then the stages' resume points are removed.
  """
  if store.isdir(slot.directory):
    experts, router, meta = store.load_adapter(slot.directory, expected_experts, expected_router)
    if meta.get("fingerprint") != slot.fingerprint:
      raise UserError(f"{slot.directory} was trained with a different config or by an earlier drex (fingerprint "
                      f"{meta.get('fingerprint')} != {slot.fingerprint}); use a new --workdir or delete that adapter")
    log.info("reusing %s", slot.directory)
    return experts, router
  if eval_only:
    raise UserError(f"adapter not found: {slot.directory}; run drex.train with this --workdir first")
  experts, router, meta, checkpoints = train()
  store.save_adapter(slot.directory, experts, router, {**meta, "fingerprint": slot.fingerprint})
  for checkpoint in checkpoints:  # committed: the stages' resume points are not needed any more
    checkpoint.remove()
  return experts, router


def routing_sample_size(cfg: ml_collections.ConfigDict) -> int:
  """Unlabeled prompts per null-expert prototype or calibration statistic: router.null_sample in whole
  evaluation batches, at least one batch."""
  batch = cfg.data.eval_batch_size
  return max(batch, cfg.router.null_sample // batch * batch)


def null_expert_dir(workdir: str, cfg: ml_collections.ConfigDict) -> str:
  """Where the null-expert prototypes of this foundation suite and sample size are kept."""
  return os.path.join(workdir, "null_expert", f"{'+'.join(cfg.foundation)}-n{routing_sample_size(cfg)}")


def identification_dir(workdir: str, cfg: ml_collections.ConfigDict, name: str) -> str:
  """Where a class's identification statistics (router `identify`) are kept: one per task or foundation member,
  sample size and number of identifying layers (a cache of what base and data make)."""
  return os.path.join(workdir, "identification",
                      f"{name}-n{routing_sample_size(cfg)}-l{cfg.router.identify_layers}")


def identification_classes(cfg: ml_collections.ConfigDict, tasks: Sequence[str]) -> list[str]:
  """The identify router's classes: the tasks in order (their experts), then the foundation members that are
  not tasks (the base)."""
  return list(tasks) + [f for f in cfg.foundation if f not in tasks]


def identification_moments(workdir: str, cfg: ml_collections.ConfigDict, names: Sequence[str]) -> dict[str, dict]:
  """The kept identification statistics of each class in `names`: name -> {path: pooled moments}, in order."""
  from drex.adapters import prototypes  # pylint: disable=g-import-not-at-top
  out = {}
  for name in names:
    directory = identification_dir(workdir, cfg, name)
    if not store.isdir(directory):
      raise UserError(f"identification statistics not found: {directory}; make them with python -m drex.evaluate "
                      f"--workdir={workdir} --config.router.kind=identify")
    out[name] = prototypes.unnest(store.load_tree(directory, None, "identification statistics"))
  return out


def identification_tree(workdir: str, cfg: ml_collections.ConfigDict, tasks: Sequence[str]) -> dict:
  """The identify router's `id_w`/`id_b` over `tasks` and the base, from the statistics kept in the workdir."""
  from drex.adapters import prototypes  # pylint: disable=g-import-not-at-top
  classes = identification_moments(workdir, cfg, identification_classes(cfg, tasks))
  return prototypes.nest(prototypes.discriminants(classes, cfg.router.identify_shrinkage))


def load_routed(workdir: str) -> tuple[base_lib.Base, dict, ml_collections.ConfigDict, list[str]]:
  """A finished workdir's base, variables ({'params', 'experts': all tasks' stacked in stream order, 'router':
  their routing vectors, + the null-expert prototypes when its router uses them}), run config and task names."""
  from drex import config as config_lib  # pylint: disable=g-import-not-at-top
  from drex.adapters import lora, routers  # pylint: disable=g-import-not-at-top
  cfg = config_lib.read_run_config(workdir)
  base = base_lib.load_from_workdir(workdir)
  experts, vectors = [], []
  for task in cfg.tasks:
    directory = os.path.join(workdir, "adapters", task)
    if not store.isdir(directory):
      raise UserError(f"adapter not found: {directory}; run drex.train with this --workdir first")
    ex, rt, _ = store.load_adapter(directory)
    experts.append(ex)
    vectors.append(rt)
  router = lora.stack(vectors)
  if "null_v" in routers.from_config(cfg.router, 1).reads():
    directory = null_expert_dir(workdir, cfg)
    if not store.isdir(directory):
      raise UserError(f"null-expert prototypes not found: {directory}; make them with python -m drex.evaluate "
                      f"--workdir={workdir} --config.router.null_expert=true")
    router = lora.merge_trees(router, store.load_tree(directory, None, "null-expert prototypes"))
  if "id_w" in routers.from_config(cfg.router, 1).reads():
    router = lora.merge_trees(router, identification_tree(workdir, cfg, cfg.tasks))
  return base, {"params": base.params, "experts": lora.stack(experts), "router": router}, cfg, list(cfg.tasks)
