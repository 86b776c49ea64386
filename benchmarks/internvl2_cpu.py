"""Benchmark: InternVL2-1B at full size on the CPU (random bf16 weights, no checkpoint) — one routed LoRA
train step and one greedy generation on ONE real-sized example; compile and run seconds, peak memory.

  python3 benchmarks/internvl2_cpu.py --out benchmarks/results [--no_remat]

Model: the `internvl2_1b` preset (InternViT-300M-448px + pixel shuffle + mlp1 + Qwen2-0.5B, ~0.94e9 params)
initialised under jit straight into bf16 (no fp32 copy of the params), a routed LoRA bank of 2 experts (rank 16,
alpha 32, all seven LLM linears; B small random so the expert branch does work and A gets gradients), random
routing vectors, top-k routing (routers.TopK(k=2)). Example: a 1344x896 synthetic chart PNG read through
drex.data.images.load_image, cut by dynamic_tiles (max 6 grid tiles) into 3x2 tiles of 448 px + the thumbnail
= 7 tiles = 1792 <IMG_CONTEXT> tokens, in a Hermes-2 (InternVL2-1B) chat layout whose text ids are arbitrary
vocabulary ids (no tokenizer needed), with a 16-token answer.
Phases (each jitted, compiled ahead of time with .lower().compile(), then run once, block_until_ready):
  train_step  drex.training.trainer.make_train_step(model, 'experts', AdamW): answer-token loss, gradients
              for the experts only (base and router frozen), AdamW update. AdamW as trainer.make_optimizer
              builds it (clip 1.0, b1 .9, b2 .999) but at a constant lr with no weight decay: its warmup
              schedule gives lr 0 at step 0, and this way an expert leaf moves only if its gradient is nonzero.
              The model is the VLM under flax's remat with REMAT_POLICY (--no_remat: the plain VLM, as drex.train).
  generate    drex.models.generation.jitted_greedy_generate with the updated experts: prefill (ViT on 7 tiles +
              decoder, KV cache), then 8 greedy tokens.
Memory: ru_maxrss (the process's peak resident set so far) after each phase, the current RSS before it,
XLA's temp buffer of the program (compiled.memory_analysis()) and the params' bytes. The train step's XLA
temp buffer is 25.6 GB with XLA's default CPU scheduler (fp32 attention tensors, 0.8 GB per decoder layer at
1855 tokens, + 4.5 GB of 151655-wide logits): too much for 24 GB. Every program is therefore compiled with
the memory-optimized scheduler (CPU_OPTIONS; 15.8 GB, peak RSS 20.4 GB, too close to 24 GB when anything else
runs), and by default the step remats (7.96 GB): matmuls without batch dims (the linears, so the ViT is not
run again) are kept, attention scores, softmax and norms recomputed in the backward.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import io
import json
import os
import platform
import resource
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from drex.adapters import lora  # pylint: disable=g-import-not-at-top
from drex.adapters import routers
from drex.data import images
from drex.models import presets
from drex.models.config import VLMConfig
from drex.models.generation import jitted_greedy_generate
from drex.models.vlm import VLM
from drex.training import trainer

CPU_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
REMAT_POLICY = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
# Qwen2 / InternVL2-1B special ids (151643 base vocabulary + 3 chat + InternVL tokens; see presets.internvl2_1b).
IM_START, IM_END, IMG_START, IMG_END = 151644, 151645, 151646, 151647
Setup = collections.namedtuple("Setup", "cfg model params experts router")  # what build() makes


def rss_mib() -> tuple[float, float]:
  """(current resident set, peak resident set so far) of this process in MiB."""
  with open("/proc/self/statm") as f:
    current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  return current / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def nbytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))


def build(preset: str = "internvl2_1b", num_experts: int = 2, rank: int = 16, k: int = 2, seed: int = 0) -> Setup:
  """The preset with random bf16 params, a routed LoRA bank and random routing vectors."""
  cfg = presets.get(preset)
  model, size = VLM(cfg, lora.AdapterSpec(routers.TopK(k=k), lora_alpha=2.0 * rank)), cfg.vision.image_size

  def init(key):  # traced once: params come out in cfg.param_dtype (bf16), never as an fp32 copy
    px, ids = jnp.zeros((1, 1, size, size, 3), jnp.float32), jnp.zeros((1, 8), jnp.int32)
    return nn.unbox(VLM(cfg).init(key, px, ids, ids, jnp.ones((1, 8), bool)))["params"]

  key = jax.random.key(seed)
  params = compile_ahead(jax.jit(init).lower(key))(key)
  key_a, key_b, key_v = jax.random.split(jax.random.key(seed + 1), 3)
  experts = lora.init_experts(params, rank, list(lora.ALL_TARGETS), key_a, num_experts=num_experts)
  leaves, tree = jax.tree_util.tree_flatten_with_path(experts)
  keys = iter(jax.random.split(key_b, len(leaves)))
  experts = jax.tree_util.tree_unflatten(tree, [  # B ~ N(0, 0.01): the expert branch is not a no-op
      x + 0.01 * jax.random.normal(next(keys), x.shape, x.dtype) if path[-1].key == "lora_b" else x
      for path, x in leaves])
  router = lora.init_router(experts)
  vs, rtree = jax.tree_util.tree_flatten(router)
  router = jax.tree_util.tree_unflatten(rtree, [jax.random.normal(kk, v.shape, v.dtype)
                                                for kk, v in zip(jax.random.split(key_v, len(vs)), vs)])
  jax.block_until_ready((params, experts, router))
  return Setup(cfg, model, params, experts, router)


def example_image(width: int = 1344, height: int = 896) -> bytes:
  """A chart-like RGB PNG: coloured bars and a line on white."""
  img, rng = Image.new("RGB", (width, height), "white"), np.random.default_rng(0)
  draw = ImageDraw.Draw(img)
  for i in range(12):
    top = int(rng.integers(height // 8, height - 60))
    draw.rectangle((60 + i * 100, top, 130 + i * 100, height - 40), fill=tuple(int(c) for c in rng.integers(0, 200, 3)))
  draw.line([(40 + 100 * i, int(rng.integers(40, height - 40))) for i in range(13)], fill=(200, 30, 30), width=5)
  draw.line([(40, height - 40), (width - 20, height - 40)], fill="black", width=3)
  with io.BytesIO() as buf:
    img.save(buf, "PNG")
    return buf.getvalue()


def example(cfg: VLMConfig, grid_tiles: int = 6, answer_len: int = 16) -> tuple[dict, dict]:
  """(train batch, prompt batch) of one example: the image's tiles and Hermes-2-shaped token ids."""
  png, tile = example_image(), cfg.vision.image_size
  tiles = images.dynamic_tiles(images.load_image(png, "example.png"), tile, 1, grid_tiles)
  assert len(tiles) == images.tile_count(*images.image_size(png), tile, 1, grid_tiles)
  pixels = np.stack([images.normalize(t) for t in tiles])[None]  # [1, tiles, 448, 448, 3]
  rng = np.random.default_rng(1)
  text = lambda n: rng.integers(100, 150000, n).tolist()  # arbitrary ordinary-vocabulary ids
  prompt = ([IM_START] + text(20) + [IM_END] + text(1)  # system turn
            + [IM_START] + text(2) + [IMG_START] + [cfg.image_token_id] * (len(tiles) * cfg.tokens_per_tile)
            + [IMG_END] + text(14) + [IM_END] + text(1)  # user turn: image + question
            + [IM_START] + text(2))  # assistant header
  answer = text(answer_len - 1) + [IM_END]
  ids = np.array([prompt + answer], np.int32)
  train = {"pixel_values": pixels, "input_ids": ids, "attention_mask": np.ones_like(ids),
           "loss_mask": np.array([[0] * len(prompt) + [1] * len(answer)], np.int32)}
  prompt_batch = {"pixel_values": pixels, "input_ids": ids[:, :len(prompt)],
                  "attention_mask": np.ones((1, len(prompt)), np.int32)}
  return train, prompt_batch


