"""The task stream on InternVL2-8B (InternViT-300M + internlm2_5-7b-chat), imported from an OpenGVLab checkpoint directory.

  python -m drex.train --config=configs/internvl2_8b.py --config.base.checkpoint=/path/to/InternVL2-8B --workdir=runs/internvl2_8b
  python -m drex.train --config=configs/internvl2_8b.py:smoke --config.base.checkpoint=/path/to/InternVL2-8B   # short run

The checkpoint directory is the Hugging Face repo OpenGVLab/InternVL2-8B as downloaded (config.json,
model*.safetensors, tokenizer files); `drex.base.load` imports it on the fly (architecture, chat
template 'internlm2-chat', 448-px dynamic tiling from its config.json) and the run keeps a drex copy in WORKDIR/base.
Compute and base weights are bfloat16 (the checkpoint's torch_dtype); LoRA experts and optimizer state are float32.
LoRA and stage-A settings follow InternVL's own LoRA fine-tuning recipe (internvl_chat/shell/internvl2.0/
2nd_finetune/*_lora.sh: rank 16, alpha = 2 r, lr 4e-5, weight decay 0.01, 3% warmup, cosine, total batch 16);
stage B follows PHATGOOSE (100 steps, lr 5e-3, gates from zero).
"""

from drex import config as config_lib
from drex.adapters import lora


def get_config(mode: str = "full"):
  c = config_lib.stream_config()
  c.tasks = ("shape_color", "chart_max", "count_shapes")  # colour words, bar positions, shape counts
  # No default: without --config.base.checkpoint the run stops with "base checkpoint directory not found".
  c.base.checkpoint = "REQUIRED: pass --config.base.checkpoint=<directory of OpenGVLab/InternVL2-8B>"
  c.lora.r = 16  # InternVL recipe: use_llm_lora 16
  c.lora.lora_alpha = 32.0  # alpha = 2 r (InternVL's wrap_llm_lora)
  c.lora.target_modules = lora.ALL_TARGETS  # every decoder linear (InternLM2 wqkv is split into q/k/v at import; wo, w1/w3/w2)
  c.lora.kernel = "auto"  # adapter mixture per shape from benchmarks/results (XLA where Pallas does not win)
  c.stage_a.learning_rate = 4e-5  # InternVL recipe
  c.stage_a.warmup_steps = 9  # 3% of 300 steps
  c.stage_a.weight_decay = 0.01  # InternVL recipe
  c.data.batch_size = 16  # total batch 16 in the recipe
  c.data.eval_batch_size = 16  # prompts per generation batch (each image is up to 13 tiles of 448 px)
  c.mesh = (1, -1, 1)  # FSDP over every device: the 8 B bf16 base is sharded, not replicated
  return config_lib.apply_mode(c, mode)
