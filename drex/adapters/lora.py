"""LoRA experts on the LLM's linears, kept apart from the frozen base.

Three pytrees (see the README's "What a run produces"), each mirroring the module paths of the base params:

* base    `params`:  {..., 'q_proj': {'kernel': [d_in, d_out], ('bias')}, ...}
* experts `experts`: {..., 'q_proj': {'lora_a': [E, d_in, r], 'lora_b': [E, r, d_out]}, ...}
* router  `router`:  {..., 'q_proj': {'v': [E, d_in], ...}, ...}   (the leaves of drex.adapters.routers)

`AdapterSpec` is the linear factory the model is built with (drex.models.layers.LinearFactory): its
`AdaptedLinear` is the model's `Linear` (same param paths, so base checkpoints load as they are) plus the
routed expert mixture, added when the `experts` collection holds an entry for that linear. The model
knows nothing of adapters; this module depends on drex.models, never the reverse.
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
from drex.adapters import routers
from drex.models.layers import Linear, LinearFactory

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLM_SCOPE = "language_model"
# Logical axes of the expert leaves, from the (in, out) axes of the kernel they adapt.
EXPERT_AXES = {"lora_a": lambda d_in, d_out: ("expert", d_in, "rank"),
               "lora_b": lambda d_in, d_out: ("expert", "rank", d_out)}


@dataclasses.dataclass(frozen=True)
class AdapterSpec(LinearFactory):
  """How adapted linears use the experts they are given: the router, the LoRA scale, the mixture kernel."""

  router: routers.Router = routers.Single()
  lora_alpha: float = 16.0
  rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
  kernel: str = "xla"  # adapter-mixture implementation: 'xla' | 'pallas' | 'auto'

  def scale(self, rank: int) -> float:
    return self.lora_alpha / (math.sqrt(rank) if self.rslora else rank)

  def prepare(self, model, variables, embeds, positions, kv_mask):
    return self.router.prepare(model, variables, embeds, positions, kv_mask)

  def __call__(self, features, axes, use_bias, dtype, param_dtype, name):
    return AdaptedLinear(features, axes, use_bias, dtype, param_dtype, spec=self, name=name)


class AdaptedLinear(Linear):
  """y = x @ kernel (+ bias) + the routed mixture of the LoRA experts found for this linear.

  Sows its (cast) input as `intermediates/inputs` and its gates as `intermediates/gates` when asked, for
  routing statistics and profiles. A per-sequence router's choice is made from the real tokens of x; when
  the `routing_state` collection is mutable (a generation's prefill) it is kept there as `chosen` [B, ...],
  and when that collection is given but not mutable (the decoded tokens) the kept choice is used.
  """

  spec: AdapterSpec = AdapterSpec()

  @nn.compact
  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """x: [..., d_in] (token_mask: [B, L], the real tokens of x [B, L, d_in]) -> [..., features]."""
    y = super().__call__(x)
    x = x.astype(self.dtype)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "inputs", x)  # for routing analysis (null-expert prototypes)
    if self.has_variable("experts", "lora_a"):
      a = self.get_variable("experts", "lora_a")
      b = self.get_variable("experts", "lora_b")
      variables = {name: self.get_variable("router", name) for name in routers.leaves()
                   if self.has_variable("router", name)}
      experts, router = {"lora_a": a, "lora_b": b}, self.spec.router
      if router.per_sequence:
        if self.has_variable("routing_state", "chosen") and not self.is_mutable_collection("routing_state"):
          chosen = self.get_variable("routing_state", "chosen")
        else:
          chosen = router.choose(x, token_mask, a.shape[0], variables, experts)
          if self.is_mutable_collection("routing_state"):
            self.put_variable("routing_state", "chosen", chosen)
        gates = router.gates(x, a.shape[0], variables, experts, chosen)
        self.sow("intermediates", "gates", gates)
        used = jax.lax.top_k(chosen[:, :a.shape[0]], min(router.per_sequence_experts, a.shape[0]))[1]  # [B, c]
        return y + mixture.sequence_mixture(x, a.astype(self.dtype), b.astype(self.dtype), gates, used,
                                            self.spec.scale(a.shape[-1]))
      gates = router.gates(x, a.shape[0], variables, experts)
      self.sow("intermediates", "gates", gates)
      y = y + mixture.adapter_mixture(x, a.astype(self.dtype), b.astype(self.dtype), gates,
                                      self.spec.scale(a.shape[-1]), kernel=self.spec.kernel,
                                      top_k=self.spec.router.top_k)
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


def init_router(experts: dict, names: Sequence[str] = ("v",)) -> dict:
  """The `router` leaves `names` (drex.adapters.routers) at their initial values, per expert per adapted linear:
  'v' zero routing vectors [E, d_in] (a sigmoid gate starts at 0.5); 'v_stats' [E, 2] the identity calibration."""
  known = routers.leaves()

  def make(m):
    e, d_in = m["lora_a"].shape[:2]
    return {name: known[name].init(e, d_in, m["lora_a"].dtype) for name in names}

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


def adapter_shardings(parallel, base_boxed_abstract: Any, tree: Any) -> Any:
  """NamedShardings of an experts tree (lora_a [E, in, r], lora_b [E, r, out]) or router tree (the leaves of
  drex.adapters.routers) on `parallel`'s mesh, from the logical axes of the base kernel each one adapts."""
  flat = flax.traverse_util.flatten_dict(base_boxed_abstract,
                                         is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
  kernels = {p[:-1]: leaf.names for p, leaf in flat.items()
             if p[-1] == "kernel" and isinstance(leaf, nn.LogicallyPartitioned)}
  logical = {**EXPERT_AXES, **{name: (lambda d_in, d_out, leaf=leaf: leaf.axes(d_in))
                               for name, leaf in routers.leaves().items()}}
  out = {}
  for path in flax.traverse_util.flatten_dict(tree):
    names = kernels.get(path[:-1])
    if names is None:
      raise ValueError(f"adapter entry {'/'.join(path)} does not match any base linear")
    if path[-1] not in logical:
      raise ValueError(f"adapter entry {'/'.join(path)}: no expert or registered router has a leaf {path[-1]!r}")
    out[path] = parallel.sharding(logical[path[-1]](*names))
  return flax.traverse_util.unflatten_dict(out)


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
