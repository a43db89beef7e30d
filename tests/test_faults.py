"""Faults a user meets: outputs that are not regular files, failed writes, a workdir already
in use, resumed TensorBoard logs, a full disk and an impossible workdir."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from medguide_jax import main as main_lib
from medguide_jax import metric_writers, report, train, workdir_lock
from tests import helpers


# --------------------------------------------------------------------------- output writes
def _odd_paths(tmp_path):
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  target = tmp_path / "target.txt"
  target.write_text("keep me")
  link = tmp_path / "link"
  link.symlink_to(target)
  folder = tmp_path / "folder"
  folder.mkdir()
  return {"a FIFO": fifo, "a symbolic link": link, "a directory": folder}


def test_outputs_replace_regular_files_only(tmp_path):
  for kind, path in _odd_paths(tmp_path).items():
    with pytest.raises(metric_writers.OutputPathError, match=f"{path} is {kind}"):
      metric_writers.write_text_atomic(path, "x")
  assert os.path.islink(tmp_path / "link") and (tmp_path / "target.txt").read_text() == "keep me"
  regular = tmp_path / "out.json"
  regular.write_text("old")
  metric_writers.write_json_atomic(regular, {"a": 1})
  assert json.loads(regular.read_text()) == {"a": 1}
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failed_write_is_an_error_naming_the_path(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(metric_writers.OutputWriteError, match=f"cannot write {blocker}/x"):
    metric_writers.write_text_atomic(blocker / "x", "x")


def _fake_run(tmp_path):
  w = tmp_path / "run0"
  w.mkdir()
  (w / "config.json").write_text(json.dumps({"seed": 0}))
  (w / "results.json").write_text(json.dumps({"stages": {}, "table": [
      {"model": "a", "auc": 0.7}]}))
  return str(w)


def test_report_out_to_a_fifo_exits_2_and_a_failed_write_exits_1(tmp_path, capsys):
  run = _fake_run(tmp_path)
  fifo = tmp_path / "out.json"
  os.mkfifo(fifo)
  assert report.run([run], out=str(tmp_path / "out")) == 2
  assert "is a FIFO" in capsys.readouterr().err
  assert os.path.exists(fifo) and not os.path.isfile(fifo)
  (tmp_path / "file").write_text("")
  assert report.run([run], out=str(tmp_path / "file" / "out")) == 1


def test_ssl_report_out_to_a_fifo_exits_2(tmp_path):
  run = _fake_run(tmp_path)
  fifo = tmp_path / "report.json"
  os.mkfifo(fifo)
  proc = subprocess.run([sys.executable, "-m", "medguide_jax.ssl_report", f"--workdirs={run}",
                         f"--out={fifo}"], cwd=helpers.ROOT, capture_output=True, text=True,
                        timeout=helpers.HANG_GUARD_S)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "is a FIFO" in proc.stderr and not os.path.isfile(fifo)


# --------------------------------------------------------------------------- workdir lock
def _holder(workdir, **fields):
  workdir.mkdir(parents=True, exist_ok=True)
  record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "heartbeat": time.time(), **fields}
  (workdir / ".lock").write_text(json.dumps(record))
  return record


def test_a_second_run_in_a_held_workdir_exits_2_naming_the_holder(tmp_path, capsys):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
  try:
    workdir = tmp_path / "w"
    _holder(workdir, pid=sleeper.pid)
    before = sorted(p.name for p in workdir.iterdir())
    code = main_lib.main(["main", f"--config=configs/guidance.py:{'dataset=synthetic,smoke'}",
                          f"--workdir={workdir}", *helpers.overrides(steps=2)])
    err = capsys.readouterr().err
    assert code == 2 and f"pid {sleeper.pid}" in err and "in use by another run" in err, err
    assert sorted(p.name for p in workdir.iterdir()) == before
    assert json.loads((workdir / ".lock").read_text())["pid"] == sleeper.pid
  finally:
    sleeper.kill()
    sleeper.wait()


def test_stale_locks_are_taken_over_and_released(tmp_path, caplog):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  lock = workdir_lock.WorkdirLock(tmp_path)
  _holder(tmp_path, pid=int(dead))  # this host, a process that is gone (a SIGKILLed run)
  with lock:
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert not (tmp_path / ".lock").exists()
  _holder(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 10_000)  # old heartbeat
  with workdir_lock.WorkdirLock(tmp_path):
    pass
  _holder(tmp_path, host="elsewhere", pid=1)  # another host, beating: live
  with pytest.raises(workdir_lock.WorkdirLockedError, match="host elsewhere"):
    workdir_lock.WorkdirLock(tmp_path).acquire()


def test_the_heartbeat_refreshes_while_the_run_lives(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  with workdir_lock.WorkdirLock(tmp_path):
    first = json.loads((tmp_path / ".lock").read_text())["heartbeat"]
    deadline = time.time() + helpers.HANG_GUARD_S
    while json.loads((tmp_path / ".lock").read_text())["heartbeat"] == first:
      assert time.time() < deadline
      time.sleep(0.05)


# --------------------------------------------------------------------------- TensorBoard
def _event_steps(logdir, tag):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  return [e.step for e in acc.Scalars(tag)]


def test_resumed_tensorboard_logs_read_as_one_run(tmp_path):
  writer = metric_writers.MetricWriter(tmp_path)
  for step in range(1, 6):  # a run killed at step 5, its last checkpoint at step 3
    writer.write(step, {"train/loss": float(step)})
  writer.close()
  time.sleep(1.1)  # event files are named by the second: the resumed run's is another file
  writer = metric_writers.MetricWriter(tmp_path, resume_step=3)
  for step in range(4, 8):
    writer.write(step, {"train/loss": 10.0 + step})
  writer.close()
  assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
  assert _event_steps(tmp_path, "train/loss") == list(range(1, 8))
  assert [l["step"] for l in helpers.metrics_lines(tmp_path / "metrics.jsonl")] == list(
      range(1, 8))


class _FillableFile:
  """An event file on a disk the test fills: once `full`, every write and flush fails."""

  def __init__(self, path):
    self.real, self.full = open(path, "wb"), False  # pylint: disable=consider-using-with

  def _check(self):
    if self.full:
      raise OSError(errno.ENOSPC, "No space left on device")

  def write(self, data):
    self._check()
    return self.real.write(data)

  def flush(self):
    self._check()
    self.real.flush()

  def close(self):
    self.real.close()


def test_a_failed_event_write_is_an_error_at_the_call_not_a_stall(tmp_path, monkeypatch):
  """tensorboardX's SummaryWriter loses its writer thread here and, 10 events later, blocks
  add_scalar forever on the thread's full queue; the events are written in the caller."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  files = []
  monkeypatch.setattr(record_writer, "open_file",
                      lambda path: files.append(_FillableFile(path)) or files[-1])
  first, second = tmp_path / "first", tmp_path / "second"
  first.mkdir()
  second.mkdir()
  writer = metric_writers.MetricWriter(first)
  writer.write(1, {"train/loss": 1.0})
  files[-1].full = True
  raised = []

  def log_on_a_full_disk():
    try:
      for step in range(2, 20):
        writer.write(step, {"train/loss": float(step)})
    except metric_writers.OutputWriteError as e:
      raised.append((step, str(e)))

  logger = threading.Thread(target=log_on_a_full_disk, daemon=True)
  logger.start()
  logger.join(helpers.HANG_GUARD_S)
  assert not logger.is_alive(), "a write on a full disk blocked"
  assert raised == [(2, f"cannot write TensorBoard events in {first}: No space left on device")]
  assert files[-1].real.closed  # the descriptor is released at the failure
  for step in range(20, 40):  # later calls neither raise again nor block
    writer.write(step, {"train/loss": float(step)})
  writer.flush()
  writer.close()
  # The next writer in the same process (a notebook's next run) is unaffected.
  writer = metric_writers.MetricWriter(second)
  for step in range(1, 31):
    writer.write(step, {"train/loss": float(step), "eval/auc": float("nan")})
  writer.flush()
  assert _event_steps(second, "train/loss") == list(range(1, 31))  # flushed: all on disk
  with pytest.raises(KeyError):  # a NaN metric stays out of TensorBoard
    _event_steps(second, "eval/auc")
  writer.close()
  writer.close()  # idempotent
  assert files[-1].real.closed


