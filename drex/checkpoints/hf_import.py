"""Import of InternVL-2 checkpoints from a local directory of safetensors shards + config.json.

Two layouts are read (names are checked exactly as the file spells them):

* ``opengvlab``: the remote-code ``InternVLChatModel`` of the OpenGVLab/InternVL2-* repositories:
  ``vision_model.*`` (fused ``attn.qkv``), ``mlp1.{0,1,3}.*`` and ``language_model.model.*`` +
  ``language_model.{output,lm_head}.weight``, with the language model of ``llm_config``:
  InternLM2 (fused ``attention.wqkv`` interleaved by KV group, ``feed_forward.w1/w3/w2``), Qwen2
  (q/k/v with bias), Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``) or Llama.
* ``hf``: transformers' native ``InternVLForConditionalGeneration``: ``model.vision_tower.*``
  (separate q/k/v), ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.weight``,
  or the legacy unprefixed form transformers also writes (``vision_tower.*``,
  ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.weight``),
  with a Qwen2 / Llama / Phi-3 ``text_config``.

Torch linears (out, in) become kernels (in, out), the patch conv OIHW becomes HWIO, fused tensors are
split. Before any tensor is read, every name and shape is checked against what the config implies;
all missing, unexpected and mis-shaped tensors are reported together in one `UserError`, so nothing
ever loads partially. With `shardings` (a tree of `jax.sharding.Sharding`s), each tensor is built
shard by shard from the memory-mapped file straight into its place on the mesh.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from drex.checkpoints.store import read_json
from drex.errors import UserError
from drex.models.config import LLMConfig, RopeConfig, VisionConfig, VLMConfig

LAYOUTS = ("opengvlab", "hf")
FAMILIES = ("qwen2", "llama", "internlm2", "phi3")
INDEX_FILE = "model.safetensors.index.json"
IMG_CONTEXT = "<IMG_CONTEXT>"
# Non-parameter buffers some older torch checkpoints carry; never weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Chat template of each language-model family when the config does not name one (HF-native layout).
FAMILY_TEMPLATES = {"qwen2": "Hermes-2", "llama": "internlm2-chat", "internlm2": "internlm2-chat",
                    "phi3": "phi3-chat"}


# ----------------------------------------------------------------------------- safetensors reading

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class SafetensorsFile:
  """One .safetensors file: its header, and zero-copy numpy views of its tensors (bf16 via ml_dtypes)."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    try:
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
          raise ValueError("header length past the end of the file")
        header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
      raise UserError(f"{path} is not a readable safetensors file ({e}); re-download it") from None
    header.pop("__metadata__", None)
    self.data_start = 8 + n
    self.entries: dict[str, dict] = header
    for name, entry in header.items():
      begin, end = entry["data_offsets"]
      if self.data_start + end > size:
        raise UserError(f"{path} is truncated (tensor {name} ends past the end of the file); re-download it")
    self._map = None

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def dtype_code(self, name: str) -> str:
    return self.entries[name]["dtype"]

  def array(self, name: str) -> np.ndarray:
    if self._map is None:
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    entry = self.entries[name]
    code = entry["dtype"]
    if code not in SAFETENSORS_DTYPES:
      raise UserError(f"tensor {name} in {self.path} has dtype {code}, which drex cannot read")
    begin, end = entry["data_offsets"]
    raw = self._map[self.data_start + begin:self.data_start + end]
    return raw.view(SAFETENSORS_DTYPES[code]).reshape(entry["shape"])


