"""Import of InternVL-2 checkpoints from a local directory of safetensors shards + config.json.

Owns: reading the checkpoint directory (`Checkpoint`, through the `safetensors` package), parsing its
config.json into a drex `VLMConfig` / chat template / image tiling, and `load_params`, which checks
every tensor against the plan and converts it. The tensor names and the transforms themselves are
`drex.checkpoints.tensor_names`, shared with export.

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

Before any tensor is read, every name and shape is checked against what the config implies; all
missing, unexpected and mis-shaped tensors are reported together in one `UserError`, so nothing ever
loads partially. With `shardings` (a tree of `jax.sharding.Sharding`s), each tensor is placed shard by
shard on the mesh.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
# Registers bfloat16 / float8 with numpy: the safetensors package's numpy reader looks dtypes up by name.
import ml_dtypes
import numpy as np
import safetensors

from drex.checkpoints import tensor_names
from drex.checkpoints.store import read_json
from drex.errors import UserError
from drex.models.config import LLMConfig, RopeConfig, VisionConfig, VLMConfig

INDEX_FILE = "model.safetensors.index.json"
IMG_CONTEXT = "<IMG_CONTEXT>"
# Non-parameter buffers some older torch checkpoints carry; never weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Chat template of each language-model family when the config does not name one (HF-native layout).
FAMILY_TEMPLATES = {"qwen2": "Hermes-2", "llama": "internlm2-chat", "internlm2": "internlm2-chat",
                    "phi3": "phi3-chat"}


# ----------------------------------------------------------------------------- safetensors reading

# The float dtypes drex imports (safetensors code -> numpy dtype); any other dtype is a check problem.
FLOAT_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
                "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
_FLOAT8 = ("F8_E4M3", "F8_E5M2")


def _open(path: str):
  # framework="numpy", not "flax": tensors are transformed and cast on the host, then placed (sharded)
  # once; "flax" would first put every whole tensor on the default device (and narrows int64 to int32).
  # The package returns a host copy of each tensor (not a view of the file): one tensor at a time.
  try:
    return safetensors.safe_open(path, framework="numpy")
  except safetensors.SafetensorError as e:
    raise UserError(f"{path} is truncated or not a safetensors file ({e}); re-download it") from None


def _read_float8(path: str, name: str) -> np.ndarray:
  """A float8 tensor as an ml_dtypes view of the memory-mapped file.

  The one thing read by hand: the safetensors package (0.5 - 0.8) cannot return float8 tensors to
  numpy (nor to flax: both look `numpy.float8_e4m3fn` up, which numpy lacks), and it does not expose
  a tensor's byte offsets, so the header is read here. The package has already validated the file.
  """
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    entry = json.loads(f.read(n))[name]
  begin, end = entry["data_offsets"]
  raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n + begin, shape=(end - begin,))
  return raw.view(FLOAT_DTYPES[entry["dtype"]]).reshape(entry["shape"])


class Checkpoint:
  """The tensors of a checkpoint directory: name -> file, from the index or from every *.safetensors.

  Headers (names, shapes, dtypes) are read when it opens; `array` reads one tensor into host memory.
  """

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_FILE)
    self.files: dict[str, Any] = {}  # filename -> safetensors handle
    self.where: dict[str, str] = {}  # tensor name -> filename
    self.headers: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}  # filename -> name -> (shape, dtype)
    problems = []
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get("weight_map", {})
      for name, filename in sorted(weight_map.items()):
        if filename not in self.files:
          path = os.path.join(directory, filename)
          if not os.path.exists(path):
            raise UserError(f"{INDEX_FILE} in {directory} names shard {filename}, which is not there; "
                            f"download every shard")
          self._add(filename)
        if name not in self.headers[filename]:
          problems.append(f"{name} (listed in {INDEX_FILE} but absent from {filename})")
          continue
        self.where[name] = filename
      if problems:
        raise UserError(f"checkpoint {directory} is inconsistent: " + "; ".join(problems))
    else:
      paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
      if not paths:
        raise UserError(f"no *.safetensors files in {directory}")
      for path in paths:
        filename = os.path.basename(path)
        for name in self._add(filename):
          if name in self.where:
            problems.append(f"{name} is in both {self.where[name]} and {filename}")
          self.where[name] = filename
      if problems:
        raise UserError(f"checkpoint {directory} has duplicate tensors (add a {INDEX_FILE}): " + "; ".join(problems))

  def _add(self, filename: str) -> list[str]:
    handle = self.files[filename] = _open(os.path.join(self.directory, filename))
    slices = {name: handle.get_slice(name) for name in handle.keys()}
    self.headers[filename] = {name: (tuple(t.get_shape()), t.get_dtype()) for name, t in slices.items()}
    return list(slices)

  def names(self) -> set[str]:
    return set(self.where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.headers[self.where[name]][name][0]

  def dtype_code(self, name: str) -> str:
    return self.headers[self.where[name]][name][1]

  def array(self, name: str) -> np.ndarray:
    code = self.dtype_code(name)
    if code in _FLOAT8:
      return _read_float8(os.path.join(self.directory, self.where[name]), name)
    try:
      return self.files[self.where[name]].get_tensor(name)
    except (TypeError, AttributeError, safetensors.SafetensorError) as e:  # a dtype numpy has no name for
      raise UserError(f"tensor {name} in {self.directory} has dtype {code}, which drex cannot read ({e})") from None


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


def llm_family(hf: dict) -> str:
  """The language-model family of a checkpoint config: 'qwen2' | 'llama' | 'internlm2' | 'phi3',
  from its LLM's architecture / model_type (`peft_export.export_family` is what a drex base exports as)."""
  llm = _llm_dict(hf)
  names = [a.lower() for a in llm.get("architectures") or []] + [str(llm.get("model_type", "")).lower()]
  for name in names:
    for family in tensor_names.FAMILIES:
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
  layout, family, llm = layout_of(hf), llm_family(hf), _llm_dict(hf)
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
  return FAMILY_TEMPLATES[llm_family(hf)]


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
    elif checkpoint.dtype_code(name) not in FLOAT_DTYPES:
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
  layout, family = layout_of(hf), llm_family(hf)
  names = tensor_names.names_in(layout, family, checkpoint.names())
  links = tensor_names.plan(cfg, family, names)
  problems = check(checkpoint, tensor_names.hf_shapes(links), cfg.llm.tie_embeddings)
  if problems:
    raise UserError(f"checkpoint {directory} ({names.layout} layout, {family}) does not fit its config: "
                    f"{len(problems)} problem(s): " + "; ".join(problems))
  dtypes: dict[tuple[str, ...], Any] = {}
  if expected is not None:
    flat = flax.traverse_util.flatten_dict(expected)
    ours = {path for link in links for path in link.params}
    if set(flat) != ours:
      raise ValueError(f"drex import plan and model disagree (a drex bug): model-only {sorted(set(flat) - ours)[:5]}, "
                       f"plan-only {sorted(ours - set(flat))[:5]}")
    dtypes = {p: x.dtype for p, x in flat.items()}
  flat_shardings = flax.traverse_util.flatten_dict(shardings) if shardings is not None else {}
  default_dtype = jnp.dtype(cfg.param_dtype)
  out = {}
  for link in links:
    for path, value in zip(link.params, link.to_drex(*[checkpoint.array(name) for name in link.hf])):
      if expected is not None and tuple(value.shape) != tuple(flat[path].shape):
        raise ValueError(f"drex import made {path} {value.shape}, model expects {flat[path].shape} (a drex bug)")
      value = np.asarray(value).astype(dtypes.get(path, default_dtype))
      out[path] = _place(value, flat_shardings.get(path))
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
  provenance = {"source": os.path.abspath(directory), "format": layout_of(hf), "llm_family": llm_family(hf),
                "architectures": hf.get("architectures")}
  return BaseInfo(cfg, template, image_spec_of(hf, preprocessor), provenance), tokenizer
