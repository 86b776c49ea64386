"""Sharding: logical rules -> mesh shardings, and a train step on 8 (fake CPU) devices equals the
same step on one device for several meshes. The 8-device part runs in a subprocess, because the
device count must be set before JAX starts."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from drex import parallel
from drex.errors import UserError

MESHES = ((8, 1, 1), (2, 2, 2), (1, 4, 2))


def test_resolve_mesh_shape():
  assert parallel.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert parallel.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(UserError, match="does not divide 8 devices"):
    parallel.resolve_mesh_shape((3, -1, 1), 8)
  with pytest.raises(UserError, match="at most one axis"):
    parallel.resolve_mesh_shape((-1, -1, 1), 8)


def test_preflight_names_the_disagreement():
  with pytest.raises(UserError, match=r"needs 4 devices, the job has 1"):
    parallel.preflight((2, 2, 1))
  with pytest.raises(UserError, match="expected 2 JAX processes but 1 joined"):
    parallel.preflight((1, 1, 1), expected_processes=2)


def test_distributed_is_off_without_a_multi_host_environment(monkeypatch):
  for key in parallel._ENV_KEYS:  # pylint: disable=protected-access
    monkeypatch.delenv(key, raising=False)
  assert not parallel.initialize_distributed("auto")
  with pytest.raises(UserError, match="distributed must be"):
    parallel.initialize_distributed("maybe")


def _step_outputs(shape):
  """(loss, updated experts) of two LoRA train steps on a micro model over a mesh of `shape`."""
  from drex import testing  # pylint: disable=g-import-not-at-top
  from drex.adapters import lora
  from drex.adapters import routers
  from drex.models import generation, vlm
  from drex.training import trainer

  n = int(np.prod(shape))
  par = parallel.Parallel.create(shape, devices=jax.devices()[:n])
  cfg = testing.micro_config()
  model = vlm.VLM(cfg, lora.AdapterSpec(routers.TopK(k=2)))
  b = testing.micro_batch(cfg, batch=8)
  args = (b["pixel_values"], b["input_ids"], vlm.prompt_positions(b["attention_mask"]),
          b["attention_mask"].astype(bool))
  boxed = jax.eval_shape(lambda: vlm.VLM(cfg).init(jax.random.key(0), *args))["params"]
  params = nn.unbox(vlm.VLM(cfg).init(jax.random.key(0), *args))["params"]
  e0 = testing.random_like(lora.init_experts(params, 4, lora.ALL_TARGETS, jax.random.key(1)), seed=2)
  experts = lora.stack([e0, testing.random_like(e0, seed=3)])
  router = testing.random_like(lora.init_router(experts), seed=4)
  optimizer = trainer.make_optimizer(trainer.OptimConfig(10, 1e-2, 1))
  base_sh = par.tree_shardings(boxed)
  frozen = {"params": par.put(params, base_sh), "router": par.put(router, lora.adapter_shardings(par, boxed, router))}
  ex_sh = lora.adapter_shardings(par, boxed, experts)
  shardings = trainer.state_shardings(optimizer, ex_sh, par, experts)
  step = trainer.compile_step(model, "experts", optimizer, shardings,
                              {"params": base_sh, "router": frozen["router"] and lora.adapter_shardings(par, boxed, router)},
                              par)
  state = trainer.create_state(par.put(experts, ex_sh), optimizer, shardings)
  losses = []
  for _ in range(2):
    with par.context():
      state, metrics = step(state, frozen, par.global_batch(b))
    losses.append(float(metrics["loss"]))
  return losses, jax.tree_util.tree_map(np.asarray, state.params)


def main():
  out = {}
  ref_losses, ref_params = _step_outputs((1, 1, 1))
  for shape in MESHES:
    losses, params = _step_outputs(shape)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                           jax.tree_util.tree_leaves(ref_params)))
    out["x".join(map(str, shape))] = {"loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                                      "param_diff": diff}
  print("RESULT " + json.dumps(out))


def test_sharded_step_equals_single_device_step():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
  assert set(result) == {"8x1x1", "2x2x2", "1x4x2"}
  for mesh, r in result.items():
    assert r["loss_diff"] <= 1e-5 and r["param_diff"] <= 1e-5, (mesh, r)


def test_rules_map_logical_axes_to_the_mesh():
  par = parallel.Parallel.create((1, 1, 1))
  assert par.sharding(("embed", "mlp")).spec == P("fsdp", "tensor")
  assert par.sharding(("activation_batch",)).spec == P(("data", "fsdp"))
  # activations have names of their own: a batch's features stay whole where the parameters' are split
  assert par.sharding(("activation_batch", "activation_length", "activation_embed")).spec == P(("data", "fsdp"), None, None)
  assert par.sharding(("expert", "embed", "rank")).spec == P(None, "fsdp", None)


if __name__ == "__main__":
  jax.config.update("jax_default_matmul_precision", "highest")
  main()
