"""Defaults and validation of a continual-learning stream config (`configs/*.py` build on these).

Every field carries a one-line comment. Sequences are tuples, so they can be overridden on the command
line: `--config.tasks="('shape_kind', 'chart_min')"`. `shrink(c)` turns any stream config into a seconds-to-minutes
CPU run (the `:smoke` mode of the config files, used by CI).
"""

from __future__ import annotations

import contextlib
import os

import ml_collections
import numpy as np

from drex import parallel
from drex.adapters import lora, routers
from drex.data import fixtures, sources, tasks
from drex.errors import UserError

METHODS = ("routing", "sequential", "mtl")
# The main job's stream (configs/task3.py): one generic question ("what is the answer ?") whose answer
# format depends on the input: a shape's kind, a number (no image), the shortest bar's side. One LoRA
# trained on them in turn re-learns the question's format and forgets the earlier tasks (sequential);
# the inputs differ token by token, so routing keeps each task. Tasks that share both images and
# question form (shape_color/shape_kind, chart_max/chart_min) are not separable token by token:
# configs/related.py.
MAIN_STREAM = ("generic_kind", "generic_add", "generic_min")


def stream_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # PRNG seed: expert init and data order
  c.tasks = MAIN_STREAM  # the specialized tasks, learned in this order
  c.task_order_seed = -1  # >= 0: learn the same tasks in another order (a fixed permutation per seed)
  c.foundation = tuple(tasks.FOUNDATION)  # suite that measures what the base keeps
  c.sources = ml_collections.ConfigDict()  # name -> source spec (drex.data.sources); names without one are embedded
  c.methods = METHODS  # 'routing' (the method, + oracle), 'sequential' (one LoRA, task after task), 'mtl'

  c.base = ml_collections.ConfigDict()
  c.base.checkpoint = ""  # base checkpoint directory ('' = the tiny base shipped in drex/assets)
  c.base.store = True  # keep a copy of the base in WORKDIR/base (False: record its path only)

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ""  # TFDS data directory ('' = ~/.cache/drex/tfds)
  c.data.batch_size = 32  # training examples per step (global, all hosts)
  c.data.eval_size = 256  # evaluation examples per task, the split's first ones (circular MC: rotations; 0 = all)
  c.data.eval_split = "test"  # split the accuracies are measured on ('validation' when choosing settings)
  c.data.eval_batch_size = 256  # prompts per generation batch
  c.data.max_new_tokens = 4  # generated tokens per answer
  c.data.seq_len = 0  # token length of training sequences (0 = longest example of the stream)
  c.data.max_tiles = 0  # image tiles per example incl. thumbnail (0 = what the base checkpoint says)
  c.data.workers = 0  # grain worker processes decoding and tiling training images (0 = in the main process)
  c.data.fixtures = ""  # smoke runs: write drex's own small copies of every real-data layout here first

  c.lora = ml_collections.ConfigDict()
  c.lora.r = 8  # LoRA rank
  c.lora.lora_alpha = 16.0  # scale = lora_alpha / r (or / sqrt(r) with rslora)
  c.lora.rslora = False  # rank-stabilized scaling
  c.lora.target_modules = lora.ALL_TARGETS  # LLM linears that get experts
  c.lora.kernel = "xla"  # adapter mixture: 'xla', 'pallas' or 'auto' (per shape, from benchmarks/results)

  c.expert_training = ml_collections.ConfigDict()  # training one task's LoRA expert (also sequential / mtl)
  c.expert_training.steps = 300  # optimizer steps per task
  c.expert_training.learning_rate = 1e-3  # peak AdamW learning rate
  c.expert_training.warmup_steps = 30  # linear warmup steps
  c.expert_training.weight_decay = 0.0  # AdamW weight decay

  c.router_training = ml_collections.ConfigDict()  # training the routing vectors of the frozen expert
  c.router_training.steps = 100  # PHATGOOSE: 100 steps
  c.router_training.learning_rate = 5e-3  # PHATGOOSE: 5e-3 (mttl uses 1e-3)
  c.router_training.warmup_steps = 6  # ~6% warmup
  c.router_training.weight_decay = 0.0  # no decay on routing vectors

  # The router of the 'routing' method at inference: `kind` (a drex.adapters.routers kind: 'identify' one expert
  # or the base per sequence, from each task's own prompt statistics, chosen on the validation split
  # (routing_levels_cpu.md); 'topk' PHATGOOSE over the trained routing vectors; 'arrow' training-free; 'dense'
  # uniform merge) and every registered router's options, each with its comment in its class's OPTIONS.
  c.router = routers.config_defaults("identify")  # kind + the registered routers' options

  c.mtl = ml_collections.ConfigDict()
  c.mtl.steps = 0  # steps on the union of all tasks (0 = tasks x expert_training.steps)

  c.analysis = ml_collections.ConfigDict()
  c.analysis.routing_batch = 64  # prompts per task for the routing-weight plots

  c.checkpoint_every = 50  # steps between resume points of the stage in progress (also saved on SIGTERM)
  c.mesh = (-1, 1, 1)  # device mesh sizes over ('data', 'fsdp', 'tensor'); -1 = what the devices leave
  c.sharding_rules = parallel.DEFAULT_RULES  # logical axis name -> mesh axes, for params and activations
  c.distributed = ml_collections.ConfigDict()  # multi-host start-up (jax.distributed.initialize)
  c.distributed.mode = "auto"  # 'auto' (when the environment is multi-host), 'on', 'off'
  c.distributed.coordinator = ""  # 'host:port' of process 0 ('' = from the environment / TPU metadata)
  c.distributed.num_processes = 0  # with a coordinator: the number of processes
  c.distributed.process_id = -1  # with a coordinator: this process's index
  return c


