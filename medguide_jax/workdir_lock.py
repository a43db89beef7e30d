"""One run per workdir: W/.lock names the run that holds W and is refreshed while it lives.

The lock is a small JSON file {host, pid, started, heartbeat} written by process 0 (it holds
the lock for every process of a multi-process run). A daemon thread rewrites the heartbeat
every HEARTBEAT_S seconds, so the lock also works across hosts and on object stores such as
gs://, where a pid means nothing. A second run finds a live lock and stops at once (exit 2,
naming the holder). A lock is stale, and is taken over with a warning, when its heartbeat is
older than MEDGUIDE_LOCK_STALE_S (default 120 s), or at once when it names a process of this
host that no longer exists (a run killed with SIGKILL and started again).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from absl import logging
from etils import epath

from medguide_jax import metric_writers
from medguide_jax.validation import ConfigError

HEARTBEAT_S = 10.0
LOCK_NAME = ".lock"


def stale_after_s() -> float:
  return float(os.environ.get("MEDGUIDE_LOCK_STALE_S", "120"))


class WorkdirLockedError(ConfigError):
  """Another live run holds the workdir (exit code 2)."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, owned by someone else
    return True
  return True


def _is_stale(holder: dict, now: float) -> str:
  """Why the lock `holder` is stale ('' if it is live)."""
  if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
    return f"its process {holder.get('pid')} on this host is gone"
  age = now - float(holder.get("heartbeat", 0))
  if age > stale_after_s():
    return f"its heartbeat is {age:.0f} s old (stale after {stale_after_s():.0f} s)"
  return ""


class WorkdirLock:
  """Context manager: holds `workdir`/.lock while the run lives (process 0 only)."""

  def __init__(self, workdir: epath.Path, *, enabled: bool = True):
    self.path = epath.Path(workdir) / LOCK_NAME
    self.enabled = enabled
    self._stop = threading.Event()
    self._thread = None
    self._record = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": time.time(), "heartbeat": time.time()}

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
      return None

  def _write(self) -> None:
    self._record["heartbeat"] = time.time()
    metric_writers.write_text_atomic(self.path, json.dumps(self._record) + "\n")

  def acquire(self) -> None:
    holder = self._read()
    if holder is not None and holder.get("pid") != os.getpid():
      why = _is_stale(holder, time.time())
      if not why:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        raise WorkdirLockedError(
            f"workdir {self.path.parent} is in use by another run (host {holder.get('host')}, "
            f"pid {holder.get('pid')}, started {started}; lock {self.path}). Wait for it, or "
            "use another workdir.")
      logging.warning("taking over the lock %s of host %s pid %s: %s", self.path,
                      holder.get("host"), holder.get("pid"), why)
    self._write()
    # Two starts racing for a free lock: the later rename wins; the other sees it and stops.
    time.sleep(0.05)
    holder = self._read()
    if holder is not None and (holder.get("pid"), holder.get("host")) != (
        self._record["pid"], self._record["host"]):
      raise WorkdirLockedError(f"workdir {self.path.parent} was taken by another run "
                               f"(host {holder.get('host')}, pid {holder.get('pid')}) as this "
                               "one started")
    self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self._write()
      except OSError as e:  # a full disk must not kill the run here; the save will say so
        logging.warning("could not refresh the workdir lock %s: %s", self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    holder = self._read()
    if holder is not None and holder.get("pid") == os.getpid():
      try:
        self.path.unlink()
      except OSError:
        pass

  def __enter__(self):
    if self.enabled:
      self.acquire()
    return self

  def __exit__(self, *exc):
    if self.enabled:
      self.release()
