"""Faults and bad input at every entry point: one line on stderr naming the problem and what to do, exit
status 2, and the workdir exactly as it was (byte for byte), or, for faults in the middle of a run, the last
good state kept so that the next run goes on from it."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config=configs/task3.py:smoke", "--config.methods=('routing',)", "--config.data.eval_size=8",
         "--config.data.eval_batch_size=8", "--config.checkpoint_every=4"]
TWO_TASKS = SMOKE + ["--config.tasks=('generic_kind', 'generic_add')"]


def _cmd(module, *args):
  return [sys.executable, "-m", module, *args]


def _run(module, *args, timeout=600):
  proc = subprocess.run(_cmd(module, *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stderr


def _error_line(stderr: str, prog: str) -> str:
  lines = stderr.strip().splitlines()
  errors = [l for l in lines if l.startswith(f"{prog}: error:")]
  assert len(errors) == 1 and not any("Traceback" in l for l in lines), stderr[-3000:]
  return errors[0]


def _snapshot(directory) -> dict[str, str]:
  """relative path -> sha256 of every file under directory."""
  out = {}
  for folder, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(folder, name)
      out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished smoke workdir (one task, routing) and its files' hashes."""
  workdir = str(tmp_path_factory.mktemp("faults") / "run")
  code, err = _run("drex.train", *SMOKE, f"--workdir={workdir}")
  assert code == 0, err[-3000:]
  return workdir, _snapshot(workdir)


def _copy(finished, tmp_path) -> str:
  workdir = str(tmp_path / "copy")
  shutil.copytree(finished[0], workdir)
  return workdir


def test_unwritable_workdir():
  code, err = _run("drex.train", *SMOKE, "--workdir=/proc/drex/run")
  assert code == 2 and "cannot write to /proc/drex/run" in _error_line(err, "drex.train")
  assert not os.path.exists("/proc/drex")


