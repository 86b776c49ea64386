"""Only the trained slice moves; a short run lowers the loss; optimizer state is adapter-sized."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drex import testing
from drex.adapters import lora
from drex.adapters import routers
from drex.models import generation, vlm
from drex.parallel import Parallel
from drex.training import trainer


@pytest.fixture(scope="module")
def setup():
  cfg = testing.micro_config()
  batches = [testing.micro_batch(cfg, batch=8, seed=s) for s in range(2)]
  for b in batches:  # a learnable target: the answer is the image's brightest tile quadrant's token
    b["input_ids"][:, -3:] = (9, 10, 11)
    b["input_ids"][:, -2] += (b["pixel_values"].mean((1, 2, 3, 4)) > 0).astype(np.int32)
  b = batches[0]
  params = nn.unbox(vlm.VLM(cfg).init(jax.random.key(0), b["pixel_values"], b["input_ids"],
                                      vlm.prompt_positions(b["attention_mask"]),
                                      b["attention_mask"].astype(bool)))["params"]
  # A random 0.02-scale LM head caps logits near +-0.6 (the final RMSNorm bounds the hidden state), so
  # no adapter could fit anything; a trained head is much larger. Make it so.
  params["language_model"]["lm_head"]["kernel"] = params["language_model"]["lm_head"]["kernel"] * 50
  return cfg, params, batches


def _run(cfg, routing, trained, init, frozen, batches, steps, lr):
  model = vlm.VLM(cfg, lora.AdapterSpec(routing))
  optimizer = trainer.make_optimizer(trainer.OptimConfig(steps, lr, warmup_steps=2))
  state = trainer.init_state(init, optimizer)
  before = float(trainer.batch_loss(model, {**frozen, trained: init}, batches[0])[0])
  step = jax.jit(trainer.make_train_step(model, trained, optimizer))
  state, summary = trainer.train("test", step, state, frozen, itertools.cycle(batches), steps,
                                 Parallel.create(), log_every=steps)
  after = float(trainer.batch_loss(model, {**frozen, trained: state.params}, batches[0])[0])
  return state, before, after


def test_stage_a_lowers_the_loss_and_leaves_the_base_alone(setup):
  cfg, params, batches = setup
  frozen = {"params": params}
  snapshot = jax.tree_util.tree_map(np.array, params)
  init = lora.init_experts(params, 4, lora.ALL_TARGETS, jax.random.key(1))
  state, before, after = _run(cfg, routers.Single(0), "experts", init, frozen, batches, 40, 1e-2)
  assert after < 0.5 * before
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen["params"], snapshot)
  assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(init)
  # Optimizer state (Adam mu and nu) is the size of the expert, not of the base.
  n_opt = lora.count_params(state.opt_state)
  assert 2 * lora.count_params(init) <= n_opt <= 2 * lora.count_params(init) + 16
  assert n_opt < lora.count_params(params)


def test_stage_b_changes_only_routing_vectors(setup):
  cfg, params, batches = setup
  experts = testing.random_like(lora.init_experts(params, 4, lora.ALL_TARGETS, jax.random.key(1)), seed=2, scale=0.3)
  frozen = {"params": params, "experts": experts}
  snapshot = jax.tree_util.tree_map(np.array, frozen)
  router = lora.init_router(experts)
  state, before, after = _run(cfg, routers.SigmoidGate(0), "router", router, frozen, batches, 15, 5e-2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, snapshot)
  assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(router)
  moved = [float(jnp.abs(v).max()) for v in jax.tree_util.tree_leaves(state.params)]
  assert min(moved) > 0 and after < before


def test_pretraining_step_lowers_the_loss(setup):
  cfg, params, batches = setup
  init = jax.tree_util.tree_map(jnp.copy, params)
  _, before, after = _run(cfg, routers.Single(0), "params", init, {}, batches, 30, 3e-3)
  assert after < 0.7 * before
