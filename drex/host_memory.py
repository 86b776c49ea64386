"""Reuse of freed host memory, for XLA:CPU's per-execution buffers.

Every run of a compiled XLA:CPU program allocates its temporaries as one block (the tiny base's train step: 88 MB).
glibc serves blocks above 32 MB (its largest mmap threshold) with a fresh mmap and unmaps them on free, and its
per-thread arenas unmap freed heap too, so each step page-faults its temporaries in anew: on the 2-core CPU 24k
page faults and ~50 ms of kernel time per step (the step takes ~110 ms). `keep_freed_memory` makes glibc serve every
block from the one main heap and keep what is freed for the next allocation (no faults after the first steps). It
changes where buffers live, never what is computed: the main job's results are bit-identical. The process's RSS
then stays at its peak (as it would for a run that keeps its buffers).

The entry points (`drex.cli.run`) call it before JAX starts its CPU threads; DREX_KEEP_FREED_MEMORY=0 turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP = 2**31 - 1  # bytes of free memory at the top of the heap before glibc returns any (int max: never)


def keep_freed_memory() -> bool:
  """One malloc arena, no mmap-served blocks, no trimming (glibc only; a no-op returning False elsewhere, or when
  DREX_KEEP_FREED_MEMORY=0). Call before the threads it should cover allocate (before JAX's first computation)."""
  if os.environ.get("DREX_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl): its allocator is left as it is
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  done = all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP)))
  if not done:
    log.warning("glibc refused a malloc setting; XLA:CPU steps will page-fault their buffers in (slower, same results)")
  return done
