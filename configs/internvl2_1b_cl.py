"""configs/internvl2_2b_cl.py on InternVL2-1B (pass --config.base.checkpoint=/path/to/InternVL2-1B and the data paths)."""

from drex import config as config_lib


def get_config(mode: str = "full"):
  return config_lib.internvl2_cl_stream("1B", eval_batch_size=64, fsdp=False, mode=mode)