def test_base_of_another_model_family(tmp_path):
  llama = tmp_path / "llama"
  llama.mkdir()
  (llama / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
  for weights in (False, True):  # without and with safetensors next to the config
    if weights:
      (llama / "model.safetensors").write_bytes(b"")
    code, err = _run("drex.train", *SMOKE, f"--config.base.checkpoint={llama}", f"--workdir={tmp_path}/run")
    line = _error_line(err, "drex.train")
    assert code == 2 and str(llama) in line and "'llama'" in line and "InternVL" in line
    assert not os.path.exists(tmp_path / "run")


def test_rerun_with_another_config_leaves_the_workdir_as_it_was(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  code, err = _run("drex.train", *SMOKE, "--config.lora.r=4", f"--workdir={workdir}")
  assert code == 2 and "was trained with a different config" in _error_line(err, "drex.train")
  assert _snapshot(workdir) == finished[1]
  code, err = _run("drex.evaluate", f"--workdir={workdir}")  # the refused command broke nothing
  assert code == 0, err[-2000:]


def test_a_changed_config_that_fits_keeps_the_earlier_one(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  code, err = _run("drex.train", *SMOKE, "--config.router.k=1", f"--workdir={workdir}")  # re-evaluates only
  assert code == 0, err[-2000:]
  assert open(os.path.join(workdir, "config.1.json")).read() == open(os.path.join(finished[0], "config.json")).read()
  assert '"k": 1' in open(os.path.join(workdir, "config.json")).read()


@pytest.mark.parametrize("image", ["missing.png", "garbage.png", "truncated.png"])
def test_generate_with_a_bad_image(finished, tmp_path, image):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "full.png")
  (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image at all")
  (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
  code, err = _run("drex.generate", f"--workdir={finished[0]}", f"--image={tmp_path / image}", "--question=what ?")
  line = _error_line(err, "drex.generate")
  assert code == 2 and str(tmp_path / image) in line
  assert _snapshot(finished[0]) == finished[1]


def test_evaluate_names_the_damaged_adapter_file(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  data = os.path.join(workdir, "adapters", "generic_kind", "experts")
  largest = max((os.path.join(d, n) for d, _, ns in os.walk(data) for n in ns), key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  before = _snapshot(workdir)
  code, err = _run("drex.evaluate", f"--workdir={workdir}")
  line = _error_line(err, "drex.evaluate")
  assert code == 2 and "is damaged" in line and largest in line and "does not fit" not in line
  assert _snapshot(workdir) == before


def _wait_for(predicate, proc, timeout=300, poll=0.005):
  begin = time.time()
  while time.time() - begin < timeout:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  raise AssertionError("timed out")


def test_non_finite_loss_stops_the_stage_and_a_fixed_rerun_resumes(tmp_path):
  """SIGTERM leaves a resume point; a diverging config then stops at the first NaN without saving anything
  of it; the fixed config resumes from the resume point and finishes."""
  workdir = str(tmp_path / "run")
  stage = os.path.join(workdir, "state", "generic_kind_expert")
  proc = subprocess.Popen(_cmd("drex.train", *SMOKE, f"--workdir={workdir}"), cwd=ROOT, stderr=subprocess.PIPE,
                          text=True)
  assert _wait_for(lambda: os.path.isdir(stage) and any(n.isdigit() for n in os.listdir(stage)), proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 143
  saved = sorted(int(n) for n in os.listdir(stage) if n.isdigit())
  code, err = _run("drex.train", *SMOKE, "--config.expert_training.learning_rate=1e38", f"--workdir={workdir}")
  line = _error_line(err, "drex.train")
  assert code == 2 and "[routing] generic_kind expert" in line and "NaN/inf at step" in line
  assert f"last good resume point, step {saved[-1]}" in line
  assert sorted(int(n) for n in os.listdir(stage) if n.isdigit())[-1] == saved[-1]  # nothing saved after it
  assert not os.path.exists(os.path.join(workdir, "adapters", "generic_kind"))
  code, err = _run("drex.train", *SMOKE, f"--workdir={workdir}")
  assert code == 0, err[-3000:]
  assert f"resuming from {stage} step {saved[-1]}" in err


def _mount_tmpfs(path, size: str) -> bool:
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


def test_disk_full_keeps_what_was_committed(tmp_path):
  """The disk fills up while task 2 trains: one line, task 1's adapter intact; with space again the same
  command finishes and does not train task 1 again."""
  mount = tmp_path / "small_disk"
  if not _mount_tmpfs(mount, "64m"):
    pytest.skip("mounting a tmpfs needs root")
  try:
    workdir = str(mount / "run")
    first = os.path.join(workdir, "adapters", "generic_kind")
    proc = subprocess.Popen(_cmd("drex.train", *TWO_TASKS, f"--workdir={workdir}"), cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: os.path.isdir(first), proc, poll=0.05)
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk to its last byte
    for block in (1 << 20, 4096, 1):
      try:
        while True:
          os.write(fd, b"\0" * block)
      except OSError:
        pass
    os.close(fd)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "no space left" in _error_line(err, "drex.train")
    committed = _snapshot(first)
    os.remove(mount / "filler")
    code, err = _run("drex.train", *TWO_TASKS, f"--workdir={workdir}")
    assert code == 0, err[-3000:]
    assert f"reusing {first}" in err and "generic_kind expert:" not in err
    assert _snapshot(first) == committed
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_signal_during_the_adapter_commit(tmp_path, sig):
  """Killed while the adapter is being written (its staging directory exists): the final directory never
  appears half-written, and the next run commits it and finishes."""
  for attempt in range(3):  # the commit lasts a fraction of a second: try again if the signal came too late
    workdir = str(tmp_path / f"run{attempt}")
    final = os.path.join(workdir, "adapters", "generic_kind")
    proc = subprocess.Popen(_cmd("drex.train", *SMOKE, f"--workdir={workdir}"), cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
    assert _wait_for(lambda: os.path.isdir(final + ".tmp"), proc, poll=0.002)
    proc.send_signal(sig)
    proc.wait(timeout=300)
    if sig == signal.SIGKILL and os.path.exists(final):
      continue
    break
  else:
    pytest.skip("the commit finished before the signal three times")
  if sig == signal.SIGKILL:
    assert not os.path.exists(final)  # nothing half-written under the final name
  else:  # SIGTERM only sets a flag: the commit completes, then the run stops or finishes
    assert proc.returncode in (0, 143) and os.path.exists(os.path.join(final, "files.json"))
  code, err = _run("drex.train", *SMOKE, f"--workdir={workdir}")
  assert code == 0, err[-3000:]
  assert os.path.exists(os.path.join(final, "files.json")) and not os.path.exists(final + ".tmp")
  code, err = _run("drex.evaluate", f"--workdir={workdir}")
  assert code == 0, err[-2000:]
