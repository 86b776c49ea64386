"""Benchmark: one InternVL2 preset (random bf16 weights, no checkpoint) — the routed LoRA forward and a
stage-A LoRA train step at a realistic batch; tokens/s and peak device memory.

  PYTHONPATH=. python3 benchmarks/internvl2_step.py --preset internvl2_2b --out benchmarks/results
  PYTHONPATH=. python3 benchmarks/internvl2_step.py --preset internvl2_8b --batch 4 --out benchmarks/results
  PYTHONPATH=. python3 benchmarks/internvl2_step.py --smoke --out /tmp/bench        # tiny preset, CPU, seconds

What is timed (each a jitted program, compiled first, then `--iters` calls after `--warmup` calls, each
ended by block_until_ready; median and mean over calls):
  forward     VLM logits for the whole batch with the LoRA expert applied (routers.Single(0)):
              InternViT on every tile, pixel shuffle, mlp1, decoder.
  train_step  drex.training.trainer.make_train_step(model, "experts", AdamW): loss on answer tokens,
              gradients w.r.t. the LoRA expert only (base frozen), optimizer update (state donated).
  sharded_train_step  (with --mesh D,F,T) the same step as drex.train runs it: params placed by the
              logical-axis rules on a ('data', 'fsdp', 'tensor') mesh (FSDP over 'fsdp'), jitted with
              explicit in/out NamedShardings, state donated (drex.training.trainer.compile_step).
Batch: B sequences of L tokens, each with `--tiles` 448-px tiles (256 <IMG_CONTEXT> tokens per tile)
after a short text prefix; the last 64 tokens are answer tokens. tokens/s counts B*L per call.
Peak memory: `jax.devices()[0].memory_stats()['peak_bytes_in_use']` after the run (None on CPU).
Approximate model FLOPs (informational): decoder linears 2*P*T forward and 2*P*T backward (input
gradients only: the base is frozen), ViT linears 2*P*T forward; attention score FLOPs included.
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

from drex import base as base_lib  # pylint: disable=g-import-not-at-top
from drex.adapters import lora
from drex.adapters import routers
from drex.data.pipeline import ImageSpec
from drex.models import presets
from drex.models.config import VLMConfig
from drex.models.vlm import VLM, model_inputs
from drex.training import trainer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def build_batch(cfg: VLMConfig, batch: int, length: int, tiles: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  n_img = tiles * cfg.tokens_per_tile
  if n_img + 80 > length:
    raise SystemExit(f"--seq {length} is too short for {tiles} tile(s) ({n_img} image tokens) + 80 text tokens")
  ids = rng.integers(10, min(cfg.llm.vocab_size, 30000), size=(batch, length)).astype(np.int32)
  ids[:, 8:8 + n_img] = cfg.image_token_id
  size = cfg.vision.image_size
  return {"pixel_values": rng.normal(size=(batch, tiles, size, size, 3)).astype(np.float32),
          "input_ids": ids, "attention_mask": np.ones((batch, length), np.int32),
          "loss_mask": np.concatenate([np.zeros((batch, length - 64), np.int32), np.ones((batch, 64), np.int32)], 1)}


def linear_params(params, scope: str) -> int:
  """Parameters of the matmul kernels under `scope` (embeddings excluded, LM head included)."""
  flat = jax.tree_util.tree_flatten_with_path(params[scope])[0]
  return int(sum(np.prod(x.shape) for path, x in flat
                 if getattr(path[-1], "key", "") == "kernel" and "embed_tokens" not in str(path)))


def approx_flops(cfg: VLMConfig, params, batch: int, length: int, tiles: int, train: bool) -> float:
  llm, vis = cfg.llm, cfg.vision
  tokens = batch * length
  vit_tokens = batch * tiles * (vis.grid * vis.grid + 1)
  llm_attn = 4 * batch * length * length * llm.num_heads * llm.head_dim * llm.num_layers / 2  # causal
  vit_attn = 4 * batch * tiles * (vis.grid ** 2 + 1) ** 2 * vis.width * vis.depth
  llm_fwd = 2 * linear_params(params, "language_model") * tokens + llm_attn
  vit_fwd = 2 * (linear_params(params, "vision_model") + linear_params(params, "mlp1")) * vit_tokens + vit_attn
  return (2 * llm_fwd if train else llm_fwd) + vit_fwd


def timed(fn, args, warmup: int, iters: int, donate_first: bool = False):
  """(compile seconds, per-call seconds list, last output)."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  out = None
  times = []
  for i in range(warmup + iters):
    start = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - start)
    if donate_first:  # the train state was donated: feed the new one back
      args = (out[0],) + tuple(args[1:])
  return compile_s, times, out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="internvl2_2b", help="internvl2_1b / 2b / 4b / 8b")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
  parser.add_argument("--tiles", type=int, default=1, help="448-px tiles per sequence (256 tokens each)")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--alpha", type=float, default=32.0)
  parser.add_argument("--kernel", default="xla", help="adapter mixture: xla | pallas | auto")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--mesh", default="", help="D,F,T: also time drex.train's sharded step on this mesh")
  parser.add_argument("--smoke", action="store_true", help="tiny preset, small batch: checks the script on CPU")
  parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON + markdown")
  args = parser.parse_args(argv)

  if args.smoke:
    cfg = presets.tiny(vocab_size=384, image_token_id=8)
    cfg = VLMConfig(vision=cfg.vision, llm=cfg.llm, image_token_id=8, dtype=args.dtype, param_dtype=args.dtype)
    args.batch, args.seq, args.tiles, args.warmup, args.iters, args.rank, args.alpha = 2, 128, 1, 1, 2, 4, 8.0
    name = "tiny_smoke"
  else:
    cfg = presets.get(args.preset, args.dtype)
    name = args.preset
  device = jax.devices()[0]
  print(f"{name}: {device.device_kind} ({jax.default_backend()}), batch {args.batch} x {args.seq} tokens, "
        f"{args.tiles} tile(s)/sequence", flush=True)

  model = VLM(cfg, lora.AdapterSpec(routers.Single(0), lora_alpha=args.alpha, kernel=args.kernel))
  image = ImageSpec(cfg.vision.image_size)
  start = time.perf_counter()
  params = jax.jit(lambda key: base_lib.init_params(VLM(cfg), image, key))(jax.random.key(0))
  def new_experts():  # non-zero B: the expert branch does work
    return jax.tree_util.tree_map(lambda x: x + 0.01, lora.init_experts(params, args.rank, list(lora.ALL_TARGETS),
                                                                        jax.random.key(1)))

  experts = new_experts()
  jax.block_until_ready((params, experts))
  init_s = time.perf_counter() - start
  batch = {k: jnp.asarray(v) for k, v in build_batch(cfg, args.batch, args.seq, args.tiles).items()}
  mask = batch["attention_mask"]

  def forward(params, experts, batch):
    logits, _ = model.apply({"params": params, "experts": experts},
                            *model_inputs(batch["pixel_values"], batch["input_ids"], mask))
    return logits

  optimizer = trainer.make_optimizer(trainer.OptimConfig(steps=1000, learning_rate=4e-5, warmup_steps=10))
  step = trainer.make_train_step(model, "experts", optimizer)
  state = trainer.init_state(experts, optimizer)
  results = {}
  fwd_compile, fwd_times, _ = timed(jax.jit(forward), (params, experts, batch), args.warmup, args.iters)
  results["forward"] = (fwd_compile, fwd_times)
  train_compile, train_times, (state, metrics) = timed(jax.jit(step, donate_argnums=(0,)),
                                                       (state, {"params": params}, batch), args.warmup, args.iters,
                                                       donate_first=True)
  results["train_step"] = (train_compile, train_times)
  loss = float(metrics["loss"])
  if args.mesh:
    from drex.parallel import Parallel  # pylint: disable=g-import-not-at-top
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    par = Parallel.create(tuple(int(v) for v in args.mesh.split(",")))
    boxed = base_lib.boxed_shapes(VLM(cfg), image)
    base_sh = par.tree_shardings(boxed)
    abstract_experts = jax.eval_shape(new_experts)
    ex_sh = lora.adapter_shardings(par, boxed, abstract_experts)
    shardings = trainer.state_shardings(optimizer, ex_sh, par, abstract_experts)
    sharded = trainer.compile_step(model, "experts", optimizer, shardings, {"params": base_sh}, par)
    sharded_state = trainer.create_state(par.put(new_experts(), ex_sh), optimizer, shardings)
    with par.context():
      global_batch = par.global_batch({k: np.asarray(v) for k, v in batch.items()})
      sharded_compile, sharded_times, _ = timed(sharded, (sharded_state, {"params": par.put(params, nn.unbox(base_sh))},
                                                          global_batch), args.warmup, args.iters, donate_first=True)
    results[f"sharded_train_step (mesh {args.mesh})"] = (sharded_compile, sharded_times)
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")

  tokens = args.batch * args.seq
  peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device.device_kind), None)
  rows = []
  for kind, (compile_s, times) in results.items():
    median = statistics.median(times)
    flops = approx_flops(cfg, params, args.batch, args.seq, args.tiles, train="train_step" in kind)
    tflops = flops / median / 1e12
    rows.append({"kind": kind, "compile_s": round(compile_s, 2), "median_s": median, "mean_s": statistics.mean(times),
                 "min_s": min(times), "tokens_per_s": tokens / median, "approx_tflop_per_call": flops / 1e12,
                 "approx_tflops": tflops,
                 "approx_mfu": tflops / peak_tflops if peak_tflops and args.dtype == "bfloat16" else None,
                 "times_s": times})
    print(f"  {kind:22s} compile {compile_s:6.1f}s  median {median * 1e3:9.2f} ms  {tokens / median:10.0f} tokens/s  "
          f"~{tflops:.1f} TFLOP/s", flush=True)
  counts = {scope: lora.count_params(params[scope]) for scope in ("vision_model", "mlp1", "language_model")}
  experts = jax.eval_shape(new_experts)
  record = {
      "benchmark": "internvl2_step", "preset": name, "config": cfg.to_dict(), "device": device.device_kind,
      "backend": jax.default_backend(), "num_devices": jax.device_count(), "jax": jax.__version__,
      "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "batch": args.batch, "seq_len": args.seq, "tiles_per_sequence": args.tiles,
      "image_tokens_per_sequence": args.tiles * cfg.tokens_per_tile, "lora_rank": args.rank,
      "lora_alpha": args.alpha, "lora_targets": list(lora.ALL_TARGETS), "kernel": args.kernel, "dtype": args.dtype,
      "params": counts, "lora_params": lora.count_params(experts), "init_s": init_s,
      "peak_bytes_in_use": peak, "memory_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))},
      "final_loss": loss, "warmup": args.warmup, "iters": args.iters, "results": rows,
      "peak_bf16_tflops_assumed": peak_tflops,
  }
  os.makedirs(args.out, exist_ok=True)
  stem = f"internvl2_step_{name}_{device.device_kind.lower().replace(' ', '_').replace('-', '_')}"
  with open(os.path.join(args.out, stem + ".json"), "w") as f:
    json.dump(record, f, indent=1)
  gib = f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a (no memory_stats on this backend)"
  lines = [f"# InternVL2 step benchmark: {name} on {device.device_kind}", "",
           f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), {record['date']}; "
           f"command: `{record['command']}`", "",
           f"Random {args.dtype} weights (vision {counts['vision_model'] / 1e6:.1f} M, mlp1 {counts['mlp1'] / 1e6:.1f} M, "
           f"LLM {counts['language_model'] / 1e6:.1f} M params); LoRA r={args.rank}, alpha={args.alpha} on "
           f"{', '.join(lora.ALL_TARGETS)} ({record['lora_params'] / 1e6:.2f} M params, fp32, kernel {args.kernel}).",
           f"Batch {args.batch} x {args.seq} tokens, {args.tiles} tile(s) of {cfg.vision.image_size} px per sequence "
           f"({record['image_tokens_per_sequence']} image tokens). Peak device memory: {gib}. "
           f"Final train loss {loss:.3f}.", "",
           "| program | compile (s) | median (ms) | mean (ms) | tokens/s | ~TFLOP/s | ~MFU |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    mfu = f"{100 * r['approx_mfu']:.1f}%" if r["approx_mfu"] is not None else "—"
    lines.append(f"| {r['kind']} | {r['compile_s']:.1f} | {r['median_s'] * 1e3:.2f} | {r['mean_s'] * 1e3:.2f} | "
                 f"{r['tokens_per_s']:.0f} | {r['approx_tflops']:.1f} | {mfu} |")
  lines += ["", "FLOPs are approximate (decoder linears 2PT fwd + 2PT input-grad bwd, ViT/mlp1 2PT fwd, attention "
            "scores included); MFU against the assumed dense bf16 peak "
            f"({peak_tflops} TFLOP/s)." if peak_tflops else "", ""]
  with open(os.path.join(args.out, stem + ".md"), "w") as f:
    f.write("\n".join(lines))
  print(f"wrote {os.path.join(args.out, stem)}.{{json,md}}; peak memory {gib}")


if __name__ == "__main__":
  main()
