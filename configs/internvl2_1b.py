"""The task stream on InternVL2-1B (InternViT-300M + Qwen2-0.5B-Instruct), imported from a checkpoint directory.

  python -m drex.train --config=configs/internvl2_1b.py --config.base.checkpoint=/path/to/InternVL2-1B --workdir=runs/internvl2_1b
  python -m drex.train --config=configs/internvl2_1b.py:smoke --config.base.checkpoint=/path/to/InternVL2-1B   # short run

The directory is the Hugging Face repo OpenGVLab/InternVL2-1B as downloaded (config.json, model*.safetensors,
tokenizer files) or its transformers-native conversion; `drex.base.load` imports it (architecture, chat
template, 448-px dynamic tiling from its config.json). Settings: `drex.config.internvl2_stream`.
"""

from drex import config as config_lib


def get_config(mode: str = "full"):
  c = config_lib.internvl2_stream("1B", eval_batch_size=64, fsdp=False)
  c.tasks = config_lib.MAIN_STREAM  # the tasks of configs/task3.py
  return config_lib.apply_mode(c, mode)
