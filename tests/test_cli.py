"""User errors at the command line are one clear line (exit status 2), never a traceback."""

import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=120):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stderr.strip().splitlines()


def _one_error_line(lines, prog):
  errors = [l for l in lines if l.startswith(f"{prog}: error:")]
  assert len(errors) == 1, lines
  assert not any("Traceback" in l for l in lines), lines
  return errors[0]


def test_wrong_config_key(tmp_path):
  code, lines = _run("drex.train", "--config=configs/task3.py", "--config.lora.rank=4", f"--workdir={tmp_path}")
  assert code == 2
  line = _one_error_line(lines, "drex.train")
  assert "unknown config key 'lora.rank'" in line and "lora_alpha" in line  # names the known keys


def test_missing_config_file(tmp_path):
  code, lines = _run("drex.train", "--config=configs/nope.py", f"--workdir={tmp_path}")
  assert code == 2 and "config file not found: configs/nope.py" in _one_error_line(lines, "drex.train")


def test_bad_config_value(tmp_path):
  code, lines = _run("drex.train", "--config=configs/task3.py", "--config.tasks=('shape_color','juggling')",
                     f"--workdir={tmp_path}")
  assert code == 2 and "unknown task 'juggling'" in _one_error_line(lines, "drex.train")


def test_evaluate_on_an_empty_workdir(tmp_path):
  code, lines = _run("drex.evaluate", f"--workdir={tmp_path}")
  assert code == 2 and "run config not found" in _one_error_line(lines, "drex.evaluate")


def test_missing_base_checkpoint(tmp_path):
  code, lines = _run("drex.train", "--config=configs/task3.py:smoke", f"--config.base.checkpoint={tmp_path}/nothing",
                     f"--workdir={tmp_path}/run")
  assert code == 2 and "base checkpoint directory not found" in _one_error_line(lines, "drex.train")


def test_entry_points_import_together():
  """Importing the commands as modules (tests and library code import generate.ask, forget.forget) defines no
  flags, so any of them can be imported together; each still parses its own flags when run."""
  modules = ["drex.train", "drex.evaluate", "drex.generate", "drex.export", "drex.pretrain", "drex.serve",
             "drex.forget"]
  proc = subprocess.run([sys.executable, "-c", "import importlib\nfor m in %r: importlib.import_module(m)" % modules],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  for module in modules:  # absl's --help lists the module's own flags (and exits 1)
    help_text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                               timeout=300).stdout
    assert "--workdir:" in help_text, (module, help_text[-500:])


CACHED_PROGRAM = """
import json, jax, jax.numpy as jnp
from drex import cli
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
directory = cli.use_compilation_cache()
jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
print(json.dumps({"directory": directory, "hits": len(hits)}))
"""


def _cached_run(env: dict) -> dict:
  env = {**{k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "DREX_COMPILATION"))}, **env,
         "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  out = subprocess.run([sys.executable, "-c", CACHED_PROGRAM], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_entry_points_keep_compiled_programs_across_runs(tmp_path):
  """A second process compiling the same programs loads them from the cache: ~/.cache/drex/xla by default, JAX's own
  JAX_COMPILATION_CACHE_DIR when set; DREX_COMPILATION_CACHE=0 turns it off."""
  home = {"HOME": str(tmp_path)}
  first, second = _cached_run(home), _cached_run(home)
  assert first["directory"] == second["directory"] == os.path.join(str(tmp_path), ".cache", "drex", "xla")
  assert first["hits"] == 0 and second["hits"] > 0 and os.listdir(first["directory"])
  own = {**home, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "own")}
  assert _cached_run(own) == {"directory": str(tmp_path / "own"), "hits": 0}
  assert _cached_run(own)["hits"] > 0
  assert _cached_run({**home, "DREX_COMPILATION_CACHE": "0"}) == {"directory": None, "hits": 0}
