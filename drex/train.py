"""Learn a stream of tasks one at a time and compare routing with the baselines.

  python -m drex.train --config=configs/task3.py --workdir=runs/task3

Writes WORKDIR/results.json, report.md, plots/ and the checkpoints (see drex.stream). Re-running a
finished workdir reuses the saved adapters and only re-evaluates.
"""

from __future__ import annotations

import json
import os

from absl import flags
from ml_collections import config_flags

from drex import cli
from drex import parallel

if __name__ == "__main__":  # the command's flags; importing the module (tests, other modules) defines none
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Stream config file, e.g. configs/task3.py[:smoke].")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")


def main(argv):
  del argv
  cfg = _CONFIG.value
  d = cfg.distributed
  parallel.initialize_distributed(d.mode, d.coordinator, d.num_processes, d.process_id)  # before any JAX call
  from drex.stream import run_stream  # pylint: disable=g-import-not-at-top
  config_path = flags.FLAGS["config"].config_filename
  workdir = _WORKDIR.value or os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])
  results = run_stream(cfg, workdir)
  summary = {m: {k: v for k, v in r.items() if k in ("average_accuracy", "foundation", "backward_transfer")}
             for m, r in results["methods"].items()}
  print(json.dumps({"workdir": workdir, "summary": summary, "seconds": results["timings_s"]["total"]}, indent=1))


if __name__ == "__main__":
  cli.run(main, "drex.train")
