"""Summarize finished drex.train workdirs as one ablation report: per stream and method the final accuracies
against each task's oracle, MFN, BWT, the foundation change and seconds per task; with the paper's token-level
PHATGOOSE router beside drex's default wherever the workdir holds its evaluation (`drex.evaluate
--config.router.kind=topk --config.router.level=token --config.router.temperature=1` writes
WORKDIR/evaluation.json), and the topk hybrid router's results where a copy of them is kept as
WORKDIR/results_hybrid.json (drex's default before the identify router).

  PYTHONPATH=. python3 benchmarks/stream_report.py "task10 (order 0)=runs/task10_o0" ... > benchmarks/results/x.md
"""

from __future__ import annotations

import json
import os
import sys


def _row(name: str, method: str, entry: dict, oracle: dict, tasks: list[str], seconds=None) -> str:
  final = dict(zip(entry["columns"], entry["matrix"][-1]))
  ratios = [final[t] / oracle[t] for t in tasks if oracle.get(t)]
  fmt = lambda v: "–" if v is None else f"{v:.3f}"
  per_task = "–" if not seconds else f"{min(seconds):.0f}-{max(seconds):.0f}"
  return (f"| {name} | {method} | {min(ratios):.2f} | {sum(ratios) / len(ratios):.2f} | {fmt(entry.get('MFN'))} | "
          f"{fmt(entry.get('BWT'))} | {100 * entry['foundation_retention']:+.1f} | {per_task} |")


def report(streams: list[tuple[str, str]]) -> str:
  lines = ["| stream | method | min task / oracle | mean task / oracle | MFN | BWT | foundation change (pts) | "
           "s per task (routing) |", "|---|---|---|---|---|---|---|---|"]
  matrices = []
  for name, workdir in streams:
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
    tasks, oracle = results["tasks"], results["oracle"]
    for method, entry in results["methods"].items():
      label = {"routing": f"routing (drex default: {results['config']['router']['kind']})"}.get(method, method)
      lines.append(_row(name, label, entry, oracle, tasks, entry.get("seconds_per_task")))
    hybrid = os.path.join(workdir, "results_hybrid.json")
    if os.path.exists(hybrid):
      with open(hybrid) as f:
        entry = json.load(f)["methods"]["routing"]
      lines.append(_row(name, "routing (topk hybrid, k=2 of 2 candidates, T=2)", entry, oracle, tasks))
    paper = os.path.join(workdir, "evaluation.json")
    if os.path.exists(paper):
      with open(paper) as f:
        evaluated = json.load(f)
      if evaluated["config"]["router"].get("level") == "token":
        lines.append(_row(name, "routing (paper: token level, T=1)", evaluated["methods"]["routing"], oracle, tasks))
    routing = results["methods"]["routing"]
    matrices += ["", f"### {name}: routing (drex default), accuracy after each task", "",
                 "| after | " + " | ".join(routing["columns"]) + " |", "|---" * (len(routing["columns"]) + 1) + "|"]
    matrices += [f"| {label} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                 for label, row in zip(routing["rows"], routing["matrix"])]
    matrices.append("| oracle | " + " | ".join(f"{oracle[t]:.3f}" if t in oracle else "" for t in routing["columns"])
                    + " |")
  return "\n".join(lines + matrices) + "\n"


if __name__ == "__main__":
  print(report([tuple(arg.split("=", 1)) for arg in sys.argv[1:]]), end="")
