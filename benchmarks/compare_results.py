"""Compare two drex results.json files number by number (timings, anything in seconds, and the config are not
compared).

  python benchmarks/compare_results.py benchmarks/results/task3_cpu.json runs/task3/results.json

Prints every differing or missing entry and exits 1 if any number differs; keys only the second file has
(fields added since the first was written) are listed but do not count as differences.
"""

from __future__ import annotations

import json
import sys

IGNORED = ("timings_s", "config")


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for key, value in tree.items():
      if (not prefix and key in IGNORED) or "seconds" in str(key):
        continue
      yield from _flatten(value, f"{prefix}/{key}" if prefix else str(key))
  elif isinstance(tree, list):
    for i, value in enumerate(tree):
      yield from _flatten(value, f"{prefix}[{i}]")
  else:
    yield prefix, tree


def compare(reference: dict, candidate: dict) -> tuple[list[str], list[str]]:
  """(differences, keys added in candidate)."""
  ref, new = dict(_flatten(reference)), dict(_flatten(candidate))
  differences = [f"{k}: {ref[k]!r} -> {new.get(k, '<missing>')!r}" for k in ref if new.get(k, object()) != ref[k]]
  added = [k for k in new if k not in ref]
  return differences, added


def main(argv: list[str]) -> int:
  if len(argv) != 3:
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  with open(argv[1]) as f:
    reference = json.load(f)
  with open(argv[2]) as f:
    candidate = json.load(f)
  differences, added = compare(reference, candidate)
  for line in differences:
    print("differs:", line)
  if added:
    print(f"added ({len(added)}): " + ", ".join(added[:20]) + (" ..." if len(added) > 20 else ""))
  print("identical numbers" if not differences else f"{len(differences)} differences")
  return 1 if differences else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
