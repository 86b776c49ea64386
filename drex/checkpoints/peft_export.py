"""Export to PyTorch users: a task's LoRA expert as a PEFT adapter, and base (+ an expert merged in)
as a transformers-native `InternVLForConditionalGeneration` checkpoint.

Owns: which transformers text model a drex base exports as (`export_family`), the PEFT adapter
(fusing experts onto fused linears), the merged checkpoint's config.json, and writing both with the
`safetensors` package. Tensor names and transforms come from `drex.checkpoints.tensor_names` (the
plan import reads too), in the `NATIVE` spelling.

PEFT folder (load with `peft.PeftModel.from_pretrained(InternVLForConditionalGeneration..., folder)`):
  adapter_config.json        LoRA r / lora_alpha / use_rslora, `target_modules` as a regex that only
                             matches the language model's linears (the vision tower also has q/k/v_proj)
  adapter_model.safetensors  base_model.model.model.language_model.layers.N.self_attn.q_proj.lora_A.weight
                             [r, d_in] and ...lora_B.weight [d_out, r] (float32)
  For Phi-3 bases, whose transformers model fuses qkv_proj and gate_up_proj, the experts of q/k/v
  (gate/up) become one LoRA of rank P*r on the fused linear (A stacked, B block-diagonal) with
  `rank_pattern` / `alpha_pattern` keeping the scale, which is exactly the same function.

Merged checkpoint (load with `InternVLForConditionalGeneration.from_pretrained(folder)`):
  config.json (InternVLConfig: vision, Qwen2 / Llama / Phi-3 text config; InternLM2 bases are written
  as Llama, as transformers' own converter does), model.safetensors (or shards + index), tokenizer.
  Tensor names are the model's state-dict names: model.vision_tower.*, model.multi_modal_projector.*,
  model.language_model.*, lm_head.weight.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Any, Callable, Iterable

import flax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from drex.checkpoints import tensor_names
from drex.checkpoints.tensor_names import NATIVE
from drex.errors import UserError
from drex.models.config import VLMConfig

# (shape, numpy dtype, producer of the array): tensors are produced when their shard is written.
Lazy = tuple[tuple[int, ...], np.dtype, Callable[[], np.ndarray]]
EXPORT_FAMILIES = ("qwen2", "llama", "phi3")


# ----------------------------------------------------------------------------- safetensors writing


def write_safetensors(path: str, tensors: dict[str, Lazy], metadata: dict[str, str] | None = None) -> None:
  """Write tensors to one .safetensors file (atomically: a .tmp file renamed into place).

  The `safetensors` package writes from a dict of arrays, so every tensor of the file is in host memory
  while it is written (`write_sharded` bounds that by its shard size, as transformers' save_pretrained does).
  """
  arrays = {}
  for name, (shape, dtype, produce) in tensors.items():
    value = np.ascontiguousarray(np.asarray(produce()).astype(np.dtype(dtype), copy=False))  # the writer needs C order
    if value.shape != tuple(shape):
      raise ValueError(f"{name}: produced {value.shape}, declared {tuple(shape)}")
    arrays[name] = value
  tmp = path + ".tmp"
  safetensors.numpy.save_file(arrays, tmp, metadata=dict(metadata or {"format": "pt"}))
  os.replace(tmp, path)


def write_sharded(directory: str, tensors: dict[str, Lazy], max_shard_bytes: int = 4 << 30) -> list[str]:
  """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
  sizes = {n: int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for n, (s, d, _) in tensors.items()}
  shards: list[list[str]] = [[]]
  used = 0
  for name in sorted(tensors):
    if shards[-1] and used + sizes[name] > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += sizes[name]
  if len(shards) == 1:
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    return ["model.safetensors"]
  files, weight_map = [], {}
  for i, names in enumerate(shards):
    filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(os.path.join(directory, filename), {n: tensors[n] for n in names})
    files.append(filename)
    weight_map.update({n: filename for n in names})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f, indent=1)
  return files


# ----------------------------------------------------------------------------- naming


def export_family(cfg: VLMConfig, provenance: dict | None = None) -> str:
  """The transformers text model a drex base exports as: 'qwen2', 'llama' or 'phi3' (InternLM2 -> Llama).

  Not the family of a checkpoint config (`hf_import.llm_family`): this is the export target.
  """
  family = (provenance or {}).get("llm_family")
  if family == "internlm2":
    return "llama"
  if family in EXPORT_FAMILIES:
    return family
  if cfg.llm.rope.kind == "longrope":
    return "phi3"
  return "qwen2" if cfg.llm.qkv_bias else "llama"