# --------------------------------------------------------------------------- disk and paths
def test_an_impossible_workdir_is_exit_2_naming_it(tmp_path, capsys):
  (tmp_path / "file").write_text("")
  code = main_lib.main(["main", "--config=configs/guidance.py:dataset=synthetic,smoke",
                        f"--workdir={tmp_path / 'file' / 'w'}", *helpers.overrides(steps=2)])
  err = capsys.readouterr().err
  assert code == 2 and f"workdir {tmp_path / 'file' / 'w'}: cannot create" in err, err
  assert "Traceback" not in err


def test_a_full_disk_is_one_line_exit_1_and_the_next_start_cleans_up(tmp_path, capsys,
                                                                      monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  workdir = tmp_path / "w"
  # Only the stage whose checkpoint fails: the smoke config's other stages (five more of
  # 300 steps each, which helpers.overrides does not shrink) would add minutes to the
  # second start and nothing to what it shows.
  args = ["main", "--config=configs/guidance.py:dataset=synthetic,smoke,stages=inferior",
          f"--workdir={workdir}", *helpers.overrides(steps=4)]
  with monkeypatch.context() as m:
    m.setattr(ocp.CheckpointManager, "save", full)
    code = main_lib.main(args)
  err = capsys.readouterr().err
  assert code == 1, err
  line = [l for l in err.splitlines() if l.startswith("error:")]
  assert line and "No space left on device" in line[0] and "checkpoint" in line[0], err
  assert "Traceback" not in err and not (workdir / ".lock").exists()
  leftover = workdir / "inferior" / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000"
  leftover.mkdir(parents=True)
  assert main_lib.main(args) == 0
  assert not leftover.exists()


def test_every_event_up_to_a_checkpoint_is_on_disk_when_it_is_saved(tmp_path, monkeypatch):
  """So a run killed after a checkpoint loses no event the resumed run will not log again."""
  from medguide_jax import checkpointing  # pylint: disable=g-import-not-at-top
  seen, save = {}, checkpointing.Checkpointer.save

  def save_and_look(self, step, state, data_iterator):
    seen[step] = _event_steps(tmp_path / "inferior", "train/loss")
    return save(self, step, state, data_iterator)

  monkeypatch.setattr(checkpointing.Checkpointer, "save", save_and_look)
  config = helpers.tiny_guidance_config(steps=6)
  config.stages.inferior.update(log_every=1, checkpoint_every=2)
  train.train_and_evaluate(config, str(tmp_path))
  assert seen == {s: list(range(1, s + 1)) for s in (2, 4, 6)}
