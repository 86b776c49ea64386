"""Ablation: cross-modal transfer. The language-only twin (text_add: "what is three plus five ?") is
learned first, then the vision task (digit_add: the sum of the two digits drawn in the image).
`forward_transfer` in results.json is digit_add's score after text_add (routing with the language
expert only) minus the base's; compare digit_add under routing with its oracle (its own expert alone).

  python -m drex.train --config=configs/cross_modal.py --workdir=runs/cross_modal
"""

from drex import config as config_lib


def get_config(mode: str = "full"):
  c = config_lib.stream_config()
  c.tasks = ("text_add", "digit_add")  # language-only twin first, then the vision task
  return config_lib.apply_mode(c, mode)