class Checkpoint:
  """The tensors of a checkpoint directory: name -> file, from the index or from every *.safetensors."""

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_FILE)
    self.files: dict[str, SafetensorsFile] = {}
    self.where: dict[str, SafetensorsFile] = {}
    problems = []
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get("weight_map", {})
      for name, filename in sorted(weight_map.items()):
        path = os.path.join(directory, filename)
        if filename not in self.files:
          if not os.path.exists(path):
            raise UserError(f"{INDEX_FILE} in {directory} names shard {filename}, which is not there; "
                            f"download every shard")
          self.files[filename] = SafetensorsFile(path)
        if name not in self.files[filename].entries:
          problems.append(f"{name} (listed in {INDEX_FILE} but absent from {filename})")
          continue
        self.where[name] = self.files[filename]
      if problems:
        raise UserError(f"checkpoint {directory} is inconsistent: " + "; ".join(problems))
    else:
      paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
      if not paths:
        raise UserError(f"no *.safetensors files in {directory}")
      for path in paths:
        file = SafetensorsFile(path)
        self.files[os.path.basename(path)] = file
        for name in file.entries:
          if name in self.where:
            problems.append(f"{name} is in both {os.path.basename(self.where[name].path)} and {os.path.basename(path)}")
          self.where[name] = file
      if problems:
        raise UserError(f"checkpoint {directory} has duplicate tensors (add a {INDEX_FILE}): " + "; ".join(problems))

  def names(self) -> set[str]:
    return set(self.where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.where[name].shape(name)

  def dtype_code(self, name: str) -> str:
    return self.where[name].dtype_code(name)

  def array(self, name: str) -> np.ndarray:
    return self.where[name].array(name)


# ----------------------------------------------------------------------------- configs


def is_checkpoint_dir(path: str) -> bool:
  """A directory with safetensors weights and a HF / OpenGVLab config.json (not a drex base)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    return False
  if not (os.path.exists(os.path.join(path, INDEX_FILE)) or glob.glob(os.path.join(path, "*.safetensors"))):
    return False
  try:
    with open(config_path) as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError):
    return False
  if "model" in cfg and "template" in cfg:  # drex's own base config
    return False
  return "model_type" in cfg or "architectures" in cfg or "llm_config" in cfg


def layout_of(hf: dict) -> str:
  if "llm_config" in hf or hf.get("model_type") == "internvl_chat":
    return "opengvlab"
  if "text_config" in hf or hf.get("model_type") == "internvl":
    return "hf"
  raise UserError(f"config.json is neither an OpenGVLab InternVL-2 config (llm_config) nor a transformers "
                  f"InternVL config (text_config); model_type={hf.get('model_type')!r}")


def _llm_dict(hf: dict) -> dict:
  return hf["llm_config"] if layout_of(hf) == "opengvlab" else hf["text_config"]


def family_of(hf: dict) -> str:
  """'qwen2' | 'llama' | 'internlm2' | 'phi3' from the language model's architecture / model_type."""
  llm = _llm_dict(hf)
  names = [a.lower() for a in llm.get("architectures") or []] + [str(llm.get("model_type", "")).lower()]
  for name in names:
    for family in ("internlm2", "qwen2", "phi3", "llama"):
      if name.startswith(family):
        return family
  raise UserError(f"unsupported language model {names} in config.json; drex reads Qwen2, InternLM2, Llama "
                  f"and Phi-3 based InternVL-2 checkpoints")


def _dtype_name(hf: dict, llm: dict) -> str:
  name = hf.get("torch_dtype") or hf.get("dtype") or llm.get("torch_dtype") or llm.get("dtype") or "float32"
  name = str(name).replace("torch.", "")
  if name not in ("float32", "bfloat16", "float16"):
    raise UserError(f"unsupported checkpoint dtype {name!r}; use a float32, bfloat16 or float16 checkpoint")
  return name


def _rope_config(llm: dict, family: str, head_dim: int) -> RopeConfig:
  params = dict(llm.get("rope_parameters") or {})
  scaling = dict(llm.get("rope_scaling") or {})
  merged = {**scaling, **params}
  theta = float(merged.get("rope_theta", llm.get("rope_theta", 10000.0)))
  kind = merged.get("rope_type") or merged.get("type") or "default"
  max_pos = int(llm.get("max_position_embeddings", 32768))
  if float(merged.get("partial_rotary_factor", llm.get("partial_rotary_factor", 1.0))) != 1.0:
    raise UserError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
  if kind == "default":
    return RopeConfig(theta=theta, kind="default", max_position_embeddings=max_pos)
  if kind == "dynamic":
    return RopeConfig(theta=theta, kind="dynamic", factor=float(merged.get("factor", 1.0)),
                      max_position_embeddings=max_pos)
  if kind in ("su", "longrope"):
    original = int(merged.get("original_max_position_embeddings") or llm.get("original_max_position_embeddings") or 0)
    if not original:
      raise UserError("longrope config without original_max_position_embeddings")
    short, long = tuple(float(v) for v in merged["short_factor"]), tuple(float(v) for v in merged["long_factor"])
    if len(short) != head_dim // 2 or len(long) != head_dim // 2:
      raise UserError(f"longrope factors have {len(short)}/{len(long)} values; head_dim {head_dim} needs "
                      f"{head_dim // 2}")
    if merged.get("factor"):  # scaling ratio given explicitly: it sets the cos/sin magnitude
      max_pos = int(round(float(merged["factor"]) * original))
    ratio = max_pos / original
    expected = math.sqrt(1 + math.log(ratio) / math.log(original)) if ratio > 1 else 1.0
    if merged.get("attention_factor") is not None and abs(float(merged["attention_factor"]) - expected) > 1e-6:
      raise UserError(f"longrope attention_factor {merged['attention_factor']} differs from the standard "
                      f"{expected:.6f}; not supported")
    return RopeConfig(theta=theta, kind="longrope", max_position_embeddings=max_pos,
                      original_max_position_embeddings=original, short_factor=short, long_factor=long)
  raise UserError(f"unsupported RoPE scaling {kind!r} in the {family} config; drex supports default, dynamic "
                  f"and longrope (su)")


def llm_config(hf: dict) -> LLMConfig:
  layout, family, llm = layout_of(hf), family_of(hf), _llm_dict(hf)
  d = int(llm["hidden_size"])
  heads = int(llm["num_attention_heads"])
  kv_heads = int(llm.get("num_key_value_heads") or heads)
  head_dim = int(llm.get("head_dim") or d // heads)
  if llm.get("hidden_act", "silu") != "silu":
    raise UserError(f"language model activation {llm.get('hidden_act')!r} is not supported (drex uses SwiGLU/silu)")
  if llm.get("mlp_bias"):
    raise UserError("MLP biases (mlp_bias=true) are not supported")
  if family == "qwen2":
    qkv_bias = True
    if llm.get("use_sliding_window"):
      raise UserError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
  elif family == "internlm2":
    qkv_bias = bool(llm.get("bias", False))
    if qkv_bias:
      raise UserError("InternLM2 with bias=true (biased wqkv/wo) is not supported")
  elif family == "llama":
    qkv_bias = bool(llm.get("attention_bias", False))
    if qkv_bias:
      raise UserError("Llama attention_bias=true (biased o_proj) is not supported")
  else:
    qkv_bias = False
  if layout == "hf":
    tie = bool(hf.get("tie_word_embeddings", True))  # transformers' InternVLConfig default
  else:
    tie = bool(llm.get("tie_word_embeddings", False))
  return LLMConfig(vocab_size=int(llm["vocab_size"]), d_model=d, num_layers=int(llm["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, d_ff=int(llm["intermediate_size"]),
                   norm_eps=float(llm.get("rms_norm_eps", 1e-6)), qkv_bias=qkv_bias, tie_embeddings=tie,
                   rope=_rope_config(llm, family, head_dim))


def _square(value, what: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise UserError(f"non-square vision {what} {value} is not supported")
    value = value[0]
  return int(value)


def vision_config(hf: dict) -> VisionConfig:
  vc = hf["vision_config"]
  if vc.get("hidden_act", "gelu") != "gelu":
    raise UserError(f"vision activation {vc.get('hidden_act')!r} is not supported (InternViT uses exact GELU)")
  if layout_of(hf) == "opengvlab":
    qkv_bias, qk_norm = bool(vc.get("qkv_bias", True)), bool(vc.get("qk_normalization", False))
  else:
    qkv_bias, qk_norm = bool(vc.get("attention_bias", False)), bool(vc.get("use_qk_norm", False))
    if not vc.get("use_mean_pooling", True):
      raise UserError("vision use_mean_pooling=false (a final vision LayerNorm) is not InternViT; not supported")
  norm_type = vc.get("norm_type", "layer_norm")
  if norm_type not in ("layer_norm", "rms_norm"):
    raise UserError(f"vision norm_type {norm_type!r} is not supported")
  return VisionConfig(image_size=_square(vc["image_size"], "image_size"),
                      patch_size=_square(vc["patch_size"], "patch_size"), width=int(vc["hidden_size"]),
                      depth=int(vc["num_hidden_layers"]), num_heads=int(vc["num_attention_heads"]),
                      mlp_dim=int(vc["intermediate_size"]), norm_type=norm_type,
                      norm_eps=float(vc.get("layer_norm_eps", 1e-6)), qkv_bias=qkv_bias, qk_norm=qk_norm)


def vlm_config(hf: dict, image_token_id: int | None = None, dtype: str | None = None) -> VLMConfig:
  """The drex architecture of a HF / OpenGVLab config.json dict.

  `image_token_id`: the `<IMG_CONTEXT>` id (OpenGVLab configs do not hold it; it comes from the
  tokenizer). `dtype`: compute and parameter dtype (default: the checkpoint's).
  """
  layout = layout_of(hf)
  vision = vision_config(hf)
  if layout == "opengvlab":
    if int(hf.get("select_layer", -1)) != -1:
      raise UserError(f"select_layer={hf.get('select_layer')} is not supported (InternVL2 uses the last ViT layer, -1)")
    if hf.get("ps_version", "v1") != "v2":
      raise UserError(f"pixel shuffle {hf.get('ps_version', 'v1')!r} is not supported (InternVL2 uses 'v2')")
    forced = hf.get("force_image_size")
    if forced and int(forced) != vision.image_size:
      raise UserError(f"force_image_size {forced} differs from the ViT's image_size {vision.image_size}; not supported")
    if image_token_id is None:
      raise UserError("an OpenGVLab config does not hold the <IMG_CONTEXT> id; load the checkpoint's tokenizer")
  else:
    feature_layer = hf.get("vision_feature_layer", -1)
    if feature_layer != -1 or hf.get("vision_feature_select_strategy", "default") != "default":
      raise UserError(f"vision_feature_layer={feature_layer} / select strategy "
                      f"{hf.get('vision_feature_select_strategy')!r} are not supported (InternVL uses -1, 'default')")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
      raise UserError(f"projector activation {hf.get('projector_hidden_act')!r} is not supported")
    config_id = int(hf.get("image_token_id", 151667))
    if image_token_id is not None and image_token_id != config_id:
      raise UserError(f"config.json's image_token_id {config_id} is not the tokenizer's {IMG_CONTEXT} id "
                      f"{image_token_id}; fix the checkpoint")
    image_token_id = config_id
  dtype = dtype or _dtype_name(hf, _llm_dict(hf))
  return VLMConfig(vision=vision, llm=llm_config(hf), downsample_ratio=float(hf.get("downsample_ratio", 0.5)),
                   projector_norm_eps=1e-5, image_token_id=int(image_token_id), dtype=dtype, param_dtype=dtype)


def template_of(hf: dict) -> str:
  """Chat template name: the OpenGVLab config's `template`, else the one of the LLM family."""
  if layout_of(hf) == "opengvlab" and hf.get("template"):
    return str(hf["template"])
  return FAMILY_TEMPLATES[family_of(hf)]


def image_spec_of(hf: dict, preprocessor: dict | None = None):
  """Dynamic tiling of the checkpoint: tile side, tiles per image (grid + thumbnail), thumbnail."""
  from drex.data.pipeline import ImageSpec  # pylint: disable=g-import-not-at-top
  vision = vision_config(hf)
  if layout_of(hf) == "opengvlab":  # InternVLChatConfig's defaults where a key is absent
    tile = int(hf.get("force_image_size") or vision.image_size)
    dynamic = bool(hf.get("dynamic_image_size", False))
    max_grid, min_grid = int(hf.get("max_dynamic_patch", 6)), int(hf.get("min_dynamic_patch", 1))
    thumbnail = bool(hf.get("use_thumbnail", False))
  else:  # GotOcr2 image processor (preprocessor_config.json), InternVL-2 defaults without one
    pre = preprocessor or {}
    size = pre.get("size") or {}
    tile = int(size.get("height") or vision.image_size)
    dynamic = bool(pre.get("crop_to_patches", True))
    max_grid, min_grid = int(pre.get("max_patches", 12)), int(pre.get("min_patches", 1))
    thumbnail = True
  if not dynamic:
    return ImageSpec(tile, max_tiles=1, min_tiles=1, use_thumbnail=False)
  extra = 1 if thumbnail and max_grid > 1 else 0
  return ImageSpec(tile, max_tiles=max_grid + extra, min_tiles=min_grid, use_thumbnail=thumbnail)


# ----------------------------------------------------------------------------- the tensor plan


@dataclasses.dataclass(frozen=True)
class Entry:
  """One drex parameter: the checkpoint tensors it is made of and how."""

  path: tuple[str, ...]
  sources: tuple[str, ...]
  fn: Callable[..., np.ndarray]


def _t(w):
  return w.T


def _ident(w):
  return w


def _conv(w):  # OIHW -> HWIO
  return w.transpose(2, 3, 1, 0)


def _concat_t(*ws):  # separate q, k, v (out, in) -> fused kernel (in, q|k|v)
  return np.concatenate(ws, 0).T


def _concat(*bs):
  return np.concatenate(bs, 0)


def _rows(begin: int, end: int):
  def fn(w):
    return w[begin:end].T
  return fn


def _wqkv(cfg: LLMConfig, part: str):
  """InternLM2 wqkv rows [(G+2)*D per KV group: q_0..q_{G-1}, k, v] -> the q, k or v kernel."""
  h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  g = h // k

  def fn(w):
    w = w.reshape(k, g + 2, d, w.shape[-1])
    sel = {"q": w[:, :g], "k": w[:, g], "v": w[:, g + 1]}[part]
    return sel.reshape(-1, w.shape[-1]).T
  return fn


@dataclasses.dataclass(frozen=True)
class Names:
  """Prefixes of a checkpoint's tensor names (its layout and spelling)."""

  layout: str  # 'opengvlab' | 'hf'
  vision: str  # 'vision_model.' | 'model.vision_tower.' | 'vision_tower.'
  projector: str  # 'mlp1.' | 'model.multi_modal_projector.' | 'multi_modal_projector.'
  body: str  # 'language_model.model.' | 'model.language_model.' | 'language_model.'
  head: str  # full name of the LM head weight


def names_of(hf: dict, keys: Sequence[str]) -> Names:
  layout, family = layout_of(hf), family_of(hf)
  keys = set(keys)
  has = lambda prefix: any(k.startswith(prefix) for k in keys)
  if layout == "opengvlab":
    return Names(layout, "vision_model.", "mlp1.", "language_model.model.",
                 "language_model.output.weight" if family == "internlm2" else "language_model.lm_head.weight")
  vision = "model.vision_tower." if has("model.vision_tower.") or not has("vision_tower.") else "vision_tower."
  projector = ("model.multi_modal_projector." if has("model.multi_modal_projector.") or not has("multi_modal_projector.")
               else "multi_modal_projector.")
  if has("model.language_model."):
    body, head = "model.language_model.", "lm_head.weight"
  elif has("language_model.model."):
    body, head = "language_model.model.", "language_model.lm_head.weight"
  elif has("language_model."):
    body, head = "language_model.", "lm_head.weight"
  else:
    body, head = "model.language_model.", "lm_head.weight"
  for candidate in ("lm_head.weight", "language_model.lm_head.weight"):
    if candidate in keys:
      head = candidate
  return Names("hf", vision, projector, body, head)


def _vision_entries(cfg: VisionConfig, n: Names) -> tuple[list[Entry], dict[str, tuple]]:
  c, m, p, g = cfg.width, cfg.mlp_dim, cfg.patch_size, cfg.grid
  entries: list[Entry] = []
  shapes: dict[str, tuple] = {}

  def add(path, sources, fn, *source_shapes):
    entries.append(Entry(("vision_model",) + path, tuple(sources), fn))
    shapes.update(dict(zip(sources, source_shapes)))

  v = n.vision
  ogv = n.layout == "opengvlab"
  emb = v + "embeddings."
  add(("class_embedding",), [emb + ("class_embedding" if ogv else "cls_token")], _ident, (1, 1, c))
  add(("position_embedding",), [emb + ("position_embedding" if ogv else "position_embeddings")], _ident,
      (1, 1 + g * g, c))
  patch = emb + ("patch_embedding." if ogv else "patch_embeddings.projection.")
  add(("patch_embedding", "kernel"), [patch + "weight"], _conv, (c, 3, p, p))
  add(("patch_embedding", "bias"), [patch + "bias"], _ident, (c,))
  norm_leaves = [("scale", "weight"), ("bias", "bias")] if cfg.norm_type == "layer_norm" else [("weight", "weight")]
  for i in range(cfg.depth):
    layer = f"{v}encoder.layers.{i}." if ogv else f"{v}encoder.layer.{i}."
    lp = (f"layers_{i}",)
    attn = layer + ("attn." if ogv else "attention.")
    for ours, theirs in (("ls1", "ls1" if ogv else "lambda_1"), ("ls2", "ls2" if ogv else "lambda_2")):
      add(lp + (ours,), [layer + theirs], _ident, (c,))
    for ours, theirs in (("norm1", "norm1" if ogv else "layernorm_before"), ("norm2", "norm2" if ogv else "layernorm_after")):
      for leaf, tleaf in norm_leaves:
        add(lp + (ours, leaf), [f"{layer}{theirs}.{tleaf}"], _ident, (c,))
    if ogv:
      add(lp + ("attn", "qkv", "kernel"), [attn + "qkv.weight"], _t, (3 * c, c))
      if cfg.qkv_bias:
        add(lp + ("attn", "qkv", "bias"), [attn + "qkv.bias"], _ident, (3 * c,))
      proj = attn + "proj."
    else:
      add(lp + ("attn", "qkv", "kernel"), [attn + f"{x}_proj.weight" for x in "qkv"], _concat_t, (c, c), (c, c), (c, c))
      if cfg.qkv_bias:
        add(lp + ("attn", "qkv", "bias"), [attn + f"{x}_proj.bias" for x in "qkv"], _concat, (c,), (c,), (c,))
      proj = attn + "projection_layer."
    if cfg.qk_norm:
      for x in ("q_norm", "k_norm"):
        add(lp + ("attn", x, "weight"), [f"{attn}{x}.weight"], _ident, (c,))
    add(lp + ("attn", "proj", "kernel"), [proj + "weight"], _t, (c, c))
    add(lp + ("attn", "proj", "bias"), [proj + "bias"], _ident, (c,))
    add(lp + ("fc1", "kernel"), [layer + "mlp.fc1.weight"], _t, (m, c))
    add(lp + ("fc1", "bias"), [layer + "mlp.fc1.bias"], _ident, (m,))
    add(lp + ("fc2", "kernel"), [layer + "mlp.fc2.weight"], _t, (c, m))
    add(lp + ("fc2", "bias"), [layer + "mlp.fc2.bias"], _ident, (c,))
  return entries, shapes


def _projector_entries(cfg: VLMConfig, n: Names) -> tuple[list[Entry], dict[str, tuple]]:
  f = round(1 / cfg.downsample_ratio)
  c_in, d = cfg.vision.width * f * f, cfg.llm.d_model
  ogv = n.layout == "opengvlab"
  norm, l1, l2 = (("0", "1", "3") if ogv else ("layer_norm", "linear_1", "linear_2"))
  pre = n.projector
  spec = [(("norm", "scale"), f"{pre}{norm}.weight", _ident, (c_in,)),
          (("norm", "bias"), f"{pre}{norm}.bias", _ident, (c_in,)),
          (("linear_1", "kernel"), f"{pre}{l1}.weight", _t, (d, c_in)),
          (("linear_1", "bias"), f"{pre}{l1}.bias", _ident, (d,)),
          (("linear_2", "kernel"), f"{pre}{l2}.weight", _t, (d, d)),
          (("linear_2", "bias"), f"{pre}{l2}.bias", _ident, (d,))]
  return ([Entry(("mlp1",) + path, (src,), fn) for path, src, fn, _ in spec],
          {src: shape for _, src, _, shape in spec})


def _llm_entries(cfg: LLMConfig, family: str, n: Names) -> tuple[list[Entry], dict[str, tuple]]:
  d, h, k, hd, f, vocab = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  entries: list[Entry] = []
  shapes: dict[str, tuple] = {}

  def add(path, sources, fn, *source_shapes):
    entries.append(Entry(("language_model",) + path, tuple(sources), fn))
    shapes.update(dict(zip(sources, source_shapes)))

  b = n.body
  internlm2 = family == "internlm2"
  add(("embed_tokens", "embedding"), [b + ("tok_embeddings.weight" if internlm2 else "embed_tokens.weight")], _ident,
      (vocab, d))
  add(("norm", "weight"), [b + "norm.weight"], _ident, (d,))
  if not cfg.tie_embeddings:
    add(("lm_head", "kernel"), [n.head], _t, (vocab, d))
  qkv_rows = (h + 2 * k) * hd
  for i in range(cfg.num_layers):
    layer, lp = f"{b}layers.{i}.", (f"layers_{i}",)
    if internlm2:
      add(lp + ("input_layernorm", "weight"), [layer + "attention_norm.weight"], _ident, (d,))
      add(lp + ("post_attention_layernorm", "weight"), [layer + "ffn_norm.weight"], _ident, (d,))
      for x in "qkv":
        add(lp + ("self_attn", f"{x}_proj", "kernel"), [layer + "attention.wqkv.weight"], _wqkv(cfg, x), (qkv_rows, d))
      add(lp + ("self_attn", "o_proj", "kernel"), [layer + "attention.wo.weight"], _t, (d, h * hd))
      for ours, theirs, shape in (("gate_proj", "w1", (f, d)), ("up_proj", "w3", (f, d)), ("down_proj", "w2", (d, f))):
        add(lp + ("mlp", ours, "kernel"), [f"{layer}feed_forward.{theirs}.weight"], _t, shape)
      continue
    for norm in ("input_layernorm", "post_attention_layernorm"):
      add(lp + (norm, "weight"), [f"{layer}{norm}.weight"], _ident, (d,))
    attn = layer + "self_attn."
    if family == "phi3":
      bounds = {"q": (0, h * hd), "k": (h * hd, (h + k) * hd), "v": ((h + k) * hd, qkv_rows)}
      for x in "qkv":
        add(lp + ("self_attn", f"{x}_proj", "kernel"), [attn + "qkv_proj.weight"], _rows(*bounds[x]), (qkv_rows, d))
      add(lp + ("mlp", "gate_proj", "kernel"), [layer + "mlp.gate_up_proj.weight"], _rows(0, f), (2 * f, d))
      add(lp + ("mlp", "up_proj", "kernel"), [layer + "mlp.gate_up_proj.weight"], _rows(f, 2 * f), (2 * f, d))
    else:
      for x, rows in (("q", h * hd), ("k", k * hd), ("v", k * hd)):
        add(lp + ("self_attn", f"{x}_proj", "kernel"), [f"{attn}{x}_proj.weight"], _t, (rows, d))
        if cfg.qkv_bias:
          add(lp + ("self_attn", f"{x}_proj", "bias"), [f"{attn}{x}_proj.bias"], _ident, (rows,))
      for x in ("gate_proj", "up_proj"):
        add(lp + ("mlp", x, "kernel"), [f"{layer}mlp.{x}.weight"], _t, (f, d))
    add(lp + ("self_attn", "o_proj", "kernel"), [attn + "o_proj.weight"], _t, (d, h * hd))
    add(lp + ("mlp", "down_proj", "kernel"), [layer + "mlp.down_proj.weight"], _t, (d, f))
  return entries, shapes


def plan(cfg: VLMConfig, family: str, names: Names) -> tuple[list[Entry], dict[str, tuple]]:
  """Every drex parameter with its source tensors, and the shape each source tensor must have."""
  entries, shapes = [], {}
  for part in (_vision_entries(cfg.vision, names), _projector_entries(cfg, names),
               _llm_entries(cfg.llm, family, names)):
    entries += part[0]
    shapes.update(part[1])
  return entries, shapes


# ----------------------------------------------------------------------------- loading


def check(checkpoint: Checkpoint, shapes: dict[str, tuple], tied: bool = False) -> list[str]:
  """Names of missing, unexpected, mis-shaped and non-float tensors."""
  present = {k for k in checkpoint.names() if not k.endswith(_IGNORED_SUFFIXES)}
  problems = [f"missing {name} (expected shape {tuple(shapes[name])})" for name in sorted(set(shapes) - present)]
  for name in sorted(present - set(shapes)):
    note = " (the config ties word embeddings)" if tied and name.endswith(("lm_head.weight", "output.weight")) else ""
    problems.append(f"unexpected {name} {checkpoint.shape(name)}{note}")
  for name in sorted(present & set(shapes)):
    if checkpoint.shape(name) != tuple(shapes[name]):
      problems.append(f"{name} has shape {checkpoint.shape(name)} but the config expects {tuple(shapes[name])}")
    elif checkpoint.dtype_code(name) not in _FLOAT_CODES:
      problems.append(f"{name} has dtype {checkpoint.dtype_code(name)}, not a float type")
  return problems


def load_params(directory: str, cfg: VLMConfig, hf: dict | None = None, shardings: Any = None,
                expected: Any = None) -> dict:
  """The drex base params of a checkpoint directory (config.json + safetensors).

  Args:
    directory: the checkpoint directory.
    cfg: the drex architecture (e.g. `vlm_config(hf)`); params get its `param_dtype`.
    hf: the checkpoint's config.json dict (read from the directory if None).
    shardings: optional tree of shardings with the params' structure (None leaves = default device).
    expected: optional tree of arrays / ShapeDtypeStructs of the model's params; the plan is checked
      against it (names and shapes), and leaves take its dtype.

  Raises:
    UserError naming every missing, unexpected and mis-shaped tensor (before anything is read).
  """
  hf = hf if hf is not None else read_json(os.path.join(directory, "config.json"), "checkpoint config")
  checkpoint = Checkpoint(directory)
  family = family_of(hf)
  names = names_of(hf, sorted(checkpoint.names()))
  entries, shapes = plan(cfg, family, names)
  problems = check(checkpoint, shapes, cfg.llm.tie_embeddings)
  if problems:
    raise UserError(f"checkpoint {directory} ({names.layout} layout, {family}) does not fit its config: "
                    f"{len(problems)} problem(s): " + "; ".join(problems))
  dtypes: dict[tuple[str, ...], Any] = {}
  if expected is not None:
    flat = flax.traverse_util.flatten_dict(expected)
    ours = {e.path for e in entries}
    if set(flat) != ours:
      raise ValueError(f"drex import plan and model disagree (a drex bug): model-only {sorted(set(flat) - ours)[:5]}, "
                       f"plan-only {sorted(ours - set(flat))[:5]}")
    dtypes = {p: x.dtype for p, x in flat.items()}
  flat_shardings = flax.traverse_util.flatten_dict(shardings) if shardings is not None else {}
  default_dtype = jnp.dtype(cfg.param_dtype)
  out = {}
  for entry in entries:
    value = entry.fn(*[checkpoint.array(name) for name in entry.sources])
    if expected is not None and tuple(value.shape) != tuple(flat[entry.path].shape):
      raise ValueError(f"drex import made {entry.path} {value.shape}, model expects {flat[entry.path].shape} (a drex bug)")
    value = np.asarray(value).astype(dtypes.get(entry.path, default_dtype))
    out[entry.path] = _place(value, flat_shardings.get(entry.path))
  return flax.traverse_util.unflatten_dict(out)


def _place(value: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jax.device_put(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


# ----------------------------------------------------------------------------- whole bases


def load_tokenizer(directory: str):
  from drex.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  try:
    return tok_lib.Tokenizer.load(directory)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  except ImportError:
    raise UserError(f"{directory} has a sentencepiece tokenizer.model; install sentencepiece "
                    f"(pip install 'drex[internvl]')") from None


def base_info(directory: str, dtype: str | None = None):
  """(BaseInfo, Tokenizer) of a HF / OpenGVLab checkpoint directory."""
  from drex.checkpoints.store import BaseInfo  # pylint: disable=g-import-not-at-top
  hf = read_json(os.path.join(directory, "config.json"), "checkpoint config")
  try:
    layout_of(hf)
  except UserError as e:
    raise UserError(f"{directory} is not an InternVL-2 checkpoint: {e}") from None
  tokenizer = load_tokenizer(directory)
  try:
    image_token_id = tokenizer.token_id(IMG_CONTEXT)
  except ValueError:
    if layout_of(hf) == "opengvlab":
      raise UserError(f"the tokenizer in {directory} has no {IMG_CONTEXT} token; is this an InternVL-2 "
                      f"checkpoint?") from None
    image_token_id = None
  cfg = vlm_config(hf, image_token_id, dtype)
  preprocessor_path = os.path.join(directory, "preprocessor_config.json")
  preprocessor = read_json(preprocessor_path, "preprocessor config") if os.path.exists(preprocessor_path) else None
  from drex.data import prompts  # pylint: disable=g-import-not-at-top
  template = template_of(hf)
  if template not in prompts.TEMPLATES:
    raise UserError(f"checkpoint chat template {template!r} is not one drex knows ({', '.join(prompts.TEMPLATES)})")
  provenance = {"source": os.path.abspath(directory), "format": layout_of(hf), "llm_family": family_of(hf),
                "architectures": hf.get("architectures")}
  return BaseInfo(cfg, template, image_spec_of(hf, preprocessor), provenance), tokenizer
