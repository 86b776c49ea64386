"""Routers: each kind is one class in one registry, producing per-token routing weights `gates [..., E]`
over the E stacked experts of an adapted linear.

A router class says, in one place:
  * `gates(x, num_experts, variables, experts)`: its routing weights;
  * `LEAVES`: the variables of the `router` collection it defines (name -> logical axes from the input axis
    of the linear they belong to, and their initial value where one exists), and `reads()`: those it uses;
  * `OPTIONS`: the `config.router` fields it reads (default and a one-line comment), `from_config` and
    `check` (the config validation) for a router that routes at inference time (`INFERENCE = True`);
  * `top_k`: the experts a token uses, when known (the mixture kernel's choice).
`config.router`, `lora.adapter_shardings`, `config.validate`, `drex.evaluate`'s overrides and the driver
read the registry; adding a kind is one class decorated with `@register` (tests/test_end_to_end.py registers one
from the test file). Every inference router honours an `allowed` [B, E] variable (`restrict`): a sequence's
restriction to some experts (drex.serving).

Kinds:
* `single(e)`: one-hot on expert e (expert training, oracle evaluation, plain LoRA use).
* `sigmoid_gate(e)`: gates[t, e] = sigmoid(x_t . v_e) on expert e only (router training).
* `topk` (the method; PHATGOOSE routing, adapted to VLMs by arXiv 2511.01831): standardize the token and
  every routing vector over features (LayerNorm without affine, eps 1e-5), score
  `x_hat . v_hat / sqrt(d_in) / temperature`, keep the top-k scores and softmax over them. Option `level`:
  'token' (every token, as published), 'sequence' (each sequence's prompt tokens' scores averaged at each
  adapted linear, top-k of those; the answer tokens use the same mixture), 'hybrid' (the sequence level keeps
  `candidates` experts, each token mixes its top-k of them). With
  `null_expert` the base model takes part as extra experts with zero output, scored against prototype
  vectors (`null_v`, one per kind of general input). With `calibrated` each score is standardized by the
  mean and std it has on the data its vector stands for (`v_stats`, `null_stats`; drex.adapters.prototypes).
* `arrow`: training-free; prototype of expert e = top left-singular vector of A_e @ B_e, score |x . p_e|,
  top-k, softmax.
* `dense(weights)`: fixed mixture weights for every token (from the config: a uniform merge).
* `identify` (drex.adapters.identify): task identification, one expert (or the base) per sequence. Before the pass, the prompts go
  through the base's first `identify_layers` decoder layers; at their `q_proj` inputs each prompt's mean
  standardized token is scored by each class's linear discriminant (`id_w`, `id_b`: a class is a task, or a
  foundation-suite member standing for the base; class means and a shared covariance, each class's
  statistics from its own prompts only, drex.adapters.prototypes); the best class summed over the layers
  picks the expert that serves every token of the sequence (none for a base class).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from drex.errors import UserError

STANDARDIZE_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Leaf:
  """A variable of the `router` collection, one row per expert: [E, ...]."""

  axes: Callable[[Any], tuple]  # logical axes, from the input axis name of the linear it belongs to
  init: Callable[[int, int, Any], jax.Array] | None = None  # (E, d_in, dtype) -> initial value; None: from data


V = Leaf(lambda d_in: ("expert", d_in), lambda e, d_in, dtype: jnp.zeros((e, d_in), dtype))
STATS = Leaf(lambda d_in: ("expert", None), lambda e, d_in, dtype: jnp.tile(jnp.asarray([[0.0, 1.0]], jnp.float32),
                                                                          (e, 1)))


@dataclasses.dataclass(frozen=True)
class Router:
  """Base class. Instances are hashable (models holding them are static under jit)."""

  KIND: ClassVar[str] = ""
  INFERENCE: ClassVar[bool] = False  # selectable as config.router.kind
  PER_SEQUENCE: ClassVar[bool] = False  # the class chooses once per sequence (`choose`), from its prompt
  LEAVES: ClassVar[dict[str, Leaf]] = {}
  OPTIONS: ClassVar[dict[str, tuple[Any, str]]] = {}  # config.router field -> (default, one-line comment)

  def gates(self, x: jax.Array, num_experts: int, variables: dict[str, jax.Array],
            experts: dict[str, jax.Array], chosen: jax.Array | None = None) -> jax.Array:
    """x: [..., d_in]; variables: this linear's `router` leaves; experts: {'lora_a', 'lora_b'}; chosen: a
    per-sequence router's choice (from `choose`). -> [..., E] float32."""
    raise NotImplementedError

  def choose(self, x: jax.Array, token_mask: jax.Array | None, num_experts: int, variables: dict[str, jax.Array],
             experts: dict[str, jax.Array]) -> jax.Array:
    """A per-sequence router's choice for each sequence of x [B, L, d_in] from its real tokens (token_mask
    [B, L]); the adapted linear keeps it for the sequence's later (decoded) tokens."""
    raise NotImplementedError(f"router {self.KIND!r} routes each token, it does not choose per sequence")

  def reads(self) -> tuple[str, ...]:
    """The `router` leaves this router needs."""
    return ()

  def prepare(self, model: Any, variables: dict, embeds: jax.Array, positions: jax.Array,
              kv_mask: jax.Array) -> dict:
    """The variables ({'params', 'experts', 'router'}) of a pass over these prompts (embeddings [B, L, d],
    positions, kv_mask [B, L]: real tokens), with what this router makes from them before the pass
    (drex.models.layers.LinearFactory.prepare; drex.models.vlm.prepared)."""
    del model, embeds, positions, kv_mask
    return variables

  @property
  def per_sequence(self) -> bool:
    """Whether this router chooses once per sequence (a wrapper may answer for the router it wraps)."""
    return self.PER_SEQUENCE

  @property
  def top_k(self) -> int | None:
    return None

  @property
  def includes_base(self) -> bool:
    """Whether the base itself takes part as a zero-output expert (its weight is 1 - sum of the gates)."""
    return False

  @property
  def per_sequence_experts(self) -> int:
    """A per-sequence router: how many experts a sequence can use at most (the mixture gathers only those:
    `choose` gives them the largest values)."""
    raise NotImplementedError

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, num_experts: int) -> "Router":
    raise NotImplementedError(f"router {cls.KIND!r} is not configurable")

  @classmethod
  def check(cls, c: ml_collections.ConfigDict) -> None:
    """Validate the config.router fields this router reads; raise a one-line UserError."""


