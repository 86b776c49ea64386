"""The frozen base: architecture + params + tokenizer + chat template + image tiling, loaded from a
base checkpoint directory (the shipped tiny base by default)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import importlib_resources

from drex.checkpoints import hf_import, store
from drex.data import pipeline, prompts, tasks
from drex.data import tokenizer as tok_lib
from drex.errors import UserError
from drex.models.layers import LinearFactory
from drex.models.vlm import VLM
from drex.parallel import Parallel

log = logging.getLogger(__name__)

SHIPPED = "base_tiny"  # drex/assets/base_tiny: the pretrained tiny base of the embedded default


def shipped_path() -> str:
  return str(importlib_resources.files("drex") / "assets" / SHIPPED)


@dataclasses.dataclass
class Base:
  info: store.BaseInfo
  tokenizer: tok_lib.Tokenizer
  params: Any
  path: str

  def model(self, linear: LinearFactory = LinearFactory()) -> VLM:
    """The VLM of this base; `linear` builds its LLM linears (drex.adapters.lora.AdapterSpec adds experts)."""
    return VLM(self.info.model, linear)

  def encoder(self, max_tiles: int = 0) -> pipeline.Encoder:
    """The base's prompt/image encoder; max_tiles > 0 overrides the checkpoint's tiles per image."""
    image = dataclasses.replace(self.info.image, max_tiles=max_tiles) if max_tiles else self.info.image
    return pipeline.Encoder(self.tokenizer, prompts.get_template(self.info.template), image,
                            self.info.model.tokens_per_tile)


def boxed_shapes(model: VLM, image: pipeline.ImageSpec) -> Any:
  """Shapes/dtypes of the base params of `model`, boxed with their logical axis names (no allocation)."""
  px = jnp.zeros((1, 1, image.tile_size, image.tile_size, 3), jnp.float32)
  ids = jnp.zeros((1, 8), jnp.int32)
  mask = jnp.ones((1, 8), bool)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), px, ids, jnp.zeros((1, 8), jnp.int32), mask))["params"]


def param_shapes(model: VLM, image: pipeline.ImageSpec, parallel: Parallel | None = None) -> Any:
  """Shapes/dtypes of the base params of `model` (with their shardings on `parallel`'s mesh)."""
  boxed = boxed_shapes(model, image)
  shapes = nn.unbox(boxed)
  if parallel is None:
    return shapes
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                                nn.unbox(parallel.tree_shardings(boxed)))


def init_params(model: VLM, image: pipeline.ImageSpec, rng: jax.Array) -> Any:
  px = jnp.zeros((1, 1, image.tile_size, image.tile_size, 3), jnp.float32)
  ids = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(model.init(rng, px, ids, jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), bool)))["params"]


def load(path: str = "", parallel: Parallel | None = None) -> Base:
  """Load a base checkpoint directory ('' = the shipped tiny base), checking every tensor; with
  `parallel`, each tensor is restored straight into its sharding on the mesh.

  `path` is a drex base (config.json with 'model'/'template', params/) or a HF / OpenGVLab
  InternVL-2 checkpoint directory (config.json + safetensors + tokenizer), imported on the fly.
  """
  path = path or shipped_path()
  if not store.isdir(path):
    raise UserError(f"base checkpoint directory not found: {path}")
  if "://" in path and not store.exists(os.path.join(path, "params")):  # a HF checkpoint on a cloud path
    path = local_copy(path)
  if hf_import.is_checkpoint_dir(path):
    info, tokenizer = hf_import.base_info(path)
    shapes = param_shapes(VLM(info.model), info.image, parallel)
    shardings = jax.tree_util.tree_map(lambda s: s.sharding, shapes) if parallel is not None else None
    params = hf_import.load_params(path, info.model, shardings=shardings, expected=shapes)
    return Base(info, tokenizer, params, path)
  info, tokenizer = store.load_base_info(path)
  params = store.load_base_params(path, param_shapes(VLM(info.model), info.image, parallel))
  return Base(info, tokenizer, params, path)


CHECKPOINT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "drex", "checkpoints")


def local_copy(url: str, cache: str = CHECKPOINT_CACHE) -> str:
  """A local copy of a checkpoint directory on a cloud path (safetensors are memory-mapped from local files),
  made once under `cache` (keyed by the URL) and reused."""
  target = os.path.join(cache, hashlib.sha256(url.encode()).hexdigest()[:16])
  if os.path.isdir(target):
    return target
  staging = f"{target}.tmp"
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  for item in epath.Path(url).iterdir():
    if item.is_file():
      log.info("copying %s", item)
      with item.open("rb") as src, open(os.path.join(staging, item.name), "wb") as dst:
        shutil.copyfileobj(src, dst, 64 << 20)
  os.rename(staging, target)
  return target


# The tasks whose text the tiny tokenizer is trained on: the family as it was when the shipped base was
# made, fixed so that adding a task does not change the tokenizer `drex.pretrain` rebuilds. Later tasks
# (generic_*, text_min) are spelled with the same pieces (their words are in it or split into it).
TOKENIZER_TASKS = ("chart_value", "doc_text", "scene_mc", "shape_color", "shape_kind", "chart_max", "chart_min",
                   "count_shapes", "digit_add", "text_add", "echo", "caption")


def tiny_tokenizer(vocab_size: int) -> tok_lib.Tokenizer:
  """BPE trained on the text of the TOKENIZER_TASKS (questions, answers, chat template)."""
  template = prompts.get_template("tiny")
  corpus = [template.prompt("", 0), template.target("")]
  for task in map(tasks.get, TOKENIZER_TASKS):
    corpus += [f"{ex.question} {ex.answer}" for _, ex in tasks.examples(task, "train", size=500)]
  corpus += [" ".join(tasks.ANSWER_WORDS)] * 10
  return tok_lib.train_bpe(corpus, vocab_size)


def load_from_workdir(workdir: str, parallel: Parallel | None = None) -> Base:
  """The base a drex.train workdir used: WORKDIR/base, or the checkpoint recorded in base_source.json."""
  stored, record = os.path.join(workdir, "base"), os.path.join(workdir, "base_source.json")
  if store.isdir(stored):
    return load(stored, parallel)
  if store.exists(record):
    return load(store.read_json(record, "base record")["source"], parallel)
  raise UserError(f"{workdir} holds no trained run (no base/ or base_source.json); run drex.train with this "
                  f"--workdir first")
