"""Where the main job's wall time goes: XLA compilation, the input pipeline, the train steps, evaluation.

  PYTHONPATH=. python3 benchmarks/main_job_profile.py --out benchmarks/results     # the main job, fresh workdir

Runs `configs/task3.py` (as `python -m drex.train` does) in a fresh workdir and TFDS cache, with
  * compile: the durations JAX reports for tracing, lowering and backend compilation (jax.monitoring);
  * pipeline: the time training loops wait for their next batch (grain: decode, tokenize, batch);
  * steps: the time in the jitted train steps, each synced (device work + dispatch);
  * evaluation: the time in `evaluate_row` (generation + scoring, its compiles included),
and writes the breakdown beside the stream's own timings, the train steps per second, and the kernel time and
page faults of the process (getrusage); the results must equal task3_cpu.json. Freed host memory is kept for reuse
as `python -m drex.train` does (drex.host_memory); `--default_malloc` measures glibc's default instead.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
from absl import flags

from benchmarks import compare_results
from drex import cli, host_memory, stream
from drex.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_EVENTS = ("/jax/core/compile/tracing_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="")
  parser.add_argument("--workdir", default="")
  parser.add_argument("--default_malloc", action="store_true", help="leave glibc's malloc settings as they are")
  args = parser.parse_args()
  kept = False if args.default_malloc else host_memory.keep_freed_memory()
  jax.config.update("jax_enable_compilation_cache", False)  # every program compiled, as on a first run
  flags.FLAGS.mark_as_parsed()
  cli.setup_logging()
  spent = collections.Counter()  # seconds per part
  step_count = [0]  # train steps run

  def on_event(event, duration, **kwargs):
    del kwargs
    if event in COMPILE_EVENTS:
      spent["compile"] += duration

  jax.monitoring.register_event_duration_secs_listener(on_event)
  train = trainer.train

  def timed_train(label, step_fn, state, frozen, batches, *rest, **kw):
    base_class = type(batches)

    class Waiting(base_class):  # the time spent waiting for batches; still the iterator its checkpoints expect
      def __next__(self):
        begin = time.perf_counter()
        try:
          return base_class.__next__(self)
        finally:
          spent["pipeline"] += time.perf_counter() - begin

    batches.__class__ = Waiting

    def step(*a):
      begin = time.perf_counter()
      out = jax.block_until_ready(step_fn(*a))
      spent["steps"] += time.perf_counter() - begin
      step_count[0] += 1
      return out

    return train(label, step, state, frozen, batches, *rest, **kw)

  evaluate_row = stream.evaluate_row

  def timed_evaluate_row(*a, **kw):
    begin = time.perf_counter()
    try:
      return evaluate_row(*a, **kw)
    finally:
      spent["evaluation"] += time.perf_counter() - begin

  stream.trainer.train = timed_train
  stream.evaluate_row = timed_evaluate_row
  cfg = cli.load_config_file(os.path.join(ROOT, "configs", "task3.py"))
  workdir = args.workdir or tempfile.mkdtemp(prefix="drex_profile_")
  cfg.data.data_dir = os.path.join(workdir, "tfds")  # an empty TFDS cache: dataset builds are part of the job
  usage_before = resource.getrusage(resource.RUSAGE_SELF)
  begin = time.perf_counter()
  results = stream.run_stream(cfg, os.path.join(workdir, "run"))
  wall = time.perf_counter() - begin
  usage = resource.getrusage(resource.RUSAGE_SELF)
  with open(os.path.join(ROOT, "benchmarks", "results", "task3_cpu.json")) as f:
    differences, _ = compare_results.compare(json.load(f), results)
  breakdown = {k: round(v, 1) for k, v in spent.items()}
  steps = step_count[0]
  info = {"command": "PYTHONPATH=. python3 benchmarks/main_job_profile.py " + " ".join(sys.argv[1:]),
          "date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "jax": jax.__version__,
          "wall_s": round(wall, 1), "breakdown_s": breakdown, "stream_timings_s": results["timings_s"],
          "train_steps": steps, "train_steps_per_s": round(steps / spent["steps"], 2), "freed_memory_kept": kept,
          "kernel_cpu_s": round(usage.ru_stime - usage_before.ru_stime, 1),
          "user_cpu_s": round(usage.ru_utime - usage_before.ru_utime, 1),
          "minor_page_faults": usage.ru_minflt - usage_before.ru_minflt,
          "results_equal_task3_cpu_json": not differences}
  print(json.dumps(info, indent=1))
  if args.out:
    with open(os.path.join(args.out, "main_job_profile_cpu.json"), "w") as f:
      json.dump(info, f, indent=1)
    rest = wall - sum(v for k, v in spent.items() if k != "compile")
    lines = ["# Main job wall time, broken down (2-core CPU)", "", f"`{info['command']}`  ",
             f"{info['date']}, jax {info['jax']}, {info['cores']} cores; fresh workdir and TFDS cache, no compilation "
             f"cache; results equal `task3_cpu.json`: {info['results_equal_task3_cpu_json']}; freed host memory kept "
             f"for reuse (drex.host_memory): {kept}.", "",
             f"Train steps: {steps} at {info['train_steps_per_s']} steps/s (each synced). CPU time: "
             f"{info['user_cpu_s']:.0f} s user, {info['kernel_cpu_s']:.0f} s kernel; "
             f"{info['minor_page_faults'] / 1e6:.1f} M minor page faults.", "",
             "| part | seconds | share |", "|---|---|---|", f"| whole job | {wall:.0f} | 100% |"]
    for key in ("steps", "pipeline", "evaluation", "compile"):
      lines.append(f"| {key}{' (inside the others)' if key == 'compile' else ''} | {spent[key]:.0f} | "
                   f"{100 * spent[key] / wall:.0f}% |")
    lines.append(f"| other (datasets, base, checkpoints, statistics, reports) | {rest:.0f} | {100 * rest / wall:.0f}% |")
    with open(os.path.join(args.out, "main_job_profile_cpu.md"), "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