def compile_ahead(lowered):
  return lowered.compile(compiler_options=CPU_OPTIONS if jax.default_backend() == "cpu" else None)


def compile_and_run(jitted, args, kwargs=None) -> tuple[float, float, Any, float]:
  """(compile s, run s, output, XLA temp GiB) of one ahead-of-time compiled call."""
  start = time.perf_counter()
  compiled = compile_ahead(jitted.lower(*args, **(kwargs or {})))
  compile_s = time.perf_counter() - start
  dynamic = [a for a in args if not isinstance(a, nn.Module)]  # static args are baked into `compiled`
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*dynamic))
  return compile_s, time.perf_counter() - start, out, compiled.memory_analysis().temp_size_in_bytes / 2**30


def train_phase(setup: Setup, batch: dict, learning_rate: float = 1e-4, remat: bool = True) -> dict:
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, 0.9, 0.999, weight_decay=0.0))
  model = nn.remat(VLM, policy=REMAT_POLICY)(setup.cfg, setup.model.adapter) if remat else setup.model
  step = jax.jit(trainer.make_train_step(model, "experts", optimizer))
  state = trainer.init_state(setup.experts, optimizer)
  rss_before = rss_mib()[0]
  compile_s, run_s, (state, metrics), temp = compile_and_run(
      step, (state, {"params": setup.params, "router": setup.router}, jax.tree_util.tree_map(jnp.asarray, batch)))
  return {"compile_s": compile_s, "run_s": run_s, "loss": float(metrics["loss"]), "experts": state.params,
          "remat": remat, "xla_temp_gib": temp, "rss_before_mib": rss_before, "peak_rss_mib": rss_mib()[1]}


