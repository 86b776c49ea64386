"""The one registry of data sources: a task's name resolves to where its records come from and how it is
asked and scored (big_vision's `datasets/core.py:get` idea: dispatch by kind).

A stream config names tasks and foundation-suite members. A name without an entry in `config.sources`
is a task of the embedded family (drex.data.tasks). An entry is a source spec (every key optional but
`kind`; `SPEC_FIELDS` holds the defaults):

  kind            'embedded' | a benchmark in its published layout ('chartqa', 'docvqa', 'mmbench', 'textvqa',
                  'scienceqa'; TFDS builders in drex.data.benchmarks) | 'internvl' (InternVL's fine-tuning
                  meta JSON, or one JSONL) | 'llava' (a LLaVA JSON list: CoIN, UCIT, MLLM-CL task files)
  path            benchmarks: the local copy in its published layout (the TFDS manual_dir)
  train, validation, test
                  benchmarks: the published split each of drex's splits reads ('' = the benchmark's default);
                  internvl / llava: that split's file ('' = the split is absent)
  image_root      internvl JSONL / llava: the folder image paths are relative to ('' = the file's folder)
  metric          a drex.data.metrics name ('' = the benchmark's; exact_match for internvl / llava)
  prompt_suffix   appended to every question, in training and evaluation ('<default>': benchmarks InternVL-2's
                  eval prompt, e.g. " Answer the question using a single word or phrase.", others none)
  max_new_tokens  tokens generated per answer (0 = the benchmark's, else config data.max_new_tokens)
  max_tiles       image tiles per example, thumbnails included (0 = the benchmark's, else the base's)

Every path may be local or a cloud path (gs://...): files are read through etils.epath.
Records follow drex.data.record. `Source.records(split)` is random access (grain reads it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from etils import epath
import ml_collections

from drex.data import benchmarks, builder, conversations, metrics, record as record_lib, tasks
from drex.errors import UserError

SPLITS = ("train", "validation", "test")

DEFAULT_SUFFIX = "<default>"
SPEC_FIELDS: dict[str, Any] = {"kind": "", "path": "", "train": "", "validation": "", "test": "", "image_root": "",
                               "metric": "", "prompt_suffix": DEFAULT_SUFFIX, "max_new_tokens": 0, "max_tiles": 0}


def make_spec(kind: str, **fields) -> ml_collections.ConfigDict:
  """A complete source spec for a config file (every field present, so each can be overridden on the command
  line: --config.sources.<name>.path=...)."""
  unknown = sorted(set(fields) - set(SPEC_FIELDS))
  if unknown:
    raise ValueError(f"unknown source spec fields {unknown}; known: {', '.join(SPEC_FIELDS)}")
  return ml_collections.ConfigDict({**SPEC_FIELDS, "kind": kind, **fields})


@dataclasses.dataclass(frozen=True)
class Source:
  """A task or foundation-suite member: its records per split and how it is asked and scored."""

  name: str
  kind: str
  metric: str
  max_new_tokens: int  # 0 = the stream's data.max_new_tokens
  max_tiles: int  # 0 = the stream's data.max_tiles / the base's
  subsets: tuple[str, ...] = ()  # parts scored on their own, then averaged (ChartQA human / augmented)
  spec: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)  # as resolved
  open_split: Callable[[str], Sequence[dict]] = dataclasses.field(default=None, compare=False, repr=False)
  # What the training records depend on (their files' identity, prompt suffix, tiles), for adapter
  # fingerprints; evaluation-only fields (test split, metric, answer length) are not part of it.
  train_identity: Callable[[], Any] = dataclasses.field(default=lambda: None, compare=False, repr=False)

  def records(self, split: str) -> Sequence[dict]:
    """drex.data.record records of one of SPLITS."""
    if split not in SPLITS:
      raise UserError(f"unknown split {split!r} for {self.name}; use one of {SPLITS}")
    return self.open_split(split)


# ----------------------------------------------------------------------------- kinds


def _embedded(name: str, spec: dict, data_dir: str) -> Source:
  task = tasks.get(name) if name in tasks.TASKS else None
  if task is None:
    raise UserError(f"unknown task {name!r}: not an embedded task ({', '.join(tasks.TASKS)}) and no "
                    f"config.sources.{name} entry gives its source")
  unused = [k for k in ("path", "train", "validation", "test", "image_root") if spec[k]]
  if unused:
    raise UserError(f"config.sources.{name} sets {unused}, which an embedded task does not read; remove them or set "
                    f"its kind")
  suffix = "" if spec["prompt_suffix"] == DEFAULT_SUFFIX else spec["prompt_suffix"]

  def open_split(split: str) -> Sequence[dict]:
    records = record_lib.Mapped(builder.data_source(name, split, data_dir), embedded_record)
    return record_lib.Mapped(records, functools.partial(_with_suffix, suffix=suffix)) if suffix else records

  def identity():  # None when nothing is set: embedded fingerprints stay those of earlier drex versions
    return ("embedded", suffix, spec["max_tiles"]) if suffix or spec["max_tiles"] else None

  return Source(name, "embedded", spec["metric"] or task.metric, spec["max_new_tokens"], spec["max_tiles"],
                spec=spec, open_split=open_split, train_identity=identity)


def embedded_record(r: dict) -> dict:
  return record_lib.make([(record_lib.text(r["question"]), record_lib.text(r["answer"]))],
                         [r["image"]] if r["has_image"] else [], group=int(r["group"]))


def _benchmark(name: str, spec: dict, data_dir: str) -> Source:
  bench = benchmarks.BENCHMARKS[spec["kind"]]
  if not spec["path"]:
    raise UserError(f"config.sources.{name}.path is empty: give the local copy of {spec['kind']} in its published "
                    f"layout")
  suffix = bench.prompt_suffix if spec["prompt_suffix"] == DEFAULT_SUFFIX else spec["prompt_suffix"]
  splits = {s: spec[s] or bench.splits.get(s, "") for s in SPLITS}

  def open_split(split: str) -> Sequence[dict]:
    if not splits[split]:
      raise UserError(f"{name} ({spec['kind']}) has no {split} split; set config.sources.{name}.{split} to one of "
                      f"its published splits")
    built = benchmarks.prepare(spec["kind"], spec["path"], data_dir)
    if splits[split] not in built.info.splits:
      raise UserError(f"{name}: the {spec['kind']} copy at {spec['path']} has no '{splits[split]}' split (it has "
                      f"{', '.join(built.info.splits) or 'none'}; expected {bench.builder.LAYOUT}); add its files or "
                      f"set config.sources.{name}.{split}")
    return record_lib.Mapped(built.as_data_source(splits[split]),
                             functools.partial(benchmarks.to_record, prompt_suffix=suffix))

  tiles = spec["max_tiles"] or bench.max_tiles

  def identity():
    return (spec["kind"], splits["train"], suffix, tiles, benchmarks.dataset_key(spec["kind"], spec["path"]))

  return Source(name, spec["kind"], spec["metric"] or bench.metric, spec["max_new_tokens"] or bench.max_new_tokens,
                tiles, tuple(bench.subsets), {**spec, **splits}, open_split, identity)


def _conversations(name: str, spec: dict, data_dir: str) -> Source:
  del data_dir  # read in place: only the annotation files are loaded, images are decoded lazily
  suffix = "" if spec["prompt_suffix"] == DEFAULT_SUFFIX else spec["prompt_suffix"]

  @functools.cache  # each annotation file is parsed once per run
  def read(path: str) -> list[dict]:
    if spec["kind"] == "llava":
      return conversations.read_llava_json(path, spec["image_root"] or str(epath.Path(path).parent))
    if path.endswith(".jsonl"):
      return conversations.read_internvl_jsonl(path, spec["image_root"] or str(epath.Path(path).parent))
    if conversations.is_meta(path):
      return conversations.read_internvl_meta(path)
    return conversations.read_llava_json(path, spec["image_root"] or str(epath.Path(path).parent))  # a JSON list

  def open_split(split: str) -> Sequence[dict]:
    if not spec[split]:
      raise UserError(f"{name} ({spec['kind']}) has no {split} split; set config.sources.{name}.{split} to its file")
    records = read(spec[split])
    return record_lib.Mapped(records, functools.partial(_with_suffix, suffix=suffix)) if suffix else records

  def identity():
    return (spec["kind"], spec["image_root"], suffix, spec["max_tiles"], conversations.files_identity(spec["train"]))

  return Source(name, spec["kind"], spec["metric"] or "exact_match", spec["max_new_tokens"], spec["max_tiles"],
                spec=spec, open_split=open_split, train_identity=identity)


def _with_suffix(r: dict, suffix: str) -> dict:
  return {**r, "turns": [(user + suffix, answer) for user, answer in r["turns"]]}


# kind -> factory(name, spec, data_dir); every benchmark of drex.data.benchmarks is a kind of its own.
KINDS: dict[str, Callable[[str, dict, str], Source]] = {
    "embedded": _embedded, **{k: _benchmark for k in benchmarks.BENCHMARKS}, "internvl": _conversations,
    "llava": _conversations}


# ----------------------------------------------------------------------------- resolution


def spec_of(name: str, specs: Mapping[str, Any] | None) -> dict:
  """The complete spec of `name` (defaults filled in), checked: unknown keys, kinds and metrics are errors."""
  given = dict((specs or {}).get(name) or {})
  unknown = sorted(set(given) - set(SPEC_FIELDS))
  if unknown:
    raise UserError(f"config.sources.{name} has unknown keys {unknown}; known: {', '.join(SPEC_FIELDS)}")
  spec = {**SPEC_FIELDS, **given}
  spec["kind"] = spec["kind"] or "embedded"
  if spec["kind"] not in KINDS:
    raise UserError(f"config.sources.{name}.kind {spec['kind']!r} is unknown; use one of {', '.join(KINDS)}")
  if spec["metric"] and spec["metric"] not in metrics.METRICS:
    raise UserError(f"config.sources.{name}.metric {spec['metric']!r} is unknown; use one of "
                    f"{', '.join(metrics.METRICS)}")
  for key in ("max_new_tokens", "max_tiles"):
    if int(spec[key]) < 0:
      raise UserError(f"config.sources.{name}.{key} must be >= 0, got {spec[key]}")
  for key, value in spec.items():
    if isinstance(value, str) and value.startswith("REQUIRED"):
      raise UserError(f"config.sources.{name}.{key} is not set: {value}")
  return spec


def get(name: str, specs: Mapping[str, Any] | None = None, data_dir: str = builder.DEFAULT_DATA_DIR) -> Source:
  """The source of a task name: its config.sources entry, else the embedded task of that name."""
  spec = spec_of(name, specs)
  return KINDS[spec["kind"]](name, spec, data_dir)


def fingerprint_part(source: Source) -> str | None:
  """A short hash of what a source's training records depend on (None for a plain embedded task, so the
  fingerprints of embedded streams are those of earlier drex versions)."""
  identity = source.train_identity()
  if identity is None:
    return None
  return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
