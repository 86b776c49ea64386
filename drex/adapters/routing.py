"""Routers: produce per-token routing weights `gates [T, E]` over the E stacked experts.

* `single(e)`: one-hot on expert e (stage A training, oracle evaluation, plain LoRA use).
* `sigmoid_gate(e)`: gates[t, e] = sigmoid(x_t . v_e) on expert e only (stage B training).
* `topk(k)`: the method (PHATGOOSE routing, adapted to VLMs by arXiv 2511.01831): standardize the
  token and every routing vector over features (LayerNorm without affine, eps 1e-5), score
  `x_hat . v_hat / sqrt(d_in) / temperature`, keep the top-k scores and softmax over them.
  With `null_expert=True` the base model takes part as extra experts with zero output, scored
  against prototype vectors (`null_v`, one per kind of general input) instead of trained ones.
  With `calibrated=True` each score is standardized by the mean and std it has on the data its
  vector stands for (`v_stats`, `null_stats`; see drex.adapters.prototypes) before the softmax, so
  trained vectors and prototypes compete on one scale.
* `arrow(k)`: training-free; prototype of expert e = top left-singular vector of A_e @ B_e,
  score |x . p_e|, top-k, softmax.
* `dense(weights)`: fixed mixture weights for every token (e.g. a uniform merge).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ROUTER_KINDS = ("single", "sigmoid_gate", "topk", "arrow", "dense")
STANDARDIZE_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Routing:
  """Which router an adapted linear uses. Hashable, so models holding it can be jit-static."""

  kind: str = "single"
  expert: int = 0  # 'single' / 'sigmoid_gate': the expert index
  k: int = 2  # 'topk' / 'arrow': experts kept per token
  temperature: float = 1.0
  null_expert: bool = False  # 'topk': the base model competes as a zero-output expert
  calibrated: bool = False  # 'topk': scores standardized per routing vector (needs v_stats / null_stats)
  weights: tuple[float, ...] = ()  # 'dense': one weight per expert

  def __post_init__(self):
    if self.kind not in ROUTER_KINDS:
      raise ValueError(f"unknown router {self.kind!r}; use one of {ROUTER_KINDS}")
    if self.k < 1:
      raise ValueError(f"router top-k must be >= 1, got {self.k}")
    if self.temperature <= 0:
      raise ValueError(f"router temperature must be > 0, got {self.temperature}")


def standardize(x: jax.Array) -> jax.Array:
  """Subtract the feature mean, divide by sqrt(biased variance + 1e-5); computed in float32."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + STANDARDIZE_EPS)


def topk_softmax(scores: jax.Array, k: int) -> jax.Array:
  """Keep the k largest scores per row and softmax over them; zeros elsewhere. [..., E] -> [..., E]."""
  num = scores.shape[-1]
  k = min(k, num)
  values, index = jax.lax.top_k(scores, k)
  weights = jax.nn.softmax(values, axis=-1)
  return jnp.einsum("...k,...ke->...e", weights, jax.nn.one_hot(index, num, dtype=weights.dtype))


def arrow_prototypes(a: jax.Array, b: jax.Array) -> jax.Array:
  """Top left-singular vector of each A_e @ B_e, without forming it. a: [E, d_in, r], b: [E, r, d_out] -> [E, d_in]."""
  q, r = jnp.linalg.qr(a.astype(jnp.float32))  # q: [E, d_in, r], r: [E, r, r]
  u, _, _ = jnp.linalg.svd(jnp.einsum("eij,ejo->eio", r, b.astype(jnp.float32)), full_matrices=False)
  return jnp.einsum("edr,er->ed", q, u[:, :, 0])


def phatgoose_scores(x: jax.Array, v: jax.Array, temperature: float) -> jax.Array:
  """Standardized similarity. x: [..., d_in], v: [E, d_in] -> [..., E] (float32)."""
  d_in = x.shape[-1]
  return jnp.einsum("...d,ed->...e", standardize(x), standardize(v)) / (jnp.sqrt(d_in) * temperature)


def compute_gates(routing: Routing, x: jax.Array, num_experts: int, *, v: jax.Array | None = None,
                  null_v: jax.Array | None = None, a: jax.Array | None = None, b: jax.Array | None = None,
                  v_stats: jax.Array | None = None, null_stats: jax.Array | None = None) -> jax.Array:
  """Routing weights for tokens x.

  Args:
    routing: the router.
    x: [..., d_in] the adapted linear's input.
    num_experts: E.
    v: [E, d_in] routing vectors ('sigmoid_gate', 'topk').
    null_v: [K, d_in] prototypes of the base model as an expert ('topk' with null_expert).
    a, b: the stacked experts ('arrow').
    v_stats, null_stats: [E, 2] / [K, 2] mean and std of each vector's raw score on its own data
      ('topk' with calibrated).

  Returns:
    [..., E] float32 gates.
  """
  lead = x.shape[:-1]
  kind = routing.kind
  if kind in ("single", "sigmoid_gate") and not 0 <= routing.expert < num_experts:
    raise ValueError(f"router {kind} picks expert {routing.expert} but only {num_experts} are loaded")
  if kind == "single":
    return jnp.broadcast_to(jax.nn.one_hot(routing.expert, num_experts, dtype=jnp.float32), lead + (num_experts,))
  if kind == "sigmoid_gate":
    _require(v, "routing vectors 'v'", kind)
    logit = jnp.einsum("...d,d->...", x.astype(jnp.float32), v[routing.expert].astype(jnp.float32))
    return jax.nn.sigmoid(logit)[..., None] * jax.nn.one_hot(routing.expert, num_experts, dtype=jnp.float32)
  if kind == "topk":
    _require(v, "routing vectors 'v'", kind)
    vectors, stats = v, v_stats
    if routing.null_expert:
      _require(null_v, "a null-expert prototype 'null_v'", "topk with null_expert")
      vectors = jnp.concatenate([v, null_v.reshape(-1, v.shape[-1])], 0)
      stats = None if v_stats is None or null_stats is None else jnp.concatenate([v_stats, null_stats], 0)
    if routing.calibrated:
      _require(stats, "score statistics 'v_stats' (and 'null_stats')", "topk with calibrated")
      raw = phatgoose_scores(x, vectors, 1.0)
      scores = (raw - stats[:, 0]) / (stats[:, 1] * routing.temperature)
    else:
      scores = phatgoose_scores(x, vectors, routing.temperature)
    return topk_softmax(scores, routing.k)[..., :num_experts]
  if kind == "arrow":
    _require(a, "expert weights", kind)
    protos = arrow_prototypes(a, b)
    scores = jnp.abs(jnp.einsum("...d,ed->...e", x.astype(jnp.float32), protos)) / routing.temperature
    return topk_softmax(scores, routing.k)
  # dense
  if len(routing.weights) != num_experts:
    raise ValueError(f"dense router has {len(routing.weights)} weights for {num_experts} experts")
  return jnp.broadcast_to(jnp.asarray(routing.weights, jnp.float32), lead + (num_experts,))


def _require(value, what: str, kind: str):
  if value is None:
    raise ValueError(f"router {kind!r} needs {what}, which are not loaded")
