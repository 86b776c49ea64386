"""Answer a JSONL file of requests with a finished drex.train workdir, many skills in one batch (drex.serving).

  python -m drex.serve --workdir=runs/task10 --requests=in.jsonl --out=answers.jsonl

A request line: {"question": str, "image": path (optional), "task": name (optional: that task's expert alone),
"experts": [names] (optional: route among these; [] = the base alone), "max_new_tokens": int (optional)};
neither task nor experts: routed over all the workdir's experts. An answer line, in request order:
{"answer": str, "experts": the selection used} or {"error": one line} (a malformed line, an unknown task, an
unreadable image: the other requests are answered). Prints examples/s at the end.
"""

from __future__ import annotations

import json
import sys
import time

from absl import flags
from etils import epath
from tqdm import tqdm

from drex import cli
from drex.errors import UserError

if __name__ == "__main__":  # the command's flags; importing the module (tests, other modules) defines none
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished drex.train workdir.")
  _REQUESTS = flags.DEFINE_string("requests", None, "JSONL file of requests.")
  _OUT = flags.DEFINE_string("out", None, "JSONL file to write the answers to.")
  _BATCH = flags.DEFINE_integer("batch_size", 16, "Requests answered together.")
  _MAX_NEW = flags.DEFINE_integer("max_new_tokens", 0, "Answer length of requests that give none (0: the run's "
                                  "data.max_new_tokens).")

FIELDS = ("question", "image", "task", "experts", "max_new_tokens")


def read_requests(path: str) -> list:
  """Requests (drex.serving.Request) or, for a line that is not one, its error message."""
  from drex.serving import Request  # pylint: disable=g-import-not-at-top
  if not epath.Path(path).exists():
    raise UserError(f"requests file not found: {path}")
  out = []
  for number, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      item = json.loads(line)
      if not isinstance(item, dict):
        raise ValueError("a request is a JSON object")
      unknown = sorted(set(item) - set(FIELDS))
      if unknown:
        raise ValueError(f"unknown fields {unknown}; a request has {', '.join(FIELDS)}")
      out.append(Request(**item))
    except (ValueError, TypeError) as e:
      out.append(f"line {number} of {path} is not a request: {str(e).splitlines()[0]}")
  return out


def main(argv):
  del argv
  if not _WORKDIR.value or not _REQUESTS.value or not _OUT.value:
    raise UserError("--workdir, --requests and --out are required")
  from drex.serving import Server  # pylint: disable=g-import-not-at-top
  items = read_requests(_REQUESTS.value)
  server = Server(_WORKDIR.value, _BATCH.value, _MAX_NEW.value)
  requests = [item for item in items if not isinstance(item, str)]
  begin = time.time()
  with tqdm(total=len(items), unit="request", desc="drex.serve") as bar:
    bar.update(len(items) - len(requests))
    answers = iter(server.generate(requests, progress=bar.update))
  seconds = time.time() - begin
  lines = [{"error": item} if isinstance(item, str) else next(answers) for item in items]
  epath.Path(_OUT.value).write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
  print(json.dumps({"requests": len(items), "errors": sum("error" in line for line in lines),
                    "seconds": round(seconds, 2), "examples_per_s": round(len(items) / max(seconds, 1e-9), 2)}),
        file=sys.stdout)


if __name__ == "__main__":
  cli.run(main, "drex.serve")