def internvl2_stream(size: str, eval_batch_size: int, fsdp: bool) -> ml_collections.ConfigDict:
  """The stream on a real InternVL2 checkpoint (`--config.base.checkpoint=DIR` is required).

  LoRA and stage-A settings follow InternVL's own LoRA fine-tuning recipe
  (internvl_chat/shell/internvl2.0/2nd_finetune/*_lora.sh: rank 16, alpha = 2 r, lr 4e-5, weight decay
  0.01, 3% warmup, cosine, total batch 16); router training and inference routing follow PHATGOOSE (100 steps,
  lr 5e-3, gates from zero; k=2, temperature 1: the tiny base's temperature 2 was chosen on its own
  validation split and is not measured on InternVL2). Compute and base weights are bfloat16 (the
  checkpoint's dtype); experts and optimizer state are float32.
  """
  c = stream_config()
  c.base.checkpoint = f"REQUIRED: pass --config.base.checkpoint=<directory of OpenGVLab/InternVL2-{size}>"  # no default
  c.base.store = False  # record the checkpoint's path instead of copying GBs into WORKDIR/base
  c.lora.r = 16  # InternVL recipe: use_llm_lora 16
  c.lora.lora_alpha = 32.0  # alpha = 2 r (InternVL's wrap_llm_lora)
  c.lora.kernel = "auto"  # adapter mixture per shape from benchmarks/results (XLA where Pallas does not win)
  c.expert_training.learning_rate = 4e-5  # InternVL recipe
  c.expert_training.warmup_steps = 9  # 3% of 300 steps
  c.expert_training.weight_decay = 0.01  # InternVL recipe
  c.data.batch_size = 16  # total batch 16 in the recipe
  c.data.eval_batch_size = eval_batch_size  # prompts per generation batch
  c.data.max_tiles = 7  # 6 tiles + thumbnail, as InternVL's fine-tuning scripts (max_dynamic_patch 6)
  c.router.kind = "topk"  # PHATGOOSE over the trained routing vectors, as the paper
  c.router.temperature = 1.0  # PHATGOOSE
  c.router.level = "token"  # PHATGOOSE, as the paper (the embedded default's identification is not measured here)
  if fsdp:
    c.mesh = (1, -1, 1)  # FSDP over every device: the bf16 base is sharded, not replicated
  return c


