"""Shared test set-up: absl flags parsed (grain workers need it), float32 matmuls on CPU, freed host memory reused
(as the entry points do: drex.host_memory), the longest test files first (pytest-xdist's workers then finish
together)."""

import os

import jax
import pytest
from absl import flags

from drex import host_memory

host_memory.keep_freed_memory()  # before JAX's first computation starts its CPU threads
flags.FLAGS.mark_as_parsed()
jax.config.update("jax_default_matmul_precision", "highest")

# Files whose tests run for minutes (real processes killed and resumed, whole streams): scheduled first.
LONGEST_FIRST = ("test_resume_and_hosts.py", "test_faults.py", "test_sources.py", "test_serving.py",
                 "test_forget.py", "test_end_to_end.py", "test_training.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the session and the drex processes tests start."""
  path = str(tmp_path_factory.mktemp("jax_compilation_cache"))
  settings = {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
  os.environ.update(settings)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  yield path
