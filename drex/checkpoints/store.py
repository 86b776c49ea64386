"""Orbax storage of the frozen base (once) and of each task's adapter (separately).

  <base>/config.json      model architecture, chat template, image tiling, provenance
  <base>/tokenizer.json   (or tokenizer.model)
  <base>/params/          orbax tree of the base params
  <workdir>/adapters/<name>/experts/   orbax tree, A: [1, d_in, r], B: [1, r, d_out]
  <workdir>/adapters/<name>/router/    orbax tree, v: [1, d_in]      (absent for plain LoRA)
  <workdir>/adapters/<name>/metadata.json

Every write goes to a temporary sibling directory (`<name>.tmp`) that is renamed into place only
when complete, so an interrupted save never leaves a half-written checkpoint under the final name,
and an existing checkpoint is never overwritten. A committed directory carries `files.json`, the size
and SHA-256 of every file in it: a restore first checks them and names the damaged file (truncated,
missing, altered), then checks names and shapes against what the model expects and reports each
offender in one error. On several hosts every process calls the save functions (orbax writes each
process's shards; process 0 writes the JSON, the manifest and renames).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from typing import Any

from etils import epath
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from drex.data import tokenizer as tok_lib
from drex.data.pipeline import ImageSpec
from drex.errors import UserError
from drex.models.config import VLMConfig


@dataclasses.dataclass(frozen=True)
class BaseInfo:
  """What a base checkpoint is, besides its weights."""

  model: VLMConfig
  template: str  # chat template name (drex.data.prompts)
  image: ImageSpec
  provenance: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)

  def to_json(self) -> dict:
    return {"model": self.model.to_dict(), "template": self.template, "image": dataclasses.asdict(self.image),
            "provenance": self.provenance}

  @classmethod
  def from_json(cls, d: dict) -> "BaseInfo":
    return cls(VLMConfig.from_dict(d["model"]), d["template"], ImageSpec(**d["image"]), d.get("provenance", {}))


# ----------------------------------------------------------------------------- generic trees


def sync(name: str) -> None:
  """Barrier across processes (no-op on one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def absolute(path: str | os.PathLike) -> str:
  """A local path made absolute; a cloud path (gs://...) as it is."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  return epath.Path(path).is_dir()


def makedirs(path: str | os.PathLike) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def remove_tree(path: str | os.PathLike) -> None:
  """Delete a directory tree if it is there."""
  p = epath.Path(path)
  if p.exists():
    p.rmtree()


def staging_for(path: str) -> str:
  """A fresh staging directory for `path` (a stale one from an interrupted save is removed)."""
  if exists(path):
    raise UserError(f"refusing to overwrite existing checkpoint {path}; move it away or use another workdir")
  staging = f"{os.fspath(path).rstrip('/')}.tmp"
  if jax.process_index() == 0:
    remove_tree(staging)
    makedirs(staging)
  sync(f"staging {staging}")
  return staging


def commit(staging: str, path: str) -> None:
  """Move a finished staging directory into place (process 0, after every process wrote), with its manifest:
  atomic on a local filesystem; on object stores a copy whose marker (the final name) appears last."""
  sync(f"commit {path}")
  if jax.process_index() == 0:
    write_manifest(staging)
    epath.Path(staging).rename(path)
  sync(f"committed {path}")


MANIFEST = "files.json"
_HASH_LIMIT = 256 << 20  # directories larger than this are checked by file sizes only (reading GBs twice is slow)


def _files(directory: str | os.PathLike) -> dict[str, epath.Path]:
  root = epath.Path(directory)
  out = {}
  for folder, _, names in root.walk():
    for name in names:
      path = epath.Path(folder) / name
      out[str(path.relative_to(root))] = path
  out.pop(MANIFEST, None)
  return out


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_manifest(directory: str | os.PathLike) -> None:
  """files.json: {relative path: [size, sha256]} of every file under `directory` (sha256 '' above _HASH_LIMIT)."""
  files = _files(directory)
  sizes = {name: path.stat().length for name, path in files.items()}
  hash_them = sum(sizes.values()) <= _HASH_LIMIT
  write_json(os.path.join(os.fspath(directory), MANIFEST),
             {name: [sizes[name], _sha256(path) if hash_them else ""] for name, path in sorted(files.items())})


def verify(directory: str | os.PathLike, what: str) -> None:
  """Check a committed directory against its manifest (directories written before manifests pass)."""
  manifest_path = os.path.join(os.fspath(directory), MANIFEST)
  if not exists(manifest_path):
    return
  manifest = read_json(manifest_path, f"{what} manifest")
  files = _files(directory)
  hash_them = sum(size for size, _ in manifest.values()) <= _HASH_LIMIT
  for name, (size, digest) in sorted(manifest.items()):
    where = os.path.join(os.fspath(directory), name)
    if name not in files:
      problem = "is missing"
    elif files[name].stat().length != size:
      problem = f"has {files[name].stat().length} bytes, {size} were written"
    elif hash_them and digest and _sha256(files[name]) != digest:
      problem = "does not match the checksum written with it"
    else:
      continue
    raise UserError(f"{what} is damaged: {where} {problem}; delete {directory} and re-run to make it again")


def keep_aside(path: str) -> str | None:
  """Rename `path` (a file or directory, if it is there) to the first free `<stem>.<n><ext>`; returns that name."""
  if not exists(path):
    return None
  stem, ext = os.path.splitext(path)
  n = 1
  while exists(f"{stem}.{n}{ext}"):
    n += 1
  epath.Path(path).rename(f"{stem}.{n}{ext}")
  return f"{stem}.{n}{ext}"


def check_writable(directory: str | os.PathLike) -> None:
  """One line, before anything is written, when `directory` cannot be created or written; leaves nothing behind
  (a probe file and any folders made for it are removed again)."""
  target = epath.Path(directory)
  made = []
  try:
    missing, folder = [], target
    while not folder.exists() and folder != folder.parent:
      missing.append(folder)
      folder = folder.parent
    for folder in reversed(missing):
      folder.mkdir()
      made.append(folder)
    probe = target / f".drex-write-probe-{uuid.uuid4().hex[:8]}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UserError(f"cannot write to {directory} ({e.strerror or type(e).__name__}); choose a directory you can "
                    f"write to") from None
  finally:
    for folder in reversed(made):
      folder.rmdir()


def write_tree(path: str, tree: Any) -> None:
  """Save a pytree of arrays with orbax at `path` (which must not exist yet)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(absolute(path), tree)
  checkpointer.wait_until_finished()


def tree_problems(expected: Any, actual: dict[tuple[str, ...], tuple[tuple[int, ...], Any]]) -> list[str]:
  """Names of missing, unexpected and mis-shaped leaves. `actual`: flat path -> (shape, dtype)."""
  want = {path: (tuple(leaf.shape), leaf.dtype) for path, leaf in flax.traverse_util.flatten_dict(expected).items()}
  problems = [f"missing {'/'.join(p)} (model expects {want[p][0]})" for p in sorted(set(want) - set(actual))]
  problems += [f"unexpected {'/'.join(p)} {actual[p][0]}" for p in sorted(set(actual) - set(want))]
  problems += [f"{'/'.join(p)} has shape {actual[p][0]} but the model expects {want[p][0]}"
               for p in sorted(set(want) & set(actual)) if tuple(actual[p][0]) != want[p][0]]
  return problems


def read_tree(path: str, expected: Any | None = None, what: str = "checkpoint") -> Any:
  """Restore a pytree saved by `write_tree`.

  With `expected` (a tree of arrays or jax.ShapeDtypeStruct, optionally with `.sharding`), every
  leaf is checked by name and shape first and restored with the expected dtype and sharding.
  """
  if not isdir(path):
    raise UserError(f"{what} not found: {path}")
  checkpointer = ocp.StandardCheckpointer()
  damaged = f"{what} at {path} is damaged or incomplete; delete it and re-run"
  try:
    meta = checkpointer.metadata(absolute(path))
  except Exception as e:  # orbax raises various types for damaged directories
    raise UserError(f"{damaged} ({type(e).__name__})") from None
  if meta is None or meta.item_metadata is None:
    raise UserError(damaged)
  stored = flax.traverse_util.flatten_dict(_as_dict(meta.item_metadata.tree))
  if expected is not None:
    problems = tree_problems(expected, {p: (tuple(m.shape), m.dtype) for p, m in stored.items()})
    if problems:
      raise UserError(f"{what} at {path} does not fit the model: " + "; ".join(problems))
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), expected)
  else:
    target = None
  try:
    return checkpointer.restore(absolute(path), target)
  except Exception as e:
    raise UserError(f"{what} at {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    f"delete it and re-run") from None


def _as_dict(tree):
  if isinstance(tree, dict):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def write_json(path: str, obj: Any) -> None:
  """Write JSON through a temporary sibling, so readers never see half a file."""
  tmp = epath.Path(f"{path}.tmp-{uuid.uuid4().hex[:8]}")
  tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
  tmp.replace(path)


def _json_default(obj):
  if isinstance(obj, (np.floating, np.integer)):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_json(path: str, what: str) -> Any:
  if not exists(path):
    raise UserError(f"{what} not found: {path}")
  try:
    return json.loads(epath.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise UserError(f"{what} at {path} is not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- base


def save_base(directory: str, params: Any, info: BaseInfo, tokenizer: tok_lib.Tokenizer) -> None:
  """Write a base checkpoint directory once (atomically)."""
  staging = staging_for(directory)
  if jax.process_index() == 0:
    write_json(os.path.join(staging, "config.json"), info.to_json())
    tokenizer.save(staging)
  write_tree(os.path.join(staging, "params"), params)
  commit(staging, directory)


def load_base_info(directory: str) -> tuple[BaseInfo, tok_lib.Tokenizer]:
  config = read_json(os.path.join(directory, "config.json"), "base config")
  if not isinstance(config, dict) or not {"model", "template", "image"} <= set(config):
    kind = config.get("model_type") if isinstance(config, dict) else None
    raise UserError(f"{directory} is neither a drex base (config.json with model, template, image) nor an InternVL-2 "
                    f"checkpoint with safetensors weights (its config.json has model_type {kind!r}); pass an "
                    f"InternVL-2 checkpoint directory (OpenGVLab/InternVL2-*) or a drex base")
  info = BaseInfo.from_json(config)
  return info, tok_lib.Tokenizer.load(directory)


def load_base_params(directory: str, expected: Any) -> Any:
  verify(directory, f"base {directory}")
  return read_tree(os.path.join(directory, "params"), expected, what="base params")


# ----------------------------------------------------------------------------- adapters


def save_adapter(directory: str, experts: Any, router: Any | None, metadata: dict) -> None:
  """Write one task's adapter (expert slice, its routing vectors, JSON metadata) once."""
  if jax.process_index() == 0:
    makedirs(epath.Path(absolute(directory)).parent)
  sync(f"parent {directory}")
  staging = staging_for(directory)
  write_tree(os.path.join(staging, "experts"), experts)
  if router is not None:
    write_tree(os.path.join(staging, "router"), router)
  if jax.process_index() == 0:
    write_json(os.path.join(staging, "metadata.json"), metadata)
  commit(staging, directory)


def save_tree(directory: str, tree: Any) -> None:
  """A lone pytree checkpoint, written once (atomically)."""
  staging = staging_for(directory)
  write_tree(os.path.join(staging, "tree"), tree)
  commit(staging, directory)


def load_tree(directory: str, expected: Any, what: str) -> Any:
  verify(directory, what)
  return read_tree(os.path.join(directory, "tree"), expected, what)


def load_adapter(directory: str, expected_experts: Any | None = None,
                 expected_router: Any | None = None) -> tuple[Any, Any | None, dict]:
  verify(directory, f"adapter {directory}")
  metadata = read_json(os.path.join(directory, "metadata.json"), "adapter metadata")
  experts = read_tree(os.path.join(directory, "experts"), expected_experts, what=f"adapter {directory}")
  router_path = os.path.join(directory, "router")
  router = read_tree(router_path, expected_router, what=f"router {directory}") if isdir(router_path) else None
  return experts, router, metadata
