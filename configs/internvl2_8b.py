"""The task stream on InternVL2-8B (InternViT-300M + internlm2_5-7b-chat), imported from a checkpoint directory.

  python -m drex.train --config=configs/internvl2_8b.py --config.base.checkpoint=/path/to/InternVL2-8B --workdir=runs/internvl2_8b
  python -m drex.train --config=configs/internvl2_8b.py:smoke --config.base.checkpoint=/path/to/InternVL2-8B   # short run

The directory is the Hugging Face repo OpenGVLab/InternVL2-8B as downloaded (config.json, model*.safetensors,
tokenizer files) or its transformers-native conversion; `drex.base.load` imports it (architecture, chat
template, 448-px dynamic tiling from its config.json). Settings: `drex.config.internvl2_stream`.
"""

from drex import config as config_lib


def get_config(mode: str = "full"):
  c = config_lib.internvl2_stream("8B", eval_batch_size=16, fsdp=True)
  c.tasks = config_lib.MAIN_STREAM  # the tasks of configs/task3.py
  return config_lib.apply_mode(c, mode)
