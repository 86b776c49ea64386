"""Order-independent experts and exact removal: a task's expert does not depend on its place in the stream,
and `drex.forget` leaves exactly the model of a stream that never learned the task."""

import os

import jax
import numpy as np
import pytest

from drex import config as config_lib
from drex import forget as forget_lib
from drex.checkpoints import store
from drex.cli import load_config_file
from drex.errors import UserError
from drex.stream import run_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tasks):
  cfg = load_config_file(os.path.join(ROOT, "configs", "task3.py:smoke"))
  cfg.tasks, cfg.methods = tuple(tasks), ("routing",)
  return cfg


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
  root = tmp_path_factory.mktemp("forget")
  three = str(root / "three")
  run_stream(_config(("generic_kind", "generic_add", "generic_min")), three)
  two = str(root / "two")
  without = run_stream(_config(("generic_kind", "generic_min")), two)
  return three, two, without


def test_an_expert_does_not_depend_on_its_place_in_the_stream(streams):
  three, two, _ = streams
  for task in ("generic_kind", "generic_min"):  # generic_min is third in one stream, second in the other
    a = store.load_adapter(os.path.join(three, "adapters", task))
    b = store.load_adapter(os.path.join(two, "adapters", task))
    for x, y in zip(jax.tree_util.tree_leaves(a[:2]), jax.tree_util.tree_leaves(b[:2])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_forget_gives_the_stream_that_never_learned_the_task(streams):
  three, _, without = streams
  with pytest.raises(UserError, match="'generic_max' is not a task"):
    forget_lib.forget(three, "generic_max")
  after = forget_lib.forget(three, "generic_add")
  assert after["tasks"] == without["tasks"] and after["forgotten"] == ["generic_add"]
  assert after["methods"]["routing"]["matrix"][-1] == without["methods"]["routing"]["matrix"][-1]  # bit for bit
  assert after["oracle"] == without["oracle"]
  assert os.path.isdir(os.path.join(three, "forgotten", "generic_add"))
  assert not os.path.exists(os.path.join(three, "adapters", "generic_add"))
  assert os.path.exists(os.path.join(three, "results.1.json")) and os.path.exists(os.path.join(three, "config.1.json"))
  again = run_stream(config_lib.read_run_config(three), three, eval_only=True, results_name="evaluation.json")
  assert again["methods"]["routing"]["matrix"] == after["methods"]["routing"]["matrix"]  # the workdir stays usable
