"""drex.host_memory: with freed memory kept, repeated XLA:CPU runs stop page-faulting their buffers in."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A program whose output (64 MB, above glibc's largest mmap threshold) is allocated anew by every call.
PROGRAM = """
import json, resource, sys
from drex import host_memory
kept = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
double = jax.jit(lambda x: x * 2.0)
faults = []
for _ in range(16):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  double(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults_per_call": min(faults[8:])}))  # the steady state: the fewest of the last 8
"""


def _faults(keep: str) -> dict:
  env = {**os.environ, "DREX_KEEP_FREED_MEMORY": keep, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_removes_the_page_faults_of_each_run():
  default, kept = _faults("0"), _faults("1")
  assert not default["kept"] and kept["kept"]
  pages = 4096 * 4096 * 4 / 4096
  assert default["faults_per_call"] > 0.5 * pages  # a fresh mapping for every output
  assert kept["faults_per_call"] < 0.05 * pages  # the freed block is reused
