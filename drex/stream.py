"""The task-sequential driver behind `python -m drex.train`: free functions composed by one short loop.

For each task of the stream: train its expert (a new LoRA on that task's data only, base frozen), train its
router (its routing vectors, expert frozen), commit both, and evaluate every task and the foundation suite
(one accuracy-matrix row). Baselines: `sequential` (one LoRA fine-tuned task after task) and `mtl` (one LoRA
on the union of all tasks). Committed adapters are reused on a re-run, so re-running a finished workdir only
re-evaluates (with the router of the current config); the workdir's layout and reuse rules: drex.workdir.

  results = run_stream(cfg, workdir)                                                    # drex.train
  results = run_stream(cfg, workdir, eval_only=True, results_name="evaluation.json")   # drex.evaluate
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import zlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tensorboardX import SummaryWriter

from drex import base as base_lib
from drex import cl_metrics, config as config_lib, evaluation, report, routing_statistics, task_data
from drex import workdir as workdir_lib
from drex.adapters import lora, routers
from drex.checkpoints import store
from drex.checkpoints.stage import StageCheckpoint
from drex.data import pipeline, sources as sources_lib
from drex.errors import UserError
from drex.models.vlm import VLM
from drex.parallel import Parallel
from drex.training import trainer

log = logging.getLogger(__name__)


class Row(list):
  """An accuracy-matrix row; `subsets` holds, for columns scored in parts, each part's score."""

  def __init__(self, *args):
    super().__init__(*args)
    self.subsets: dict[str, dict[str, float | None]] = {}


@dataclasses.dataclass
class Run:
  """What the functions of one stream run share: config, workdir, mesh, frozen base, data and evaluator."""

  cfg: ml_collections.ConfigDict
  workdir: str
  eval_only: bool  # never train: every adapter must be in the workdir already
  parallel: Parallel
  base: base_lib.Base
  base_boxed: Any  # the base params' shapes with their logical axes
  data: task_data.TaskData
  evaluator: evaluation.Evaluator
  writer: Any = None  # TensorBoard (process 0 of a training run)
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  compiled: dict[Any, Any] = dataclasses.field(default_factory=dict)  # train steps, by model/collection/optimizer

  @contextlib.contextmanager
  def timed(self, key: str):
    begin = time.time()
    try:
      yield
    finally:
      self.timings[key] = self.timings.get(key, 0.0) + time.time() - begin

  def model(self, router: routers.Router = routers.Single(0)) -> VLM:
    """The base VLM with linears that route its experts with `router`."""
    c = self.cfg.lora
    return self.base.model(lora.AdapterSpec(router, c.lora_alpha, c.rslora, c.kernel))

  def shardings(self, variables: dict) -> dict:
    """Shardings of a {'params', 'experts', 'router'} dict (adapters follow the base linear they adapt)."""
    return {name: (self.parallel.tree_shardings(self.base_boxed) if name == "params"
                   else lora.adapter_shardings(self.parallel, self.base_boxed, tree))
            for name, tree in variables.items()}

  def place(self, variables: dict) -> dict:
    """Adapter trees put on the mesh; 'params' (any value) stands for the base, placed when it was loaded."""
    adapters = {k: v for k, v in variables.items() if k != "params"}
    shardings = self.shardings(adapters)
    placed = {k: self.parallel.put(v, shardings[k]) for k, v in adapters.items()}
    return {"params": self.base.params, **placed} if "params" in variables else placed

  def new_expert(self, name: str) -> Any:
    """A fresh LoRA expert, its init seeded by `name` (a task's: the same whatever its place in the stream)."""
    rng = jax.random.fold_in(jax.random.key(self.cfg.seed), name_seed(name))
    return lora.init_experts(self.base.params, self.cfg.lora.r, list(self.cfg.lora.target_modules), rng)

  def expert_shapes(self) -> Any:
    return jax.eval_shape(lambda: self.new_expert("shapes"))

  def data_seed(self, name: str) -> int:
    """The data order of a task's training: from its name, not its place in the stream."""
    return self.cfg.seed + name_seed(name)


