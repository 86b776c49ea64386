"""Task identification (router `identify`): linear discriminants from each class's own prompt statistics, one
expert (or the base) per sequence, chosen before the pass and kept for every decoded token."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drex import config as config_lib
from drex import testing
from drex import workdir as workdir_lib
from drex.adapters import identify, lora, prototypes, routers
from drex.errors import UserError
from drex.models import generation, vlm


def _moments(x: np.ndarray) -> dict:
  return {"count": np.float64(len(x)), "sum": x.sum(0), "outer": x.T @ x}


def test_discriminants_are_the_shared_covariance_gaussian_rule():
  """w_c = S^-1 mu_c, b_c = -mu_c S^-1 mu_c / 2 with S the mean class covariance shrunk towards its mean
  variance; they classify held-out samples of three overlapping Gaussians with one covariance."""
  rng = np.random.default_rng(0)
  d, n = 6, 4000
  mix = rng.normal(size=(d, d))
  means = rng.normal(size=(3, d)) * 0.8
  train = [means[c] + rng.normal(size=(n, d)) @ mix for c in range(3)]
  test = [means[c] + rng.normal(size=(n, d)) @ mix for c in range(3)]
  shrink = 0.02
  out = prototypes.discriminants({name: {"p": _moments(x)} for name, x in zip("abc", train)}, shrink)["p"]
  covs = [np.cov(x.T, bias=True) for x in train]
  shared = np.mean(covs, 0)
  shared = (1 - shrink) * shared + shrink * np.trace(shared) / d * np.eye(d)
  mu = np.stack([x.mean(0) for x in train])
  w = mu @ np.linalg.inv(shared)
  np.testing.assert_allclose(out["id_w"], w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["id_b"][:, 0], -0.5 * (w * mu).sum(1), rtol=1e-4, atol=1e-5)
  # Nearly the Bayes rule with the true covariance (shrinkage costs little here).
  truth = np.linalg.inv(mix.T @ mix)
  hits = hits_true = 0
  for c, x in enumerate(test):
    hits += (np.argmax(x @ out["id_w"].T + out["id_b"][:, 0], 1) == c).sum()
    hits_true += (np.argmax(x @ truth @ means.T - 0.5 * ((means @ truth) * means).sum(1), 1) == c).sum()
  assert hits / (3 * n) > hits_true / (3 * n) - 0.03
  assert hits / (3 * n) > 1 / 3 + 0.2


def test_a_class_row_does_not_depend_on_the_order_of_the_classes():
  """The task order of a stream must not change what identifies a task: rows equal bit for bit."""
  rng = np.random.default_rng(1)
  classes = {name: {"p": _moments(rng.normal(size=(50, 5)) + i)} for i, name in enumerate(["t1", "t2", "t3", "base"])}
  first = prototypes.discriminants(classes, 0.1)["p"]
  order = ["t3", "t1", "base", "t2"]
  second = prototypes.discriminants({n: classes[n] for n in order}, 0.1)["p"]
  for i, name in enumerate(classes):
    for leaf in ("id_w", "id_b"):
      np.testing.assert_array_equal(first[leaf][i], second[leaf][order.index(name)])


def test_identifying_paths_are_the_first_layers_q_proj():
  paths = [f"language_model/layers_{i}/self_attn/{m}" for i in range(24) for m in ("q_proj", "k_proj")]
  chosen = prototypes.identifying_paths(paths, 3)
  assert chosen == sorted(f"language_model/layers_{i}/self_attn/q_proj" for i in (0, 1, 2))
  assert len(prototypes.identifying_paths(paths, 100)) == 24
  assert prototypes.identifying_paths([p for p in paths if "k_proj" in p], 3) == []


@pytest.fixture(scope="module", params=[1, 2])
def identified_micro(request):
  """A micro VLM (2 layers) with 3 experts and random discriminants for 3 experts + 2 base classes at the q_proj
  of its first 1 or 2 layers (the identifying pass runs only those)."""
  cfg, params, _ = testing.micro_model()
  e0 = testing.random_like(lora.init_experts(params, 3, lora.ALL_TARGETS, jax.random.key(1)), seed=3, scale=0.3)
  experts = lora.stack([e0, testing.random_like(e0, seed=4, scale=0.3), testing.random_like(e0, seed=5, scale=0.3)])
  linears = prototypes.by_path(experts, "lora_a")
  rng = np.random.default_rng(7)
  leaves = {p: {"id_w": rng.normal(size=(5, a.shape[1])).astype(np.float32),
                "id_b": rng.normal(size=(5, 1)).astype(np.float32)}
            for p, a in linears.items() if p in prototypes.identifying_paths(linears, request.param)}
  router = lora.merge_trees(lora.init_router(experts), prototypes.nest(leaves))
  return cfg, {"params": params, "experts": experts, "router": router}, leaves


def _expected_classes(model, variables, leaves, batch):
  """The classes the discriminants give, computed here from the base's q_proj inputs."""
  _, st = model.apply({"params": variables["params"]},  # a whole pass: the same inputs as a truncated one
                      *vlm.model_inputs(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]),
                      mutable=["intermediates"])
  inputs = {"/".join(p[:-1]): np.asarray(v[0], np.float64)
            for p, v in flax.traverse_util.flatten_dict(st["intermediates"]).items() if p[-1] == "inputs"}
  mask = np.asarray(batch["attention_mask"], np.float64)
  total = 0.0
  for path, leaf in leaves.items():
    x = inputs[path]
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    pooled = (xhat * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    total = total + pooled @ leaf["id_w"].T + leaf["id_b"][:, 0]
  return np.argmax(total, 1), total


def test_each_sequence_is_answered_by_its_identified_expert_or_the_base(identified_micro):
  """Generation under `identify` equals, row by row, generation with the identified expert alone (Single), or
  the base alone for a base class; the KV-cached decode keeps the prompt's choice."""
  cfg, variables, leaves = identified_micro
  model = vlm.VLM(cfg, lora.AdapterSpec(identify.Identify(), lora_alpha=4.0))
  classes = set()
  for seed in range(4):
    b = testing.micro_batch(cfg, batch=3, seed=seed, pad=(0, 2, 5))
    expected, _ = _expected_classes(model, variables, leaves, b)
    classes |= set(expected.tolist())
    out = np.asarray(generation.greedy_generate(model, variables, b["pixel_values"], b["input_ids"],
                                                b["attention_mask"], 4, -1, 0))
    for row, c in enumerate(expected):
      if c < 3:
        alone = vlm.VLM(cfg, lora.AdapterSpec(routers.Single(int(c)), lora_alpha=4.0))
        ref_vars = variables
      else:
        alone, ref_vars = vlm.VLM(cfg), {"params": variables["params"]}
      ref = np.asarray(generation.greedy_generate(alone, ref_vars, b["pixel_values"], b["input_ids"],
                                                  b["attention_mask"], 4, -1, 0))
      np.testing.assert_array_equal(out[row], ref[row], err_msg=f"seed {seed} row {row} class {c}")
  assert len(classes) >= 2  # the check saw more than one kind of choice


def test_a_restriction_to_some_experts_is_honoured(identified_micro):
  """With `allowed` (a serving request's own selection) the best allowed class wins; base classes stay allowed."""
  cfg, variables, leaves = identified_micro
  model = vlm.VLM(cfg, lora.AdapterSpec(identify.Identify(), lora_alpha=4.0))
  b = testing.micro_batch(cfg, batch=3, seed=1)
  _, scores = _expected_classes(model, variables, leaves, b)
  allowed = np.asarray([[1, 0, 0], [0, 1, 1], [0, 0, 0]], np.float32)
  router = jax.tree_util.tree_map(lambda x: x, variables["router"])
  flat = flax.traverse_util.flatten_dict(router)
  flat.update({p[:-1] + ("allowed",): jnp.asarray(allowed) for p in list(flat) if p[-1] == "v"})
  prepared, _ = vlm.prepared(model, {**variables, "router": flax.traverse_util.unflatten_dict(flat)},
                             b["pixel_values"], b["input_ids"], b["attention_mask"])
  identified = next(v for p, v in flax.traverse_util.flatten_dict(prepared["router"]).items()
                    if p[-1] == "identified")
  masked = np.where(np.pad(allowed, ((0, 0), (0, 2)), constant_values=1) > 0, scores, -np.inf)
  best = np.argmax(masked, 1)
  np.testing.assert_array_equal(np.asarray(identified), np.eye(5, dtype=np.float32)[best][:, :3])


def test_options_are_checked():
  c = routers.config_defaults("identify")
  routers.check(c)
  c.identify_layers = 0
  with pytest.raises(UserError, match="identify_layers"):
    routers.check(c)
  c.identify_layers, c.identify_shrinkage = 4, 0.0
  with pytest.raises(UserError, match="identify_shrinkage"):
    routers.check(c)


def test_missing_statistics_name_the_directory_and_the_command(tmp_path):
  """A workdir without a class's identification statistics: one line naming the directory and how to make them."""
  cfg = config_lib.stream_config()
  with pytest.raises(UserError, match=r"identification statistics not found: .*generic_kind-n\d+-l2; make them "
                                      r"with python -m drex.evaluate --workdir=.* --config.router.kind=identify"):
    workdir_lib.identification_tree(str(tmp_path), cfg, ["generic_kind"])


def test_per_sequence_discriminants_score_each_sequence_with_its_own(identified_micro):
  """drex.serving gives each request its own discriminants [B, C, d]: the same ones stacked choose as the shared
  ones do, and a row's own discriminants decide its choice alone."""
  cfg, variables, leaves = identified_micro
  model = vlm.VLM(cfg, lora.AdapterSpec(identify.Identify(), lora_alpha=4.0))
  b = testing.micro_batch(cfg, batch=3, seed=2)

  def identified(router_leaves):
    flat = flax.traverse_util.flatten_dict(variables["router"])
    flat.update({tuple(p.split("/")) + (k,): jnp.asarray(v) for p, entry in router_leaves.items() for k, v in entry.items()})
    prepared, _ = vlm.prepared(model, {**variables, "router": flax.traverse_util.unflatten_dict(flat)},
                               b["pixel_values"], b["input_ids"], b["attention_mask"])
    return np.asarray(next(v for p, v in flax.traverse_util.flatten_dict(prepared["router"]).items()
                           if p[-1] == "identified"))

  shared = identified(leaves)
  stacked = identified({p: {k: np.stack([v] * 3) for k, v in e.items()} for p, e in leaves.items()})
  np.testing.assert_array_equal(stacked, shared)
  forced = {p: {"id_w": np.stack([e["id_w"]] * 3), "id_b": np.stack([e["id_b"]] * 3)} for p, e in leaves.items()}
  for p in forced:  # row 1's own discriminants make expert 2 win; the other rows keep theirs
    forced[p]["id_b"][1] = np.where(np.arange(5)[:, None] == 2, 1e6, -1e6)
  got = identified(forced)
  np.testing.assert_array_equal(got[1], np.eye(5, dtype=np.float32)[2][:3])
  np.testing.assert_array_equal(got[[0, 2]], shared[[0, 2]])
