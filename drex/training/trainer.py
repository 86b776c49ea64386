"""The one training loop: differentiate one variable collection (the slice being trained), keep
the others frozen. Optimizer state therefore has the size of the trained slice only.

  pretraining : trains 'params' (the whole base)
  stage A     : trains 'experts' (one new LoRA expert, base frozen)
  stage B     : trains 'router' (that expert's routing vectors, expert and base frozen)
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

from drex.models.generation import prompt_positions
from drex.models.vlm import VLM, answer_loss

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
  mask = batch["attention_mask"]
  logits, _ = model.apply(variables, batch["pixel_values"], batch["input_ids"], prompt_positions(mask),
                          mask.astype(bool))
  return answer_loss(logits, batch["input_ids"], batch["loss_mask"])


def make_train_step(model: VLM, trained: str, optimizer: optax.GradientTransformation) -> Callable:
  """step(state, frozen_variables, batch) -> (state, {'loss'}) for the collection `trained`."""

  def loss_fn(params, frozen, batch):
    total, count = batch_loss(model, {**frozen, trained: params}, batch)
    return total / jnp.maximum(count, 1.0)

  def step(state: TrainState, frozen: dict, batch: dict):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), {"loss": loss}

  return step


def train(name: str, step_fn: Callable, state: TrainState, frozen: dict, batches: Iterator[dict], steps: int,
          log_every: int = 50, writer=None, jit_step: Callable | None = None) -> tuple[TrainState, dict]:
  """Run `steps` steps from state.step; returns the final state and {'loss_first', 'loss_last', 'seconds'}."""
  compiled = jit_step or jax.jit(step_fn, donate_argnums=(0,))
  start = int(state.step)
  losses = []
  begin = time.time()
  bar = tqdm(range(start, steps), desc=name, unit="step", leave=False, mininterval=2.0, disable=steps <= start)
  for i in bar:
    batch = next(batches)
    state, metrics = compiled(state, frozen, batch)
    if (i + 1) % log_every == 0 or i + 1 == steps or i == start:
      loss = float(metrics["loss"])
      losses.append(loss)
      bar.set_postfix(loss=f"{loss:.3f}")
      if writer is not None:
        writer.add_scalar(f"{name}/loss", loss, i + 1)
  seconds = time.time() - begin
  summary = {"loss_first": losses[0] if losses else float("nan"), "loss_last": losses[-1] if losses else float("nan"),
             "seconds": seconds}
  log.info("%s: %d steps in %.1fs, loss %.3f -> %.3f", name, steps - start, seconds, summary["loss_first"],
               summary["loss_last"])
  return state, summary


def to_device_batch(batch: dict) -> dict:
  """Drop host-only fields."""
  return {k: np.asarray(v) for k, v in batch.items() if k != "valid"}
