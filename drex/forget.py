"""Remove a task from a finished drex.train workdir: the routed model then is exactly the one that never
learned it.

  python -m drex.forget --workdir=runs/task3 --task=generic_add

Each task's expert and routing vectors depend on nothing but its own task (their seeds come from its name;
its sequence and prompt lengths are its own), so the remaining adapters are the ones a stream without the
task would have trained, bit for bit, and the routing method over them gives that stream's accuracies. The
routing method is re-evaluated first (nothing changes if that fails); then the task's adapter is moved to
WORKDIR/forgotten/<task>/ and the new config.json and results.json are written (the earlier ones kept as
config.<n>.json and results.<n>.json). The baselines (sequential, mtl) were trained on the task's data and
cannot forget it without retraining: they are left out of the new results, and their directories (like
forgotten/<task>/, which holds the task's expert) stay in the workdir until deleted by hand.
"""

from __future__ import annotations

import json
import os

from absl import flags
from etils import epath

from drex import cli
from drex import config as config_lib
from drex import report
from drex.checkpoints import store
from drex.errors import UserError

if __name__ == "__main__":  # the command's flags; importing the module (tests, other modules) defines none
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished drex.train workdir.")
  _TASK = flags.DEFINE_string("task", None, "The task to remove.")


def forget(workdir: str, task: str) -> dict:
  """Remove `task` from the workdir's stream; returns the new results (routing method only)."""
  from drex.stream import run_stream  # pylint: disable=g-import-not-at-top
  cfg = config_lib.read_run_config(workdir)
  if task not in cfg.tasks:
    raise UserError(f"{task!r} is not a task of {workdir}; its tasks: {', '.join(cfg.tasks)}")
  if len(cfg.tasks) == 1:
    raise UserError(f"{task!r} is the only task of {workdir}: nothing would be left (use a new workdir instead)")
  adapter = os.path.join(workdir, "adapters", task)
  if not store.isdir(adapter):
    raise UserError(f"adapter not found: {adapter}; was the stream finished?")
  earlier = store.read_json(os.path.join(workdir, "results.json"), "results").get("forgotten", []) if store.exists(
      os.path.join(workdir, "results.json")) else []
  cfg.tasks = tuple(t for t in cfg.tasks if t != task)
  cfg.task_order_seed = -1  # the remaining tasks keep their order
  cfg.methods = ("routing",)
  with cfg.unlocked():
    if cfg.get("sources") and task in cfg.sources and task not in cfg.foundation:
      del cfg.sources[task]
  # 1. evaluate (nothing in the workdir changes if this fails), 2. write the new files beside the old ones,
  # 3. rename: the adapter aside, the old files aside, the new ones into place.
  pending_results = os.path.join(workdir, f"results.forget-{task}.json")
  results = run_stream(cfg, workdir, eval_only=True, results_name=os.path.basename(pending_results))
  results["forgotten"] = earlier + [task]
  store.write_json(pending_results, results)
  pending_config = os.path.join(workdir, f"config.forget-{task}.json")
  store.write_json(pending_config, json.loads(json.dumps(cfg.to_dict(), default=str)))
  forgotten = os.path.join(workdir, "forgotten", task)
  store.makedirs(os.path.dirname(forgotten))
  store.keep_aside(forgotten)
  epath.Path(adapter).rename(forgotten)
  for name, pending in (("config.json", pending_config), ("results.json", pending_results)):
    store.keep_aside(os.path.join(workdir, name))
    epath.Path(pending).rename(os.path.join(workdir, name))
  report.write_all(workdir, results)
  return results


def main(argv):
  del argv
  if not _WORKDIR.value or not _TASK.value:
    raise UserError("--workdir and --task are required")
  results = forget(_WORKDIR.value, _TASK.value)
  routing = results["methods"]["routing"]
  print(json.dumps({"workdir": _WORKDIR.value, "forgotten": _TASK.value, "tasks": results["tasks"],
                    "final_row": dict(zip(routing["columns"], routing["matrix"][-1]))}, indent=1))


if __name__ == "__main__":
  cli.run(main, "drex.forget")
