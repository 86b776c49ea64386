"""The main job end to end on the shipped tiny base.

CI runs the `:smoke` stream (one short task); the full `configs/task3.py` run, with the paper's
effects checked, is marked slow (python -m pytest -m slow tests/test_end_to_end.py)."""

import json
import os

import jax
import matplotlib
import numpy as np
import pytest

from drex import base as base_lib
from drex import generate
from drex import serving
from drex import workdir as workdir_lib
from drex.checkpoints import store
from drex.cli import load_config_file
from drex.data import tasks
from drex.errors import UserError
from drex.routing_statistics import null_prototypes
from drex.stream import open_run, run_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_schema(results, num_tasks, num_foundation):
  assert set(results) >= {"tasks", "foundation", "methods", "oracle", "timings_s"}
  for name, m in results["methods"].items():
    assert set(m) >= {"columns", "matrix", "average_accuracy", "forgetting", "backward_transfer",
                      "foundation_retention"}, name
    matrix = np.asarray(m["matrix"])
    assert matrix.shape[1] == num_tasks + num_foundation and ((0 <= matrix) & (matrix <= 1)).all()
    assert m["columns"] == results["tasks"] + results["foundation"]
  assert np.asarray(results["methods"]["routing"]["matrix"]).shape[0] == num_tasks + 1
  assert set(results["oracle"]) == set(results["tasks"])


def test_shipped_base_is_small_and_loads():
  path = base_lib.shipped_path()
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
  assert size <= 20e6
  base = base_lib.load()
  assert base.info.template == "tiny" and base.info.provenance["command"].startswith("python -m drex.pretrain")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The `:smoke` stream, run once from an empty workdir: (config, workdir, results)."""
  cfg = load_config_file(os.path.join(ROOT, "configs", "task3.py:smoke"))
  workdir = str(tmp_path_factory.mktemp("smoke") / "run")
  return cfg, workdir, run_stream(cfg, workdir)


def test_smoke_stream_end_to_end_reuse_and_reevaluation(smoke_run):
  cfg, workdir, results = smoke_run
  _check_schema(results, 1, 3)
  for name in ("results.json", "report.md", "plots/matrix_routing.png", "plots/routing_routing.png",
               f"adapters/{cfg.tasks[0]}/metadata.json", "base/config.json", "baselines/mtl/metadata.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  stored = json.load(open(os.path.join(workdir, "results.json")))
  base_mtime = os.path.getmtime(os.path.join(workdir, "base", "config.json"))

  again = run_stream(cfg, workdir)  # finished workdir: nothing is trained again
  assert not any(k.endswith(("/expert", "/router", "/train")) for k in again["timings_s"])
  assert os.path.getmtime(os.path.join(workdir, "base", "config.json")) == base_mtime
  evaluated = run_stream(cfg, workdir, eval_only=True, results_name="evaluation.json")
  for method in stored["methods"]:
    assert again["methods"][method]["matrix"] == stored["methods"][method]["matrix"]
    assert evaluated["methods"][method]["matrix"] == stored["methods"][method]["matrix"]


def test_null_expert_prototypes_are_kept_per_sample_size(smoke_run):
  """The null expert's prototypes are a cache of what the base and the data make: one per foundation suite and
  sample size (router.null_sample in whole batches); another sample size makes new ones, never reuses others."""
  _, workdir, _ = smoke_run
  cfg = load_config_file(os.path.join(ROOT, "configs", "task3.py:smoke"))
  cfg.router.null_expert, cfg.methods = True, ("routing",)
  made = []
  for sample in (cfg.data.eval_batch_size, 2 * cfg.data.eval_batch_size):
    cfg.router.null_sample = sample
    tree = null_prototypes(open_run(cfg, workdir, eval_only=True))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(tree))
    made.append(workdir_lib.null_expert_dir(workdir, cfg))
  assert made[0] != made[1] and all(os.path.isdir(d) for d in made)
  first, second = (store.load_tree(d, None, "prototypes") for d in made)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))


def test_ask_answers_the_same_with_and_without_prompt_padding(smoke_run, monkeypatch):
  """ask() left-pads prompts to a bucket so one compile serves many questions: padding must change nothing."""
  cfg, workdir, _ = smoke_run
  routed = generate.load_routed(workdir)
  examples = [next(tasks.examples(tasks.get(name), "test", size=1))[1] for name in (cfg.tasks[0], "doc_text")]
  padded = [generate.ask(routed, ex.image, ex.question, max_new_tokens=4) for ex in examples]
  monkeypatch.setattr(serving, "prompt_bucket", lambda length: length)
  unpadded = [generate.ask(routed, ex.image, ex.question, max_new_tokens=4) for ex in examples]
  assert [p["answer"] for p in padded] == [u["answer"] for u in unpadded]
  np.testing.assert_allclose([p["routing_per_layer"] for p in padded], [u["routing_per_layer"] for u in unpadded],
                             atol=2e-3)


def test_walkthrough_notebook_runs_on_a_finished_workdir(smoke_run, monkeypatch, capsys):
  """notebooks/walkthrough.ipynb, cell by cell, on the smoke workdir (no training: it is finished)."""
  _, workdir, results = smoke_run
  monkeypatch.setenv("DREX_WORKDIR", workdir)
  matplotlib.use("Agg")
  notebook = json.load(open(os.path.join(ROOT, "notebooks", "walkthrough.ipynb")))
  namespace: dict = {}
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), "walkthrough.ipynb", "exec"), namespace)  # pylint: disable=exec-used
  assert set(namespace["answers"]) == set(results["tasks"] + results["foundation"])
  for out in namespace["answers"].values():
    weights = np.asarray(out["routing_per_layer"])
    assert weights.ndim == 2 and weights.shape[1] == len(out["experts"]) and np.allclose(weights.sum(-1), 1.0, atol=1e-3)
  assert "## Timings" in capsys.readouterr().out
  assert len(namespace["served"]) == len(namespace["requests"]) and all("answer" in a for a in namespace["served"])


@pytest.mark.slow
def test_task3_shows_the_method(tmp_path):
  """The main job's effects as measured on the shipped base (README, "Results"): routing keeps every task
  near its own expert (measured 100% with the identify default, 94-100% with the topk hybrid) and the
  foundation suite within the issue's 2 points (measured 0.0; -2.0 with the topk hybrid), better than both
  baselines; sequential fine-tuning forgets tasks 1-2 (measured
  66 points) and the foundation suite (-27). Margins allow for other CPUs' numerics; the run is deterministic on one machine."""
  cfg = load_config_file(os.path.join(ROOT, "configs", "task3.py"))
  r = run_stream(cfg, str(tmp_path / "task3"))
  routing, sequential, mtl = (r["methods"][m] for m in ("routing", "sequential", "mtl"))
  for j, task in enumerate(r["tasks"]):
    assert routing["matrix"][-1][j] >= 0.9 * r["oracle"][task], task
  seq = np.asarray(sequential["matrix"])
  assert np.mean([seq[j + 1, j] - seq[-1, j] for j in (0, 1)]) >= 0.15  # forgetting of tasks 1-2
  assert routing["foundation_retention"] >= -0.025
  assert routing["foundation_retention"] > sequential["foundation_retention"] + 0.05
  assert routing["foundation_retention"] > mtl["foundation_retention"]
  assert sequential["foundation_retention"] <= -0.10


