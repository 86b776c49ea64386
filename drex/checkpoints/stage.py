"""Preemption safety for the stage in progress.

`StageCheckpoint` saves the trained slice, its optimizer state, the step and the grain iterator
state with an orbax `CheckpointManager` every `every` steps and when the process is asked to stop
(SIGTERM); a restarted run restores the newest good step and replays no data. orbax writes each step
to a temporary directory and renames it when complete, and deletes older steps only after a newer
one is committed, so an interrupted save never replaces a good checkpoint. A damaged newest step is
reported and the one before it is used; if none restores, the error says what to delete.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

from drex.checkpoints import store
from drex.errors import UserError

log = logging.getLogger(__name__)

_STOP = threading.Event()


class Preempted(Exception):
  """The process was asked to stop (SIGTERM); the stage's state was saved first."""


def install_sigterm_handler() -> None:
  """SIGTERM sets a flag that training loops poll; they save and raise Preempted."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, lambda *_: _STOP.set())


def stop_requested() -> bool:
  return _STOP.is_set()


class StageCheckpoint:
  """orbax CheckpointManager over {'state': TrainState, 'data': grain iterator} for one stage."""

  def __init__(self, directory: str, every: int):
    self.directory = store.absolute(directory)
    self.every = max(int(every), 1)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False))

  def restore(self, state: Any, iterator: grain.DatasetIterator) -> Any:
    """The newest restorable state (and iterator position) past `state.step`, or `state` when there is none."""
    unfinished = ([p.name for p in epath.Path(self.directory).iterdir() if "tmp" in p.name]
                  if store.isdir(self.directory) else [])
    if unfinished:
      log.warning("ignoring unfinished checkpoint writes in %s: %s", self.directory, ", ".join(sorted(unfinished)))
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    problems = []
    current = int(getattr(state, "step", 0))
    for step in sorted((s for s in self.manager.all_steps() if s > current), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(iterator)))
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        problems.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        log.warning("checkpoint %s/%d is damaged, trying an older one (%s)", self.directory, step, problems[-1])
        continue
      log.info("resuming from %s step %d", self.directory, step)
      return restored.state
    if problems:
      raise UserError(f"no restorable checkpoint in {self.directory} ({'; '.join(problems)}); delete that "
                      f"directory to restart the stage from its beginning")
    return state

  def latest_step(self) -> int | None:
    """The newest saved step, if any."""
    return self.manager.latest_step()

  def save(self, step: int, state: Any, iterator: grain.DatasetIterator, force: bool = False) -> None:
    if not force and step % self.every:
      return
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=grain.checkpoint.CheckpointSave(iterator)), force=True)
    self.manager.wait_until_finished()

  def remove(self) -> None:
    """Delete the stage's checkpoints once its result is committed elsewhere."""
    self.manager.close()
    if jax.process_index() == 0:
      store.remove_tree(self.directory)
