"""Human-readable outputs of a run: report.md (tables), PNG heatmaps of each accuracy matrix, and
PNG routing-weight profiles (per layer and expert, for each task's evaluation data)."""

from __future__ import annotations

import io
import os

from etils import epath
from matplotlib.figure import Figure  # figures without pyplot: drawing reports leaves the user's backend alone
import numpy as np

SUMMARY_KEYS = ("average_accuracy", "foundation", "foundation_retention", "forgetting", "backward_transfer",
                "forward_transfer", "average_incremental_accuracy")
FIELD_KEYS = ("MFT", "MFN", "MAA", "BWT")  # the names multimodal continual-instruction-tuning papers use


def _fmt(v) -> str:
  return "–" if v is None else f"{v:.3f}"


def markdown(results: dict) -> str:
  lines = ["# drex run report", "", f"Tasks (in order): {', '.join(results['tasks'])}  ",
           f"Foundation suite: {', '.join(results['foundation'])}", ""]
  lines += ["## Summary", "", "| method | " + " | ".join(SUMMARY_KEYS) + " |",
            "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
  for name, m in results["methods"].items():
    lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in SUMMARY_KEYS) + " |")
  lines += ["", "As MCITlib reports them (MFT: right after learning, MFN: final, MAA: mean over the stream, BWT):", "",
            "| method | " + " | ".join(FIELD_KEYS) + " |", "|---" * (len(FIELD_KEYS) + 1) + "|"]
  for name, m in results["methods"].items():
    lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in FIELD_KEYS) + " |")
  if results.get("oracle"):
    lines += ["", "## Oracle (each task's own expert alone)", "", "| task | score | routing after last task | ratio |",
              "|---|---|---|---|"]
    routing = results["methods"].get("routing")
    for j, (task, score) in enumerate(results["oracle"].items()):
      routed = routing["matrix"][-1][j] if routing else None
      ratio = routed / score if routed is not None and score else None
      lines.append(f"| {task} | {score:.3f} | {_fmt(routed)} | {_fmt(ratio)} |")
  for name, m in results["methods"].items():
    lines += ["", f"## {name}: accuracy matrix", "", "| after | " + " | ".join(m["columns"]) + " |",
              "|---" * (len(m["columns"]) + 1) + "|"]
    for label, row in zip(m["rows"], m["matrix"]):
      lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
  if results.get("timings_s"):
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["timings_s"].items()]
  lines += ["", "Plots: `plots/matrix_<method>.png`, `plots/routing_<method>.png`.", ""]
  return "\n".join(lines)


def plot_matrix(path: str, title: str, rows: list[str], columns: list[str], matrix, num_tasks: int) -> None:
  m = np.asarray(matrix)
  fig = Figure(figsize=(1.1 * len(columns) + 2, 0.6 * len(rows) + 1.6))
  ax = fig.subplots()
  im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
  ax.set_xticks(range(len(columns)), columns, rotation=35, ha="right")
  ax.set_yticks(range(len(rows)), rows)
  ax.axvline(num_tasks - 0.5, color="white", lw=2)
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="white" if m[i, j] < 0.6 else "black",
              fontsize=8)
  ax.set_title(title)
  fig.colorbar(im, ax=ax, fraction=0.04)
  fig.tight_layout()
  _save(fig, path)


def plot_routing(path: str, title: str, profiles: dict[str, list[list[float]]], experts: list[str]) -> None:
  """profiles: eval set -> [layers, experts] mean routing weight."""
  names = list(profiles)
  fig = Figure(figsize=(2.2 * len(names) + 1, 2.8))
  axes = fig.subplots(1, len(names), squeeze=False)
  for ax, name in zip(axes[0], names):
    p = np.asarray(profiles[name])
    ax.imshow(p, vmin=0, vmax=1, cmap="magma", aspect="auto")
    ax.set_title(name, fontsize=9)
    ax.set_xticks(range(len(experts)), experts, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(p.shape[0]), [f"layer {i}" for i in range(p.shape[0])], fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  _save(fig, path)


def _save(fig, path: str) -> None:
  """PNG to a local or cloud path (matplotlib writes to a buffer, epath to the file)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  epath.Path(path).write_bytes(buffer.getvalue())


def write_all(workdir: str, results: dict) -> None:
  plots = os.path.join(workdir, "plots")
  epath.Path(plots).mkdir(parents=True, exist_ok=True)
  for name, m in results["methods"].items():
    plot_matrix(os.path.join(plots, f"matrix_{name}.png"), f"{name}: accuracy after each task", m["rows"],
                m["columns"], m["matrix"], len(results["tasks"]))
  for name, profiles in results.get("routing_profiles", {}).items():
    plot_routing(os.path.join(plots, f"routing_{name}.png"), f"{name}: mean routing weight per layer",
                 profiles["profiles"], profiles["experts"])
  epath.Path(workdir, "report.md").write_text(markdown(results))
