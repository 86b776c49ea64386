"""Accuracy of routing settings over subsets of the experts of one drex.train workdir (evaluation only).

Train a pool of experts once, then ask which streams and which router settings work, without
training again:

  python -m drex.train --config=configs/task3.py --config.methods="('routing',)" --workdir=runs/pool7 \
      --config.tasks="('shape_color','digit_add','text_add','shape_kind','chart_max','count_shapes','chart_min')"
  PYTHONPATH=. python benchmarks/routing_subsets.py runs/pool7 "shape_kind,chart_min,text_add;shape_color,shape_kind,text_add" \
      '{"k":2};{"k":2,"null":true};{"k":2,"null":true,"cal":true,"T":0.5}'

Subsets are ';'-separated lists of tasks; settings are ';'-separated JSON objects with k, T (temperature),
null (null expert), cal (calibrated scores), level ('token', 'sequence', 'hybrid'), cand (the hybrid's
candidates per sequence), kind (the router kind, e.g. 'identify'), layers and shrink (identify's
identify_layers and identify_shrinkage); what a setting leaves out is the run's own router config
(`{}` = the routing the run evaluated with). An optional fourth argument names the split the
accuracies are measured on: 'validation' (default; choose settings there) or 'test'. Prints one line
per subset and setting: each task's and each foundation member's accuracy.
"""

import json
import sys

from drex import config as config_lib
from drex import routing_statistics, stream
from drex.adapters import lora, routers
from drex.checkpoints import store


def main(workdir: str, subsets: str, settings: str, split: str = "validation") -> None:
  cfg = config_lib.read_run_config(workdir)
  cfg.data.eval_split = split
  run_router = cfg.router.to_dict()
  run = stream.open_run(cfg, workdir, eval_only=True)
  adapters = {task: store.load_adapter(f"{workdir}/adapters/{task}")[:2] for task in cfg.tasks}
  for subset in [tuple(s.split(",")) for s in subsets.split(";")]:
    experts = lora.stack([adapters[t][0] for t in subset])
    vectors = lora.stack([adapters[t][1] for t in subset])
    columns = list(subset) + list(cfg.foundation)
    for setting in [json.loads(s) for s in settings.split(";")]:
      cfg.router.update(k=setting.get("k", run_router["k"]), temperature=setting.get("T", run_router["temperature"]),
                        null_expert=setting.get("null", run_router["null_expert"]),
                        calibrate=setting.get("cal", run_router["calibrate"]),
                        level=setting.get("level", run_router.get("level", "token")),
                        candidates=setting.get("cand", run_router.get("candidates", 2)),
                        pooling=setting.get("pool", run_router.get("pooling", "mean")),
                        kind=setting.get("kind", run_router["kind"]),
                        identify_layers=setting.get("layers", run_router.get("identify_layers", 2)),
                        identify_shrinkage=setting.get("shrink", run_router.get("identify_shrinkage", 0.1)))
      router = routers.from_config(cfg.router, len(subset))
      tree = lora.merge_trees(vectors, routing_statistics.data_leaves(run, router, subset))  # made once, then loaded
      row = stream.evaluate_row(run, router, {"experts": experts, "router": tree}, columns)
      print(f"{'+'.join(subset)} {json.dumps(setting)}: " + ", ".join(f"{c} {v:.3f}" for c, v in zip(columns, row)),
            flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:5])
