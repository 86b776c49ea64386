"""Ablation: cross-modal transfer. The language-only twin (text_min: "bars 3 7 5 . which bar is the
shortest ?", the chart as its caption) is learned first, then the vision task (chart_min: the same
question about the chart image). `forward_transfer` in results.json is chart_min's score after text_min
(routing with the language expert only) minus the base's; compare chart_min under routing with its
oracle (its own expert alone). (digit_add / text_add are the other twin pair; the tiny model cannot
learn to read and add two drawn digits, so digit_add's oracle stays near 0.15.)

  python -m drex.train --config=configs/cross_modal.py --workdir=runs/cross_modal
"""

from drex import config as config_lib


def get_config(mode: str = "full"):
  c = config_lib.stream_config()
  c.tasks = ("text_min", "chart_min")  # language-only twin first, then the vision task
  return config_lib.apply_mode(c, mode)
