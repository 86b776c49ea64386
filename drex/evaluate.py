"""Re-evaluate a finished drex.train workdir from what is on disk (base + adapters), without training.

  python -m drex.evaluate --workdir=runs/task3
  python -m drex.evaluate --workdir=runs/task3 --config.router.kind=arrow --config.data.eval_split=validation
  python -m drex.evaluate --workdir=runs/task3 --config.router.kind=topk --config.router.level=token \
      --config.router.temperature=1   # the paper's PHATGOOSE router

Any field of the run's config can be overridden with --config.<field>=<value> (a router kind's options are
fields of config.router: drex.adapters.routers); fields that change what was trained are refused, since the
adapters on disk were not trained with them. Writes WORKDIR/evaluation.json and prints, per method, the
largest difference from results.json.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np

from drex import cli
from drex import config as config_lib
from drex.checkpoints import store
from drex.errors import UserError
from drex.stream import run_stream

if __name__ == "__main__":  # the command's flags; importing the module (tests, other modules) defines none
  _WORKDIR = flags.DEFINE_string("workdir", None, "A drex.train workdir.")
  _CONFIG = config_flags.DEFINE_config_dict("config", config_lib.stream_config(),
                                            "Overrides of the workdir's config, e.g. --config.router.k=1.")


def main(argv):
  del argv
  workdir = _WORKDIR.value
  if not workdir:
    raise UserError("--workdir is required")
  cfg = config_lib.read_run_config(workdir)
  for key in cli.override_keys(sys.argv[1:]):
    cli.set_field(cfg, key, cli.get_field(_CONFIG.value, key))
  results = run_stream(cfg, workdir, eval_only=True, results_name="evaluation.json")
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
  cli.run(main, "drex.evaluate", default_config=config_lib.stream_config)
