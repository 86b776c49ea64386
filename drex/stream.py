"""The task-sequential driver behind `python -m drex.train`.

For each task of the stream: stage A (a new LoRA expert on that task's data only, base frozen),
stage B (its routing vectors, expert frozen), save, evaluate every task and the foundation suite
(one accuracy-matrix row). Baselines: `sequential` (one LoRA fine-tuned task after task) and `mtl`
(one LoRA on the union of all tasks). Finished adapters are reused on a re-run, so re-running a
finished workdir only re-evaluates (with the router settings of the current config).

Workdir layout:
  base/                       the frozen base as used (written once)
  adapters/<task>/            routing expert of each task: experts/, router/, metadata.json
  baselines/sequential/<i>_<task>/, baselines/mtl/   the baselines' LoRAs
  null_router/                prototypes of the base as a zero-output expert (router.null_expert)
  results.json, report.md, plots/, tensorboard/
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import Any

from etils import epath
import flax
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tensorboardX import SummaryWriter

from drex import base as base_lib
from drex import cl_metrics, config as config_lib, evaluation, report, task_data
from drex.adapters import lora, prototypes
from drex.adapters.routing import Routing
from drex.checkpoints import store
from drex.checkpoints.stage import StageCheckpoint
from drex.data import pipeline, record as record_lib, sources as sources_lib
from drex.errors import UserError
from drex.parallel import Parallel
from drex.training import trainer

log = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
  """Stable hash of the config parts an artifact was trained with."""
  text = json.dumps(parts, sort_keys=True, default=lambda o: o.to_dict() if hasattr(o, "to_dict") else str(o))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


class Row(list):
  """An accuracy-matrix row; `subsets` holds, for columns scored in parts, each part's score."""

  def __init__(self, *args):
    super().__init__(*args)
    self.subsets: dict[str, dict[str, float | None]] = {}


