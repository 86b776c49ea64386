"""Sequence-level and hybrid routing: the same trained routing vectors as the paper's token-level router, one
choice per sequence kept for its decoded tokens; they equal token routing where they must."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drex import testing
from drex.adapters import lora, routers
from drex.models import generation, vlm

LEVELS = {"token": routers.TopK(k=2), "sequence": routers.SequenceTopK(k=2),
          "hybrid": routers.HybridTopK(k=2, candidates=3)}


def _scores_setup(t=7, e=4, d=12, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(t, d)), jnp.float32), jnp.asarray(rng.normal(size=(e, d)), jnp.float32)


def _gates(router, x, v, mask=None, **variables):
  """x: [B, L, d] -> [B, L, E] through the router's own protocol (a per-sequence choice first)."""
  variables = {"v": v, **variables}
  chosen = router.choose(x, mask, v.shape[0], variables, {}) if router.per_sequence else None
  return router.gates(x, v.shape[0], variables, {}, chosen) if router.per_sequence else router.gates(
      x, v.shape[0], variables, {})


def test_levels_equal_token_routing_on_identical_tokens():
  x, v = _scores_setup()
  same = jnp.broadcast_to(x[:1], (2, 5, x.shape[1]))  # every token of both sequences alike
  token = _gates(LEVELS["token"], same, v)
  for level in ("sequence", "hybrid"):
    np.testing.assert_allclose(_gates(LEVELS[level], same, v), token, atol=1e-6, err_msg=level)


def test_levels_equal_token_routing_with_one_expert():
  x, v = _scores_setup(e=1)
  seqs = x.reshape(1, 7, -1)
  for level, router in LEVELS.items():
    np.testing.assert_allclose(_gates(router, seqs, v), 1.0, atol=1e-6, err_msg=level)


def test_sequence_level_routes_every_token_of_a_sequence_alike_and_ignores_padding():
  x, v = _scores_setup(t=10)
  seqs = x.reshape(2, 5, -1)
  mask = jnp.asarray([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
  g = _gates(LEVELS["sequence"], seqs, v, mask)
  np.testing.assert_allclose(g, jnp.broadcast_to(g[:, :1], g.shape), atol=1e-7)  # one mixture per sequence
  assert ((g[:, 0] > 0).sum(-1) == 2).all()
  changed = seqs.at[0, 0].set(100.0)  # a padding token's value must not matter
  np.testing.assert_allclose(_gates(LEVELS["sequence"], changed, v, mask)[0], g[0], atol=1e-7)
  hybrid = _gates(LEVELS["hybrid"], seqs, v, mask)
  kept = (np.asarray(hybrid) > 0).any(1)  # experts a sequence uses anywhere: within its 3 candidates
  assert (kept.sum(-1) <= 3).all() and ((np.asarray(hybrid) > 0).sum(-1) == 2).all()


@pytest.mark.parametrize("level", ["token", "sequence", "hybrid"])
def test_null_expert_at_every_level(level):
  x, v = _scores_setup(t=8)
  router = routers.TopK.from_config(_config(level, null_expert=True), 4)
  seqs = x.reshape(2, 4, -1)
  g = _gates(router, seqs, v, null_v=seqs.mean((0, 1))[None])  # a prototype close to every token
  assert router.includes_base and (np.asarray(g.sum(-1)) < 1.0 - 1e-3).any() and (g.sum(-1) <= 1.0 + 1e-6).all()


def _config(level, **options):
  c = routers.config_defaults("topk")
  c.level = level
  c.update(options)
  return c


@pytest.fixture(scope="module")
def routed_micro():
  cfg, params, _ = testing.micro_model()
  e0 = testing.random_like(lora.init_experts(params, 3, lora.ALL_TARGETS, jax.random.key(1)), seed=3, scale=0.3)
  experts = lora.stack([e0, testing.random_like(e0, seed=4, scale=0.3), testing.random_like(e0, seed=5, scale=0.3)])
  router = testing.random_like(lora.init_router(experts), seed=6, scale=1.0)
  return cfg, {"params": params, "experts": experts, "router": router}


@pytest.mark.parametrize("level", ["token", "sequence", "hybrid"])
def test_kv_cached_generation_equals_uncached(routed_micro, level):
  """Greedy decoding with the KV cache gives the tokens of a full forward pass per step; a per-sequence
  router's choice comes from the prompt alone in both (the prefill keeps it, the full passes reuse it)."""
  cfg, variables = routed_micro
  model = vlm.VLM(cfg, lora.AdapterSpec(routers.TopK.from_config(_config(level), 3), lora_alpha=4.0))
  b = testing.micro_batch(cfg, pad=(0, 2, 5))
  out = np.asarray(generation.greedy_generate(model, variables, b["pixel_values"], b["input_ids"],
                                              b["attention_mask"], 5, -1, 0))
  inputs = vlm.model_inputs(b["pixel_values"], b["input_ids"], b["attention_mask"])
  _, state = model.apply(variables, *inputs, mutable=["routing_state"])  # the prompt's choice
  ids, mask = b["input_ids"], b["attention_mask"]
  for _ in range(5):
    logits, _ = model.apply({**variables, **state}, *vlm.model_inputs(b["pixel_values"], ids, mask))
    nxt = np.argmax(np.asarray(logits[:, -1]), -1)[:, None]
    ids, mask = np.concatenate([ids, nxt], 1), np.concatenate([mask, np.ones_like(nxt)], 1)
  np.testing.assert_array_equal(ids[:, -5:], out)
  if level != "token":
    assert jax.tree_util.tree_leaves(state)  # the choice was kept


@pytest.mark.parametrize("level", ["token", "sequence", "hybrid"])
def test_a_restriction_to_some_experts_holds_with_padding(level):
  """`allowed` (a served request's selection): only those experts get weight, also for left-padded prompts."""
  x, v = _scores_setup(t=10)
  seqs = x.reshape(2, 5, -1)
  mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
  allowed = jnp.asarray([[0, 1, 0, 0], [1, 0, 1, 1]], jnp.float32)
  g = np.asarray(_gates(LEVELS[level], seqs, v, mask, allowed=allowed))
  assert np.isfinite(g).all()
  assert (g[0, :, [0, 2, 3]] == 0).all() and np.allclose(g[0, 2:, 1], 1.0)  # one allowed expert takes it all
  assert (g[1, :, 1] == 0).all() and np.allclose(g[1].sum(-1), 1.0, atol=1e-6)


def test_last_token_pooling_routes_a_sequence_by_its_last_prompt_token():
  x, v = _scores_setup(t=10)
  seqs = x.reshape(2, 5, -1)
  last = routers.SequenceTopK(k=2, pooling="last")
  g = _gates(last, seqs, v, jnp.ones((2, 5), bool))
  token = _gates(LEVELS["token"], seqs, v)
  np.testing.assert_allclose(g, jnp.broadcast_to(token[:, -1:], g.shape), atol=1e-6)  # the last token's choice
  changed = seqs.at[:, :-1].set(50.0)  # earlier prompt tokens do not matter
  np.testing.assert_allclose(_gates(last, changed, v, jnp.ones((2, 5), bool)), g, atol=1e-6)
