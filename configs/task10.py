"""Ablation: number of tasks, ten of them. Every learnable task of the embedded family (each one's own expert
reaches >= 0.94): the main stream, then three tasks on its inputs (a shape's colour, the tallest bar, a sum asked
in other words), then the related ones (the shortest bar of the same charts, the number of shapes against the
foundation's multiple-choice counting, a shape's kind asked plainly, the shortest bar of a chart given as text).

  python -m drex.train --config=configs/task10.py --workdir=runs/task10
  python -m drex.train --config=configs/task10.py --config.task_order_seed=1 --workdir=runs/task10_order1

`--config.task_order_seed=N` learns the same ten tasks in another order (a fixed permutation per N), the
number-of-tasks ablation in three orders: each expert is the same whatever the order (seeded by its task).
"""

from drex import config as config_lib

TASKS = config_lib.MAIN_STREAM + ("shape_color", "chart_max", "text_add", "chart_min", "count_shapes", "shape_kind",
                                  "text_min")


def get_config(mode: str = "full"):
  c = config_lib.stream_config()
  c.tasks = TASKS  # learned in this order unless task_order_seed is set
  return config_lib.apply_mode(c, mode)