REGISTRY: dict[str, type[Router]] = {}


def register(cls: type[Router]) -> type[Router]:
  """Class decorator: add a router kind (its options and leaves must agree with those already registered)."""
  for name, (default, _) in cls.OPTIONS.items():
    for other in REGISTRY.values():
      if name in other.OPTIONS and other.OPTIONS[name][0] != default:
        raise ValueError(f"router option {name!r} of {cls.KIND!r} has default {default!r}, {other.KIND!r} has "
                         f"{other.OPTIONS[name][0]!r}")
  REGISTRY[cls.KIND] = cls
  return cls


def get(kind: str) -> type[Router]:
  if kind not in REGISTRY:
    raise UserError(f"unknown router {kind!r}; use one of {', '.join(REGISTRY)}")
  return REGISTRY[kind]


def inference_kinds() -> tuple[str, ...]:
  return tuple(k for k, cls in REGISTRY.items() if cls.INFERENCE)


# Variables that are not any router kind's own but routers honour (`allowed`: per-sequence restriction to some
# experts [B, E]) or that wrappers outside this module add (drex.serving): name -> Leaf.
EXTRA_LEAVES: dict[str, Leaf] = {"allowed": Leaf(lambda d_in: ("activation_batch", None))}


def leaves() -> dict[str, Leaf]:
  """Every `router` leaf a registered router, or a wrapper (EXTRA_LEAVES), defines."""
  out: dict[str, Leaf] = dict(EXTRA_LEAVES)
  for cls in REGISTRY.values():
    out.update(cls.LEAVES)
  return out


def restrict(scores: jax.Array, variables: dict) -> jax.Array:
  """Scores [B, L, E (+ K null)] with the experts a sequence may not use (`allowed` [B, E] = 0) at -inf; the
  null prototypes stay allowed. Unchanged without an `allowed` variable."""
  allowed = variables.get("allowed")
  if allowed is None:
    return scores
  allowed = jnp.pad(allowed, ((0, 0), (0, scores.shape[-1] - allowed.shape[-1])), constant_values=1)
  return jnp.where(allowed[:, None, :] > 0, scores, -jnp.inf)