def name_seed(name: str) -> int:
  """A stable 31-bit number from a name (what seeds a task's expert and data order)."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def open_run(cfg: ml_collections.ConfigDict, workdir: str, eval_only: bool = False) -> Run:
  """Check the config and workdir, load the base and the data; a training run then records itself. Nothing
  is written before every check has passed."""
  config_lib.validate(config_lib.ordered(cfg))
  if not eval_only:
    store.check_writable(workdir)
  tfds.disable_progress_bar()
  parallel = Parallel.create(cfg.mesh, cfg.sharding_rules)
  log.info("mesh %s over %d devices in %d processes", parallel.shape, jax.device_count(), jax.process_count())
  timings: dict[str, float] = {}
  begin = time.time()
  base = workdir_lib.load_base(cfg, workdir, eval_only, parallel)
  log.info("base %s: %.2fM params, template %s", base.path, lora.count_params(base.params) / 1e6, base.info.template)
  base_boxed = base_lib.boxed_shapes(base.model(), base.info.image)
  timings["load_base"] = time.time() - begin
  begin = time.time()
  data = task_data.prepare(cfg, base)
  timings["data"] = time.time() - begin
  batch_devices = parallel.shape["data"] * parallel.shape["fsdp"]
  for key in ("batch_size", "eval_batch_size"):
    if cfg.data[key] % batch_devices or cfg.data[key] % jax.process_count():
      raise UserError(f"data.{key}={cfg.data[key]} must be divisible by the {batch_devices} devices of the mesh's "
                      f"data x fsdp axes and by the {jax.process_count()} processes")
  run = Run(cfg, workdir, eval_only, parallel, base, base_boxed, data,
            evaluation.Evaluator(cfg.data.eval_batch_size, parallel), timings=timings)
  if not eval_only:
    workdir_lib.check_fits(planned_slots(run))
    workdir_lib.record_run(cfg, workdir, base)
    if jax.process_index() == 0:
      run.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  return run


# ------------------------------------------------------------------------------------------ where adapters live


def _fingerprint(run: Run, names: list[str], *parts) -> str:
  """Of what an adapter trained on the data of `names` depends on (never the stream's other tasks)."""
  c = run.cfg
  return workdir_lib.fingerprint(c.seed, c.lora, c.expert_training, c.data.batch_size,
                                 [run.data.seq_len[n] for n in names], *parts)


def _data_identity(run: Run, names) -> list:
  """The training data's identity: real sources' (nothing for embedded tasks, as in earlier drex versions)."""
  parts = [sources_lib.fingerprint_part(run.data.sources[n]) for n in names]
  return [p for p in parts if p is not None]


def routing_slot(run: Run, i: int) -> workdir_lib.Slot:
  """Task i's expert and routing vectors."""
  task = run.cfg.tasks[i]
  return workdir_lib.Slot(os.path.join(run.workdir, "adapters", task),
                          _fingerprint(run, [task], task, run.cfg.router_training, *_data_identity(run, [task])))


def sequential_slot(run: Run, i: int) -> workdir_lib.Slot:
  """The sequential baseline's LoRA after task i."""
  tasks = list(run.cfg.tasks[:i + 1])
  return workdir_lib.Slot(os.path.join(run.workdir, "baselines", "sequential", f"{i}_{tasks[-1]}"),
                          _fingerprint(run, tasks, "sequential", tasks, *_data_identity(run, tasks)))


def mtl_steps(cfg: ml_collections.ConfigDict) -> int:
  return cfg.mtl.steps or cfg.expert_training.steps * len(cfg.tasks)


def mtl_slot(run: Run) -> workdir_lib.Slot:
  tasks = list(run.cfg.tasks)
  return workdir_lib.Slot(os.path.join(run.workdir, "baselines", "mtl"),
                          _fingerprint(run, tasks, "mtl", tasks, mtl_steps(run.cfg), *_data_identity(run, tasks)))


def planned_slots(run: Run) -> list[workdir_lib.Slot]:
  """Every adapter the configured methods reuse or train."""
  methods, n = run.cfg.methods, len(run.cfg.tasks)
  slots = [routing_slot(run, i) for i in range(n)] if {"routing", "sequential"} & set(methods) else []
  if "sequential" in methods:
    slots += [sequential_slot(run, i) for i in range(n)]
  if "mtl" in methods:
    slots.append(mtl_slot(run))
  return slots


def _lora_meta(run: Run, **extra) -> dict:
  c = run.cfg.lora
  return {"r": c.r, "lora_alpha": c.lora_alpha, "rslora": c.rslora, "target_modules": list(c.target_modules),
          "base": run.base.info.provenance.get("command", run.base.path), **extra}


# ------------------------------------------------------------------------------------------ training


def train_collection(run: Run, label: str, stage: str, router: routers.Router, trained: str, init: Any, frozen: dict,
                     optim: trainer.OptimConfig, names: list[str], seed: int) -> tuple[Any, dict, StageCheckpoint]:
  """Train one variable collection from `init` on the data of `names` (the rest frozen), resuming
  state/<stage> if a run was cut short. Returns (trained values, summary, the stage's checkpoint)."""
  model = run.model(router)
  frozen = run.place(frozen)
  init = run.place({trained: init})[trained]
  key = (model.linear, trained, optim, jax.tree_util.tree_structure(frozen))
  if key not in run.compiled:
    optimizer = trainer.make_optimizer(optim)
    shardings = trainer.state_shardings(optimizer, run.shardings({trained: init})[trained], run.parallel, init)
    step = trainer.compile_step(model, trained, optimizer, shardings, run.shardings(frozen), run.parallel)
    run.compiled[key] = (optimizer, shardings, step)
  optimizer, shardings, step = run.compiled[key]
  state = trainer.create_state(init, optimizer, shardings)
  checkpoint = StageCheckpoint(os.path.join(run.workdir, "state", stage), run.cfg.checkpoint_every)
  batches = run.data.batches(names, run.cfg.data.batch_size, seed, run.cfg.data.workers)
  state, summary = trainer.train(label, step, state, frozen, batches, optim.steps, run.parallel, checkpoint,
                                 writer=run.writer)
  return state.params, summary, checkpoint


def _optim(c: ml_collections.ConfigDict, steps: int | None = None) -> trainer.OptimConfig:
  return trainer.OptimConfig(steps or c.steps, c.learning_rate, c.warmup_steps, c.weight_decay)


def train_expert(run: Run, label: str, stage: str, init: Any, names: list[str], seed: int,
                 steps: int | None = None) -> tuple[Any, dict, StageCheckpoint]:
  """A LoRA expert (from `init`) on the data of `names`, the base frozen."""
  return train_collection(run, label, stage, routers.Single(0), "experts", init, {"params": None},
                          _optim(run.cfg.expert_training, steps), names, seed)


def train_router(run: Run, label: str, stage: str, experts: Any, task: str, seed: int) -> tuple[Any, dict, Any]:
  """The routing vectors of a frozen expert on its task's data (PHATGOOSE: sigmoid gates from zero)."""
  return train_collection(run, label, stage, routers.SigmoidGate(0), "router", lora.init_router(experts),
                          {"params": None, "experts": experts}, _optim(run.cfg.router_training), [task], seed)


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_row(run: Run, router: routers.Router, variables: dict, columns: list[str] | None = None) -> Row:
  """Scores of the model routed by `router` over `variables` ({'experts', 'router'} or {}) on each column."""
  model = run.model(router)
  placed = run.place({"params": None, **variables})
  row = Row()
  for name in columns or run.data.columns:
    score, subsets = run.evaluator.scores(model, placed, run.data.eval_sets[name])
    row.append(score)
    if subsets:
      row.subsets[name] = subsets
  return row


def _log_row(run: Run, method: str, index: int, row: list[float]) -> None:
  label = "before any task" if index == 0 else f"after {run.cfg.tasks[index - 1]}"
  log.info("[%s] %s: %s", method, label, ", ".join(f"{c} {v:.3f}" for c, v in zip(run.data.columns, row)))
  if run.writer is not None:
    for c, v in zip(run.data.columns, row):
      run.writer.add_scalar(f"{method}/{c}", v, index)


def _method_entry(run: Run, matrix: list[list[float]], rows: list[str] | None = None, sequential: bool = True) -> dict:
  labels = rows or ["base"] + [f"after {t}" for t in run.cfg.tasks]
  entry = {"columns": list(run.data.columns), "rows": labels, "matrix": [list(row) for row in matrix]}
  entry.update(cl_metrics.summarize(matrix, len(run.cfg.tasks), sequential))
  final_subsets = getattr(matrix[-1], "subsets", None)
  if final_subsets:  # e.g. ChartQA's human and augmented parts, reported separately (their mean is the score)
    entry["final_subset_scores"] = final_subsets
  return entry


def routing_profiles(run: Run, router: routers.Router, variables: dict) -> dict:
  """Mean routing weight per layer and expert on a batch of each column's evaluation data."""
  model = run.model(router)
  profiles = {}
  for name in run.data.columns:
    eval_set = run.data.eval_sets[name]
    batch = next(pipeline.eval_batches(eval_set.source, eval_set.encoder, eval_set.prompt_len,
                                       run.cfg.analysis.routing_batch, run.cfg.analysis.routing_batch,
                                       jax.process_index(), jax.process_count()))
    p = evaluation.routing_profile(model, run.place({"params": None, **variables}), batch, run.parallel)
    if router.includes_base:
      p = np.concatenate([p, 1.0 - p.sum(-1, keepdims=True)], -1)
    profiles[name] = p.round(4).tolist()
  experts = list(run.cfg.tasks) + (["base (null)"] if router.includes_base else [])
  return {"experts": experts, "profiles": profiles}


# ------------------------------------------------------------------------------------------ the methods


def learn_routing(run: Run, base_row: Row) -> tuple[dict, dict]:
  """The method: per task an expert and its routing vectors; after each task, all of them routed by the
  config's router. Returns (its results entry, {'oracle', 'routing_profiles'})."""
  cfg = run.cfg
  expected = run.expert_shapes()
  experts, vectors, rows, oracle, seconds = [], [], [base_row], {}, []
  for i, task in enumerate(cfg.tasks):
    begin = time.time()

    def train(i=i, task=task):
      with run.timed("routing/expert"):
        ex, sa, ca = train_expert(run, f"[routing] {task} expert", f"{task}_expert", run.new_expert(task), [task],
                                  run.data_seed(task))
      with run.timed("routing/router"):
        rt, sb, cb = train_router(run, f"[routing] {task} router", f"{task}_router", ex, task, run.data_seed(task))
        rt = lora.merge_trees(rt, routing_statistics.vector_statistics(run, rt, task))
      return ex, rt, _lora_meta(run, task=task, expert_training=sa, router_training=sb), [ca, cb]

    ex, rt = workdir_lib.load_or_train(routing_slot(run, i), expected, lora.init_router(expected, ("v", "v_stats")),
                                       run.eval_only, train)
    experts.append(ex)
    vectors.append(rt)
    with run.timed("routing/eval"):
      oracle[task] = evaluate_row(run, routers.Single(0), {"experts": ex}, [task])[0]
      router = routers.from_config(cfg.router, len(experts))
      leaves = routing_statistics.data_leaves(run, router, cfg.tasks[:i + 1])
      router_tree = lora.merge_trees(lora.stack(vectors), leaves)
      variables = {"experts": lora.stack(experts), "router": router_tree}
      rows.append(evaluate_row(run, router, variables))
    _log_row(run, "routing", i + 1, rows[-1])
    log.info("[routing] oracle %s: %.3f", task, oracle[task])
    seconds.append(round(time.time() - begin, 1))
  with run.timed("routing/analysis"):
    profiles = routing_profiles(run, router, variables)
  entry = _method_entry(run, rows)
  entry["seconds_per_task"] = seconds  # its expert, its routing vectors and the evaluation after it
  return entry, {"oracle": oracle, "routing_profiles": {"routing": profiles}}


def learn_sequential(run: Run, base_row: Row) -> tuple[dict, dict]:
  """One LoRA fine-tuned task after task (its first task's expert is the routing method's, when trained)."""
  cfg = run.cfg
  expected = run.expert_shapes()
  rows = [base_row]
  current = run.new_expert(cfg.tasks[0])  # the routing method's first expert starts here too
  for i, task in enumerate(cfg.tasks):

    def train(i=i, task=task, start=current):
      with run.timed("sequential/train"):
        ex, sa, ca = train_expert(run, f"[sequential] {task}", f"sequential_{i}_{task}", start, [task],
                                  run.data_seed(task))
      return ex, None, _lora_meta(run, task=task, index=i, expert_training=sa), [ca]

    reuse = routing_slot(run, i)
    if i == 0 and store.isdir(reuse.directory):  # the routing method's first expert: same init, data and steps
      current, _ = workdir_lib.load_or_train(reuse, expected, lora.init_router(expected, ("v", "v_stats")),
                                             run.eval_only, train)
    else:
      current, _ = workdir_lib.load_or_train(sequential_slot(run, i), expected, None, run.eval_only, train)
    with run.timed("sequential/eval"):
      rows.append(evaluate_row(run, routers.Single(0), {"experts": current}))
    _log_row(run, "sequential", i + 1, rows[-1])
  return _method_entry(run, rows), {}


def learn_mtl(run: Run, base_row: Row) -> tuple[dict, dict]:
  """One LoRA on the union of all tasks (needs all data at once)."""
  cfg = run.cfg

  def train():
    with run.timed("mtl/train"):
      ex, sa, ca = train_expert(run, "[mtl] all tasks", "mtl", run.new_expert("mtl"), list(cfg.tasks),
                                run.data_seed("mtl"), mtl_steps(cfg))
    return ex, None, _lora_meta(run, tasks=list(cfg.tasks), expert_training=sa), [ca]

  ex, _ = workdir_lib.load_or_train(mtl_slot(run), run.expert_shapes(), None, run.eval_only, train)
  with run.timed("mtl/eval"):
    row = evaluate_row(run, routers.Single(0), {"experts": ex})
  _log_row(run, "mtl", len(cfg.tasks), row)
  return _method_entry(run, [base_row, row], rows=["base", "all tasks"], sequential=False), {}


METHODS: dict[str, Callable[[Run, Row], tuple[dict, dict]]] = {
    "routing": learn_routing, "sequential": learn_sequential, "mtl": learn_mtl}


# ------------------------------------------------------------------------------------------ the run


def run_stream(cfg: ml_collections.ConfigDict, workdir: str, eval_only: bool = False,
               results_name: str = "results.json") -> dict:
  """Train what is missing, evaluate everything, write results_name (and, for results.json, report.md and
  plots); returns the results."""
  run = open_run(cfg, workdir, eval_only)
  begin = time.time()
  results: dict[str, Any] = {"tasks": list(cfg.tasks), "foundation": list(cfg.foundation), "methods": {},
                             "oracle": {}, "config": cfg.to_dict()}
  with run.timed("base/eval"):
    base_row = evaluate_row(run, routers.Single(0), {})
  _log_row(run, "base", 0, base_row)
  for method in cfg.methods:
    results["methods"][method], extra = METHODS[method](run, base_row)
    results.update(extra)
  left_out = dict(run.data.left_out)  # records whose images could not be read (or over data.seq_len): not used
  for name, eval_set in run.data.eval_sets.items():
    if eval_set.failed_decoding:
      key = f"{name}/{cfg.data.eval_split}"
      left_out[key] = left_out.get(key, 0) + eval_set.failed_decoding
  if left_out:
    results["left_out"] = left_out
  run.timings["total"] = time.time() - begin + run.timings.get("load_base", 0) + run.timings.get("data", 0)
  results["timings_s"] = {k: round(v, 1) for k, v in run.timings.items()}
  if jax.process_index() == 0:
    if not eval_only:
      store.remove_tree(os.path.join(workdir, "state"))  # every stage is committed
    store.write_json(os.path.join(workdir, results_name), results)
    if results_name == "results.json":
      report.write_all(workdir, results)
    if run.writer is not None:
      run.writer.close()
  return results
