"""configs/internvl2_2b_cl.py on InternVL2-8B, FSDP over every device (pass --config.base.checkpoint and the data paths)."""

from drex import config as config_lib


def get_config(mode: str = "full"):
  return config_lib.internvl2_cl_stream("8B", eval_batch_size=16, fsdp=True, mode=mode)
