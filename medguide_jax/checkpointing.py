"""The only module that talks to orbax: train state and data iterator in one checkpoint.

Each checkpoint step holds two items: 'state' (the TrainState pytree) and 'data' (the grain
iterator state, one JSON file per process). Saves are asynchronous; the last
`keep` are kept. A step whose restore fails (truncated or corrupt files) is skipped
with a warning in favour of the previous one.
"""
from __future__ import annotations

import contextlib
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from medguide_jax import metric_writers, paths


class CheckpointMismatchError(ValueError):
  """A checkpoint whose parameters do not fit the current config."""


class Checkpointer:
  """Saves and restores (TrainState, grain iterator) pairs under `directory`."""

  def __init__(self, directory: str | epath.Path, *, keep: int = 2, async_save: bool = True,
               owner: bool = False):
    self.directory = epath.Path(directory)
    # owner (the run holding the workdir lock): a save that failed (disk full, a kill) left
    # a temporary step directory, which this start removes; readers leave them alone.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=owner)
    # Handlers registered up front, so metadata and restore work before any save.
    handlers = {"state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iterator))
    with _naming_write_errors(self.directory / str(step)):
      self._manager.save(step, args=args, force=True)

  def check_fits(self, step: int, abstract_state) -> None:
    """Raises CheckpointMismatchError naming every leaf whose shape or presence differs."""
    stored = self._manager.item_metadata(step)["state"]
    stored = {k: tuple(getattr(m, "shape", ()) or ()) for k, m in paths.flatten(stored).items()}
    wanted = {k: tuple(x.shape) for k, x in paths.flatten(abstract_state).items()}
    problems = [f"{k}: checkpoint {stored.get(k, 'missing')} vs config {v}"
                for k, v in wanted.items() if stored.get(k) != v]
    problems += [f"{k}: in checkpoint, not in config" for k in stored if k not in wanted]
    if problems:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory / str(step)} does not fit the config:\n  "
          + "\n  ".join(problems[:20]))

  def restore_latest(self, abstract_state, data_iterator):
    """(step, state) from the newest readable checkpoint, or (None, None) if none is."""
    for step in reversed(self.steps()):
      try:
        self.check_fits(step, abstract_state)
        return step, self.restore(step, abstract_state, data_iterator)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # corrupt or truncated files: fall back one checkpoint
        self._set_aside(step, e)
    return None, None

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves an unreadable step out of the way (kept for inspection, never deleted)."""
    aside = self.directory.parent / "checkpoints_unreadable"
    logging.warning("checkpoint %s is unreadable (%s); moved to %s, falling back to the "
                    "previous one", self.directory / str(step), error, aside)
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("medguide_checkpoint_set_aside")
    self._manager.reload()

  def restore(self, step: int, abstract_state, data_iterator=None):
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    with _naming_write_errors(self.directory):
      self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _os_error(e: BaseException) -> OSError | None:
  """The OSError under an exception that orbax (or its threads) wrapped, if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


@contextlib.contextmanager
def _naming_write_errors(where):
  """A failed checkpoint write (no space, no permission) becomes one OutputWriteError
  naming the checkpoint and the cause, instead of orbax's traceback."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    os_error = _os_error(e)
    if os_error is None:
      raise
    raise metric_writers.OutputWriteError(
        f"cannot write the checkpoint {where}: {os_error.strerror or os_error}") from e


def save_variables(path: str | epath.Path, variables) -> None:
  """Writes a finished stage's selected variables (what init_from and load_run read)."""
  with _naming_write_errors(path), ocp.StandardCheckpointer() as ckptr:
    ckptr.save(epath.Path(path), variables, force=True)


def load_variables(path: str | epath.Path):
  """The variables written by save_variables, as host numpy arrays."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no saved variables at {path}")
  with ocp.StandardCheckpointer() as ckptr:
    return jax.tree.map(np.asarray, ckptr.restore(path))
