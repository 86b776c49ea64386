"""Ablation: number of tasks. Six specialized tasks in sequence (the accuracy matrix of each method
shows how routing and the baselines scale with the stream's length).

  python -m drex.train --config=configs/task6.py --workdir=runs/task6
"""

from drex import config as config_lib


def get_config(mode: str = "full"):
  c = config_lib.stream_config()
  c.tasks = ("shape_color", "chart_max", "text_add", "shape_kind", "digit_add", "count_shapes")
  return config_lib.apply_mode(c, mode)
