"""Shared test set-up: absl flags parsed (grain workers need it), float32 matmuls on CPU."""

import jax
from absl import flags

flags.FLAGS.mark_as_parsed()
jax.config.update("jax_default_matmul_precision", "highest")
