"""The one training loop: differentiate one variable collection (the slice being trained), keep
the others frozen. Optimizer state therefore has the size of the trained slice only.

  pretraining     : trains 'params' (the whole base)
  expert training : trains 'experts' (one new LoRA expert, base frozen)
  router training : trains 'router' (that expert's routing vectors, expert and base frozen)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from drex.checkpoints.stage import Preempted, StageCheckpoint, stop_requested
from drex.errors import UserError
from drex.models.vlm import VLM, answer_loss, model_inputs
from drex.parallel import Parallel

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # the trained slice
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  steps: int
  learning_rate: float
  warmup_steps: int = 0
  weight_decay: float = 0.0
  grad_clip: float = 1.0


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay to 10%, gradient clipping by global norm."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                                max(cfg.steps, cfg.warmup_steps + 1), cfg.learning_rate * 0.1)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=cfg.weight_decay))


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def batch_loss(model: VLM, variables: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(sum of answer-token losses, answer-token count) of one batch."""
  logits, _ = model.apply(variables, *model_inputs(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]))
  return answer_loss(logits, batch["input_ids"], batch["loss_mask"])


def make_train_step(model: VLM, trained: str, optimizer: optax.GradientTransformation) -> Callable:
  """step(state, frozen_variables, batch) -> (state, {'loss', 'finite'}) for the collection `trained`;
  'finite' is False when the loss or the gradient norm is not finite."""

  def loss_fn(params, frozen, batch):
    total, count = batch_loss(model, {**frozen, trained: params}, batch)
    return total / jnp.maximum(count, 1.0)

  def step(state: TrainState, frozen: dict, batch: dict):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    return TrainState(state.step + 1, params, opt_state), {"loss": loss, "finite": finite}

  return step


def state_shardings(optimizer: optax.GradientTransformation, params_shardings: Any, parallel: Parallel,
                    params_abstract: Any) -> TrainState:
  """Shardings of a TrainState: optimizer moments follow their params, scalars are replicated."""
  replicated = parallel.sharding(())
  opt_abstract = jax.eval_shape(optimizer.init, params_abstract)
  opt = optax.tree_map_params(optimizer, lambda _, s: s, opt_abstract, params_shardings,
                              transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=params_shardings, opt_state=opt)


def compile_step(model: VLM, trained: str, optimizer: optax.GradientTransformation, shardings: TrainState,
                 frozen_shardings: dict, parallel: Parallel) -> Callable:
  """The jitted step with explicit in/out shardings and the state donated."""
  step = make_train_step(model, trained, optimizer)
  return jax.jit(step, in_shardings=(shardings, frozen_shardings, parallel.batch_sharding()),
                 out_shardings=(shardings, parallel.sharding(())), donate_argnums=(0,))


def create_state(params: Any, optimizer: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  return jax.jit(lambda p: init_state(p, optimizer), out_shardings=shardings)(params)


def train(label: str, step_fn: Callable, state: TrainState, frozen: dict, batches: Iterator[dict], steps: int,
          parallel: Parallel, checkpoint: StageCheckpoint | None = None, log_every: int = 50,
          writer=None) -> tuple[TrainState, dict]:
  """Run a stage to `steps` from state.step (restored from `checkpoint` when one exists).

  Saves to `checkpoint` every checkpoint.every steps and on SIGTERM (then raises Preempted). A loss or gradient
  norm that is not finite raises NonFinite naming the step, before any state after it is saved.
  Returns the final state and {'loss_first', 'loss_last', 'seconds', 'resumed_from'} (+ 'skipped_records',
  the rows made from a later record because a record's images could not be decoded, when there were any).
  """
  if checkpoint is not None:
    state = checkpoint.restore(state, batches)
  start = int(state.step)
  losses = []
  skipped = 0  # this host's training records passed over because their images could not be decoded
  unchecked: list[tuple[int, jax.Array]] = []  # (step, finite flag) not yet looked at: checked at every sync point
  begin = time.time()
  bar = tqdm(range(start, steps), desc=label, unit="step", leave=False, mininterval=2.0,
             disable=steps <= start or jax.process_index() != 0)
  with bar:  # closed (and cleared) on every exit, so an error message starts on its own line
    for i in bar:
      local = dict(next(batches))
      skipped += int(np.sum(local.pop("skipped", 0)))
      batch = parallel.global_batch(local)
      with parallel.context():
        state, metrics = step_fn(state, frozen, batch)
      unchecked.append((i + 1, metrics["finite"]))
      saving = checkpoint is not None and i + 1 < steps and ((i + 1) % checkpoint.every == 0 or stop_requested())
      if (i + 1) % log_every == 0 or i + 1 == steps or i == start or saving:
        _check_finite(unchecked, label, checkpoint)
        unchecked = []
      if (i + 1) % log_every == 0 or i + 1 == steps or i == start:
        loss = float(metrics["loss"])
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        if writer is not None:
          writer.add_scalar(f"{label}/loss", loss, i + 1)
      if checkpoint is not None and i + 1 < steps:
        if _stop_everywhere(i + 1, checkpoint.every):
          checkpoint.save(i + 1, state, batches, force=True)
          raise Preempted(f"stopped by SIGTERM at step {i + 1} of {label}; its state is saved in "
                          f"{checkpoint.directory}: re-run the same command to resume")
        checkpoint.save(i + 1, state, batches)
  seconds = time.time() - begin
  summary = {"loss_first": losses[0] if losses else float("nan"), "loss_last": losses[-1] if losses else float("nan"),
             "seconds": round(seconds, 2), "resumed_from": start}
  if skipped:
    summary["skipped_records"] = skipped
    log.warning("%s: %d training records skipped on this host: their images could not be decoded (see the "
                "warnings above)", label, skipped)
  log.info("%s: %d steps in %.1fs, loss %.3f -> %.3f", label, steps - start, seconds, summary["loss_first"],
           summary["loss_last"])
  return state, summary


class NonFinite(UserError):
  """The loss or a gradient became NaN or infinite; nothing of the stage was committed."""


def _check_finite(unchecked: list[tuple[int, jax.Array]], label: str, checkpoint: StageCheckpoint | None) -> None:
  """Raise NonFinite at the first step whose loss or gradient norm was not finite (before it can be saved)."""
  if not unchecked:
    return
  flags = np.asarray(jax.device_get([flag for _, flag in unchecked]))
  if flags.all():
    return
  step = unchecked[int(np.argmin(flags))][0]
  kept = checkpoint.latest_step() if checkpoint is not None else None
  resume = (f"its last good resume point, step {kept}, is kept in {checkpoint.directory}: fix the config and "
            f"re-run to resume from there" if kept else "fix the config (e.g. a lower learning rate) and re-run")
  raise NonFinite(f"{label}: the loss or gradient became NaN/inf at step {step}; the stage stopped and nothing of "
                  f"it was committed; {resume}")


def _stop_everywhere(step: int, every: int) -> bool:
  """Whether SIGTERM arrived (on any host: hosts agree at checkpoint steps, so they save together)."""
  if jax.process_count() == 1:
    return stop_requested()
  if step % every:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.process_allgather(np.int32(stop_requested())).max())