def _check_family(family: str) -> None:
  if family not in EXPORT_FAMILIES:
    raise ValueError(f"cannot export as {family!r}: transformers' InternVL text models here are {EXPORT_FAMILIES}")


# ----------------------------------------------------------------------------- PEFT adapter


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def peft_adapter(experts: Any, index: int, cfg: VLMConfig, family: str, r: int, lora_alpha: float,
                 rslora: bool = False) -> tuple[dict[str, np.ndarray], dict]:
  """(PEFT state dict, adapter_config fields) of expert `index` of an experts tree."""
  _check_family(family)
  flat = flax.traverse_util.flatten_dict(experts)
  modules: dict[tuple[int, str], dict[str, Any]] = {}  # (layer, drex linear) -> {lora_a, lora_b}
  for path, leaf in flat.items():
    if path[0] != "language_model" or not path[1].startswith("layers_"):
      raise UserError(f"expert entry {'/'.join(path)} is not a decoder linear; cannot export it to PEFT")
    modules.setdefault((int(path[1].split("_")[1]), path[-2]), {})[path[-1]] = leaf
  tensors: dict[str, np.ndarray] = {}
  rank_pattern, alpha_pattern, targets = {}, {}, set()
  for linear in tensor_names.decoder_linears(tensor_names.llm_links(cfg.llm, family, NATIVE)):
    present = [(name, d_out) for name, d_out in linear.parts if (linear.layer, name) in modules]
    if not present:
      continue
    d_total = sum(d for _, d in linear.parts)
    d_in = modules[linear.layer, present[0][0]]["lora_a"].shape[1]
    a = np.zeros((d_in, len(present) * r), np.float32)
    b = np.zeros((len(present) * r, d_total), np.float32)
    row, slot = 0, 0
    for name, d_out in linear.parts:
      if (linear.layer, name) in modules:
        a[:, slot * r:(slot + 1) * r] = _np(modules[linear.layer, name]["lora_a"][index])
        b[slot * r:(slot + 1) * r, row:row + d_out] = _np(modules[linear.layer, name]["lora_b"][index])
        slot += 1
      row += d_out
    hf_name = linear.module.rsplit(".", 1)[1]
    tensors[f"base_model.model.{linear.module}.lora_A.weight"] = a.T.copy()
    tensors[f"base_model.model.{linear.module}.lora_B.weight"] = b.T.copy()
    targets.add(hf_name)
    if len(present) > 1:  # keep scale alpha/r (or alpha/sqrt(r)) at the fused rank P*r
      rank_pattern[hf_name] = len(present) * r
      alpha_pattern[hf_name] = lora_alpha * (math.sqrt(len(present)) if rslora else len(present))
  if not tensors:
    raise UserError("the adapter holds no decoder linears to export")
  groups = sorted(targets)
  regex = "^" + re.escape(NATIVE.body) + r"layers\.\d+\.(self_attn|mlp)\.(" + "|".join(groups) + r")$"
  fields = {"r": r, "lora_alpha": lora_alpha, "use_rslora": rslora, "target_modules": regex,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
  return tensors, fields


def export_peft(out_dir: str, experts: Any, index: int, cfg: VLMConfig, family: str, r: int, lora_alpha: float,
                rslora: bool = False, base_model_name_or_path: str = "", extra: dict | None = None) -> None:
  """Write expert `index` as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."""
  tensors, fields = peft_adapter(experts, index, cfg, family, r, lora_alpha, rslora)
  os.makedirs(out_dir, exist_ok=True)
  config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path or None,
      "revision": None, "inference_mode": True, "r": fields["r"], "lora_alpha": fields["lora_alpha"],
      "lora_dropout": 0.0, "target_modules": fields["target_modules"], "bias": "none", "fan_in_fan_out": False,
      "use_rslora": fields["use_rslora"], "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
      "layers_to_transform": None, "layers_pattern": None, "rank_pattern": fields["rank_pattern"],
      "alpha_pattern": fields["alpha_pattern"],
  }
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"),
                    {k: (v.shape, v.dtype, (lambda v=v: v)) for k, v in tensors.items()},
                    {"format": "pt", **({k: str(v) for k, v in (extra or {}).items()})})


# ----------------------------------------------------------------------------- merged checkpoint


