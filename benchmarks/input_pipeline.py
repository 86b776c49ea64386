"""Benchmark: the training input pipeline at InternVL-2 sizes — decode + 448-px dynamic tiling (6 tiles +
thumbnail) + normalization + chat-formatted tokenization, in grain worker processes.

  PYTHONPATH=. python3 benchmarks/input_pipeline.py --out benchmarks/results
  PYTHONPATH=. python3 benchmarks/input_pipeline.py --workers 0 1 2 4 --batches 12 --out /tmp/res

Records: JPEG photos-like images of several real-world sizes (640x480 to 1600x1200, portrait and landscape,
random textures so JPEG decoding costs what it costs on real photos) and one question each, encoded by
`drex.data.pipeline.Encoder` with a 448-px ImageSpec of 7 tile slots and 256 tokens per tile (InternVL2's).
For each worker count: examples/s over `--batches` global batches from the iterator's creation (worker
start-up included, so the figure is a lower bound; grain reads ahead with threads, so only long runs
measure the steady state), i.e. what one host can feed a training step. A 2B train step on one H100 takes about 50
examples/s per host (issue 10).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # pylint: disable=g-import-not-at-top

from drex.base import tiny_tokenizer
from drex.data import pipeline, prompts, record

SIZES = ((640, 480), (1024, 768), (800, 1200), (1600, 1200), (1280, 720), (720, 1280))


def make_records(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    w, h = SIZES[i % len(SIZES)]
    small = rng.integers(0, 255, (h // 16, w // 16, 3), np.uint8)  # smooth-ish texture after upscaling
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    out.append(record.make([("what is shown in the picture ? answer briefly .", "a texture")], [buf.getvalue()]))
  return out


def measure(records: list[dict], workers: int, batch: int, batches: int) -> dict:
  encoder = pipeline.Encoder(tiny_tokenizer(384), prompts.get_template("tiny"), pipeline.ImageSpec(448, 7), 256)
  seq_len = -(-encoder.scan(records).total_max // 8) * 8
  it = pipeline.train_batches([records], encoder, seq_len, batch, seed=0, workers=workers)
  begin = time.time()
  b = next(it)
  first = time.time() - begin
  for _ in range(batches - 1):
    b = next(it)
  seconds = time.time() - begin
  return {"workers": workers, "examples_per_s": round(batch * batches / seconds, 2), "first_batch_s": round(first, 2),
          "seconds": round(seconds, 1), "seq_len": seq_len, "batch_shape": list(b["pixel_values"].shape)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--records", type=int, default=48)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
  records = make_records(args.records)
  rows = [measure(records, w, args.batch, args.batches) for w in args.workers]
  info = {"command": "PYTHONPATH=. python3 benchmarks/input_pipeline.py " + " ".join(sys.argv[1:]),
          "date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
          "cores": os.cpu_count(), "rows": rows}
  print(json.dumps(info, indent=1))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "input_pipeline_cpu.json"), "w") as f:
      json.dump(info, f, indent=1)
    lines = ["# Input pipeline: 448-px dynamic tiling (6 tiles + thumbnail), CPU", "", f"`{info['command']}`  ",
             f"{info['date']}, {info['cores']} cores ({info['cpu']}); {args.batches} batches of {args.batch} timed from "
             f"the iterator's creation (start-up included), JPEG images 640x480 to 1600x1200", "",
             "| grain workers | examples/s | examples/s per worker | first batch (s) | total (s) |", "|---|---|---|---|---|"]
    for r in rows:
      per = r["examples_per_s"] / max(r["workers"], 1)
      lines.append(f"| {r['workers']} | {r['examples_per_s']:.1f} | {per:.1f} | {r['first_batch_s']:.1f} | "
                   f"{r['seconds']:.1f} |")
    with open(os.path.join(args.out, "input_pipeline_cpu.md"), "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
