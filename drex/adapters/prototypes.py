"""Statistics of the adapted linears' inputs, for routers that compare tokens with prototypes.

* The null expert (the base competing as a zero-output expert) is scored against prototypes: the
  mean standardized input of each adapted linear over unlabeled prompts of each kind of general
  input (each foundation-suite member).
* Calibration puts trained routing vectors (PHATGOOSE gates) and prototypes on one scale: for each
  vector u, the mean and standard deviation of its raw score s_u(x) = x_hat . u_hat / sqrt(d_in)
  over the tokens of the data u stands for (its task's inputs; its foundation member's inputs);
  the calibrated score (s_u(x) - mean_u) / std_u says how typical x is of u's own data.

* Task identification (router `identify`) scores each prompt's mean standardized input with linear
  discriminants: each class (a task; a foundation-suite member for the base) contributes the sufficient
  statistics of its own prompts only (`pooled_moments`: count, sum, sum of outer products), and
  `discriminants` combines them into w_c = S^-1 mu_c, b_c = -mu_c . w_c / 2 with S the class covariances'
  mean shrunk towards its mean variance (Ledoit-Wolf style).

All statistics are over real prompt tokens of base-model activations (experts with B = 0).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from drex.adapters.identify import Identify, layer_index, pooled_standardized
from drex.adapters.routers import standardize
from drex.models.vlm import VLM, model_inputs
from drex.parallel import Parallel


def input_moments(model: VLM, variables: dict, batches: Iterable[dict], parallel: Parallel,
                  vectors: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, np.ndarray]]:
  """Per adapted linear ('language_model/.../q_proj'): {'mean': mean standardized input [d_in]} and,
  with `vectors` (path -> [N, d_in]), {'score_mean', 'score_std': [N]} of the raw routing scores.

  `variables` must hold an experts tree (its inputs are sown by every adapted linear).
  """
  vectors = vectors or {}
  compiled = _input_sums(model, parallel.sharding(()))
  total: dict[str, dict[str, np.ndarray]] = {}
  count = 0.0
  for b in batches:
    mask = b["attention_mask"] * b["valid"][:, None]
    g = parallel.global_batch({"pixel_values": b["pixel_values"], "input_ids": b["input_ids"], "attention_mask": mask})
    with parallel.context():
      s, n = compiled(variables, vectors, g["pixel_values"], g["input_ids"], g["attention_mask"])
    for key, entry in s.items():
      acc = total.setdefault(key, {})
      for name, value in entry.items():
        acc[name] = acc.get(name, 0.0) + np.asarray(value, np.float64)
    count += float(n)
  out = {}
  for key, acc in total.items():
    out[key] = {"mean": (acc["x"] / count).astype(np.float32)}
    if "s" in acc:
      mean = acc["s"] / count
      out[key]["score_mean"] = mean.astype(np.float32)
      out[key]["score_std"] = np.sqrt(np.maximum(acc["s2"] / count - mean ** 2, 1e-12)).astype(np.float32)
  return out


def as_tree(per_path: dict[str, Any], leaf: str) -> dict:
  """{'a/b/c': array} -> {'a': {'b': {'c': {leaf: array}}}}."""
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")) + (leaf,): v for k, v in per_path.items()})


def by_path(tree: dict, leaf: str) -> dict[str, Any]:
  """Inverse of as_tree for one leaf name."""
  return {"/".join(p[:-1]): v for p, v in flax.traverse_util.flatten_dict(tree).items() if p[-1] == leaf}


def nest(per_path: dict[str, dict[str, Any]]) -> dict:
  """{'a/b': {leaf: array}} -> {'a': {'b': {leaf: array}}}."""
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")) + (leaf,): v
                                            for k, leaves in per_path.items() for leaf, v in leaves.items()})


def unnest(tree: dict) -> dict[str, dict[str, Any]]:
  """Inverse of nest."""
  out: dict[str, dict[str, Any]] = {}
  for p, v in flax.traverse_util.flatten_dict(tree).items():
    out.setdefault("/".join(p[:-1]), {})[p[-1]] = v
  return out


def stats_array(moments: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """path -> [N, 2] (score mean, score std)."""
  return {k: np.stack([m["score_mean"], m["score_std"]], -1) for k, m in moments.items()}


def identifying_paths(linear_paths: Iterable[str], count: int) -> list[str]:
  """The adapted `q_proj` paths of the first `count` decoder layers among linear_paths
  ('language_model/layers_3/self_attn/q_proj', ...)."""
  wanted = {f"layers_{i}" for i in range(count)}
  return sorted(p for p in linear_paths
                if p.endswith("/" + Identify.IDENTIFYING_MODULE) and wanted & set(p.split("/")))


def pooled_moments(model: VLM, variables: dict, batches: Iterable[dict], parallel: Parallel,
                   paths: list[str]) -> dict[str, dict[str, np.ndarray]]:
  """Per path: {'count': [], 'sum': [d_in], 'outer': [d_in, d_in]} of the prompts' mean standardized inputs
  (float64; `variables` must hold an experts tree, whose linears sow their inputs). Only the decoder layers up to
  the deepest path run: the pass the identify router makes before a prompt's own (Identify.prepare)."""
  depth = 1 + max(layer_index(tuple(p.split("/"))) for p in paths)
  compiled = _pooled_sums(model, depth, tuple(paths), parallel.sharding(()))
  total: dict[str, dict[str, np.ndarray]] = {}
  for b in batches:
    mask = b["attention_mask"] * b["valid"][:, None]
    g = parallel.global_batch({"pixel_values": b["pixel_values"], "input_ids": b["input_ids"], "attention_mask": mask})
    with parallel.context():
      s = compiled(variables, g["pixel_values"], g["input_ids"], g["attention_mask"])
    for path, entry in s.items():  # batches combined in float64 (sum; sum of outer products)
      n, mean = float(entry["count"]), np.asarray(entry["mean"], np.float64)
      acc = total.setdefault(path, {"count": 0.0, "sum": 0.0, "outer": 0.0})
      acc["count"] += n
      acc["sum"] = acc["sum"] + n * mean
      acc["outer"] = acc["outer"] + np.asarray(entry["m2"], np.float64) + n * np.outer(mean, mean)
  return {path: {k: np.asarray(v, np.float64) for k, v in acc.items()} for path, acc in total.items()}


