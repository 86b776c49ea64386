"""Ablation: related tasks. Two chart tasks on the foundation suite's own chart images (chart_max,
chart_min) and a counting task that conflicts with the foundation's multiple-choice counting
(count_shapes answers a digit, scene_mc a letter). Shows how much routing and the baselines
interfere with the foundation suite when new tasks share its inputs.

  python -m drex.train --config=configs/related.py --workdir=runs/related
"""

from drex import config as config_lib


def get_config(mode: str = "full"):
  c = config_lib.stream_config()
  c.tasks = ("chart_max", "chart_min", "count_shapes")  # related to each other and to the foundation suite
  return config_lib.apply_mode(c, mode)