class Stream:
  """One run of a stream config in a workdir."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, eval_only: bool = False):
    config_lib.validate(cfg)
    self.cfg = cfg
    self.workdir = workdir
    self.eval_only = eval_only  # never train: every adapter must be in the workdir already
    self.timings: dict[str, float] = {}
    self._steps: dict[Any, Any] = {}
    if not eval_only:
      store.check_writable(workdir)  # leaves nothing behind: nothing is written before the checks below pass
    tfds.disable_progress_bar()
    self.parallel = Parallel.create(cfg.mesh, cfg.sharding_rules)
    log.info("mesh %s over %d devices in %d processes", self.parallel.shape, jax.device_count(), jax.process_count())
    with self._timed("load_base"):
      self.base = self._load_base()
      self.base_boxed = base_lib.boxed_shapes(self.base.model(), self.base.info.image)
      self.base_shardings = self.parallel.tree_shardings(self.base_boxed)
    with self._timed("data"):
      self.data = task_data.prepare(cfg, self.base)
      self._check_batch_sizes()
    self.columns = self.data.columns
    self.evaluator = evaluation.Evaluator(cfg.data.eval_batch_size, self.parallel)
    self.writer = None
    if not eval_only:
      self._check_finished_adapters()
      self._record_run()
      if jax.process_index() == 0:
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  # ------------------------------------------------------------------ set-up

  @contextlib.contextmanager
  def _timed(self, key: str):
    begin = time.time()
    try:
      yield
    finally:
      self.timings[key] = self.timings.get(key, 0.0) + time.time() - begin

  def _base_source(self) -> str:
    return store.absolute(self.cfg.base.checkpoint or base_lib.shipped_path())

  def _load_base(self) -> base_lib.Base:
    """The frozen base: the workdir's copy (WORKDIR/base) or recorded source when it has one, else the
    config's (stored once by `_record_run`, after the checks)."""
    source = self._base_source()
    record = os.path.join(self.workdir, "base_source.json")
    if store.exists(record) or self.eval_only:
      recorded = store.read_json(record, "base record")["source"] if store.exists(record) else source
      if recorded != source and not self.eval_only:
        raise UserError(f"{self.workdir} was made with base {recorded}, the config names {source}; "
                        f"use a new --workdir")
      return base_lib.load_from_workdir(self.workdir, self.parallel)
    base = base_lib.load(source, self.parallel)
    log.info("base %s: %.2fM params, template %s", source, lora.count_params(base.params) / 1e6, base.info.template)
    return base

  def _check_finished_adapters(self) -> None:
    """Refuse, before anything is written, a config that does not match the adapters already in the workdir."""
    for directory, fp in self._planned_adapters():
      meta_path = os.path.join(directory, "metadata.json")
      if store.exists(meta_path):
        stored = store.read_json(meta_path, "adapter metadata").get("fingerprint")
        if stored != fp:
          raise UserError(f"{directory} was trained with a different config (fingerprint {stored} != {fp}); use a "
                          f"new --workdir, or the config it was made with (WORKDIR/config.json)")

  def _record_run(self) -> None:
    """What a compatible run writes first: the base (once) and the config. A config that differs from the
    workdir's config.json replaces it, and the earlier one is kept as config.<n>.json."""
    if jax.process_index() == 0:
      store.makedirs(self.workdir)
    store.sync("workdir made")
    record = os.path.join(self.workdir, "base_source.json")
    if not store.exists(record):
      if self.cfg.base.store:
        store.save_base(os.path.join(self.workdir, "base"), self.base.params, self.base.info, self.base.tokenizer)
      if jax.process_index() == 0:
        store.write_json(record, {"source": self._base_source()})
    if jax.process_index() == 0:
      path = os.path.join(self.workdir, "config.json")
      new = json.loads(json.dumps(self.cfg.to_dict(), default=str))
      if store.exists(path):
        old = store.read_json(path, "run config")
        if old == new:
          return
        n = 1
        while store.exists(os.path.join(self.workdir, f"config.{n}.json")):
          n += 1
        epath.Path(path).rename(os.path.join(self.workdir, f"config.{n}.json"))
        log.info("the config differs from this workdir's last one, kept as config.%d.json", n)
      store.write_json(path, new)

  def _check_batch_sizes(self) -> None:
    cfg = self.cfg
    batch_devices = self.parallel.shape["data"] * self.parallel.shape["fsdp"]
    for key in ("batch_size", "eval_batch_size"):
      if cfg.data[key] % batch_devices or cfg.data[key] % jax.process_count():
        raise UserError(f"data.{key}={cfg.data[key]} must be divisible by the {batch_devices} devices of the mesh's "
                        f"data x fsdp axes and by the {jax.process_count()} processes")

  # ------------------------------------------------------------------ models and training

  def adapter_spec(self, routing: Routing) -> lora.AdapterSpec:
    c = self.cfg.lora
    return lora.AdapterSpec(routing, c.lora_alpha, c.rslora, c.kernel)

  def _batches(self, names: list[str], seed: int):
    return self.data.batches(names, self.cfg.data.batch_size, seed, self.cfg.data.workers)

  def _shardings(self, variables: dict) -> dict:
    """Shardings of a {'params', 'experts', 'router'} dict (adapters follow the base linear they adapt)."""
    out = {}
    for name, tree in variables.items():
      out[name] = self.base_shardings if name == "params" else self.parallel.adapter_shardings(self.base_boxed, tree)
    return out

  def _variables(self, variables: dict) -> dict:
    """Place adapter trees on the mesh (the base is placed when loaded)."""
    shardings = self._shardings({k: v for k, v in variables.items() if k != "params"})
    placed = {k: self.parallel.put(v, shardings[k]) for k, v in variables.items() if k != "params"}
    return {"params": self.base.params, **placed} if "params" in variables else placed

  def _fit(self, label: str, stage_id: str, routing: Routing, trained: str, init: Any, frozen: dict,
           optim: trainer.OptimConfig, names: list[str], seed: int) -> tuple[Any, dict]:
    """Train one collection from `init` (resuming WORKDIR/state/<stage_id> if a run was cut short)."""
    model = self.base.model(self.adapter_spec(routing))
    frozen = self._variables(frozen)
    init = self._variables({trained: init})[trained]
    key = (model.adapter, trained, optim, jax.tree_util.tree_structure(frozen))
    if key not in self._steps:
      optimizer = trainer.make_optimizer(optim)
      trained_sh = self._shardings({trained: init})[trained]
      shardings = trainer.state_shardings(optimizer, trained_sh, self.parallel, init)
      step = trainer.compile_step(model, trained, optimizer, shardings, self._shardings(frozen), self.parallel)
      self._steps[key] = (optimizer, shardings, step)
    optimizer, shardings, step = self._steps[key]
    state = trainer.create_state(init, optimizer, shardings)
    checkpoint = StageCheckpoint(os.path.join(self.workdir, "state", stage_id), self.cfg.checkpoint_every)
    state, summary = trainer.train(label, step, state, frozen, self._batches(names, seed), optim.steps,
                                   self.parallel, checkpoint, writer=self.writer)
    return state.params, {**summary, "_checkpoint": checkpoint}

  def _stage_a_optim(self, steps: int | None = None) -> trainer.OptimConfig:
    c = self.cfg.stage_a
    return trainer.OptimConfig(steps or c.steps, c.learning_rate, c.warmup_steps, c.weight_decay)

  def _new_expert(self, index: int) -> Any:
    rng = jax.random.fold_in(jax.random.key(self.cfg.seed), index)
    return lora.init_experts(self.base.params, self.cfg.lora.r, list(self.cfg.lora.target_modules), rng)

  def _train_expert(self, label: str, stage_id: str, init: Any, names: list[str], seed: int,
                    steps: int | None = None):
    return self._fit(label, stage_id, Routing("single", 0), "experts", init, {"params": self.base.params},
                     self._stage_a_optim(steps), names, seed)

  def _train_router(self, label: str, stage_id: str, experts: Any, task: str, seed: int):
    c = self.cfg.stage_b
    optim = trainer.OptimConfig(c.steps, c.learning_rate, c.warmup_steps, c.weight_decay)
    return self._fit(label, stage_id, Routing("sigmoid_gate", 0), "router", lora.init_router(experts),
                     {"params": self.base.params, "experts": experts}, optim, [task], seed)

  def _expert_shapes(self) -> Any:
    return jax.eval_shape(lambda: self._new_expert(0))

  def _load_or_train(self, directory: str, fp: str, train_fn, with_router: bool) -> tuple[Any, Any]:
    """Reuse a finished adapter checkpoint with the same fingerprint, else train and save it."""
    if store.isdir(directory):
      expected = self._expert_shapes()
      experts, router, meta = store.load_adapter(directory, expected,
                                                 lora.init_router(expected, with_stats=True) if with_router else None)
      if meta.get("fingerprint") != fp:
        raise UserError(f"{directory} was trained with a different config (fingerprint {meta.get('fingerprint')} "
                        f"!= {fp}); use a new --workdir or delete that adapter")
      log.info("reusing %s", directory)
      return experts, router
    if self.eval_only:
      raise UserError(f"adapter not found: {directory}; run drex.train with this --workdir first")
    experts, router, meta = train_fn()
    checkpoints = [v.pop("_checkpoint") for v in meta.values() if isinstance(v, dict) and "_checkpoint" in v]
    store.save_adapter(directory, experts, router, {**meta, "fingerprint": fp})
    for checkpoint in checkpoints:  # the adapter is committed: the stages' resume points are not needed
      checkpoint.remove()
    return experts, router

  def _lora_meta(self, **extra) -> dict:
    c = self.cfg.lora
    return {"r": c.r, "lora_alpha": c.lora_alpha, "rslora": c.rslora, "target_modules": list(c.target_modules),
            "base": self.base.info.provenance.get("command", self.base.path), **extra}

  def _train_fp(self, *parts) -> str:
    c = self.cfg
    return fingerprint(c.seed, c.lora, c.stage_a, c.data.batch_size, self.data.seq_len, *parts)

  def _data_fp(self, names) -> list:
    """The training data's identity for fingerprints: real sources' specs (nothing for embedded tasks)."""
    parts = [sources_lib.fingerprint_part(self.data.sources[n]) for n in names]
    return [p for p in parts if p is not None]

  def _routing_adapter(self, i: int) -> tuple[str, str]:
    """(directory, fingerprint) of task i's expert and routing vectors."""
    task = self.cfg.tasks[i]
    return (os.path.join(self.workdir, "adapters", task),
            self._train_fp(task, i, self.cfg.stage_b, *self._data_fp([task])))

  def _sequential_adapter(self, i: int) -> tuple[str, str]:
    """(directory, fingerprint) of the sequential baseline's LoRA after task i."""
    tasks = list(self.cfg.tasks[:i + 1])
    return (os.path.join(self.workdir, "baselines", "sequential", f"{i}_{tasks[-1]}"),
            self._train_fp("sequential", tasks, *self._data_fp(tasks)))

  def _mtl_steps(self) -> int:
    return self.cfg.mtl.steps or self.cfg.stage_a.steps * len(self.cfg.tasks)

  def _mtl_adapter(self) -> tuple[str, str]:
    tasks = list(self.cfg.tasks)
    return (os.path.join(self.workdir, "baselines", "mtl"),
            self._train_fp("mtl", tasks, self._mtl_steps(), *self._data_fp(tasks)))

  def _planned_adapters(self) -> list[tuple[str, str]]:
    """Every adapter the configured methods reuse or train: (directory, fingerprint)."""
    methods, n = self.cfg.methods, len(self.cfg.tasks)
    plan = [self._routing_adapter(i) for i in range(n)] if {"routing", "sequential"} & set(methods) else []
    if "sequential" in methods:
      plan += [self._sequential_adapter(i) for i in range(n)]
    if "mtl" in methods:
      plan.append(self._mtl_adapter())
    return plan

  # ------------------------------------------------------------------ evaluation

  def evaluate_row(self, routing: Routing | None, variables: dict, columns: list[str] | None = None) -> "Row":
    model = self.base.model(self.adapter_spec(routing or Routing("single", 0)))
    placed = self._variables({"params": None, **variables})
    row = Row()
    for name in columns or self.columns:
      score, subsets = self.evaluator.scores(model, placed, self.data.eval_sets[name])
      row.append(score)
      if subsets:
        row.subsets[name] = subsets
    return row

  def _log_row(self, method: str, index: int, row: list[float]) -> None:
    label = "before any task" if index == 0 else f"after {self.cfg.tasks[index - 1]}"
    log.info("[%s] %s: %s", method, label, ", ".join(f"{c} {v:.3f}" for c, v in zip(self.columns, row)))
    if self.writer is not None:
      for c, v in zip(self.columns, row):
        self.writer.add_scalar(f"{method}/{c}", v, index)

  def _sample_size(self) -> int:
    batch = self.cfg.data.eval_batch_size
    return max(batch, self.cfg.router.null_sample // batch * batch)

  def _sample_batches(self, records, encoder: pipeline.Encoder, prompt_len: int):
    """Unlabeled prompts of a source for routing statistics (router.null_sample of them)."""
    return pipeline.eval_batches(records, encoder, prompt_len, self.cfg.data.eval_batch_size, self._sample_size(),
                                 jax.process_index(), jax.process_count())

  def _moments(self, batches, vectors: dict | None = None) -> dict:
    variables = self._variables({"params": None, "experts": self._new_expert(0)})  # B = 0: the base's inputs
    return prototypes.input_moments(self.base.model(), variables, batches, self.parallel, vectors)

  def expert_stats(self, router: Any, task: str) -> Any:
    """v_stats [1, 2] per adapted linear: the score statistics of a task's routing vector on its data."""
    batches = self._sample_batches(self.data.train[task], self.data.encoders[task], self.data.train_prompt_len[task])
    moments = self._moments(batches, prototypes.by_path(router, "v"))
    return prototypes.as_tree(prototypes.stats_array(moments), "v_stats")

  def null_prototypes(self) -> Any:
    """The base as a zero-output expert: per adapted linear, the mean standardized input over
    unlabeled prompts of each foundation-suite member, null_v [K, d_in] (K = suite size), and each
    prototype's score statistics on its member's prompts, null_stats [K, 2]."""
    directory = os.path.join(self.workdir, "null_router")
    k = len(self.cfg.foundation)
    shapes = jax.eval_shape(lambda: lora.init_router(lora.stack([self._new_expert(0)] * k), with_stats=True))
    expected = _rename_leaves(_rename_leaves(shapes, "v", "null_v"), "v_stats", "null_stats")
    if store.isdir(directory):
      return store.load_tree(directory, expected, "null-expert prototypes")
    samples = [self._foundation_sample(f) for f in self.cfg.foundation]
    means = [{key: m["mean"] for key, m in self._moments(self._sample_batches(*s)).items()} for s in samples]
    protos = {key: np.stack([m[key] for m in means]) for key in means[0]}
    stats = [prototypes.stats_array(self._moments(self._sample_batches(*s), {key: p[i:i + 1] for key, p in protos.items()}))
             for i, s in enumerate(samples)]
    tree = lora.merge_trees(prototypes.as_tree(protos, "null_v"),
                            prototypes.as_tree({key: np.concatenate([s[key] for s in stats]) for key in protos},
                                               "null_stats"))
    store.save_tree(directory, tree)
    return tree

  def _foundation_sample(self, name: str) -> tuple:
    """(records, encoder, prompt length) of a foundation member's unlabeled prompts: its train split, or its
    validation split when it has none (MMBench: the prototypes then see the prompts, not the answers, of the
    questions it is scored on)."""
    source, encoder = self.data.sources[name], self.data.encoders[name]
    try:
      records = source.records("train")
    except UserError:
      log.warning("%s has no train split: its null-expert prototype is made from its validation prompts", name)
      records = source.records("validation")
    sample = record_lib.Subset(records, range(min(len(records), self._sample_size())))
    longest = encoder.scan(sample).prompt_max
    return sample, encoder, max(self.data.eval_sets[name].prompt_len, task_data.round_up(longest, 8))

  # ------------------------------------------------------------------ methods

  def run_routing(self, results: dict, base_row: list[float]) -> None:
    cfg = self.cfg
    experts, routers, rows = [], [], [base_row]
    oracle = {}
    null = self.null_prototypes() if config_lib.inference_routing(cfg, 1).null_expert else None
    for i, task in enumerate(cfg.tasks):
      directory, fp = self._routing_adapter(i)

      def train(i=i, task=task):
        with self._timed("routing/stage_a"):
          ex, sa = self._train_expert(f"[routing] {task} stage A", f"{i}_{task}_A", self._new_expert(i), [task],
                                      cfg.seed + i)
        with self._timed("routing/stage_b"):
          rt, sb = self._train_router(f"[routing] {task} stage B", f"{i}_{task}_B", ex, task, cfg.seed + i)
          rt = lora.merge_trees(rt, self.expert_stats(rt, task))
        return ex, rt, self._lora_meta(task=task, index=i, stage_a=sa, stage_b=sb)

      ex, rt = self._load_or_train(directory, fp, train, with_router=True)
      experts.append(ex)
      routers.append(rt)
      with self._timed("routing/eval"):
        oracle[task] = self.evaluate_row(Routing("single", 0), {"experts": ex}, [task])[0]
        routing = config_lib.inference_routing(cfg, len(experts))
        router_tree = lora.stack(routers)
        if null is not None:
          router_tree = lora.merge_trees(router_tree, null)
        variables = {"experts": lora.stack(experts), "router": router_tree}
        rows.append(self.evaluate_row(routing, variables))
      self._log_row("routing", i + 1, rows[-1])
      log.info("[routing] oracle %s: %.3f", task, oracle[task])
    results["methods"]["routing"] = self._method_entry(rows)
    results["oracle"] = oracle
    with self._timed("routing/analysis"):
      results.setdefault("routing_profiles", {})["routing"] = self._routing_profiles(routing, variables)

  def run_sequential(self, results: dict, base_row: list[float]) -> None:
    cfg = self.cfg
    rows = [base_row]
    current = self._new_expert(0)
    for i, task in enumerate(cfg.tasks):
      directory, fp = self._sequential_adapter(i)
      reuse, reuse_fp = self._routing_adapter(i)

      def train(i=i, task=task, start=current):
        with self._timed("sequential/train"):
          ex, sa = self._train_expert(f"[sequential] {task}", f"sequential_{i}_{task}", start, [task], cfg.seed + i)
        return ex, None, self._lora_meta(task=task, index=i, stage_a=sa)

      if i == 0 and store.isdir(reuse):  # identical to the routing method's first expert (same init/data/steps)
        current, _ = self._load_or_train(reuse, reuse_fp, None, with_router=True)
      else:
        current, _ = self._load_or_train(directory, fp, train, with_router=False)
      with self._timed("sequential/eval"):
        rows.append(self.evaluate_row(Routing("single", 0), {"experts": current}))
      self._log_row("sequential", i + 1, rows[-1])
    results["methods"]["sequential"] = self._method_entry(rows)

  def run_mtl(self, results: dict, base_row: list[float]) -> None:
    cfg = self.cfg
    steps = self._mtl_steps()
    directory, fp = self._mtl_adapter()

    def train():
      with self._timed("mtl/train"):
        ex, sa = self._train_expert("[mtl] all tasks", "mtl", self._new_expert(0), list(cfg.tasks), cfg.seed, steps)
      return ex, None, self._lora_meta(tasks=list(cfg.tasks), stage_a=sa)

    ex, _ = self._load_or_train(directory, fp, train, with_router=False)
    with self._timed("mtl/eval"):
      row = self.evaluate_row(Routing("single", 0), {"experts": ex})
    self._log_row("mtl", len(cfg.tasks), row)
    results["methods"]["mtl"] = self._method_entry([base_row, row], rows=["base", "all tasks"], sequential=False)

  def _method_entry(self, matrix: list[list[float]], rows: list[str] | None = None, sequential: bool = True) -> dict:
    labels = rows or ["base"] + [f"after {t}" for t in self.cfg.tasks]
    entry = {"columns": list(self.columns), "rows": labels, "matrix": [list(row) for row in matrix]}
    entry.update(cl_metrics.summarize(matrix, len(self.cfg.tasks), sequential))
    final_subsets = getattr(matrix[-1], "subsets", None)
    if final_subsets:  # e.g. ChartQA's human and augmented parts, reported separately (their mean is the score)
      entry["final_subset_scores"] = final_subsets
    return entry

  def _routing_profiles(self, routing: Routing, variables: dict) -> dict:
    model = self.base.model(self.adapter_spec(routing))
    profiles = {}
    for name in self.columns:
      eval_set = self.data.eval_sets[name]
      batch = next(pipeline.eval_batches(eval_set.source, eval_set.encoder, eval_set.prompt_len,
                                         self.cfg.analysis.routing_batch, self.cfg.analysis.routing_batch,
                                         jax.process_index(), jax.process_count()))
      p = evaluation.routing_profile(model, self._variables({"params": None, **variables}), batch, self.parallel)
      if routing.null_expert:
        p = np.concatenate([p, 1.0 - p.sum(-1, keepdims=True)], -1)
      profiles[name] = p.round(4).tolist()
    experts = list(self.cfg.tasks) + (["base (null)"] if routing.null_expert else [])
    return {"experts": experts, "profiles": profiles}

  # ------------------------------------------------------------------ the run

  def run(self, results_name: str = "results.json") -> dict:
    """Train what is missing, evaluate everything, write results_name, report.md and plots."""
    begin = time.time()
    cfg = self.cfg
    results: dict[str, Any] = {"tasks": list(cfg.tasks), "foundation": list(cfg.foundation), "methods": {},
                               "oracle": {}, "config": cfg.to_dict()}
    with self._timed("base/eval"):
      base_row = self.evaluate_row(None, {})
    self._log_row("base", 0, base_row)
    for method in cfg.methods:
      getattr(self, f"run_{method}")(results, base_row)
    left_out = dict(self.data.left_out)  # records whose images could not be read (or over data.seq_len): not used
    for name, eval_set in self.data.eval_sets.items():
      if eval_set.failed_decoding:
        key = f"{name}/{cfg.data.eval_split}"
        left_out[key] = left_out.get(key, 0) + eval_set.failed_decoding
    if left_out:
      results["left_out"] = left_out
    self.timings["total"] = time.time() - begin + self.timings.get("load_base", 0) + self.timings.get("data", 0)
    results["timings_s"] = {k: round(v, 1) for k, v in self.timings.items()}
    if jax.process_index() == 0:
      if not self.eval_only:
        store.remove_tree(os.path.join(self.workdir, "state"))  # every stage is committed
      store.write_json(os.path.join(self.workdir, results_name), results)
      if results_name == "results.json":
        report.write_all(self.workdir, results)
      if self.writer is not None:
        self.writer.close()
    return results


def _rename_leaves(tree: dict, old: str, new: str) -> dict:
  flat = flax.traverse_util.flatten_dict(tree)
  return flax.traverse_util.unflatten_dict({(p[:-1] + (new,) if p[-1] == old else p): v for p, v in flat.items()})

