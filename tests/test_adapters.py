"""LoRA expert trees, routers and the routed adapted linear: the equivalences the method rests on."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drex import testing
from drex.adapters import lora, routers
from drex.models import generation, vlm


@pytest.fixture(scope="module")
def setup():
  return testing.micro_model()


def _logits(cfg, variables, args, route=routers.Single(0)):
  return vlm.VLM(cfg, lora.AdapterSpec(route, lora_alpha=4.0)).apply(variables, *args)[0]


def test_init_experts_shapes_and_targets(setup):
  _, params, _ = setup
  ex = lora.init_experts(params, 3, ["q_proj", "down_proj"], jax.random.key(1), num_experts=2)
  layer = ex["language_model"]["layers_0"]
  chex.assert_shape(layer["self_attn"]["q_proj"]["lora_a"], (2, 32, 3))
  chex.assert_shape(layer["self_attn"]["q_proj"]["lora_b"], (2, 3, 32))
  chex.assert_shape(layer["mlp"]["down_proj"]["lora_a"], (2, 48, 3))
  assert "k_proj" not in layer["self_attn"] and "gate_proj" not in layer["mlp"]
  assert float(jnp.abs(layer["self_attn"]["q_proj"]["lora_b"]).max()) == 0.0
  bound = 1 / np.sqrt(32)
  assert float(jnp.abs(layer["self_attn"]["q_proj"]["lora_a"]).max()) <= bound
  all_ex = lora.init_experts(params, 3, lora.ALL_TARGETS, jax.random.key(1))
  assert len(jax.tree_util.tree_leaves(all_ex)) == 2 * 7 * 2  # (A, B) x 7 linears x 2 layers


def test_unknown_target_module_is_an_error(setup):
  _, params, _ = setup
  with pytest.raises(ValueError, match="unknown LoRA target_modules"):
    lora.init_experts(params, 2, ["qkv"], jax.random.key(0))


def test_zero_b_lora_equals_base(setup):
  cfg, params, args = setup
  ex = lora.init_experts(params, 4, lora.ALL_TARGETS, jax.random.key(1))
  np.testing.assert_array_equal(_logits(cfg, {"params": params, "experts": ex}, args),
                                _logits(cfg, {"params": params}, args))


def test_single_routing_equals_plain_lora_merged_into_base(setup):
  cfg, params, args = setup
  ex = testing.random_like(lora.init_experts(params, 4, lora.ALL_TARGETS, jax.random.key(1)), seed=3)
  routed = _logits(cfg, {"params": params, "experts": ex}, args)
  merged = lora.merge_into_base(params, ex, 0, scale=4.0 / 4)
  np.testing.assert_allclose(routed, _logits(cfg, {"params": merged}, args), atol=2e-5)
  assert float(jnp.abs(routed - _logits(cfg, {"params": params}, args)).max()) > 1e-3


def test_single_picks_the_named_expert_of_a_stack(setup):
  cfg, params, args = setup
  e0 = testing.random_like(lora.init_experts(params, 4, lora.ALL_TARGETS, jax.random.key(1)), seed=3)
  e1 = testing.random_like(e0, seed=4)
  stacked = lora.stack([e0, e1])
  np.testing.assert_allclose(_logits(cfg, {"params": params, "experts": stacked}, args, routers.Single(1)),
                             _logits(cfg, {"params": params, "experts": e1}, args), atol=1e-5)
  chex.assert_trees_all_close(lora.take(stacked, 1), e1)


def test_topk_with_one_expert_and_k1_equals_single(setup):
  cfg, params, args = setup
  ex = testing.random_like(lora.init_experts(params, 4, lora.ALL_TARGETS, jax.random.key(1)), seed=3)
  router = testing.random_like(lora.init_router(ex), seed=5)
  variables = {"params": params, "experts": ex, "router": router}
  np.testing.assert_allclose(_logits(cfg, variables, args, routers.TopK(k=1)),
                             _logits(cfg, {"params": params, "experts": ex}, args), atol=1e-6)


def test_sigmoid_gate_scales_the_expert_branch(setup):
  cfg, params, args = setup
  ex = testing.random_like(lora.init_experts(params, 4, lora.ALL_TARGETS, jax.random.key(1)), seed=3)
  zero_router = lora.init_router(ex)  # sigmoid(0) = 0.5 everywhere
  half = lora.merge_into_base(params, ex, 0, scale=0.5 * 4.0 / 4)
  np.testing.assert_allclose(
      _logits(cfg, {"params": params, "experts": ex, "router": zero_router}, args, routers.SigmoidGate(0)),
      _logits(cfg, {"params": half}, args), atol=2e-5)


# ----------------------------------------------------------------------------- router semantics


def _scores_setup(t=9, d=12, e=4, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(t, d)), jnp.float32), jnp.asarray(rng.normal(size=(e, d)), jnp.float32)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_weights_sum_to_one_with_k_nonzeros(k):
  x, v = _scores_setup()
  g = routers.TopK(k=k).gates(x, 4, {"v": v}, {})
  np.testing.assert_allclose(g.sum(-1), 1.0, atol=1e-6)
  assert ((g > 0).sum(-1) == k).all()


def test_topk_is_invariant_to_affine_rescaling():
  x, v = _scores_setup()
  g = routers.TopK().gates(x, 4, {"v": v}, {})
  g2 = routers.TopK().gates(3.0 * x + 2.0, 4, {"v": 0.5 * v - 1.0}, {})
  np.testing.assert_allclose(g, g2, atol=1e-5)


def test_topk_renormalization_is_softmax_over_kept_scores():
  x, v = _scores_setup()
  scores = routers.phatgoose_scores(x, v, 1.0)
  g = routers.TopK(k=2).gates(x, 4, {"v": v}, {})
  for t in range(x.shape[0]):
    kept = np.argsort(-np.asarray(scores[t]))[:2]
    expected = np.exp(scores[t, kept]) / np.exp(scores[t, kept]).sum()
    np.testing.assert_allclose(g[t, kept], expected, atol=1e-6)


def test_identical_vectors_split_evenly():
  x, v = _scores_setup(e=1)
  g = routers.TopK(k=2).gates(x, 3, {"v": jnp.repeat(v, 3, 0)}, {})
  np.testing.assert_allclose(np.sort(np.asarray(g), -1)[:, 1:], 0.5, atol=1e-6)


def test_phatgoose_scores_standardize_and_scale():
  x, v = _scores_setup()
  std = lambda a: (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5)
  expected = std(np.asarray(x)) @ std(np.asarray(v)).T / np.sqrt(12)
  np.testing.assert_allclose(routers.phatgoose_scores(x, v, 1.0), expected, atol=1e-5)


def test_null_expert_takes_weight_and_contributes_nothing():
  x, v = _scores_setup()
  null_v = x.mean(0, keepdims=True)  # one prototype close to every token
  g = routers.TopK(k=2, null_expert=True).gates(x, 4, {"v": v, "null_v": null_v}, {})
  chex.assert_shape(g, (9, 4))
  assert (g.sum(-1) < 1.0 - 1e-3).any()  # part of the mass went to the base
  assert (g.sum(-1) <= 1.0 + 1e-6).all()
  with pytest.raises(ValueError, match="needs the router variable 'null_v'"):
    routers.TopK(null_expert=True).gates(x, 4, {"v": v}, {})


def test_arrow_prototype_is_top_singular_vector_and_sign_invariant():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(3, 10, 4)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(3, 4, 7)), jnp.float32)
  protos = routers.arrow_prototypes(a, b)
  for e in range(3):
    u, _, _ = np.linalg.svd(np.asarray(a[e]) @ np.asarray(b[e]))
    assert abs(abs(float(np.dot(protos[e], u[:, 0]))) - 1.0) < 1e-4
  x = jnp.asarray(rng.normal(size=(5, 10)), jnp.float32)
  np.testing.assert_allclose(routers.Arrow(k=2).gates(x, 3, {}, {"lora_a": a, "lora_b": b}),
                             routers.Arrow(k=2).gates(-x, 3, {}, {"lora_a": a, "lora_b": b}), atol=1e-6)


def test_router_config_errors():
  with pytest.raises(ValueError, match="unknown router 'phatgoose'"):
    routers.get("phatgoose")
  with pytest.raises(ValueError, match="picks expert 3 but only 2"):
    routers.Single(3).gates(jnp.ones((2, 4)), 2, {}, {})
  with pytest.raises(ValueError, match="2 weights for 3 experts"):
    routers.Dense((0.5, 0.5)).gates(jnp.ones((2, 4)), 3, {}, {})


def test_stack_rejects_different_structures(setup):
  _, params, _ = setup
  a = lora.init_experts(params, 2, ["q_proj"], jax.random.key(0))
  b = lora.init_experts(params, 2, ["k_proj"], jax.random.key(0))
  with pytest.raises(ValueError, match="adapts different layers"):
    lora.stack([a, b])


@pytest.mark.parametrize("kernel", ["pallas", "auto"])
def test_model_logits_and_train_step_agree_between_kernels(setup, kernel):
  """The Pallas kernel (interpret mode on CPU) behind the model gives the XLA path's logits and grads."""
  from drex.training import trainer  # pylint: disable=g-import-not-at-top
  cfg, params, args = setup
  e0 = testing.random_like(lora.init_experts(params, 3, lora.ALL_TARGETS, jax.random.key(1)), seed=3)
  experts = lora.stack([e0, testing.random_like(e0, seed=4)])
  router = testing.random_like(lora.init_router(experts), seed=5)
  variables = {"params": params, "experts": experts, "router": router}
  outs = {}
  for k in ("xla", kernel):
    model = vlm.VLM(cfg, lora.AdapterSpec(routers.TopK(k=2), lora_alpha=4.0, kernel=k))
    logits = model.apply(variables, *args)[0]
    b = testing.micro_batch(cfg)
    grads = jax.grad(lambda ex: trainer.batch_loss(model, {**variables, "experts": ex}, b)[0])(experts)
    outs[k] = (logits, grads)
  np.testing.assert_allclose(outs[kernel][0], outs["xla"][0], atol=1e-4)
  chex.assert_trees_all_close(outs[kernel][1], outs["xla"][1], atol=1e-4)


