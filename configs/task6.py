"""Ablation: number of tasks. The main stream (configs/task3.py), then three more tasks, each on the
inputs of one of the first three (a shape's colour, the tallest bar, a sum asked in other words): rows
1-3 of each matrix are the main job's, rows 4-6 show what three more experts (or three more rounds of
fine-tuning) do to them.

  python -m drex.train --config=configs/task6.py --workdir=runs/task6
"""

from drex import config as config_lib


def get_config(mode: str = "full"):
  c = config_lib.stream_config()
  c.tasks = config_lib.MAIN_STREAM + ("shape_color", "chart_max", "text_add")
  return config_lib.apply_mode(c, mode)