def internvl2_cl_stream(size: str, eval_batch_size: int, fsdp: bool, mode: str | None) -> ml_collections.ConfigDict:
  """The paper's setting on a real InternVL2 checkpoint and real data from local copies: the foundation suite
  ChartQA, DocVQA, MMBench (InternVL-2's eval prompts, tiles and answer lengths, official metrics) and a
  CoIN-like stream of ScienceQA, TextVQA and one of the user's own tasks (InternVL meta JSON / JSONL).

  Mode 'smoke' runs the same code on the shipped tiny base and drex's own fixture files in every layout
  (drex.data.fixtures: the five benchmarks, an InternVL JSONL task and a LLaVA JSON task), in minutes on a CPU.
  """
  c = internvl2_stream(size, eval_batch_size, fsdp)
  c.foundation = ("chartqa", "docvqa", "mmbench")  # the paper's foundation skills
  c.tasks = ("scienceqa", "textvqa", "user_task")  # learned in this order
  c.sources = ml_collections.ConfigDict({  # where each name's data is (drex.data.sources specs)
      "chartqa": sources.make_spec("chartqa", path="REQUIRED: the ChartQA folder holding train/ val/ test/"),
      "docvqa": sources.make_spec("docvqa", path="REQUIRED: the DocVQA folder holding train/ val/ (*_v1.0.json)"),
      "mmbench": sources.make_spec("mmbench", path="REQUIRED: a folder with mmbench_dev_en_20231003.tsv"),
      "scienceqa": sources.make_spec("scienceqa", path="REQUIRED: ScienceQA data/scienceqa (problems.json, "
                                                       "pid_splits.json, images/)"),
      "textvqa": sources.make_spec("textvqa", path="REQUIRED: the folder with TextVQA_0.5.1_*.json and "
                                                   "train_images/"),
      "user_task": sources.make_spec("internvl", train="REQUIRED: your InternVL meta JSON (or one JSONL)",
                                     test="REQUIRED: its evaluation JSONL"),
  })
  c.data.eval_size = 0  # whole published evaluation splits (--config.data.eval_size=500 for a quick estimate)
  c.data.max_new_tokens = 100  # answer length of sources without their own (your InternVL / LLaVA tasks)
  c.data.workers = 8  # grain processes decoding and tiling 448-px images (a 2B step wants ~50 examples/s)
  if mode == "smoke":
    specs = fixtures.specs(fixtures.DEFAULT_ROOT)
    c.base.checkpoint = ""  # the shipped tiny base
    c.base.store = True  # a copy in WORKDIR/base, as the embedded default
    c.data.fixtures = fixtures.DEFAULT_ROOT  # written there first (once)
    c.tasks = ("scienceqa", "textvqa", "user_jsonl", "user_llava")  # every format learned once
    c.sources = ml_collections.ConfigDict({name: specs[name] for name in c.tasks + c.foundation})  # fixtures
    for spec in c.sources.values():
      spec.max_new_tokens = 6  # short answers: the tiny base's generations are not worth 100 tokens
      spec.max_tiles = 4  # one tiling for all (one compiled program per model), and room for two images
    c.data.max_tiles = 4  # as the sources above
    c.data.workers = 0  # in-process decoding: worker start-up would dominate a smoke run
    c.lora.kernel = "xla"  # CPU
    c.expert_training.learning_rate = 1e-3  # the tiny base's rate (the InternVL recipe's 4e-5 moves nothing in 12 steps)
    c.expert_training.steps, c.expert_training.warmup_steps = 12, 2  # seconds, not minutes
    c.router_training.steps, c.router_training.warmup_steps = 6, 1  # likewise
    c.data.batch_size = 8  # small batches
    c.data.eval_size = 8  # the first 8 records of each evaluation split
    c.data.eval_batch_size = 8  # one generation batch per column
    c.router.null_sample = 8  # routing statistics from one batch
    c.analysis.routing_batch = 8  # one batch per routing plot
    c.checkpoint_every = 5  # resume points inside each short stage
    c.mesh = (-1, 1, 1)  # data parallel over whatever devices there are
  elif mode not in (None, "", "full"):
    raise UserError(f"unknown config mode {mode!r}; use 'full' or 'smoke'")
  return c


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A CPU smoke run of the same stream: one short task, small evaluations."""
  c.tasks = c.tasks[:1]
  c.expert_training.steps, c.expert_training.warmup_steps = 12, 2
  c.router_training.steps, c.router_training.warmup_steps = 6, 1
  c.data.batch_size = 8
  c.data.eval_size = 32
  c.data.eval_batch_size = 32
  c.router.null_sample = 32
  c.analysis.routing_batch = 8
  c.checkpoint_every = 5
  return c


def apply_mode(c: ml_collections.ConfigDict, mode: str | None) -> ml_collections.ConfigDict:
  if mode in (None, "", "full"):
    return c
  if mode == "smoke":
    return shrink(c)
  raise UserError(f"unknown config mode {mode!r}; use 'full' or 'smoke'")


def validate(c: ml_collections.ConfigDict) -> None:
  """Check values the config schema cannot (names, ranges); raise a one-line UserError."""
  for name in list(c.tasks) + list(c.foundation):
    if sources.spec_of(name, c.get("sources"))["kind"] == "embedded" and name not in tasks.TASKS:
      raise UserError(f"unknown task {name!r} in config: not an embedded task ({', '.join(tasks.TASKS)}) and no "
                      f"config.sources.{name} entry gives its source")
  unused = sorted(set(c.get("sources") or {}) - set(c.tasks) - set(c.foundation))
  if unused:
    raise UserError(f"config.sources has entries {unused} that are neither tasks nor foundation members")
  if not c.tasks:
    raise UserError("config.tasks is empty; name at least one task")
  if len(set(c.tasks)) != len(c.tasks):
    raise UserError(f"config.tasks repeats a task: {list(c.tasks)}")
  for m in c.methods:
    if m not in METHODS:
      raise UserError(f"unknown method {m!r} in config.methods; use any of {METHODS}")
  unknown = set(c.lora.target_modules) - set(lora.ALL_TARGETS)
  if unknown:
    raise UserError(f"unknown lora.target_modules {sorted(unknown)}; choose from {lora.ALL_TARGETS}")
  if c.lora.kernel not in ("xla", "pallas", "auto"):
    raise UserError(f"unknown lora.kernel {c.lora.kernel!r}; use 'xla', 'pallas' or 'auto'")
  if c.data.eval_split not in tasks.EVAL_SPLITS:
    raise UserError(f"config.data.eval_split must be one of {tasks.EVAL_SPLITS}, got {c.data.eval_split!r}")
  routers.check(c.router)
  for key, value in [("lora.r", c.lora.r), ("expert_training.steps", c.expert_training.steps),
                     ("router_training.steps", c.router_training.steps), ("data.batch_size", c.data.batch_size)]:
    if value < 1:
      raise UserError(f"config.{key} must be >= 1, got {value}")
  for key in ("eval_size", "workers", "seq_len", "max_tiles"):
    if c.data[key] < 0:
      raise UserError(f"config.data.{key} must be >= 0, got {c.data[key]}")


def ordered(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with its tasks in the order task_order_seed says (a permutation of the sorted task names, so
  applying it again changes nothing); task_order_seed < 0 keeps the given order."""
  if c.get("task_order_seed", -1) >= 0:
    order = np.random.default_rng(c.task_order_seed).permutation(len(c.tasks))
    c.tasks = tuple(sorted(c.tasks)[i] for i in order)
  return c


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a drex.train workdir was made with (WORKDIR/config.json), on top of today's defaults
  (fields added since keep their defaults)."""
  from drex.checkpoints import store  # pylint: disable=g-import-not-at-top
  stored = _tuples(store.read_json(os.path.join(workdir, "config.json"), "run config"))
  for old, new in (("stage_a", "expert_training"), ("stage_b", "router_training")):  # names before drex 0.2
    if old in stored:
      stored[new] = stored.pop(old)
  cfg = stream_config()
  _merge_into(cfg, stored)
  return cfg


def _merge_into(cfg: ml_collections.ConfigDict, values: dict) -> None:
  for key, value in values.items():
    if isinstance(value, dict) and key in cfg and isinstance(cfg[key], ml_collections.ConfigDict):
      _merge_into(cfg[key], value)
    else:
      with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
        cfg[key] = value


def _tuples(tree):
  """JSON lists back to the tuples the config uses."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  return tuple(_tuples(v) for v in tree) if isinstance(tree, list) else tree