def config_defaults(kind: str) -> ml_collections.ConfigDict:
  """config.router: `kind` plus every registered inference router's options at their defaults."""
  c = ml_collections.ConfigDict({"kind": kind})
  for cls in REGISTRY.values():
    for name, (default, _) in cls.OPTIONS.items():
      c[name] = default
  return c


def from_config(c: ml_collections.ConfigDict, num_experts: int) -> Router:
  """The router the 'routing' method evaluates with, over `num_experts` experts (config.router)."""
  cls = get(c.kind)
  if not cls.INFERENCE:
    raise UserError(f"router {c.kind!r} is not an inference router; use one of {', '.join(inference_kinds())}")
  return cls.from_config(c, num_experts)


def check(c: ml_collections.ConfigDict) -> None:
  if c.kind not in inference_kinds():
    raise UserError(f"config.router.kind must be one of {', '.join(inference_kinds())}, got {c.kind!r}")
  get(c.kind).check(c)


# ----------------------------------------------------------------------------- shared math


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


def _require(variables: dict, name: str, kind: str) -> jax.Array:
  if name not in variables:
    raise ValueError(f"router {kind!r} needs the router variable {name!r}, which is not loaded")
  return variables[name]


def _check_expert(kind: str, expert: int, num_experts: int) -> None:
  if not 0 <= expert < num_experts:
    raise ValueError(f"router {kind} picks expert {expert} but only {num_experts} are loaded")


def _check_k_temperature(c: ml_collections.ConfigDict) -> None:
  if c.k < 1:
    raise UserError(f"config.router.k must be >= 1, got {c.k}")
  if c.temperature <= 0:
    raise UserError(f"config.router.temperature must be > 0, got {c.temperature}")


# ----------------------------------------------------------------------------- kinds


@register
@dataclasses.dataclass(frozen=True)
class Single(Router):
  """One-hot on one expert."""

  KIND: ClassVar[str] = "single"
  expert: int = 0

  def gates(self, x, num_experts, variables, experts, chosen=None):
    _check_expert(self.KIND, self.expert, num_experts)
    return jnp.broadcast_to(jax.nn.one_hot(self.expert, num_experts, dtype=jnp.float32), x.shape[:-1] + (num_experts,))


@register
@dataclasses.dataclass(frozen=True)
class SigmoidGate(Router):
  """sigmoid(x . v_e) on one expert: how its routing vector is trained (PHATGOOSE), from v = 0."""

  KIND: ClassVar[str] = "sigmoid_gate"
  LEAVES: ClassVar[dict[str, Leaf]] = {"v": V, "v_stats": STATS}  # v_stats: calibration (computed after training)
  expert: int = 0

  def gates(self, x, num_experts, variables, experts, chosen=None):
    _check_expert(self.KIND, self.expert, num_experts)
    v = _require(variables, "v", self.KIND)
    logit = jnp.einsum("...d,d->...", x.astype(jnp.float32), v[self.expert].astype(jnp.float32))
    return jax.nn.sigmoid(logit)[..., None] * jax.nn.one_hot(self.expert, num_experts, dtype=jnp.float32)

  def reads(self):
    return ("v",)


