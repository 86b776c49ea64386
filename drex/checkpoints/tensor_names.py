"""The one map between checkpoint tensor names and drex parameter paths, used in both directions.

`plan(cfg, family, names)` lists every tensor of an InternVL-2 model as a `Link`: the checkpoint
tensor name(s) with the shapes the config implies, the drex param path(s), and an invertible
`Transform` between them (`to_drex` for import, `to_hf` for export: transposes, the patch conv's
OIHW <-> HWIO, separate q/k/v <-> drex's fused vision qkv, Phi-3's fused qkv_proj / gate_up_proj
rows, InternLM2's wqkv interleaved by KV group). `hf_import` reads checkpoints through it;
`peft_export` writes merged checkpoints through it and takes PEFT's module names and fused-linear
groups from it (`decoder_linears`). A new language-model family is one branch of `llm_links` here
(plus its config parsing in `hf_import`).

`Names` holds a checkpoint's spelling: the remote-code OpenGVLab layout (`vision_model.*`, `mlp1.*`,
`language_model.model.*`) or the transformers-native one, prefixed (`NATIVE`, what export writes) or
in the legacy unprefixed form; `names_in` finds it from a checkpoint's tensor names.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from drex.models.config import LLMConfig, VisionConfig, VLMConfig

LAYOUTS = ("opengvlab", "hf")
FAMILIES = ("qwen2", "llama", "internlm2", "phi3")
# The decoder linears of drex's language model (the modules LoRA experts adapt).
LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Path = tuple[str, ...]
Shape = tuple[int, ...]


# ----------------------------------------------------------------------------- transforms


class Transform:
  """Checkpoint tensors <-> drex params of one `Link`; `to_hf` inverts `to_drex` (tuples, in order)."""

  def to_drex(self, *tensors: np.ndarray) -> tuple[np.ndarray, ...]:
    raise NotImplementedError

  def to_hf(self, *params: np.ndarray) -> tuple[np.ndarray, ...]:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Same(Transform):
  """The same array both sides (norms, biases, embeddings)."""

  def to_drex(self, w):
    return (w,)

  def to_hf(self, p):
    return (p,)


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
  """A torch linear weight (out, in) <-> a flax kernel (in, out)."""

  def to_drex(self, w):
    return (w.T,)

  def to_hf(self, k):
    return (k.T,)


@dataclasses.dataclass(frozen=True)
class Conv(Transform):
  """A torch conv weight OIHW <-> a flax conv kernel HWIO."""

  def to_drex(self, w):
    return (w.transpose(2, 3, 1, 0),)

  def to_hf(self, k):
    return (k.transpose(3, 2, 0, 1),)


@dataclasses.dataclass(frozen=True)
class Concat(Transform):
  """Separate checkpoint tensors (q, k, v) <-> one drex param holding them along its output axis.

  `linear`: torch weights (out_i, in) <-> kernel (in, sum out_i); else 1-D biases.
  """

  sizes: tuple[int, ...]
  linear: bool = True

  def to_drex(self, *ws):
    x = np.concatenate(ws, 0)
    return (x.T if self.linear else x,)

  def to_hf(self, p):
    x = p.T if self.linear else p
    return tuple(np.split(x, np.cumsum(self.sizes)[:-1], 0))


@dataclasses.dataclass(frozen=True)
class RowSplit(Transform):
  """One fused torch weight whose output rows are parts in order <-> one drex kernel per part
  (Phi-3's qkv_proj = q|k|v and gate_up_proj = gate|up)."""

  sizes: tuple[int, ...]

  def to_drex(self, w):
    bounds = np.cumsum((0,) + self.sizes)
    return tuple(w[a:b].T for a, b in zip(bounds[:-1], bounds[1:]))

  def to_hf(self, *ks):
    return (np.concatenate(ks, 1).T,)


@dataclasses.dataclass(frozen=True)
class KVGroupQKV(Transform):
  """InternLM2's wqkv, rows [(G+2)*D per KV group: q_0..q_{G-1}, k, v] <-> the q, k and v kernels."""

  heads: int
  kv_heads: int
  head_dim: int

  def to_drex(self, w):
    k, d = self.kv_heads, self.head_dim
    g = self.heads // k
    w = w.reshape(k, g + 2, d, w.shape[-1])
    return tuple(x.reshape(-1, w.shape[-1]).T for x in (w[:, :g], w[:, g], w[:, g + 1]))

  def to_hf(self, q, kk, v):
    k, d, d_in = self.kv_heads, self.head_dim, q.shape[0]
    g = self.heads // k
    parts = [q.T.reshape(k, g, d, d_in), kk.T.reshape(k, 1, d, d_in), v.T.reshape(k, 1, d, d_in)]
    return (np.concatenate(parts, 1).reshape(-1, d_in),)


SAME, LINEAR, CONV = Same(), Linear(), Conv()


@dataclasses.dataclass(frozen=True)
class Link:
  """Checkpoint tensors `hf` (of the `shapes` the config implies) <-> drex params `params`."""

  hf: tuple[str, ...]
  shapes: tuple[Shape, ...]
  params: tuple[Path, ...]
  transform: Transform

  def to_drex(self, *tensors) -> tuple[np.ndarray, ...]:
    return self.transform.to_drex(*tensors)

  def to_hf(self, *params) -> tuple[np.ndarray, ...]:
    return self.transform.to_hf(*params)


class _Links(list):
  """Links under one drex root ('vision_model', 'mlp1', 'language_model')."""

  def __init__(self, root: str):
    super().__init__()
    self.root = root

  def one(self, path: Path, name: str, shape: Shape, transform: Transform = SAME) -> None:
    self.many([path], [name], [shape], transform)

  def many(self, paths: Sequence[Path], names: Sequence[str], shapes: Sequence[Shape], transform: Transform) -> None:
    self.append(Link(tuple(names), tuple(tuple(s) for s in shapes), tuple((self.root,) + tuple(p) for p in paths),
                     transform))


# ----------------------------------------------------------------------------- spellings


@dataclasses.dataclass(frozen=True)
class Names:
  """Prefixes of a checkpoint's tensor names (its layout and spelling)."""

  layout: str  # 'opengvlab' | 'hf'
  vision: str  # 'vision_model.' | 'model.vision_tower.' | 'vision_tower.'
  projector: str  # 'mlp1.' | 'model.multi_modal_projector.' | 'multi_modal_projector.'
  body: str  # 'language_model.model.' | 'model.language_model.' | 'language_model.'
  head: str  # full name of the LM head weight


# transformers' InternVLForConditionalGeneration state-dict names: what export writes.
NATIVE = Names("hf", "model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.weight")


def names_in(layout: str, family: str, keys: Iterable[str]) -> Names:
  """The spelling of a checkpoint of `layout` / `family` whose tensors are named `keys`."""
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


# ----------------------------------------------------------------------------- the plan


def vision_links(cfg: VisionConfig, n: Names) -> list[Link]:
  c, m, p, g = cfg.width, cfg.mlp_dim, cfg.patch_size, cfg.grid
  links = _Links("vision_model")
  v = n.vision
  ogv = n.layout == "opengvlab"
  emb = v + "embeddings."
  links.one(("class_embedding",), emb + ("class_embedding" if ogv else "cls_token"), (1, 1, c))
  links.one(("position_embedding",), emb + ("position_embedding" if ogv else "position_embeddings"), (1, 1 + g * g, c))
  patch = emb + ("patch_embedding." if ogv else "patch_embeddings.projection.")
  links.one(("patch_embedding", "kernel"), patch + "weight", (c, 3, p, p), CONV)
  links.one(("patch_embedding", "bias"), patch + "bias", (c,))
  norm_leaves = [("scale", "weight"), ("bias", "bias")] if cfg.norm_type == "layer_norm" else [("weight", "weight")]
  for i in range(cfg.depth):
    layer = f"{v}encoder.layers.{i}." if ogv else f"{v}encoder.layer.{i}."
    lp = (f"layers_{i}",)
    attn = layer + ("attn." if ogv else "attention.")
    for ours, theirs in (("ls1", "ls1" if ogv else "lambda_1"), ("ls2", "ls2" if ogv else "lambda_2")):
      links.one(lp + (ours,), layer + theirs, (c,))
    for ours, theirs in (("norm1", "norm1" if ogv else "layernorm_before"),
                         ("norm2", "norm2" if ogv else "layernorm_after")):
      for leaf, tleaf in norm_leaves:
        links.one(lp + (ours, leaf), f"{layer}{theirs}.{tleaf}", (c,))
    if ogv:
      links.one(lp + ("attn", "qkv", "kernel"), attn + "qkv.weight", (3 * c, c), LINEAR)
      if cfg.qkv_bias:
        links.one(lp + ("attn", "qkv", "bias"), attn + "qkv.bias", (3 * c,))
      proj = attn + "proj."
    else:
      links.many([lp + ("attn", "qkv", "kernel")], [attn + f"{x}_proj.weight" for x in "qkv"], [(c, c)] * 3,
                 Concat((c, c, c)))
      if cfg.qkv_bias:
        links.many([lp + ("attn", "qkv", "bias")], [attn + f"{x}_proj.bias" for x in "qkv"], [(c,)] * 3,
                   Concat((c, c, c), linear=False))
      proj = attn + "projection_layer."
    if cfg.qk_norm:
      for x in ("q_norm", "k_norm"):
        links.one(lp + ("attn", x, "weight"), f"{attn}{x}.weight", (c,))
    links.one(lp + ("attn", "proj", "kernel"), proj + "weight", (c, c), LINEAR)
    links.one(lp + ("attn", "proj", "bias"), proj + "bias", (c,))
    links.one(lp + ("fc1", "kernel"), layer + "mlp.fc1.weight", (m, c), LINEAR)
    links.one(lp + ("fc1", "bias"), layer + "mlp.fc1.bias", (m,))
    links.one(lp + ("fc2", "kernel"), layer + "mlp.fc2.weight", (c, m), LINEAR)
    links.one(lp + ("fc2", "bias"), layer + "mlp.fc2.bias", (c,))
  return links


def projector_links(cfg: VLMConfig, n: Names) -> list[Link]:
  f = round(1 / cfg.downsample_ratio)
  c_in, d = cfg.vision.width * f * f, cfg.llm.d_model
  norm, l1, l2 = ("0", "1", "3") if n.layout == "opengvlab" else ("layer_norm", "linear_1", "linear_2")
  pre = n.projector
  links = _Links("mlp1")
  links.one(("norm", "scale"), f"{pre}{norm}.weight", (c_in,))
  links.one(("norm", "bias"), f"{pre}{norm}.bias", (c_in,))
  links.one(("linear_1", "kernel"), f"{pre}{l1}.weight", (d, c_in), LINEAR)
  links.one(("linear_1", "bias"), f"{pre}{l1}.bias", (d,))
  links.one(("linear_2", "kernel"), f"{pre}{l2}.weight", (d, d), LINEAR)
  links.one(("linear_2", "bias"), f"{pre}{l2}.bias", (d,))
  return links


def llm_links(cfg: LLMConfig, family: str, n: Names) -> list[Link]:
  """The language model's tensors: one branch per family where its checkpoint names or fusions differ."""
  d, h, k, hd, f, vocab = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  links = _Links("language_model")
  b = n.body
  internlm2 = family == "internlm2"
  links.one(("embed_tokens", "embedding"), b + ("tok_embeddings.weight" if internlm2 else "embed_tokens.weight"),
            (vocab, d))
  links.one(("norm", "weight"), b + "norm.weight", (d,))
  if not cfg.tie_embeddings:
    links.one(("lm_head", "kernel"), n.head, (vocab, d), LINEAR)
  qkv_rows = (h + 2 * k) * hd
  qkv = [("self_attn", f"{x}_proj", "kernel") for x in "qkv"]
  for i in range(cfg.num_layers):
    layer, lp = f"{b}layers.{i}.", (f"layers_{i}",)
    if internlm2:
      links.one(lp + ("input_layernorm", "weight"), layer + "attention_norm.weight", (d,))
      links.one(lp + ("post_attention_layernorm", "weight"), layer + "ffn_norm.weight", (d,))
      links.many([lp + x for x in qkv], [layer + "attention.wqkv.weight"], [(qkv_rows, d)], KVGroupQKV(h, k, hd))
      links.one(lp + ("self_attn", "o_proj", "kernel"), layer + "attention.wo.weight", (d, h * hd), LINEAR)
      for ours, theirs, shape in (("gate_proj", "w1", (f, d)), ("up_proj", "w3", (f, d)), ("down_proj", "w2", (d, f))):
        links.one(lp + ("mlp", ours, "kernel"), f"{layer}feed_forward.{theirs}.weight", shape, LINEAR)
      continue
    for norm in ("input_layernorm", "post_attention_layernorm"):
      links.one(lp + (norm, "weight"), f"{layer}{norm}.weight", (d,))
    attn = layer + "self_attn."
    if family == "phi3":
      links.many([lp + x for x in qkv], [attn + "qkv_proj.weight"], [(qkv_rows, d)], RowSplit((h * hd, k * hd, k * hd)))
      links.many([lp + ("mlp", "gate_proj", "kernel"), lp + ("mlp", "up_proj", "kernel")],
                 [layer + "mlp.gate_up_proj.weight"], [(2 * f, d)], RowSplit((f, f)))
    else:  # qwen2, llama
      for x, rows in (("q", h * hd), ("k", k * hd), ("v", k * hd)):
        links.one(lp + ("self_attn", f"{x}_proj", "kernel"), f"{attn}{x}_proj.weight", (rows, d), LINEAR)
        if cfg.qkv_bias:
          links.one(lp + ("self_attn", f"{x}_proj", "bias"), f"{attn}{x}_proj.bias", (rows,))
      for x in ("gate_proj", "up_proj"):
        links.one(lp + ("mlp", x, "kernel"), f"{layer}mlp.{x}.weight", (f, d), LINEAR)
    links.one(lp + ("self_attn", "o_proj", "kernel"), attn + "o_proj.weight", (d, h * hd), LINEAR)
    links.one(lp + ("mlp", "down_proj", "kernel"), layer + "mlp.down_proj.weight", (d, f), LINEAR)
  return links


def plan(cfg: VLMConfig, family: str, names: Names) -> list[Link]:
  """Every tensor of the model: checkpoint names and shapes, drex paths, and the transform between them."""
  if family not in FAMILIES:
    raise ValueError(f"unknown language-model family {family!r}; one of {FAMILIES}")
  return vision_links(cfg.vision, names) + projector_links(cfg, names) + llm_links(cfg.llm, family, names)


def hf_shapes(links: Iterable[Link]) -> dict[str, Shape]:
  """Checkpoint tensor name -> the shape the config implies."""
  return {name: shape for link in links for name, shape in zip(link.hf, link.shapes)}


@dataclasses.dataclass(frozen=True)
class DecoderLinear:
  """One checkpoint linear of a decoder layer and the drex linears it holds."""

  layer: int
  module: str  # checkpoint module name, e.g. 'model.language_model.layers.0.self_attn.qkv_proj'
  parts: tuple[tuple[str, int], ...]  # (drex linear, d_out) in output-row order: one unless fused


def decoder_linears(links: Iterable[Link]) -> list[DecoderLinear]:
  """The decoder linears of a plan (what PEFT adapters target), fused ones with their parts."""
  out = []
  for link in links:
    path = link.params[0]
    if not (path[0] == "language_model" and path[1].startswith("layers_") and path[-1] == "kernel"
            and path[-2] in LLM_LINEARS):
      continue
    if isinstance(link.transform, Linear):
      sizes = (link.shapes[0][0],)
    elif isinstance(link.transform, RowSplit):
      sizes = link.transform.sizes
    else:  # e.g. InternLM2's wqkv: its rows interleave q/k/v, so no block of rows is one part
      raise ValueError(f"{link.hf[0]} ({type(link.transform).__name__}) is not a linear whose rows are its parts "
                       f"in order; a LoRA cannot be mapped onto it")
    out.append(DecoderLinear(int(path[1].split("_")[1]), link.hf[0].removesuffix(".weight"),
                             tuple(zip((p[-2] for p in link.params), sizes))))
  return out