# The statistics' jitted passes, one per model, depth and paths: every task and foundation member reuses them
# (their prompts are batched to one shape), so each is compiled once per run, not once per class.
@functools.lru_cache(maxsize=16)
def _input_sums(model: VLM, replicated: jax.sharding.Sharding):
  """jit of (variables, vecs, px, ids, mask) -> ({path: {'x', 's'?, 's2'?}}, token count) (see input_moments)."""

  def sums(variables, vecs, px, ids, mask):
    _, st = model.apply(variables, *model_inputs(px, ids, mask), mutable=["intermediates"])
    w = mask.astype(jnp.float32)[..., None]
    out = {}
    for path, value in flax.traverse_util.flatten_dict(st["intermediates"]).items():
      if path[-1] != "inputs" or "language_model" not in path:
        continue
      key = "/".join(path[:-1])
      xhat = standardize(value[0])
      entry = {"x": (xhat * w).sum((0, 1))}
      if key in vecs:
        s = jnp.einsum("bld,nd->bln", xhat, standardize(vecs[key])) / jnp.sqrt(xhat.shape[-1])
        entry.update(s=(s * w).sum((0, 1)), s2=(s * s * w).sum((0, 1)))
      out[key] = entry
    return out, w.sum()

  return jax.jit(sums, out_shardings=replicated)


@functools.lru_cache(maxsize=16)
def _pooled_sums(model: VLM, depth: int, paths: tuple[str, ...], replicated: jax.sharding.Sharding):
  """jit of (variables, px, ids, mask) -> {path: {'count', 'mean', 'm2'}} of one batch (see pooled_moments)."""

  def sums(variables, px, ids, mask):
    positions, kv_mask = model_inputs(px, ids, mask)[2:]
    embeds = model.apply(variables, ids, px, method="embed")
    _, st = model.apply(variables, embeds, positions, kv_mask, depth=depth, method="decode", mutable=["intermediates"])
    flat = {"/".join(p[:-1]): v[0] for p, v in flax.traverse_util.flatten_dict(st["intermediates"]).items()
            if p[-1] == "inputs"}
    keep = (mask.sum(1) > 0).astype(jnp.float32)[:, None]
    count = keep.sum()
    out = {}
    for path in paths:
      pooled = pooled_standardized(flat[path], mask) * keep
      mean = pooled.sum(0) / jnp.maximum(count, 1.0)
      centred = (pooled - mean) * keep  # centred in the batch: the float32 sums keep the prompts' spread
      out[path] = {"count": count, "mean": mean,
                   "m2": jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST)}
    return out

  return jax.jit(sums, out_shardings=replicated)


def discriminants(classes: dict[str, dict[str, dict[str, np.ndarray]]],
                  shrinkage: float) -> dict[str, dict[str, np.ndarray]]:
  """Per path: {'id_w': [C, d_in], 'id_b': [C, 1]} (float32), one row per class of `classes` (name -> its
  pooled_moments) in that order. The shared covariance sums the classes in name order, so a class's row does
  not depend on the order the classes were learned in."""
  out = {}
  for path in next(iter(classes.values())):
    means, covariances = {}, {}
    for name, moments in classes.items():
      m = moments[path]
      if m["count"] < 2:
        raise ValueError(f"identification statistics of {name} need at least 2 prompts, got {m['count']}")
      means[name] = m["sum"] / m["count"]
      covariances[name] = m["outer"] / m["count"] - np.outer(means[name], means[name])
    shared = np.mean([covariances[name] for name in sorted(classes)], 0)
    d = shared.shape[0]
    shared = (1.0 - shrinkage) * shared + shrinkage * max(np.trace(shared) / d, 1e-12) * np.eye(d)
    mu = np.stack(list(means.values()))  # [C, d]
    w = np.linalg.solve(shared, mu.T).T
    out[path] = {"id_w": w.astype(np.float32), "id_b": (-0.5 * (w * mu).sum(1, keepdims=True)).astype(np.float32)}
  return out
