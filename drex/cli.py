"""Command-line plumbing shared by drex's entry points: ml_collections config files with
`--config.a.b=value` overrides, checked up front so that a missing config file or a misspelled key is
a one-line error (not a traceback), and `UserError`s printed as one line with exit status 2."""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import sys
import threading
from typing import Callable, Sequence

from absl import app
import ml_collections

from drex import host_memory
from drex.errors import UserError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'path/to/config.py[:arg]' -> the ConfigDict its get_config(arg) returns."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file not found: {path}")
  module_spec = importlib.util.spec_from_file_location(f"drex_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} has no get_config(arg) function")
  return module.get_config(arg or None) if arg else module.get_config()


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str], flag: str = "config") -> None:
  """Every --config.a.b=value names an existing field."""
  prefix = f"--{flag}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    key = arg[len(prefix):].split("=", 1)[0]
    node = config
    walked = []
    for part in key.split("."):
      if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
        known = ", ".join(sorted(node.keys())) if isinstance(node, (ml_collections.ConfigDict, dict)) else "(none)"
        where = ".".join(walked) or "the top level"
        raise UserError(f"unknown config key '{key}': no '{part}' under {where}; known keys there: {known}")
      node = node[part]
      walked.append(part)


def override_keys(argv: Sequence[str], flag: str = "config") -> list[str]:
  """The dotted keys of the --config.a.b=value overrides on a command line."""
  prefix = f"--{flag}."
  return [arg[len(prefix):].split("=", 1)[0] for arg in argv if arg.startswith(prefix)]


def get_field(config: ml_collections.ConfigDict, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def set_field(config: ml_collections.ConfigDict, key: str, value) -> None:
  *parents, last = key.split(".")
  for part in parents:
    config = config[part]
  config[last] = value


def _precheck(argv: Sequence[str], flag: str, default_config: Callable[[], ml_collections.ConfigDict] | None) -> None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{flag}="):
      spec = arg.split("=", 1)[1]
    elif arg == f"--{flag}" and i + 1 < len(argv):
      spec = argv[i + 1]
    else:
      continue
    check_overrides(load_config_file(spec), argv, flag)
    return
  if default_config is not None:
    check_overrides(default_config(), argv, flag)


def setup_logging() -> None:
  """drex's own messages at INFO on stderr; other libraries' (orbax, tfds, grain) at WARNING."""
  logging.getLogger().setLevel(logging.WARNING)
  logger = logging.getLogger("drex")
  logger.setLevel(logging.INFO)
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s drex %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False
  absl = logging.getLogger("absl")  # orbax logs a failed background write with its traceback
  if not any(isinstance(f, _MachineFailureFilter) for f in absl.filters):
    absl.addFilter(_MachineFailureFilter())


class _MachineFailureFilter(logging.Filter):
  """Drops library log records of a full disk, quota, read-only filesystem or permission failure (with their
  tracebacks): the failure reaches drex's command, which reports it in one line (`run`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and record.exc_info[1] is not None and environment_error(record.exc_info[1]))


# Failures of the machine, not of drex: reported in one line like user errors (exit status 2).
_ENVIRONMENT_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                       errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied"}


def environment_error(e: BaseException) -> str | None:
  """A one-line description of a full disk, a quota, a read-only filesystem or a permission problem anywhere in
  the exception's chain (libraries such as orbax and tensorstore wrap the OSError), else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
      return f"{_ENVIRONMENT_ERRNOS[e.errno]}{f' writing {e.filename}' if e.filename else ''}"
    text = str(e)
    for number, words in _ENVIRONMENT_ERRNOS.items():
      if os.strerror(number) in text or words in text.lower():
        return f"{words} ({text.splitlines()[0][:200]})" if text else words
    e = e.__cause__ or e.__context__
  return None


COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "drex", "xla")
COMPILATION_CACHE_BYTES = 4 * 2**30  # least recently used programs are removed beyond this


def use_compilation_cache() -> str | None:
  """Keep compiled XLA programs on disk across runs, so a resumed, re-evaluated or served workdir does not compile
  again what an earlier run compiled (at InternVL2 sizes, minutes per program): in JAX_COMPILATION_CACHE_DIR when
  that is set, else in ~/.cache/drex/xla; DREX_COMPILATION_CACHE=0 turns it off. Returns the directory (None:
  off). A cached program is the one XLA compiles (keyed by its HLO, compile options, device and jax version):
  results do not change. Programs that compile in under a second are not kept (JAX's default)."""
  import jax  # pylint: disable=g-import-not-at-top
  if os.environ.get("DREX_COMPILATION_CACHE", "1") == "0":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or COMPILATION_CACHE
  jax.config.update("jax_compilation_cache_dir", directory)
  if jax.config.jax_compilation_cache_max_size < 0:  # unbounded unless the user bounded it (JAX's own setting)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
  return directory


def run(main: Callable[[Sequence[str]], None], prog: str,
        default_config: Callable[[], ml_collections.ConfigDict] | None = None) -> None:
  """absl app.run(main) with config pre-checks (against the --config file, else `default_config()`), one-line
  user errors and one-line machine failures (a full disk: what was committed before stays, the next run
  resumes); anything else is a bug and a traceback."""

  def wrapped(argv):
    from drex.checkpoints import stage  # pylint: disable=g-import-not-at-top
    setup_logging()
    stage.install_sigterm_handler()
    default_hook = threading.excepthook

    def thread_hook(args):  # a full disk in a writer thread (TensorBoard): the main thread reports it once
      if environment_error(args.exc_value) is None:
        default_hook(args)

    threading.excepthook = thread_hook
    default_unraisable = sys.unraisablehook

    def unraisable_hook(unraisable):  # tensorstore's callbacks into orbax's loop, closed by a failed write
      closed = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)
      if not closed and environment_error(unraisable.exc_value) is None:
        default_unraisable(unraisable)

    sys.unraisablehook = unraisable_hook
    try:
      main(argv)
    except UserError as e:
      print(f"{prog}: error: {e}", file=sys.stderr)
      sys.exit(2)
    except stage.Preempted as e:
      print(f"{prog}: {e}", file=sys.stderr)
      sys.exit(143)
    except Exception as e:  # pylint: disable=broad-except
      problem = environment_error(e)
      if problem is None:
        raise
      print(f"{prog}: error: {problem}; what was committed before is kept: free space (or fix the permission) and "
            f"re-run the same command to go on", file=sys.stderr)
      sys.stderr.flush()
      sys.stdout.flush()
      os._exit(2)  # not sys.exit: libraries' exit hooks (TensorBoard's flush) would fail on the same disk, loudly

  host_memory.keep_freed_memory()  # before JAX starts its CPU threads
  use_compilation_cache()
  try:
    _precheck(sys.argv[1:], "config", default_config)
  except UserError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(wrapped)