def test_calibrated_scores_standardize_each_vector():
  x, v = _scores_setup()
  identity = jnp.tile(jnp.asarray([[0.0, 1.0]]), (4, 1))
  np.testing.assert_allclose(routers.TopK(calibrated=True).gates(x, 4, {"v": v, "v_stats": identity}, {}),
                             routers.TopK().gates(x, 4, {"v": v}, {}), atol=1e-6)
  stats = jnp.asarray([[0.5, 2.0], [-1.0, 0.5], [0.0, 1.0], [2.0, 3.0]])
  raw = routers.phatgoose_scores(x, v, 1.0)
  expected = routers.topk_softmax((raw - stats[:, 0]) / stats[:, 1], 2)
  np.testing.assert_allclose(routers.TopK(calibrated=True).gates(x, 4, {"v": v, "v_stats": stats}, {}),
                             expected, atol=1e-6)
  with pytest.raises(ValueError, match="score statistics"):
    routers.TopK(calibrated=True).gates(x, 4, {"v": v}, {})


def test_input_moments_match_a_direct_computation(setup):
  """Prototype means and score statistics equal numpy's over the real tokens of the batch."""
  from drex.adapters import prototypes  # pylint: disable=g-import-not-at-top
  from drex.parallel import Parallel  # pylint: disable=g-import-not-at-top
  cfg, params, args = setup
  b = testing.micro_batch(cfg, pad=(0, 3, 5))
  batch = {**b, "valid": np.array([1, 1, 0], np.int32)}  # the third row is padding
  experts = lora.init_experts(params, 2, ["q_proj"], jax.random.key(0))
  model = vlm.VLM(cfg, lora.AdapterSpec())  # adapted linears sow their inputs
  key = "language_model/layers_1/self_attn/q_proj"
  vec = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
  m = prototypes.input_moments(model, {"params": params, "experts": experts}, [batch], Parallel.create((1, 1, 1)),
                               {key: vec})[key]
  _, st = model.apply({"params": params, "experts": experts}, *args[:1], b["input_ids"],
                      vlm.prompt_positions(b["attention_mask"]), b["attention_mask"].astype(bool),
                      mutable=["intermediates"])
  x = np.asarray(st["intermediates"]["language_model"]["layers_1"]["self_attn"]["q_proj"]["inputs"][0])
  real = (b["attention_mask"] * batch["valid"][:, None]).astype(bool)
  xhat = np.asarray(routers.standardize(jnp.asarray(x[real])))
  np.testing.assert_allclose(m["mean"], xhat.mean(0), atol=1e-5)
  scores = xhat @ np.asarray(routers.standardize(jnp.asarray(vec))).T / np.sqrt(32)
  np.testing.assert_allclose(m["score_mean"], scores.mean(0), atol=1e-5)
  np.testing.assert_allclose(m["score_std"], scores.std(0), atol=1e-4)
  # Another class's statistics through an equal model reuse the compiled pass (one compile per run, not per class).
  parallel = Parallel.create((1, 1, 1))
  misses = prototypes._input_sums.cache_info().misses
  prototypes.input_moments(vlm.VLM(cfg, lora.AdapterSpec()), {"params": params, "experts": experts}, [batch],
                           parallel, {key: -vec})
  assert prototypes._input_sums.cache_info().misses == misses
  assert prototypes._input_sums(model, parallel.sharding(()))._cache_size() == 1