def hf_state(params: Any, cfg: VLMConfig, family: str, dtype: np.dtype | None = None) -> dict[str, Lazy]:
  """transformers-native state dict of drex base params (lazily converted, one tensor at a time)."""
  _check_family(family)
  flat = flax.traverse_util.flatten_dict(params)
  links = tensor_names.plan(cfg, family, NATIVE)
  missing = sorted({"/".join(path) for link in links for path in link.params if path not in flat})
  if missing:
    raise UserError(f"base params have no {', '.join(missing)}")
  out: dict[str, Lazy] = {}
  for link in links:
    leaves = [flat[path] for path in link.params]
    out_dtype = np.dtype(dtype or leaves[0].dtype)
    for j, (name, shape) in enumerate(zip(link.hf, link.shapes)):
      out[name] = (shape, out_dtype, lambda link=link, leaves=leaves, j=j: link.to_hf(*map(np.asarray, leaves))[j])
  return out


def hf_config(cfg: VLMConfig, family: str, torch_dtype: str) -> dict:
  """config.json of the transformers-native InternVLForConditionalGeneration of a drex base."""
  vc, llm = cfg.vision, cfg.llm
  vision = {"model_type": "internvl_vision", "hidden_size": vc.width, "num_hidden_layers": vc.depth,
            "num_attention_heads": vc.num_heads, "intermediate_size": vc.mlp_dim, "attention_bias": vc.qkv_bias,
            "use_qk_norm": vc.qk_norm, "norm_type": vc.norm_type, "layer_norm_eps": vc.norm_eps,
            "image_size": [vc.image_size, vc.image_size], "patch_size": [vc.patch_size, vc.patch_size],
            "hidden_act": "gelu", "num_channels": 3, "use_mean_pooling": True, "use_absolute_position_embeddings": True,
            "use_mask_token": False, "layer_scale_init_value": 0.1}
  rope = llm.rope
  text = {"model_type": family, "architectures": [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                                                    "phi3": "Phi3ForCausalLM"}[family]],
          "vocab_size": llm.vocab_size, "hidden_size": llm.d_model, "intermediate_size": llm.d_ff,
          "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
          "num_key_value_heads": llm.num_kv_heads, "head_dim": llm.head_dim, "rms_norm_eps": llm.norm_eps,
          "hidden_act": "silu", "max_position_embeddings": rope.max_position_embeddings,
          "tie_word_embeddings": llm.tie_embeddings, "rope_theta": rope.theta, "torch_dtype": torch_dtype,
          # drex does not keep the LLM's special-token ids; None avoids model defaults outside the vocabulary.
          "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
  if rope.kind == "dynamic":
    text["rope_scaling"] = {"rope_type": "dynamic", "type": "dynamic", "factor": rope.factor}
  elif rope.kind == "longrope":
    text["rope_scaling"] = {"rope_type": "longrope", "type": "longrope", "short_factor": list(rope.short_factor),
                            "long_factor": list(rope.long_factor),
                            "original_max_position_embeddings": rope.original_max_position_embeddings}
    text["original_max_position_embeddings"] = rope.original_max_position_embeddings
  if family == "qwen2":
    text.update(use_sliding_window=False, max_window_layers=llm.num_layers)
  elif family == "llama":
    text.update(attention_bias=False, mlp_bias=False)
  return {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
          "vision_config": vision, "text_config": text, "image_token_id": cfg.image_token_id,
          "image_seq_length": cfg.tokens_per_tile, "downsample_ratio": cfg.downsample_ratio,
          "projector_hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
          "tie_word_embeddings": llm.tie_embeddings, "torch_dtype": torch_dtype}


def export_merged(out_dir: str, params: Any, cfg: VLMConfig, family: str, experts: Any | None = None,
                  index: int = 0, scale: float = 1.0, tokenizer=None, dtype: str | None = None,
                  max_shard_bytes: int = 4 << 30) -> list[str]:
  """Write base params (with expert `index` merged in: W + scale * A @ B) as a transformers checkpoint."""
  from drex.adapters import lora  # pylint: disable=g-import-not-at-top
  if experts is not None:
    params = lora.merge_into_base(params, experts, index, scale)
  name = dtype or cfg.param_dtype
  os.makedirs(out_dir, exist_ok=True)
  files = write_sharded(out_dir, hf_state(params, cfg, family, jnp.dtype(name)), max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config(cfg, family, name), f, indent=2)
  if tokenizer is not None:
    tokenizer.save(out_dir)
  return files


def copy_files(src_dir: str, out_dir: str, names: Iterable[str]) -> None:
  for name in names:
    path = os.path.join(src_dir, name)
    if os.path.exists(path):
      shutil.copy(path, os.path.join(out_dir, name))
