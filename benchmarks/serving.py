"""Benchmark: serving a mixed batch of skills with drex.serving, against (a) drex answering one skill selection
per batch and (b) PEFT's mixed-adapter batch (`adapter_names`) on the same model exported with drex.export.

  PYTHONPATH=. python3 benchmarks/serving.py runs/pool10 --out benchmarks/results

The workdir's experts (10 for runs/pool10: `python -m drex.train --config=configs/task10.py
--config.methods="('routing',)" --workdir=runs/pool10`) serve `--requests` questions from the tasks' test
splits, cycling through four skill kinds: routed over all experts, routed over a subset of three, one task's
expert, the base alone. Timed after one warm-up pass over the same requests (compiles excluded), median of
`--reps` rounds in which the compared paths take turns; requests/s and generated tokens/s.
  drex mixed    Server.generate(all requests): every batch mixes the four kinds.
  (a) drex loop one Server.generate call per distinct selection: each batch holds one selection.
  (b) PEFT      transformers InternVLForConditionalGeneration (torch, CPU) with one PEFT LoRA per task loaded,
                `generate(..., adapter_names=[...])` per batch; PEFT cannot route, so it serves the one-task and
                base requests, and drex mixed is timed on exactly those requests for the comparison. Both are
                timed from the requests (image files, questions) to the answers' text, and their answers compared.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from drex.data import tasks  # pylint: disable=g-import-not-at-top
from drex.serving import Request, Server

KINDS = ("routed", "subset", "task", "base")


def make_requests(server: Server, count: int, image_dir: str, max_new_tokens: int) -> list[Request]:
  rng = np.random.default_rng(0)
  out = []
  for i in range(count):
    task = server.tasks[i % len(server.tasks)]
    _, ex = list(tasks.examples(tasks.get(task), "test", size=i // len(server.tasks) + 1, seed=3))[-1]
    image = None
    if ex.image is not None:
      image = os.path.join(image_dir, f"{i}.png")
      Image.fromarray(ex.image).save(image)
    kind = KINDS[i % len(KINDS)]
    others = [t for t in server.tasks if t != task]
    selection = {"routed": {}, "subset": {"experts": [task] + list(rng.choice(others, 2, replace=False))},
                 "task": {"task": task}, "base": {"experts": []}}[kind]
    out.append(Request(ex.question, image=image, max_new_tokens=max_new_tokens, **selection))
  return out


def _timed(fns: dict, reps: int) -> dict[str, float]:
  """Median seconds of each function over `reps` rounds, after a warm-up call of each (compiles); the functions
  take turns within a round, so a slower or faster spell of the machine falls on all of them alike."""
  for fn in fns.values():
    fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      begin = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - begin)
  return {name: statistics.median(t) for name, t in times.items()}


def _selection_key(r: Request):
  return (r.task, tuple(r.experts) if r.experts is not None else None)


def drex_rows(server: Server, requests: list[Request], reps: int) -> dict:
  groups: dict = {}
  for r in requests:
    groups.setdefault(_selection_key(r), []).append(r)
  seconds = _timed({"mixed": lambda: server.generate(requests),
                    "loop": lambda: [server.generate(g) for g in groups.values()]}, reps)
  mixed, looped = seconds["mixed"], seconds["loop"]
  tokens = len(requests) * requests[0].max_new_tokens
  return {"requests": len(requests), "selections": len(groups), "mixed_s": round(mixed, 3),
          "loop_s": round(looped, 3), "mixed_requests_per_s": round(len(requests) / mixed, 2),
          "loop_requests_per_s": round(len(requests) / looped, 2), "mixed_tokens_per_s": round(tokens / mixed, 1),
          "speedup_over_loop": round(looped / mixed, 2)}


def peft_rows(server: Server, requests: list[Request], reps: int, batch_size: int) -> dict:
  """PEFT mixed-adapter batches on the exported model (one-task and base requests only)."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from drex.checkpoints import peft_export  # pylint: disable=g-import-not-at-top
  from drex.data import record  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  cfg, base = server.cfg, server.base
  family = peft_export.export_family(base.info.model, base.info.provenance)
  export = tempfile.mkdtemp(prefix="drex_peft_bench_")
  peft_export.export_merged(os.path.join(export, "base"), base.params, base.info.model, family, dtype="float32")
  model = transformers.InternVLForConditionalGeneration.from_pretrained(os.path.join(export, "base")).eval()
  for i, task in enumerate(server.tasks):
    path = os.path.join(export, task)
    peft_export.export_peft(path, server.experts, i, base.info.model, family, cfg.lora.r, cfg.lora.lora_alpha,
                            cfg.lora.rslora)
    if i == 0:
      model = peft.PeftModel.from_pretrained(model, path, adapter_name=task)
    else:
      model.load_adapter(path, adapter_name=task)
  model.eval()

  def encode(r: Request):
    q = record.make([(r.question, "")], [] if r.image is None else [r.image])
    pixels, counts = server.encoder.pixels(q["images"])
    return server.encoder.prompt_ids(q, counts), pixels[:sum(counts)]

  names = [r.task if r.task else "__base__" for r in requests]

  def run():  # from the requests to the answers' text, as Server.generate
    encoded = [encode(r) for r in requests]
    answers = []
    for start in range(0, len(requests), batch_size):
      chunk = list(range(start, min(start + batch_size, len(requests))))
      length = max(len(encoded[i][0]) for i in chunk)
      ids = np.asarray([[server.encoder.pad_id] * (length - len(encoded[i][0])) + encoded[i][0] for i in chunk])
      mask = np.asarray([[0] * (length - len(encoded[i][0])) + [1] * len(encoded[i][0]) for i in chunk])
      tiles = [encoded[i][1] for i in chunk if len(encoded[i][1])]
      kwargs = {}
      if tiles:
        kwargs["pixel_values"] = torch.from_numpy(np.concatenate(tiles)).permute(0, 3, 1, 2)
      with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=requests[0].max_new_tokens, do_sample=False,
                             adapter_names=[names[i] for i in chunk], pad_token_id=server.encoder.pad_id,
                             eos_token_id=server.encoder.eos_id, **kwargs)
      answers += [server.encoder.decode_answer(row[length:].tolist()) for row in out.numpy()]
    return answers

  timed = _timed({"peft": run, "drex": lambda: server.generate(requests)}, reps)
  seconds, drex_s = timed["peft"], timed["drex"]
  same = sum(p == d.get("answer") for p, d in zip(run(), server.generate(requests)))  # the same model both ways
  return {"requests": len(requests), "same_answers": same, "peft_s": round(seconds, 3), "drex_s": round(drex_s, 3),
          "peft_requests_per_s": round(len(requests) / seconds, 2),
          "drex_requests_per_s": round(len(requests) / drex_s, 2), "speedup_over_peft": round(seconds / drex_s, 2)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--requests", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--max_new_tokens", type=int, default=8)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--skip_peft", action="store_true")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  server = Server(args.workdir, args.batch_size, args.max_new_tokens)
  image_dir = tempfile.mkdtemp(prefix="drex_serving_bench_")
  requests = make_requests(server, args.requests, image_dir, args.max_new_tokens)
  result = {"command": "PYTHONPATH=. python3 benchmarks/serving.py " + " ".join(sys.argv[1:]),
            "date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "experts": len(server.tasks),
            "router": server.cfg.router.to_dict(), "drex": drex_rows(server, requests, args.reps)}
  print(json.dumps(result["drex"]), flush=True)
  if not args.skip_peft:
    fixed = [r for r in requests if r.task is not None or r.experts == []]
    result["peft"] = peft_rows(server, fixed, args.reps, args.batch_size)
    print(json.dumps(result["peft"]), flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "serving_cpu.json"), "w") as f:
      json.dump(result, f, indent=1)
    d, p = result["drex"], result.get("peft")
    lines = ["# Serving a mixed batch of skills (CPU)", "", f"`{result['command']}`  ",
             f"{result['date']}, {result['cores']} cores; {result['experts']} experts; {d['requests']} requests, four "
             f"skill kinds cycled (routed over all / over 3 / one task / base), batch {args.batch_size}, "
             f"{args.max_new_tokens} new tokens each; median of {args.reps} rounds after a warm-up, the compared paths "
             f"taking turns in each round.", "",
             "| path | requests | seconds | requests/s | speed-up of drex mixed |", "|---|---|---|---|---|",
             f"| drex mixed batches | {d['requests']} | {d['mixed_s']} | {d['mixed_requests_per_s']} | |",
             f"| (a) drex, one selection per batch ({d['selections']} selections) | {d['requests']} | {d['loop_s']} | "
             f"{d['loop_requests_per_s']} | {d['speedup_over_loop']}x |"]
    if p:
      lines += [f"| drex mixed, one-task and base requests only | {p['requests']} | {p['drex_s']} | "
                f"{p['drex_requests_per_s']} | |",
                f"| (b) PEFT `adapter_names` mixed batches, same requests | {p['requests']} | {p['peft_s']} | "
                f"{p['peft_requests_per_s']} | {p['speedup_over_peft']}x |", "",
                f"Both timed from the requests (image files, questions) to the answers' text; PEFT gave the same "
                f"answer as drex to {p['same_answers']} of its {p['requests']} requests."]
    with open(os.path.join(args.out, "serving_cpu.md"), "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
