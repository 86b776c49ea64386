"""The paper's continual-learning setting on InternVL2-2B with real data from local copies: foundation skills
ChartQA, DocVQA and MMBench, then ScienceQA, TextVQA and your own InternVL JSONL task, learned one by one.

  python -m drex.train --config=configs/internvl2_2b_cl.py --config.base.checkpoint=/data/InternVL2-2B \
      --config.sources.chartqa.path=/data/ChartQA --config.sources.docvqa.path=/data/DocVQA \
      --config.sources.mmbench.path=/data/MMBench --config.sources.scienceqa.path=/data/ScienceQA/data/scienceqa \
      --config.sources.textvqa.path=/data/TextVQA --config.sources.user_task.train=/data/mine/meta.json \
      --config.sources.user_task.test=/data/mine/test.jsonl --workdir=runs/internvl2_2b_cl
  python -m drex.train --config=configs/internvl2_2b_cl.py:smoke --workdir=/tmp/cl_smoke   # tiny base, fixtures, CPU

Settings: `drex.config.internvl2_cl_stream` (source specs: `drex.data.sources`).
"""

from drex import config as config_lib


def get_config(mode: str = "full"):
  return config_lib.internvl2_cl_stream("2B", eval_batch_size=32, fsdp=False, mode=mode)
