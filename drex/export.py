"""Export a trained task expert for PyTorch users.

  python -m drex.export --workdir=runs/task3 --task=generic_min --out=export/generic_min_peft
  python -m drex.export --workdir=runs/task3 --task=generic_min --out=export/generic_min_merged --merged
  python -m drex.export --workdir=runs/task3 --out=export/base_hf --merged        # the base alone

Without --merged, OUT is a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for the
transformers-native InternVLForConditionalGeneration of the workdir's base; with --merged, OUT is that
transformers checkpoint itself (config.json, safetensors, tokenizer) with the expert folded into the
base weights (W + scale * A @ B). A PEFT adapter needs the base in that format: export it with
--merged and no --task when the base was not a transformers checkpoint (e.g. the shipped tiny base).
"""

from __future__ import annotations

import json
import os

from absl import flags
import jax

from drex import cli

if __name__ == "__main__":  # the command's flags; importing the module (tests, other modules) defines none
  _WORKDIR = flags.DEFINE_string("workdir", None, "A drex.train workdir (with base/ and adapters/<task>/).")
  _TASK = flags.DEFINE_string("task", "", "The task whose expert to export (adapters/<task>/).")
  _OUT = flags.DEFINE_string("out", None, "Output directory (must not exist or be empty).")
  _MERGED = flags.DEFINE_bool("merged", False, "Write base + expert merged as a transformers checkpoint.")


def main(argv):
  del argv
  from drex import base as base_lib  # pylint: disable=g-import-not-at-top
  from drex.adapters import lora  # pylint: disable=g-import-not-at-top
  from drex.checkpoints import peft_export, store  # pylint: disable=g-import-not-at-top
  from drex.errors import UserError  # pylint: disable=g-import-not-at-top

  workdir, task, out = _WORKDIR.value, _TASK.value, _OUT.value
  if not workdir or not out:
    raise UserError("--workdir and --out are required")
  if not task and not _MERGED.value:
    raise UserError("--task is required (or pass --merged without --task to export the base alone)")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"refusing to overwrite {out}; choose a new --out")
  store.check_writable(out)
  base = base_lib.load_from_workdir(workdir)
  cfg = base.info.model
  family = peft_export.export_family(cfg, base.info.provenance)
  experts, meta = None, {}
  if task:
    adapter_dir = os.path.join(workdir, "adapters", task)
    if not os.path.isdir(adapter_dir):
      root = os.path.join(workdir, "adapters")
      known = sorted(os.listdir(root)) if os.path.isdir(root) else []
      raise UserError(f"no adapter for task {task!r} in {workdir}; trained tasks: {', '.join(known) or 'none'}")
    meta = store.read_json(os.path.join(adapter_dir, "metadata.json"), "adapter metadata")
    targets = list(meta.get("target_modules", lora.ALL_TARGETS))
    expected = jax.eval_shape(lambda: lora.init_experts(base.params, int(meta["r"]), targets, jax.random.key(0)))
    experts, _, meta = store.load_adapter(adapter_dir, expected)
  r, alpha, rslora = int(meta.get("r", 1)), float(meta.get("lora_alpha", 1.0)), bool(meta.get("rslora", False))
  source = base.info.provenance.get("source", "")
  if _MERGED.value:
    scale = lora.AdapterSpec(lora_alpha=alpha, rslora=rslora).scale(r)
    files = peft_export.export_merged(out, base.params, cfg, family, experts, 0, scale, base.tokenizer)
    summary = {"out": out, "format": "transformers InternVLForConditionalGeneration", "text_model": family,
               "task": task or None, "files": files}
  else:
    peft_export.export_peft(out, experts, 0, cfg, family, r, alpha, rslora,
                            base_model_name_or_path=source if base.info.provenance.get("format") == "hf" else "",
                            extra={"drex_task": task})
    summary = {"out": out, "format": "PEFT LoRA", "text_model": family, "task": task, "r": r, "lora_alpha": alpha,
               "base": source or None}
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  cli.run(main, "drex.export")
