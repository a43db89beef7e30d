"""metrics.jsonl, TensorBoard events and the progress line; process 0 alone writes.

A failed output write raises OutputWriteError naming the file (the CLI's exit 1); a path
that holds something other than a regular file is OutputPathError (exit 2). TensorBoard
events are written in the caller's thread (see _EventFile), so a write error surfaces at
the call and flush() puts every logged event on disk.
"""
from __future__ import annotations

import json
import math
import os
import socket
import stat
import time

import jax
from absl import logging
from etils import epath


def is_writer() -> bool:
  return jax.process_index() == 0


class OutputPathError(ValueError):
  """The output path holds something that is not a regular file (a device, FIFO, symlink,
  directory): outputs replace regular files only. Exit code 2."""


class OutputWriteError(OSError):
  """An output could not be written (no space, no permission, ...). Exit code 1."""


def check_output_path(path: str | os.PathLike) -> None:
  """Raises OutputPathError unless `path` is absent or a regular file (local paths; object
  stores such as gs:// hold only files)."""
  text = os.fspath(path)
  if "://" in text or not os.path.lexists(text):
    return
  st = os.lstat(text)
  if not stat.S_ISREG(st.st_mode):
    kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a directory"
            if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
            "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
    raise OutputPathError(f"{text} is {kind}; outputs replace regular files only: give "
                          "another path or remove it")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it over `path`, so a
  reader never sees half a file. Only a regular file (or nothing) may be at `path`; a
  failed write leaves `path` as it was and raises OutputWriteError naming it."""
  path = epath.Path(path)
  check_output_path(path)
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
  try:
    tmp.write_text(text)
    tmp.replace(path)
  except OSError as e:
    try:
      tmp.unlink(missing_ok=True)
    except OSError:
      pass
    raise OutputWriteError(f"cannot write {path}: {e.strerror or e}") from e


def write_json_atomic(path: epath.Path, obj) -> None:
  """write_text_atomic of `obj` as indented JSON, from process 0 only."""
  if not is_writer():
    return
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  raise TypeError(f"not JSON-serialisable: {type(x)}")


class _EventFile:
  """One TensorBoard event file (events.out.tfevents.<seconds>.<host>), written in the
  caller's thread with tensorboardX's record format (TFRecord framing and CRCs) and protos.

  Not tensorboardX's SummaryWriter: that hands every event to a worker thread through a
  bounded queue (10 events). When the thread dies on a write error (a full disk, a lost
  mount), nothing drains the queue: once 10 more events wait in it, the next add_scalar
  blocks forever instead of failing. And its flush() flushes only what the thread has
  written so far, not the events still queued. Here a write error raises at the call (OutputWriteError naming the logdir),
  flush() writes and fsyncs every event logged, and nothing outlives close() (no thread,
  no queue, no atexit hook).
  """

  FLUSH_S = 30.0  # events reach the disk at least this often while a run logs

  def __init__(self, logdir: str, *, purge_step: int | None = None):
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._event_pb2, self.logdir, self._file = event_pb2, logdir, None
    try:
      record_writer.directory_check(logdir)
      name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
      self._file = record_writer.RecordWriter(os.path.join(logdir, name))
      self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
      if purge_step is not None:
        # As SummaryWriter(purge_step=) writes them: TensorBoard then drops the events of
        # earlier files at steps >= purge_step (those a killed run logged past its last
        # checkpoint, which the resumed run logs again).
        self._write(event_pb2.Event(wall_time=time.time(), step=purge_step,
                                    file_version="brain.Event:2"))
        self._write(event_pb2.Event(
            wall_time=time.time(), step=purge_step,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    except OSError as e:
      raise self._fail(e) from e
    self._flushed = time.monotonic()

  def _fail(self, e: OSError) -> OutputWriteError:
    """Releases the file (nothing more goes into it: later calls are no-ops, the error is
    reported once) and returns the error naming the logdir."""
    f, self._file = self._file, None
    if f is not None:
      try:
        f.close()  # releases the descriptor even when the buffered bytes cannot be written
      except Exception:  # pylint: disable=broad-except
        pass
    return OutputWriteError(f"cannot write TensorBoard events in {self.logdir}: "
                            f"{e.strerror or e}")

  def _write(self, event) -> None:
    self._file.write(event.SerializeToString())

  def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
    """One event holding every scalar of `step` (tags cleaned as tensorboardX does)."""
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    if not scalars or self._file is None:
      return
    values = [summary.scalar(tag, value).value[0] for tag, value in scalars.items()]
    try:
      self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary_pb2.Summary(value=values)))
    except OSError as e:
      raise self._fail(e) from e
    if time.monotonic() - self._flushed > self.FLUSH_S:
      self.flush()

  def flush(self) -> None:
    """Writes and fsyncs every event added so far."""
    if self._file is None:
      return
    try:
      self._file.flush()
    except OSError as e:
      raise self._fail(e) from e
    self._flushed = time.monotonic()

  def close(self) -> None:
    """Flushes and closes the file; idempotent."""
    if self._file is None:
      return
    self.flush()
    f, self._file = self._file, None
    try:
      f.close()
    except OSError as e:
      self._file = f
      raise self._fail(e) from e


class MetricWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard."""

  def __init__(self, workdir: epath.Path, *, resume_step: int = 0):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if not is_writer():
      return
    self._truncate_after(resume_step)
    # After a resume, a purge step tells TensorBoard to drop the earlier files' events past
    # the restored step (a killed run logged them, the resumed one logs them again), so the
    # event files read as one uninterrupted run, like metrics.jsonl.
    self._tb = _EventFile(str(workdir), purge_step=resume_step + 1 if resume_step else None)

  def _truncate_after(self, step: int) -> None:
    """After a resume, lines past the restored step are dropped: the file reads as one run."""
    if not self.path.exists():
      return
    lines = [l for l in self.path.read_text().splitlines() if l.strip()]
    kept = [l for l in lines if json.loads(l)["step"] <= step]
    if len(kept) != len(lines):
      write_text_atomic(self.path, "".join(l + "\n" for l in kept))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not is_writer():
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    try:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    except OSError as e:
      raise OutputWriteError(f"cannot write {self.path}: {e.strerror or e}") from e
    # An undefined metric (e.g. Dice with no masked image) is NaN in metrics.jsonl; in
    # TensorBoard it is left out rather than warned about at every evaluation. (A
    # non-finite loss stops training in the trainer's guard, not here.)
    self._tb.add_scalars(step, {k: v for k, v in record.items()
                                if k != "step" and math.isfinite(v)})

  def flush(self) -> None:
    """Puts every TensorBoard event logged so far on disk. The trainer flushes before every
    checkpoint: a run killed after a checkpoint then has every event up to its step on
    disk, and the resumed run's purge step drops only the later ones."""
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Steps/s and ETA over the steps run since the last report (pauses excluded)."""

  def __init__(self, total_steps: int, first_step: int, name: str):
    self.total, self.name = total_steps, name
    self._t, self._step, self._paused = time.monotonic(), first_step, 0.0

  def pause(self, seconds: float) -> None:
    self._paused += seconds

  def report(self, step: int) -> dict[str, float]:
    now = time.monotonic()
    elapsed = max(now - self._t - self._paused, 1e-9)
    rate = (step - self._step) / elapsed
    self._t, self._step, self._paused = now, step, 0.0
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    if is_writer():
      logging.info("[%s] step %d/%d  %.2f steps/s  ETA %s", self.name, step, self.total, rate,
                   time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 1e6 else "?")
    return {"train/steps_per_sec": rate}


def read_json(path: epath.Path):
  return json.loads(epath.Path(path).read_text())
