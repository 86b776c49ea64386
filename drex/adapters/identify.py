"""The `identify` router: task identification, one expert (or the base) per sequence (drex.adapters.routers'
module docstring; the statistics it reads: drex.adapters.prototypes, drex.routing_statistics)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax
import jax
import jax.numpy as jnp

from drex.adapters import routers
from drex.errors import UserError


def layer_index(path: tuple[str, ...]) -> int:
  """The decoder layer of a linear's path ('language_model', 'layers_3', ...) -> 3."""
  return next(int(part[len("layers_"):]) for part in path if part.startswith("layers_"))


def pooled_standardized(x: jax.Array, token_mask: jax.Array | None) -> jax.Array:
  """Each sequence's mean standardized input over its real tokens: x [B, L, d_in], token_mask [B, L] -> [B, d_in]."""
  weight = jnp.ones(x.shape[:2], jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
  return jnp.einsum("bl,bld->bd", weight, routers.standardize(x)) / jnp.maximum(weight.sum(1), 1.0)[:, None]


@routers.register
@dataclasses.dataclass(frozen=True)
class Identify(routers.Router):
  """Task identification: one expert, or the base, per sequence (module docstring). `prepare` runs the base
  over the prompts and leaves the choice as `identified` [B, E] (one-hot, zeros for a base class) in every
  adapted linear's router variables; the pass then gives that expert every token of the sequence."""

  KIND: ClassVar[str] = "identify"
  INFERENCE: ClassVar[bool] = True
  PER_SEQUENCE: ClassVar[bool] = True
  # [E + K, d_in] and [E + K, 1] at the identifying linears: the E tasks' discriminants, then the K base classes'
  # (or [B, E + K, ...]: each sequence its own, as drex.serving gives a request that names a subset of tasks).
  LEAVES: ClassVar[dict[str, routers.Leaf]] = {
      "id_w": routers.Leaf(routers.V.axes), "id_b": routers.Leaf(routers.STATS.axes),
      "identified": routers.Leaf(lambda d_in: ("activation_batch", None))}
  OPTIONS: ClassVar[dict[str, tuple[Any, str]]] = {
      "identify_layers": (2, "identify: the first decoder layers whose q_proj inputs identify a prompt's task "
                             "(the identifying pass runs only these; validation split, routing_levels_cpu.md)"),
      "identify_shrinkage": (0.1, "identify: the shared covariance shrunk this far towards its mean variance "
                                  "(validation split, routing_levels_cpu.md)"),
  }
  IDENTIFYING_MODULE: ClassVar[str] = "q_proj"  # its input is each decoder layer's normalized residual stream

  def prepare(self, model, variables, embeds, positions, kv_mask):
    leaves = flax.traverse_util.flatten_dict(variables["router"])
    depth = 1 + max((layer_index(p) for p in leaves if p[-1] == "id_w"), default=-1)
    if not depth:
      raise ValueError("router 'identify' needs the router variables 'id_w' and 'id_b', which are not loaded")
    # The base's first `depth` layers over the prompts (what the identifying linears' inputs need, no more).
    _, state = model.apply({"params": variables["params"]}, embeds, positions, kv_mask, depth=depth,
                           method="decode", mutable=["intermediates"])
    inputs = {p[:-1]: v[0] for p, v in flax.traverse_util.flatten_dict(state["intermediates"]).items()
              if p[-1] == "inputs"}
    num_experts = jax.tree.leaves(variables["experts"])[0].shape[0]
    scores, allowed = 0.0, {}
    for path, w in leaves.items():
      if path[-1] == "id_w":
        pooled = pooled_standardized(inputs[path[:-1]], kv_mask)
        bias = leaves[path[:-1] + ("id_b",)][..., 0]  # [C], or [B, C] per sequence (drex.serving's subsets)
        spec = "bd,bcd->bc" if w.ndim == 3 else "bd,cd->bc"
        scores = scores + jnp.einsum(spec, pooled, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) + bias
      elif path[-1] == "allowed":
        allowed = {"allowed": w}
    scores = routers.restrict(scores[:, None, :], allowed)[:, 0]  # a serving request's own selection of tasks
    identified = jax.nn.one_hot(jnp.argmax(scores, -1), scores.shape[-1], dtype=jnp.float32)[:, :num_experts]
    linears = {p[:-1] for p in flax.traverse_util.flatten_dict(variables["experts"])}
    router = flax.traverse_util.unflatten_dict({**leaves, **{p + ("identified",): identified for p in linears}})
    return {**variables, "router": router}

  def choose(self, x, token_mask, num_experts, variables, experts):
    if "identified" not in variables:
      raise ValueError("router 'identify' chooses in prepare (model.linear.prepare) before the forward pass")
    return variables["identified"]

  def gates(self, x, num_experts, variables, experts, chosen=None):
    if chosen is None:
      raise ValueError("router 'identify' needs its per-sequence choice")
    return jnp.broadcast_to(chosen[:, None, :num_experts], x.shape[:-1] + (num_experts,))

  def reads(self):
    return ("id_w", "id_b")

  @property
  def per_sequence_experts(self):
    return 1

  @property
  def top_k(self):
    return 1

  @property
  def includes_base(self):
    return True

  @classmethod
  def from_config(cls, c, num_experts):
    return cls()

  @classmethod
  def check(cls, c):
    if c.identify_layers < 1:
      raise UserError(f"config.router.identify_layers must be >= 1, got {c.identify_layers}")
    if not 0.0 < c.identify_shrinkage <= 1.0:
      raise UserError(f"config.router.identify_shrinkage must be in (0, 1], got {c.identify_shrinkage}")
