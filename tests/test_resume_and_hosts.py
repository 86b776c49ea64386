"""Preemption safety and multi-host runs, with real processes.

* A run killed in the middle of a stage (SIGKILL, or SIGTERM which saves first) and restarted ends
  with exactly the adapters of an uninterrupted run, and trains no finished task again.
* Two JAX processes on loopback run the same stream and produce the same results.json numbers as
  one process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from drex import base as base_lib
from drex.checkpoints import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/task3.py:smoke", "--config.tasks=('shape_color', 'chart_max')", "--config.methods=('routing',)",
        "--config.expert_training.steps=20", "--config.checkpoint_every=5", "--config.data.eval_size=16",
        "--config.data.eval_batch_size=16", "--config.analysis.routing_batch=8"]


def _start(workdir, *extra):
  return subprocess.Popen([sys.executable, "-m", "drex.train", *ARGS, *extra, f"--workdir={workdir}"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(workdir):
  proc = _start(workdir)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return err


def _wait_for_resume_point(workdir, stage, proc, timeout=300):
  """Until the stage has committed a checkpoint step (orbax renames the step directory when done)."""
  path = os.path.join(workdir, "state", stage)
  begin = time.time()
  while time.time() - begin < timeout:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    steps = [n for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
    if steps:
      return
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint of {stage} appeared")


def _adapters(workdir):
  out = {}
  for task in ("shape_color", "chart_max"):
    ex, rt, _ = store.load_adapter(os.path.join(workdir, "adapters", task))
    out[task] = (ex, rt)
  return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  _finish(workdir)
  return workdir


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_adapters(uninterrupted, tmp_path, sig):
  workdir = str(tmp_path / "run")
  proc = _start(workdir)
  _wait_for_resume_point(workdir, "chart_max_expert", proc)  # task 2's expert is being trained
  first_task = os.path.join(workdir, "adapters", "shape_color", "metadata.json")
  finished_at = os.path.getmtime(first_task)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  if sig == signal.SIGTERM:
    assert proc.returncode == 143 and "re-run the same command to resume" in err, err[-2000:]
  else:
    assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, "adapters", "chart_max"))
  log = _finish(workdir)
  assert "resuming from" in log and "reusing" in log
  assert os.path.getmtime(first_task) == finished_at  # the finished task was not trained again
  got, want = _adapters(workdir), _adapters(uninterrupted)
  for task in want:
    for a, b in zip(jax_leaves(got[task]), jax_leaves(want[task])):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  assert not os.path.exists(os.path.join(workdir, "state"))  # resume points are removed once committed
  ours = json.load(open(os.path.join(workdir, "results.json")))["methods"]["routing"]["matrix"]
  theirs = json.load(open(os.path.join(uninterrupted, "results.json")))["methods"]["routing"]["matrix"]
  assert ours == theirs


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.multiprocess
def test_two_processes_give_the_numbers_of_one(uninterrupted, tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / "two")
  procs = [_start(workdir, "--config.distributed.mode=on", f"--config.distributed.coordinator=127.0.0.1:{port}",
                  "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}") for i in range(2)]
  try:
    outs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "in 2 processes" in outs[0][1]
  two = json.load(open(os.path.join(workdir, "results.json")))
  one = json.load(open(os.path.join(uninterrupted, "results.json")))
  for method, entry in one["methods"].items():
    np.testing.assert_allclose(two["methods"][method]["matrix"], entry["matrix"], atol=1e-6)
  assert two["oracle"] == pytest.approx(one["oracle"], abs=1e-6)


def _pretrain(workdir, *extra):
  return subprocess.Popen([sys.executable, "-m", "drex.pretrain", "--config=configs/base_tiny.py:smoke", *extra,
                           f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pretrained(workdir, *extra):
  out, err = _pretrain(workdir, *extra).communicate(timeout=600)
  assert out.strip(), err[-3000:]
  info, _ = store.load_base_info(os.path.join(workdir, "base"))
  return store.load_base_params(os.path.join(workdir, "base"), None), info.provenance["history"]


def test_killed_pretraining_resumes_to_the_same_base(tmp_path):
  """drex.pretrain killed (SIGKILL) after a resume point and re-run ends with the uninterrupted base."""
  reference, reference_history = _pretrained(tmp_path / "uninterrupted")
  workdir = tmp_path / "killed"
  proc = _pretrain(workdir)
  _wait_for_resume_point(str(workdir), "pretrain", proc)
  proc.kill()
  proc.wait()
  assert not os.path.exists(workdir / "base")
  refused = _pretrain(workdir, "--config.learning_rate=0.01").communicate(timeout=600)[1]
  assert "another config" in refused
  params, history = _pretrained(workdir)
  assert history == reference_history and not os.path.exists(workdir / "state")
  for a, b in zip(jax_leaves(reference), jax_leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_pretraining_continues_from_a_base(tmp_path):
  """--config.init_from starts from that base's params and tokenizer (at learning rate 0 they come out
  unchanged, where a fresh init would not; the tokenizer is the base's, not one of config.vocab_size) and
  keeps its provenance."""
  shipped = base_lib.shipped_path()
  params, _ = _pretrained(tmp_path, f"--config.init_from={shipped}", "--config.learning_rate=0",
                          "--config.vocab_size=300", "--config.steps=2", "--config.eval_size=8",
                          "--config.eval_batch_size=8")
  for a, b in zip(jax_leaves(store.load_base_params(shipped, None)), jax_leaves(params)):
    np.testing.assert_array_equal(a, b)
  info, _ = store.load_base_info(os.path.join(tmp_path, "base"))
  shipped_info, _ = store.load_base_info(shipped)
  assert info.provenance["init_from"] == {"path": shipped, "provenance": shipped_info.provenance}
  with open(os.path.join(tmp_path, "base", "tokenizer.json")) as ours:
    with open(os.path.join(shipped, "tokenizer.json")) as theirs:
      assert ours.read() == theirs.read()
