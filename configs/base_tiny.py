"""Pretraining of the tiny InternVL-shaped base that ships with drex (drex/assets/base_tiny): the first
command, then the second (a lower-lr phase from the first's base).

  python -m drex.pretrain --config=configs/base_tiny.py --workdir=runs/base_tiny
  python -m drex.pretrain --config=configs/base_tiny.py:continue --workdir=runs/base_tiny_continued  # its 2nd phase
  python -m drex.pretrain --config=configs/base_tiny.py:smoke --workdir=/tmp/base_smoke   # seconds
"""

import ml_collections


def get_config(mode: str = "full") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # PRNG seed: tokenizer corpus, init, data order
  c.vocab_size = 384  # size of the BPE vocabulary trained on the task family's text (not used with init_from)
  c.data_dir = ""  # TFDS data directory ('' = ~/.cache/drex/tfds)
  c.data = "pretrain"  # 'pretrain' (the large pretraining splits) or 'train' (the tasks' small train splits)
  c.data_workers = 0  # grain worker processes formatting batches (0 = in the main process)
  c.batch_size = 64  # examples per step
  c.steps = 8000  # optimizer steps
  c.learning_rate = 1e-3  # peak AdamW learning rate
  c.warmup_steps = 300  # linear warmup steps
  c.weight_decay = 0.01  # AdamW weight decay
  c.eval_every = 1000  # steps between foundation-suite evaluations
  c.eval_size = 256  # test examples per foundation task
  c.eval_batch_size = 256  # prompts per generation batch
  c.max_new_tokens = 4  # generated tokens per answer
  c.checkpoint_every = 250  # steps between resume points (also after each evaluation and on SIGTERM)
  c.max_seconds = 0  # stop training (at an evaluation) after this many seconds (0 = run all steps)
  c.export_to = ""  # if set, also copy the finished base there (e.g. drex/assets/base_tiny)
  c.init_from = ""  # a base directory to continue pretraining ('' = a fresh tokenizer and init)
  if mode == "smoke":  # a seconds-long run that exercises every code path
    c.steps = 20
    c.data = "train"
    c.warmup_steps = 5
    c.eval_every = 10
    c.eval_size = 16
    c.eval_batch_size = 16
    c.checkpoint_every = 5
  elif mode == "gpu":  # the first phase on a GPU: large batches, parallel input pipeline
    c.batch_size = 512
    c.steps = 20000
    c.learning_rate = 2e-3
    c.warmup_steps = 500
    c.eval_every = 2500
    c.data_workers = 12
    c.max_seconds = 330
  elif mode == "continue":  # a second, lower-lr phase on the 'full' run's base: consolidates doc_text
    c.init_from = "runs/base_tiny/base"
    c.seed = 1  # another data order than the first phase's
    c.steps = 3000
    c.learning_rate = 3e-4
    c.warmup_steps = 100
  elif mode != "full":
    raise ValueError(f"unknown mode {mode!r}; use 'full', 'continue', 'gpu' or 'smoke'")
  return c
