"""InternVL2-1B at full size on the CPU (random bf16 weights): one routed LoRA train step and one greedy
generation through benchmarks/internvl2_cpu.py's functions. Slow: 5-9 min and ~13 GB of RAM on 2 CPU cores;
run with -m slow."""

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import internvl2_cpu as bench  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
  return bench.build("internvl2_1b")


def test_internvl2_1b_train_step_and_generation(setup):
  cfg = setup.cfg
  params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(setup.params))
  assert abs(params - 0.938e9) / 0.938e9 < 0.03, params  # InternVL2-1B: 938 M (ViT 304 M, mlp1 4.5 M, LLM 630 M)
  assert {str(x.dtype) for x in jax.tree_util.tree_leaves(setup.params)} == {"bfloat16"}
  assert bench.nbytes(setup.params) == 2 * params

  train_batch, prompt = bench.example(cfg)
  assert train_batch["pixel_values"].shape == (1, 7, 448, 448, 3)
  assert (train_batch["input_ids"] == cfg.image_token_id).sum() == 7 * 256 == 1792

  train = bench.train_phase(setup, train_batch)
  log_vocab = np.log(cfg.llm.vocab_size)
  assert np.isfinite(train["loss"]) and 0.5 * log_vocab < train["loss"] < 3 * log_vocab, train["loss"]
  # no weight decay and a constant lr: an expert leaf moves only where its gradient is nonzero
  before = jax.tree_util.tree_leaves_with_path(setup.experts)
  after = jax.tree_util.tree_leaves(train["experts"])
  assert len(before) == len(after) == 24 * 7 * 2
  for (path, old), new in zip(before, after):
    moved = np.asarray(new, np.float32) != np.asarray(old, np.float32)
    assert moved.shape[0] == 2 and moved[0].any() and moved[1].any(), f"no gradient for an expert at {path}"
    assert np.isfinite(np.asarray(new, np.float32)).all()

  gen = bench.generate_phase(setup, train["experts"], prompt, new_tokens=8)
  tokens = gen["tokens"]
  assert tokens.shape == (1, 8) and tokens.dtype == np.int32
  assert ((tokens >= 0) & (tokens < cfg.llm.vocab_size)).all(), tokens
  assert gen["compile_s"] > 0 and gen["run_s"] > 0 and gen["peak_rss_mib"] > bench.nbytes(setup.params) / 2**20
