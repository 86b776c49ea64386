"""Ask a routed model of a drex.train workdir a question about an image (or a text-only question).

  python -m drex.generate --workdir=runs/task3 --image=shape.png --question="what colour is the shape ?"

Prints the answer and, per decoder layer, the mean routing weight of each expert over the prompt.
"""

from __future__ import annotations

import json

from absl import flags
import jax
import numpy as np

from drex import cli
from drex import evaluation
from drex import serving
from drex.adapters import lora, routers
from drex.data import images, record
from drex.errors import UserError
from drex.models.generation import jitted_greedy_generate
from drex.parallel import Parallel
from drex.workdir import load_routed

if __name__ == "__main__":  # the command's flags; importing the module (tests, other modules) defines none
  _WORKDIR = flags.DEFINE_string("workdir", None, "A drex.train workdir.")
  _IMAGE = flags.DEFINE_string("image", None, "Image file (PNG/JPEG/...); omit for a text-only question.")
  _QUESTION = flags.DEFINE_string("question", None, "The question.")
  _MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Tokens to generate at most.")


def ask(workdir_model: tuple, image: np.ndarray | None, question: str, max_new_tokens: int = 16) -> dict:
  """Answer one question with the routed model `load_routed(workdir)` returned.

  image: [H, W, 3] uint8 or None (text-only). Returns {'answer': str, 'experts': [E names],
  'routing_per_layer': [layers][E] mean weights over the prompt}, with the base as a last
  expert 'base (null)' when the null expert is on.
  """
  base, variables, cfg, names = workdir_model
  router = routers.from_config(cfg.router, len(names))
  model = base.model(lora.AdapterSpec(router, cfg.lora.lora_alpha, cfg.lora.rslora, cfg.lora.kernel))
  encoder = base.encoder()
  question_record = record.make([(question, "")], [] if image is None else [image])
  pixels, tiles = encoder.pixels(question_record["images"])
  prompt = encoder.prompt_ids(question_record, tiles)
  ids, mask = (x[None] for x in encoder.left_pad(prompt, serving.prompt_bucket(len(prompt))))
  tokens = jitted_greedy_generate(model, variables, pixels[None], ids, mask, max_new_tokens, encoder.eos_id,
                                  encoder.pad_id)
  batch = {"pixel_values": pixels[None], "input_ids": ids, "attention_mask": mask}
  profile = evaluation.routing_profile(model, variables, batch, Parallel.create((1, 1, 1), devices=jax.devices()[:1]))
  if router.includes_base:  # the weight left to the base itself
    profile = np.concatenate([profile, 1.0 - profile.sum(-1, keepdims=True)], -1)
    names = names + ["base (null)"]
  return {"answer": encoder.decode_answer(np.asarray(tokens[0])), "experts": names,
          "routing_per_layer": np.round(profile.astype(np.float64), 3).tolist()}


def main(argv):
  del argv
  if not _WORKDIR.value or not _QUESTION.value:
    raise UserError("--workdir and --question are required")
  image = images.load_image(_IMAGE.value) if _IMAGE.value else None
  print(json.dumps(ask(load_routed(_WORKDIR.value), image, _QUESTION.value, _MAX_NEW.value), indent=1))


if __name__ == "__main__":
  cli.run(main, "drex.generate")
