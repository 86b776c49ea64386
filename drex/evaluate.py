"""Re-evaluate a finished drex.train workdir from what is on disk (base + adapters), without training.

  python -m drex.evaluate --workdir=runs/task3
  python -m drex.evaluate --workdir=runs/task3 --router_k=1 --calibrate   # same experts, other routing

Writes WORKDIR/evaluation.json and prints, per method, the largest difference from results.json.
"""

from __future__ import annotations

import json
import os

from absl import flags
import numpy as np

from drex import cli
from drex import config as config_lib
from drex.checkpoints import store
from drex.errors import UserError
from drex.stream import Stream

_WORKDIR = flags.DEFINE_string("workdir", None, "A drex.train workdir.")
_ROUTER_K = flags.DEFINE_integer("router_k", None, "Override router.k (experts kept per token).")
_NULL = flags.DEFINE_bool("null_expert", None, "Override router.null_expert.")
_ROUTER = flags.DEFINE_string("router", None, "Override router.kind ('topk', 'arrow', 'dense').")
_CALIBRATE = flags.DEFINE_bool("calibrate", None, "Override router.calibrate (standardize each vector's scores).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Override router.temperature.")


def main(argv):
  del argv
  workdir = _WORKDIR.value
  if not workdir:
    raise UserError("--workdir is required")
  cfg = config_lib.read_run_config(workdir)
  overrides = (("k", _ROUTER_K), ("null_expert", _NULL), ("kind", _ROUTER), ("calibrate", _CALIBRATE),
               ("temperature", _TEMPERATURE))
  for key, flag in overrides:
    if flag.value is not None:
      cfg.router[key] = flag.value
  results = Stream(cfg, workdir, eval_only=True).run("evaluation.json")
  stored_path = os.path.join(workdir, "results.json")
  report = {}
  if store.exists(stored_path):
    stored = store.read_json(stored_path, "stored results")
    for method, entry in results["methods"].items():
      if method in stored["methods"]:
        report[method] = float(np.abs(np.subtract(entry["matrix"], stored["methods"][method]["matrix"])).max())
  print(json.dumps({"methods": {m: {"matrix": r["matrix"], "average_accuracy": r["average_accuracy"],
                                    "foundation": r["foundation"]} for m, r in results["methods"].items()},
                    "max_abs_difference_from_results_json": report}, indent=1))


if __name__ == "__main__":
  cli.run(main, "drex.evaluate")