@register
@dataclasses.dataclass(frozen=True)
class TopK(Router):
  """The method: standardized similarity to the routing vectors, top-k, softmax (optionally with the base as
  a null expert, and per-vector calibration). `config.router.level` picks where the choice is made: each
  token (PHATGOOSE; this class), each sequence (SequenceTopK) or both (HybridTopK)."""

  KIND: ClassVar[str] = "topk"
  INFERENCE: ClassVar[bool] = True
  LEAVES: ClassVar[dict[str, Leaf]] = {"null_v": Leaf(V.axes), "null_stats": Leaf(STATS.axes)}  # made from data
  OPTIONS: ClassVar[dict[str, tuple[Any, str]]] = {
      "k": (2, "experts kept per token"),
      "temperature": (2.0, "softmax temperature of the routing scores (PHATGOOSE: 1; 2 keeps the base's foundation "
                           "skills within 2 pts on the embedded default's validation split, routing_subsets_cpu.md)"),
      "null_expert": (False, "the base competes as a zero-output expert (prototype of base activations)"),
      "null_sample": (512, "unlabeled prompts per prototype / calibration statistic (null expert, calibration)"),
      "calibrate": (False, "standardize each vector's scores by their mean/std on its own data"),
      "level": ("hybrid", "where topk chooses: 'token' (PHATGOOSE, every token), 'sequence' (once per sequence from "
                          "its prompt, kept for its answer), 'hybrid' (the sequence picks candidates, its tokens mix "
                          "them; chosen on the validation split, routing_levels_cpu.md)"),
      "candidates": (2, "hybrid: experts the sequence level keeps for the tokens to mix"),
      "pooling": ("mean", "sequence / hybrid: a sequence's score, the 'mean' over its prompt tokens or the score of "
                          "its 'last' token (where the first answer token is predicted)"),
  }
  LEVELS: ClassVar[tuple[str, ...]] = ("token", "sequence", "hybrid")
  k: int = 2
  temperature: float = 1.0
  null_expert: bool = False
  calibrated: bool = False
  pooling: str = "mean"

  def scores(self, x: jax.Array, variables: dict) -> jax.Array:
    """[..., E (+ K null prototypes)] routing scores of tokens x [..., d_in], restricted to the `allowed` experts
    when the variables hold such a mask (x [B, L, d_in] then)."""
    return restrict(self._scores(x, variables), variables)

  def _scores(self, x: jax.Array, variables: dict) -> jax.Array:
    v = _require(variables, "v", self.KIND)
    vectors, stats = v, variables.get("v_stats")
    if self.null_expert:
      null_v = _require(variables, "null_v", "topk with null_expert")
      vectors = jnp.concatenate([v, null_v.reshape(-1, v.shape[-1])], 0)
      null_stats = variables.get("null_stats")
      stats = None if stats is None or null_stats is None else jnp.concatenate([stats, null_stats], 0)
    if self.calibrated:
      if stats is None:
        raise ValueError("router 'topk with calibrated' needs score statistics 'v_stats' (and 'null_stats'), "
                         "which are not loaded")
      raw = phatgoose_scores(x, vectors, 1.0)
      return (raw - stats[:, 0]) / (stats[:, 1] * self.temperature)
    return phatgoose_scores(x, vectors, self.temperature)

  def sequence_scores(self, x: jax.Array, token_mask: jax.Array | None, variables: dict) -> jax.Array:
    """[B, E (+ K)]: each sequence's scores, the mean over its real tokens of x [B, L, d_in] (then restricted to
    the `allowed` experts: a restriction's -inf never meets a padding token's zero weight)."""
    if self.pooling == "last":  # prompts are left-padded: the last position is the prompt's last token
      return restrict(self._scores(x[:, -1:], variables), variables)[:, 0]
    scores = self._scores(x, variables)
    weight = jnp.ones(x.shape[:2], jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    pooled = (scores * weight[..., None]).sum(1) / jnp.maximum(weight.sum(1), 1.0)[:, None]
    return restrict(pooled[:, None, :], variables)[:, 0]

  def gates(self, x, num_experts, variables, experts, chosen=None):
    return topk_softmax(self.scores(x, variables), self.k)[..., :num_experts]

  def reads(self):
    return ("v",) + (("null_v", "null_stats") if self.null_expert else ()) + (("v_stats",) if self.calibrated else ())

  @property
  def top_k(self):
    return self.k

  @property
  def includes_base(self):
    return self.null_expert

  @classmethod
  def from_config(cls, c, num_experts):
    kind = {"token": TopK, "sequence": SequenceTopK, "hybrid": HybridTopK}[c.level]
    extra = {"candidates": c.candidates} if kind is HybridTopK else {}
    if kind is not TopK:
      extra["pooling"] = c.pooling
    return kind(k=c.k, temperature=c.temperature, null_expert=c.null_expert, calibrated=c.calibrate, **extra)

  @classmethod
  def check(cls, c):
    _check_k_temperature(c)
    if c.level not in cls.LEVELS:
      raise UserError(f"config.router.level must be one of {cls.LEVELS}, got {c.level!r}")
    if c.candidates < 1:
      raise UserError(f"config.router.candidates must be >= 1, got {c.candidates}")
    if c.pooling not in ("mean", "last"):
      raise UserError(f"config.router.pooling must be 'mean' or 'last', got {c.pooling!r}")


@dataclasses.dataclass(frozen=True)
class SequenceTopK(TopK):
  """topk once per sequence: its prompt's tokens scored and averaged at each adapted linear, the top-k of those
  sequence scores softmaxed; every token of the sequence (its answer too) uses that mixture."""

  PER_SEQUENCE: ClassVar[bool] = True

  @property
  def per_sequence_experts(self):
    return self.k

  def choose(self, x, token_mask, num_experts, variables, experts):
    return topk_softmax(self.sequence_scores(x, token_mask, variables), self.k)  # [B, E (+ K)]

  def gates(self, x, num_experts, variables, experts, chosen=None):
    if chosen is None:
      raise ValueError("the sequence-level router needs its per-sequence choice")
    return jnp.broadcast_to(chosen[:, None, :num_experts], x.shape[:-1] + (num_experts,))


@dataclasses.dataclass(frozen=True)
class HybridTopK(TopK):
  """The sequence picks `candidates` experts (top pooled prompt scores, `choose`: a [B, E (+ K)] 0/1 mask kept
  for the sequence's decoded tokens); each token then mixes the top-k of those candidates by its own scores
  (softmax at `temperature`); candidates covering every expert give the token level."""

  PER_SEQUENCE: ClassVar[bool] = True
  candidates: int = 2

  @property
  def per_sequence_experts(self):
    return self.candidates

  def choose(self, x, token_mask, num_experts, variables, experts):
    scores = self.sequence_scores(x, token_mask, variables)
    _, index = jax.lax.top_k(scores, min(self.candidates, scores.shape[-1]))
    return jax.nn.one_hot(index, scores.shape[-1], dtype=jnp.float32).sum(-2)  # [B, E (+ K)] 0/1

  def gates(self, x, num_experts, variables, experts, chosen=None):
    if chosen is None:
      raise ValueError("the hybrid router needs its per-sequence candidates")
    scores = jnp.where(chosen[:, None, :] > 0, self.scores(x, variables), -jnp.inf)
    return topk_softmax(scores, self.k)[..., :num_experts]


@register
@dataclasses.dataclass(frozen=True)
class Arrow(Router):
  """Training-free: each expert's prototype is the top singular vector of its A @ B."""

  KIND: ClassVar[str] = "arrow"
  INFERENCE: ClassVar[bool] = True
  OPTIONS: ClassVar[dict[str, tuple[Any, str]]] = {"k": TopK.OPTIONS["k"], "temperature": TopK.OPTIONS["temperature"]}
  k: int = 2
  temperature: float = 1.0

  def gates(self, x, num_experts, variables, experts, chosen=None):
    protos = arrow_prototypes(experts["lora_a"], experts["lora_b"])
    scores = jnp.abs(jnp.einsum("...d,ed->...e", x.astype(jnp.float32), protos)) / self.temperature
    return topk_softmax(restrict(scores, variables), self.k)

  @property
  def top_k(self):
    return self.k

  @classmethod
  def from_config(cls, c, num_experts):
    return cls(k=c.k, temperature=c.temperature)

  @classmethod
  def check(cls, c):
    _check_k_temperature(c)


@register
@dataclasses.dataclass(frozen=True)
class Dense(Router):
  """Fixed weights for every token (from the config: a uniform merge of all experts)."""

  KIND: ClassVar[str] = "dense"
  INFERENCE: ClassVar[bool] = True
  weights: tuple[float, ...] = ()

  def gates(self, x, num_experts, variables, experts, chosen=None):
    if len(self.weights) != num_experts:
      raise ValueError(f"dense router has {len(self.weights)} weights for {num_experts} experts")
    weights = jnp.broadcast_to(jnp.asarray(self.weights, jnp.float32), x.shape[:-1] + (num_experts,))
    if "allowed" in variables:  # renormalized over the allowed experts
      weights = weights * variables["allowed"][:, None, :]
      weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-12)
    return weights

  @classmethod
  def from_config(cls, c, num_experts):
    return cls((1.0 / num_experts,) * num_experts)
