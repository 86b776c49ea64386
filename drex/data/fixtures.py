"""drex's own small copies of every supported real-data layout, for smoke runs and tests without downloads.

`ensure(root)` writes (once) a few records of each benchmark in its published layout (ChartQA, DocVQA,
MMBench, TextVQA, ScienceQA; drex.data.benchmarks) and the InternVL meta JSON + JSONL and LLaVA JSON
instruction-tuning formats (drex.data.conversations), with images drawn by drex.data.render in varied
sizes, modes and formats. `specs(root)` gives the source specs (drex.data.sources) that read them:

  root/chartqa, root/docvqa, root/mmbench, root/textvqa, root/scienceqa   benchmark manual_dirs
  root/conversations/internvl/{meta.json, train.jsonl, test.jsonl, images/}
  root/conversations/llava/{train.json, test.json, images/}
"""

from __future__ import annotations

import os
import shutil
import uuid

import ml_collections

from drex.data import benchmarks, conversations, sources

DEFAULT_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "drex", "fixtures")
VERSION = "1"  # bump when a writer changes, so cached copies are rewritten
_DONE = f".complete-v{VERSION}"


def specs(root: str = DEFAULT_ROOT) -> dict[str, ml_collections.ConfigDict]:
  """name -> source spec of each fixture dataset under root: every benchmark under its kind's name, plus
  'user_jsonl' (InternVL meta JSON for training, a JSONL for evaluation) and 'user_llava' (LLaVA JSON)."""
  out = {kind: sources.make_spec(kind, path=os.path.join(root, kind)) for kind in benchmarks.BENCHMARKS}
  internvl = os.path.join(root, "conversations", "internvl")
  llava = os.path.join(root, "conversations", "llava")
  out["user_jsonl"] = sources.make_spec("internvl", train=os.path.join(internvl, "meta.json"),
                                        test=os.path.join(internvl, "test.jsonl"),
                                        image_root=os.path.join(internvl, "images"))
  out["user_llava"] = sources.make_spec("llava", train=os.path.join(llava, "train.json"),
                                        test=os.path.join(llava, "test.json"))
  return out


def ensure(root: str = DEFAULT_ROOT, size: int = 8) -> str:
  """Write every fixture under root unless a complete copy is there already; returns root.

  Written to a sibling directory first and renamed into place, so a crash never leaves half a copy.
  """
  if os.path.exists(os.path.join(root, _DONE)):
    return root
  staging = f"{root.rstrip(os.sep)}.tmp-{uuid.uuid4().hex[:8]}"
  for kind, bench in benchmarks.BENCHMARKS.items():
    bench.write_fixture(os.path.join(staging, kind), seed=0, size=size)
  conversations.write_fixture(os.path.join(staging, "conversations"), seed=0, size=size)
  open(os.path.join(staging, _DONE), "w").close()
  if os.path.exists(root) and not os.path.exists(os.path.join(root, _DONE)):  # an older or incomplete copy
    shutil.rmtree(root, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
  try:
    os.rename(staging, root)
  except OSError:  # another process put its (identical) complete copy there first
    shutil.rmtree(staging, ignore_errors=True)
    if not os.path.exists(os.path.join(root, _DONE)):
      raise
  return root
