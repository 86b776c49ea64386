"""The main job: three specialized tasks learned in sequence on the shipped tiny base.

  python -m drex.train --config=configs/task3.py --workdir=runs/task3
  python -m drex.train --config=configs/task3.py:smoke --workdir=/tmp/smoke   # CI-sized

Routing (the method) vs sequential fine-tuning (forgets) vs multi-task learning (all data at once).
"""

from drex import config as config_lib


def get_config(mode: str = "full"):
  c = config_lib.stream_config()
  c.tasks = config_lib.MAIN_STREAM  # one generic question: a shape's kind; a sum in words (no image); shortest bar
  return config_lib.apply_mode(c, mode)
