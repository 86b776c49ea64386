"""Benchmark: what routing among many experts costs — the routed forward (10 LoRA experts, every LLM linear) against
the base forward, at InternVL2-2B shapes (random bf16 weights) and on the shipped tiny model.

  PYTHONPATH=. python3 benchmarks/routed_forward.py --out benchmarks/results            # 2B + tiny, this machine
  PYTHONPATH=. python3 benchmarks/routed_forward.py --preset tiny --out /tmp/res         # tiny only (seconds)

For each model: the base forward (no experts) and the routed forward with E experts of rank r, at the token,
sequence and hybrid routing levels of `topk` and with the `identify` router (its identifying pass through the
first 2 decoder layers, then one expert per sequence; drex.adapters.routers), each a jitted program compiled
first, then the median of `--iters` calls (block_until_ready). `--levels` picks the routed rows. One batch: B sequences with `--tiles` image tiles and a short question.
The ratio routed / base is the number that matters (issue 12: <= 1.15 at 2B shapes with 10 experts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import internvl2_cpu  # pylint: disable=g-import-not-at-top
from drex import base as base_lib
from drex.adapters import identify, lora, prototypes, routers
from drex.models.vlm import VLM, model_inputs, prepared

LEVELS = {"token": routers.TopK(k=2), "sequence": routers.SequenceTopK(k=2),
          "hybrid": routers.HybridTopK(k=2, candidates=3), "identify": identify.Identify()}
IDENTIFY_LAYERS = 2  # the default config.router.identify_layers
BASE_CLASSES = 3  # the foundation suite's members


def _identify_leaves(experts, seed: int = 2) -> dict:
  """Random discriminants (E tasks + the base classes) at the first layers' q_proj, as the identify router reads."""
  rng = np.random.default_rng(seed)
  linears = prototypes.by_path(experts, "lora_a")
  rows = lora.num_experts(experts) + BASE_CLASSES
  return prototypes.nest({p: {"id_w": rng.normal(size=(rows, linears[p].shape[1])).astype(np.float32),
                              "id_b": rng.normal(size=(rows, 1)).astype(np.float32)}
                          for p in prototypes.identifying_paths(linears, IDENTIFY_LAYERS)})


def _random_adapters(params, num_experts: int, rank: int, seed: int = 1):
  key_a, key_b, key_v = jax.random.split(jax.random.key(seed), 3)
  experts = lora.init_experts(params, rank, list(lora.ALL_TARGETS), key_a, num_experts=num_experts)
  experts = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.01 * jax.random.normal(key_b, x.shape, x.dtype) if p[-1].key == "lora_b" else x, experts)
  router = jax.tree_util.tree_map(lambda v: jax.random.normal(key_v, v.shape, v.dtype), lora.init_router(experts))
  return experts, router


def _batch(cfg, batch: int, tiles: int, text: int = 64, seed: int = 0):
  rng = np.random.default_rng(seed)
  size = cfg.vision.image_size
  n_img = tiles * cfg.tokens_per_tile
  ids = rng.integers(100, min(cfg.llm.vocab_size, 30000), size=(batch, n_img + text)).astype(np.int32)
  ids[:, 4:4 + n_img] = cfg.image_token_id
  pixels = rng.normal(size=(batch, tiles, size, size, 3)).astype(np.float32)
  return model_inputs(jnp.asarray(pixels), jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32))


def _time(fn, args, iters: int) -> tuple[float, float]:
  begin = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - begin
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    begin = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - begin)
  return statistics.median(times), compile_s


def _routed(model: VLM):
  """The routed forward over a prompt batch, with what the router makes from the prompts first (drex's path)."""

  def forward(p, e, v, px, ids, positions, kv_mask):
    variables, embeds = prepared(model, {"params": p, "experts": e, "router": v}, px, ids, kv_mask)
    return model.apply(variables, embeds, positions, kv_mask, method="decode")[0]

  return forward


def measure(name: str, cfg, params, experts, router, batch, iters: int, levels: list[str]) -> dict:
  base = VLM(cfg)
  rows = {"base": _time(lambda p, *a: base.apply({"params": p}, *a)[0], (params, *batch), iters)}
  router = lora.merge_trees(router, _identify_leaves(experts))
  for level in levels:
    model = VLM(cfg, lora.AdapterSpec(LEVELS[level], lora_alpha=32.0))
    rows[level] = _time(_routed(model), (params, experts, router, *batch), iters)
  base_s = rows["base"][0]
  out = {"model": name, "tokens": int(batch[1].size), "experts": int(lora.num_experts(experts)),
         "rank": int(lora.rank_of(experts)),
         "seconds": {k: round(v[0], 4) for k, v in rows.items()},
         "compile_seconds": {k: round(v[1], 1) for k, v in rows.items()},
         "ratio_to_base": {k: round(v[0] / base_s, 3) for k, v in rows.items() if k != "base"}}
  print(json.dumps(out), flush=True)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=["all", "tiny", "internvl2_2b"], default="all")
  parser.add_argument("--experts", type=int, default=10)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--tiles", type=int, default=2)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--levels", default=",".join(LEVELS), help="routed rows, from " + ",".join(LEVELS))
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  levels = args.levels.split(",")
  results = []
  if args.preset in ("all", "tiny"):
    tiny = base_lib.load()
    experts, router = _random_adapters(tiny.params, args.experts, 8)
    results.append(measure("tiny (shipped base)", tiny.info.model, tiny.params, experts, router,
                           _batch(tiny.info.model, 32, 1, text=32), max(args.iters, 10), levels))
  if args.preset in ("all", "internvl2_2b"):
    setup = internvl2_cpu.build("internvl2_2b", num_experts=1, rank=args.rank)
    cfg, params = setup.cfg, setup.params
    del setup  # its one-expert bank is not used
    experts, router = _random_adapters(params, args.experts, args.rank)
    results.append(measure("internvl2_2b (random bf16)", cfg, params, experts, router,
                           _batch(cfg, args.batch, args.tiles), args.iters, levels))
  device = jax.devices()[0].device_kind
  info = {"command": "PYTHONPATH=. python3 benchmarks/routed_forward.py " + " ".join(sys.argv[1:]),
          "date": datetime.date.today().isoformat(), "device": device, "jax": jax.__version__,
          "cores": os.cpu_count(), "machine": platform.machine(), "results": results}
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"routed_forward_{'cpu' if device == 'cpu' else device.lower().replace(' ', '_')}")
    with open(stem + ".json", "w") as f:
      json.dump(info, f, indent=1)
    lines = [f"# Routed forward vs base forward ({device}, jax {jax.__version__})", "", f"`{info['command']}`  ",
             f"{info['date']}; {args.experts} experts on every LLM linear; median of timed calls after a compile.", "",
             "| model | tokens | base (s) | " + " | ".join(f"{k} (s)" for k in levels) + " | ratio " + " / ".join(levels)
             + " |", "|---" * (len(levels) + 4) + "|"]
    for r in results:
      s, q = r["seconds"], r["ratio_to_base"]
      lines.append(f"| {r['model']} | {r['tokens']} | {s['base']} | " + " | ".join(str(s[k]) for k in levels) + " | "
                   + " / ".join(str(q[k]) for k in levels) + " |")
    with open(stem + ".md", "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
