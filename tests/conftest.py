"""Shared test set-up: absl flags parsed (grain workers need it), float32 matmuls on CPU."""

import os

import jax
import pytest
from absl import flags

flags.FLAGS.mark_as_parsed()
jax.config.update("jax_default_matmul_precision", "highest")


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
