"""metrics.jsonl, TensorBoard events and the progress line; process 0 alone writes."""
from __future__ import annotations

import json
import math
import os
import time

import jax
from absl import logging
from etils import epath


def is_writer() -> bool:
  return jax.process_index() == 0


def write_json_atomic(path: epath.Path, obj) -> None:
  """Writes then renames, so a reader never sees half a file."""
  if not is_writer():
    return
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")
  tmp.replace(path)


def _jsonable(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  raise TypeError(f"not JSON-serialisable: {type(x)}")


class MetricWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard."""

  def __init__(self, workdir: epath.Path, *, resume_step: int = 0):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if not is_writer():
      return
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(str(workdir), flush_secs=30)

  def _truncate_after(self, step: int) -> None:
    """After a resume, lines past the restored step are dropped: the file reads as one run."""
    if not self.path.exists():
      return
    lines = [l for l in self.path.read_text().splitlines() if l.strip()]
    kept = [l for l in lines if json.loads(l)["step"] <= step]
    if len(kept) != len(lines):
      self.path.write_text("".join(l + "\n" for l in kept))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not is_writer():
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      # An undefined metric (e.g. Dice with no masked image) is NaN in metrics.jsonl; in
      # TensorBoard it is left out rather than warned about at every evaluation. (A
      # non-finite loss stops training in the trainer's guard, not here.)
      if k != "step" and math.isfinite(v):
        self._tb.add_scalar(k, v, step)

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