def generate_phase(setup: Setup, experts, prompt: dict, new_tokens: int = 8) -> dict:
  variables = {"params": setup.params, "experts": experts, "router": setup.router}
  args = (setup.model, variables, *(jnp.asarray(prompt[k]) for k in ("pixel_values", "input_ids", "attention_mask")))
  rss_before = rss_mib()[0]
  compile_s, run_s, tokens, temp = compile_and_run(jitted_greedy_generate, args,
                                                   {"max_new_tokens": new_tokens, "eos_id": IM_END, "pad_id": 0})
  return {"compile_s": compile_s, "run_s": run_s, "tokens": np.asarray(tokens), "xla_temp_gib": temp,
          "rss_before_mib": rss_before, "peak_rss_mib": rss_mib()[1]}


def cpu_model() -> str:
  with open("/proc/cpuinfo") as f:
    names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
  return f"{names[0]} x {len(names)}" if names else platform.processor()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="internvl2_1b")
  parser.add_argument("--new_tokens", type=int, default=8)
  parser.add_argument("--out", default="benchmarks/results", help="directory for the .json + .md")
  parser.add_argument("--no_remat", action="store_true", help="train the plain VLM (about 21 GB peak RSS)")
  args = parser.parse_args(argv)
  python = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else "python3"
  command = " ".join([python, "benchmarks/internvl2_cpu.py"] + (sys.argv[1:] if argv is None else list(argv)))
  print(f"{args.preset} on {cpu_model()}, jax {jax.__version__} ({jax.default_backend()})", flush=True)
  start = time.perf_counter()
  setup = build(args.preset)
  counts = {s: lora.count_params(setup.params[s]) for s in ("vision_model", "mlp1", "language_model")}
  init = {"seconds": time.perf_counter() - start, "params": sum(counts.values()), "params_by_scope": counts,
          "params_bytes": nbytes(setup.params), "params_dtype": str(jax.tree_util.tree_leaves(setup.params)[0].dtype),
          "lora_params": lora.count_params(setup.experts), "peak_rss_mib": rss_mib()[1]}
  print(f"  init {init['seconds']:.1f}s: {init['params'] / 1e9:.3f}e9 params ({init['params_bytes'] / 2**30:.2f} GiB "
        f"{init['params_dtype']}), peak RSS {init['peak_rss_mib'] / 1024:.2f} GiB", flush=True)
  train_batch, prompt = example(setup.cfg)
  train = train_phase(setup, train_batch, remat=not args.no_remat)
  gen = generate_phase(setup, train.pop("experts"), prompt, args.new_tokens)
  gen["tokens"] = gen["tokens"].tolist()
  total_s = time.perf_counter() - start
  ids = train_batch["input_ids"]
  ex = {"tiles": int(train_batch["pixel_values"].shape[1]), "tile_px": setup.cfg.vision.image_size,
        "image_tokens": int((ids == setup.cfg.image_token_id).sum()), "train_tokens": int(ids.shape[1]),
        "answer_tokens": int(train_batch["loss_mask"].sum()), "prompt_tokens": int(prompt["input_ids"].shape[1]),
        "new_tokens": args.new_tokens}
  record = {"benchmark": "internvl2_cpu", "preset": args.preset, "command": command, "jax": jax.__version__,
            "backend": jax.default_backend(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "xla_compiler_options": CPU_OPTIONS if jax.default_backend() == "cpu" else {}, "example": ex,
            "lora": {"experts": 2, "rank": 16, "alpha": 32.0, "targets": list(lora.ALL_TARGETS), "routing": "topk 2"},
            "init": init, "train_step": train, "generate": gen, "total_s": total_s}
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"{args.preset}_cpu")
  with open(stem + ".json", "w") as f:
    json.dump(record, f, indent=1)
  gib = lambda mib: f"{mib / 1024:.2f}"
  phases = (("train_step" + " (remat)" * train["remat"], train), (f"generate, {args.new_tokens} tokens", gen))
  rows = [f"| {name} | {r['compile_s']:.1f} | {r['run_s']:.1f} | {r['xla_temp_gib']:.2f} | {gib(r['rss_before_mib'])} "
          f"| {gib(r['peak_rss_mib'])} |" for name, r in phases]
  lines = [f"# {args.preset} at full size on the CPU: one routed LoRA train step and one generation", "",
           f"`{command}` — jax {jax.__version__}, {record['cpu']} ({os.cpu_count()} cores), Python "
           f"{record['python']}, {record['date'][:19]} UTC; XLA CPU options {record['xla_compiler_options']}.", "",
           f"Random {init['params_dtype']} weights: {init['params'] / 1e9:.3f}e9 params "
           f"({init['params_bytes'] / 2**30:.2f} GiB; vision {counts['vision_model'] / 1e6:.1f} M, mlp1 "
           f"{counts['mlp1'] / 1e6:.1f} M, LLM {counts['language_model'] / 1e6:.1f} M), initialised (compile + run) in "
           f"{init['seconds']:.1f} s, peak RSS then {gib(init['peak_rss_mib'])} GiB. LoRA bank: 2 experts, r=16, all 7 "
           f"LLM linears ({init['lora_params'] / 1e6:.1f} M fp32 params), top-k routing (k=2), random routing vectors.",
           f"One example: {ex['tiles']} tiles of {ex['tile_px']} px ({ex['image_tokens']} image tokens), "
           f"{ex['train_tokens']} tokens to train on ({ex['answer_tokens']} answer tokens), a {ex['prompt_tokens']}"
           f"-token prompt to generate {ex['new_tokens']} tokens from.", "",
           "| phase | compile (s) | run (s) | XLA temp (GiB) | RSS before (GiB) | peak RSS after (GiB) |",
           "|---|---|---|---|---|---|", *rows, "",
           f"Train loss {train['loss']:.3f} (random weights: about ln(vocab) = {np.log(setup.cfg.llm.vocab_size):.1f});"
           f" generated ids {gen['tokens']}. Whole run {total_s:.0f} s. Peak RSS is the process's maximum so far "
           f"(ru_maxrss): each row includes the params and everything before it.", ""]
  with open(stem + ".md", "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines[-6:]) + f"\nwrote {stem}.{{json,md}}", flush=True)
  return record


if __name__ == "__main__":
  main()
