"""LoRA experts on the LLM's linears, kept apart from the frozen base.

Three pytrees (see DESIGN §2), each mirroring the module paths of the base params:

* base    `params`:  {..., 'q_proj': {'kernel': [d_in, d_out], ('bias')}, ...}
* experts `experts`: {..., 'q_proj': {'lora_a': [E, d_in, r], 'lora_b': [E, r, d_out]}, ...}
* router  `router`:  {..., 'q_proj': {'v': [E, d_in]}, ...}   (+ 'null_v': [d_in] when used)

`AdaptedDense` keeps the base parameter path of a plain dense layer (so base checkpoints load as
they are) and adds the routed expert mixture when the `experts` collection holds an entry for it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drex.adapters import mixture
from drex.adapters import routing as routing_lib

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLM_SCOPE = "language_model"


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """How adapted linears use the experts they are given."""

  routing: routing_lib.Routing = routing_lib.Routing()
  lora_alpha: float = 16.0
  rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
  kernel: str = "xla"  # adapter-mixture implementation: 'xla' | 'pallas' | 'auto'

  def scale(self, rank: int) -> float:
    return self.lora_alpha / (math.sqrt(rank) if self.rslora else rank)


class AdaptedDense(nn.Module):
  """y = x @ kernel (+ bias) + routed mixture of the LoRA experts found for this layer.

  Attributes:
    features: d_out.
    axes: logical axis names of the kernel (in, out).
    use_bias: add a bias (Qwen2 q/k/v).
    adapter: routing and scaling of the experts.
  """

  features: int
  axes: tuple[str, str]
  use_bias: bool = False
  adapter: AdapterSpec = AdapterSpec()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., d_in] -> [..., features]."""
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    x = x.astype(self.dtype)
    y = jnp.dot(x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "inputs", x)  # for routing analysis (null-expert prototypes)
    if self.has_variable("experts", "lora_a"):
      a = self.get_variable("experts", "lora_a")
      b = self.get_variable("experts", "lora_b")
      router = {name: self.get_variable("router", name) for name in ("v", "null_v", "v_stats", "null_stats")
                if self.has_variable("router", name)}
      gates = routing_lib.compute_gates(self.adapter.routing, x, a.shape[0], a=a, b=b, **router)
      self.sow("intermediates", "gates", gates)
      route = self.adapter.routing
      y = y + mixture.adapter_mixture(x, a.astype(self.dtype), b.astype(self.dtype), gates,
                                      self.adapter.scale(a.shape[-1]), kernel=self.adapter.kernel,
                                      top_k=route.k if route.kind in ("topk", "arrow") else None)
    return y


# ----------------------------------------------------------------------------- tree functions


def adapted_kernels(base_params: dict, target_modules: Sequence[str]) -> dict[tuple[str, ...], jax.Array]:
  """Paths (module path, without 'kernel') -> kernel of every LLM linear named in target_modules."""
  unknown = set(target_modules) - set(ALL_TARGETS)
  if unknown:
    raise ValueError(f"unknown LoRA target_modules {sorted(unknown)}; choose from {ALL_TARGETS}")
  flat = flax.traverse_util.flatten_dict(nn.unbox(base_params))
  found = {path[:-1]: leaf for path, leaf in flat.items()
           if path[-1] == "kernel" and len(path) >= 2 and path[-2] in target_modules and LLM_SCOPE in path}
  if not found:
    raise ValueError(f"no LLM linear matches target_modules {list(target_modules)}")
  return found


def init_experts(base_params: dict, rank: int, target_modules: Sequence[str], rng: jax.Array,
                 num_experts: int = 1, dtype=jnp.float32) -> dict:
  """A fresh expert bank: A Kaiming-uniform (PEFT's bound 1/sqrt(d_in)), B zeros.

  Returns the `experts` tree with A: [num_experts, d_in, rank], B: [num_experts, rank, d_out].
  """
  if rank < 1:
    raise ValueError(f"LoRA rank r must be >= 1, got {rank}")
  kernels = adapted_kernels(base_params, target_modules)
  keys = jax.random.split(rng, len(kernels))
  tree = {}
  for key, (path, kernel) in zip(keys, sorted(kernels.items())):
    d_in, d_out = kernel.shape
    bound = 1.0 / math.sqrt(d_in)
    tree[path + ("lora_a",)] = jax.random.uniform(key, (num_experts, d_in, rank), dtype, -bound, bound)
    tree[path + ("lora_b",)] = jnp.zeros((num_experts, rank, d_out), dtype)
  return flax.traverse_util.unflatten_dict(tree)


def init_router(experts: dict, with_stats: bool = False) -> dict:
  """Zero routing vectors (sigmoid gate starts at 0.5), one per expert per adapted linear: v [E, d_in];
  with_stats adds v_stats [E, 2] (score mean 0, std 1: the identity calibration)."""
  def make(m):
    e, d_in = m["lora_a"].shape[:2]
    out = {"v": jnp.zeros((e, d_in), m["lora_a"].dtype)}
    if with_stats:
      out["v_stats"] = jnp.tile(jnp.asarray([[0.0, 1.0]], jnp.float32), (e, 1))
    return out
  return _map_modules(experts, make)


def stack(trees: Iterable[dict]) -> dict:
  """Concatenate expert (or router) trees along the expert axis, in the given order."""
  trees = list(trees)
  if not trees:
    raise ValueError("no expert trees to stack")
  structure = jax.tree_util.tree_structure(trees[0])
  for i, t in enumerate(trees[1:], 1):
    if jax.tree_util.tree_structure(t) != structure:
      raise ValueError(f"expert tree {i} adapts different layers than expert tree 0; they cannot be stacked")
  return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def take(tree: dict, index: int) -> dict:
  """The single-expert slice `index` of a stacked tree (keeps the expert axis, size 1)."""
  return jax.tree_util.tree_map(lambda x: x[index:index + 1], tree)


def num_experts(experts: dict) -> int:
  return int(jax.tree_util.tree_leaves(experts)[0].shape[0])


def rank_of(experts: dict) -> int:
  return int(_modules(experts)[0][1]["lora_a"].shape[-1])


def merge_into_base(base_params: dict, experts: dict, index: int, scale: float) -> dict:
  """Base params with expert `index` folded in: kernel + scale * A_e @ B_e (for export / serving)."""
  flat_base = flax.traverse_util.flatten_dict(base_params)
  for path, module in _modules(experts):
    delta = scale * jnp.asarray(module["lora_a"][index], jnp.float32) @ jnp.asarray(module["lora_b"][index], jnp.float32)
    kernel = flat_base[path + ("kernel",)]
    flat_base[path + ("kernel",)] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return flax.traverse_util.unflatten_dict(flat_base)


def merge_trees(*trees: dict) -> dict:
  """Union of nested dicts (later trees win on equal paths), e.g. routing vectors + null prototypes."""
  flat = {}
  for tree in trees:
    flat.update(flax.traverse_util.flatten_dict(tree))
  return flax.traverse_util.unflatten_dict(flat)


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _modules(tree: dict):
  """(module path, {leaf name: array}) for each adapted module in an experts/router tree."""
  grouped: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, leaf in flax.traverse_util.flatten_dict(tree).items():
    grouped.setdefault(path[:-1], {})[path[-1]] = leaf
  return sorted(grouped.items())


def _map_modules(tree: dict, fn: Callable[[dict], dict]) -> dict:
  flat = {}
  for path, module in _modules(tree):
    for name, leaf in fn(module).items():
      flat[path + (name,)] = leaf
  return flax.traverse_util.unflatten_dict(flat)