@pytest.fixture
def fixed_router():
  """A router kind defined here, in a test file: every token to one expert, the expert chosen by a config
  option of its own. Registered for the test only."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from typing import ClassVar  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from drex.adapters import routers  # pylint: disable=g-import-not-at-top

  @routers.register
  @dataclasses.dataclass(frozen=True)
  class OneExpert(routers.Router):
    KIND: ClassVar[str] = "one_expert"
    INFERENCE: ClassVar[bool] = True
    OPTIONS: ClassVar[dict] = {"chosen_expert": (0, "the expert every token goes to")}
    chosen: int = 0

    def gates(self, x, num_experts, variables, experts):
      return jnp.broadcast_to(jax.nn.one_hot(self.chosen, num_experts), x.shape[:-1] + (num_experts,))

    @classmethod
    def from_config(cls, c, num_experts):
      return cls(c.chosen_expert)

  yield OneExpert
  routers.REGISTRY.pop("one_expert")


def test_a_router_kind_from_a_test_file_evaluates_a_workdir(smoke_run, fixed_router):
  """Registering a kind is all it takes: config.router gets its option, validation accepts it, and the
  driver evaluates the workdir's experts with it (no training). Routed to the task's own expert, routing
  scores what the oracle scored."""
  from drex import config as config_lib  # pylint: disable=g-import-not-at-top
  _, workdir, results = smoke_run
  cfg = config_lib.read_run_config(workdir)
  assert cfg.router.chosen_expert == 0  # the new option, at its default
  cfg.router.kind = "one_expert"
  cfg.methods = ("routing",)
  evaluated = run_stream(cfg, workdir, eval_only=True, results_name="evaluation.json")
  task = results["tasks"][0]
  assert evaluated["methods"]["routing"]["matrix"][-1][0] == results["oracle"][task]
  cfg.router.kind = "one_expert_typo"
  with pytest.raises(UserError, match="config.router.kind must be one of .*one_expert"):
    run_stream(cfg, workdir, eval_only=True, results_name="evaluation.json")
