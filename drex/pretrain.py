"""Pretrain the tiny base of the embedded default (the result ships in drex/assets/base_tiny).

  python -m drex.pretrain --config=configs/base_tiny.py --workdir=runs/base_tiny
  python -m drex.pretrain --config=configs/base_tiny.py:continue --workdir=runs/base_tiny_continued

Trains a BPE tokenizer on the task family's text, then the whole tiny InternVL-shaped model on the
foundation suite (+ the auxiliary echo task, which teaches every answer word, and caption, which keeps
colour, kind and layout in the vision features), evaluates the foundation suite,
and writes WORKDIR/base (orbax params + config.json + tokenizer.json). `--config.export_to=DIR`
also copies it to DIR. `--config.init_from=BASE_DIR` continues pretraining that base instead (its
architecture, tokenizer and params; its provenance is kept under provenance.init_from; the
foundation scores logged and recorded are on the test split, as the matrices of drex.train).

Preemption-safe like drex.train: params, optimizer state, step and data position are saved in
WORKDIR/state/pretrain every `checkpoint_every` steps, after each evaluation and on SIGTERM; re-running
the same command resumes there (with another config it refuses).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time

from absl import flags
import flax.linen as nn
import jax
from ml_collections import config_flags
import tensorflow_datasets as tfds
from tensorboardX import SummaryWriter

from drex import base as base_lib
from drex import cli
from drex import evaluation
from drex import parallel
from drex.task_data import round_up
from drex.checkpoints import store
from drex.checkpoints.stage import StageCheckpoint
from drex.data import builder, pipeline, record as record_lib, sources as sources_lib, tasks
from drex.errors import UserError
from drex.models import presets
from drex.training import trainer

if __name__ == "__main__":  # the command's flags; importing the module (tests, other modules) defines none
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config file (configs/base_tiny.py).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; WORKDIR/base is written once.")

log = logging.getLogger("drex.pretrain")  # __name__ is "__main__" under python -m


def main(argv):
  del argv
  cfg = _CONFIG.value
  if _WORKDIR.value is None:
    raise UserError("--workdir is required")
  workdir = _WORKDIR.value
  base_dir = os.path.join(workdir, "base")
  if os.path.exists(base_dir):
    raise UserError(f"{base_dir} exists already; a base is written once (use another --workdir)")
  store.check_writable(workdir)
  os.makedirs(workdir, exist_ok=True)
  tfds.disable_progress_bar()
  data_dir = cfg.data_dir or builder.DEFAULT_DATA_DIR
  begin = time.time()

  par = parallel.Parallel.create()
  if cfg.init_from:  # continue pretraining a base: its architecture, tokenizer and params
    cfg.init_from = os.path.abspath(cfg.init_from)  # recorded, and compared on resume, as an absolute path
    start = base_lib.load(cfg.init_from, par)
    tokenizer, start_params, start_provenance = start.tokenizer, start.params, start.info.provenance
    info = store.BaseInfo(start.info.model, start.info.template, start.info.image)
    del start
  else:
    tokenizer, start_params = base_lib.tiny_tokenizer(cfg.vocab_size), None
    info = store.BaseInfo(presets.tiny(tokenizer.vocab_size, tokenizer.token_id("<IMG_CONTEXT>")), "tiny",
                          pipeline.ImageSpec(tile_size=32, max_tiles=1))
  skeleton = base_lib.Base(info, tokenizer, None, "")
  model, encoder = skeleton.model(), skeleton.encoder()

  if cfg.data not in ("pretrain", "train"):
    raise UserError(f"unknown pretraining data {cfg.data!r}; use 'pretrain' or 'train'")
  prefix = builder.PRETRAIN_PREFIX if cfg.data == "pretrain" else ""
  builder.prepare_all([prefix + name for name in tasks.PRETRAIN_MIX] + list(tasks.FOUNDATION), data_dir,
                      processes=os.cpu_count() or 1)
  embedded = lambda name, split: record_lib.Mapped(builder.data_source(name, split, data_dir),
                                                    sources_lib.embedded_record)
  train_sources = [embedded(prefix + name, "train") for name in tasks.PRETRAIN_MIX]
  eval_sets = [evaluation.make_eval_set(name, tasks.get(name).metric, embedded(name, "test"), limit=cfg.eval_size)
               for name in tasks.FOUNDATION]
  train_len = max(encoder.scan(record_lib.Subset(src, range(min(2000, len(src))))).total_max for src in train_sources)  # a sample, + slack
  prompt_len = round_up(max(encoder.scan(s.source).prompt_max for s in eval_sets), 8)
  for eval_set in eval_sets:
    eval_set.encoder, eval_set.prompt_len, eval_set.max_new_tokens = encoder, prompt_len, cfg.max_new_tokens
  seq_len = round_up(train_len + 2, 8)
  log.info("model %s; tokenizer %d tokens; seq_len %d", info.model.llm, tokenizer.vocab_size, seq_len)

  optim = trainer.OptimConfig(cfg.steps, cfg.learning_rate, cfg.warmup_steps, cfg.weight_decay)
  optimizer = trainer.make_optimizer(optim)
  boxed = base_lib.boxed_shapes(model, info.image)
  params_sh = par.tree_shardings(boxed)
  shardings = trainer.state_shardings(optimizer, params_sh, par, nn.unbox(boxed))
  params = start_params if start_params is not None else jax.jit(
      lambda: base_lib.init_params(model, info.image, jax.random.key(cfg.seed)), out_shardings=params_sh)()
  state = trainer.create_state(params, optimizer, shardings)
  batches = pipeline.train_batches(train_sources, encoder, seq_len, cfg.batch_size, cfg.seed,
                                   weights=[1.0] * len(train_sources),
                                   process_index=jax.process_index(), process_count=jax.process_count(),
                                   workers=cfg.data_workers)
  evaluator = evaluation.Evaluator(cfg.eval_batch_size, par)
  step = trainer.compile_step(model, "params", optimizer, shardings, {}, par)
  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  checkpoint = StageCheckpoint(os.path.join(workdir, "state", "pretrain"), cfg.checkpoint_every)
  history_path = os.path.join(workdir, "state", "history.json")
  history = _resumable_history(os.path.join(workdir, "state", "config.json"), history_path, cfg.to_dict())
  state = checkpoint.restore(state, batches)
  history = [h for h in history if h["step"] <= int(state.step)]
  train_begin = time.time()
  while int(state.step) < cfg.steps:
    if cfg.max_seconds and time.time() - train_begin > cfg.max_seconds:
      log.info("stopping at step %d: max_seconds=%d reached", int(state.step), cfg.max_seconds)
      break
    target = min((int(state.step) // cfg.eval_every + 1) * cfg.eval_every, cfg.steps)  # evaluations on a fixed grid
    state, summary = trainer.train("pretrain", step, state, {}, batches, target, par, checkpoint, writer=writer)
    scores = {s.name: evaluator.score(model, {"params": state.params}, s) for s in eval_sets}
    history.append({"step": target, "loss": summary["loss_last"], **scores})
    for name, score in scores.items():
      writer.add_scalar(f"foundation/{name}", score, target)
    log.info("step %d: loss %.3f; %s", target, summary["loss_last"],
                 ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    checkpoint.save(target, state, batches, force=True)
    if jax.process_index() == 0:
      store.write_json(history_path, history)
  writer.close()

  provenance = {"command": " ".join(["python -m drex.pretrain"] + sys.argv[1:]), "config": cfg.to_dict(),
                "steps_done": int(state.step),
                "seconds": round(time.time() - begin, 1), "device": jax.devices()[0].device_kind,
                "jax": jax.__version__, "foundation_scores": history[-1], "history": history}
  if cfg.init_from:
    provenance["init_from"] = {"path": cfg.init_from, "provenance": start_provenance}
  info = store.BaseInfo(info.model, info.template, info.image, provenance)
  store.save_base(base_dir, state.params, info, tokenizer)
  checkpoint.remove()
  if jax.process_index() == 0:
    shutil.rmtree(os.path.join(workdir, "state"), ignore_errors=True)
  log.info("wrote %s (%.0fs)", base_dir, provenance["seconds"])
  print(json.dumps(history[-1]))
  if cfg.export_to:
    if os.path.exists(cfg.export_to):
      raise UserError(f"{cfg.export_to} exists; remove it first to replace the exported base")
    shutil.copytree(base_dir, cfg.export_to)
    log.info("exported to %s", cfg.export_to)


def _resumable_history(config_path: str, history_path: str, config: dict) -> list[dict]:
  """The evaluations of an interrupted run of the same config ([] for a fresh WORKDIR); refuses another config."""
  if os.path.exists(config_path):
    stored = store.read_json(config_path, "pretraining state config")
    if stored != json.loads(json.dumps(config)):
      raise UserError(f"{os.path.dirname(config_path)} holds an interrupted pretraining with another config; "
                      "re-run with the same config to resume, or use another --workdir")
    return store.read_json(history_path, "pretraining history") if os.path.exists(history_path) else []
  if jax.process_index() == 0:
    store.write_json(config_path, config)
  return []




if __name__ == "__main__":
  cli.run(main, "drex.pretrain")
