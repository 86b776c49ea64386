"""Serving many skills in one batch: each request answered as it would be alone with its selection, and as
drex evaluates that selection; bad requests get their own error line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from drex import config as config_lib
from drex import workdir as workdir_lib
from drex.adapters import lora, routers
from drex.checkpoints import store
from drex.cli import load_config_file
from drex.data import record, tasks
from drex.models.generation import jitted_greedy_generate
from drex.serving import Request, Server, prompt_bucket
from drex.stream import run_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("generic_kind", "generic_add")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  cfg = load_config_file(os.path.join(ROOT, "configs", "task3.py:smoke"))
  cfg.tasks, cfg.methods = TASKS, ("routing",)
  path = str(tmp_path_factory.mktemp("serving") / "run")
  run_stream(cfg, path)
  images = tmp_path_factory.mktemp("images")
  return path, images


def _requests(image_dir) -> list[Request]:
  out = []
  for name, task in [("shape", "generic_kind"), ("words", "generic_add"), ("chart", "generic_min")]:
    for i, (_, ex) in enumerate(tasks.examples(tasks.get(task), "test", size=2, seed=7)):
      path = None
      if ex.image is not None:
        path = str(image_dir / f"{name}{i}.png")
        Image.fromarray(ex.image).save(path)
      out.append((ex.question, path))
  selections = [dict(), dict(task="generic_kind"), dict(task="generic_add"), dict(experts=["generic_add"]),
                dict(experts=[]), dict(experts=list(TASKS))]
  return [Request(q, image=p, max_new_tokens=3 + i % 4, **selections[i % len(selections)])
          for i, (q, p) in enumerate(out)]


def test_a_mixed_batch_answers_each_request_as_alone(workdir):
  path, image_dir = workdir
  requests = _requests(image_dir)
  together = Server(path, batch_size=8).generate(requests)
  alone = Server(path, batch_size=1)
  for request, answer in zip(requests, together):
    assert answer == alone.generate([request])[0], request
  assert {tuple(a["experts"]) for a in together} == {TASKS, ("generic_kind",), ("generic_add",), ()}


def _reference(path, request: Request, router, expert_names) -> str:
  """What drex evaluates for a selection: the chosen experts stacked alone (none: the base), greedy decoding."""
  cfg = config_lib.read_run_config(path)
  server = Server(path, batch_size=1)
  base = server.base
  question = record.make([(request.question, "")], [] if request.image is None else [request.image])
  pixels, counts = server.encoder.pixels(question["images"])
  prompt = server.encoder.prompt_ids(question, counts)
  variables = {"params": base.params}
  if expert_names:
    loaded = [store.load_adapter(os.path.join(path, "adapters", t)) for t in expert_names]
    variables.update(experts=lora.stack([e for e, _, _ in loaded]), router=lora.stack([r for _, r, _ in loaded]))
    if "id_w" in router.reads():  # identification among these tasks and the base, as in a stream of them alone
      variables["router"] = lora.merge_trees(variables["router"],
                                             workdir_lib.identification_tree(path, cfg, expert_names))
  model = base.model(lora.AdapterSpec(router, cfg.lora.lora_alpha, cfg.lora.rslora, cfg.lora.kernel))
  tokens = jitted_greedy_generate(model, variables, pixels[None], np.asarray([prompt], np.int32),
                                  np.ones((1, len(prompt)), np.int32), request.max_new_tokens,
                                  server.encoder.eos_id, server.encoder.pad_id)
  return server.encoder.decode_answer(np.asarray(tokens[0]))


def test_selections_equal_what_drex_evaluates(workdir):
  path, image_dir = workdir
  cfg = config_lib.read_run_config(path)
  server = Server(path, batch_size=4)
  for request in _requests(image_dir)[:6]:
    got = server.generate([request])[0]["answer"]
    if request.task is not None:
      want = _reference(path, request, routers.Single(0), [request.task])
    elif request.experts == []:
      want = _reference(path, request, routers.Single(0), [])
    else:
      names = request.experts or list(TASKS)
      want = _reference(path, request, routers.from_config(cfg.router, len(names)), names)
    assert got == want, request


def test_serve_command_answers_good_requests_and_reports_bad_ones(workdir, tmp_path):
  path, image_dir = workdir
  good = _requests(image_dir)[:3]
  lines = [json.dumps({k: v for k, v in vars(r).items() if v is not None}) for r in good]
  lines[1:1] = ['{"question": "what ?", "task": "juggling"}', '{"question": "what ?", "image": "/no/such.png"}',
                "not json", '{"question": "what ?", "colour": "red"}']
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  proc = subprocess.run([sys.executable, "-m", "drex.serve", f"--workdir={path}", f"--requests={tmp_path / 'in.jsonl'}",
                         f"--out={tmp_path / 'out.jsonl'}", "--batch_size=4"], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert len(out) == 7 and "examples_per_s" in proc.stdout
  assert "answer" in out[0] and all("answer" in out[i] for i in (5, 6))
  assert "unknown task 'juggling'" in out[1]["error"] and "image file not found" in out[2]["error"]
  assert "not a request" in out[3]["error"] and "unknown fields ['colour']" in out[4]["error"]


def test_prompt_buckets_are_few_and_pad_less_than_a_third():
  buckets = [prompt_bucket(n) for n in range(1, 8193)]
  assert all(b >= n for n, b in enumerate(buckets, 1)) and buckets == sorted(buckets)
  assert all((b - n) / b < 1 / 3 for n, b in enumerate(buckets, 1) if n > 16)
  assert sorted(set(buckets)) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
                                  6144, 8192]
