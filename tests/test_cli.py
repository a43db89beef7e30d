"""The command line as a user meets it: exit codes, signals, devices and processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from medguide_jax import checkpointing
from tests import helpers


def _no_outputs(workdir) -> bool:
  return not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.parametrize("bad, message", [
    ("--config.stages.inferior.num_stepz=3", "num_stepz"),
    ("--config.stages.inferior.num_steps=three", "num_steps"),
    ("--config.data.nmae=x", "nmae"),
])
def test_bad_override_exits_2_and_writes_nothing(tmp_path, bad, message):
  proc = helpers.run_main(tmp_path / "w", [bad], check=False, timeout=helpers.HANG_GUARD_S)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr
  assert _no_outputs(tmp_path / "w")


def test_bad_config_arg_exits_2(tmp_path):
  proc = helpers.run_main(tmp_path / "w", [], config_arg="dataset=imagenet", check=False)
  assert proc.returncode == 2 and "dataset" in proc.stderr
  assert _no_outputs(tmp_path / "w")


def test_unbuilt_real_dataset_exits_2_with_the_build_command(tmp_path):
  proc = helpers.run_main(tmp_path / "w", [], config_arg="dataset=derm7pt,smoke", check=False,
                          env={"MEDGUIDE_DATA_DIR": str(tmp_path / "empty")})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "python -m data_prep.build derm7pt" in proc.stderr
  assert _no_outputs(tmp_path / "w")


def _wait_for_checkpoint(workdir, proc, timeout=helpers.HANG_GUARD_S):
  ckpt_dir = workdir / "inferior" / "checkpoints"
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
      return
    time.sleep(0.2)
  raise AssertionError(f"no checkpoint appeared; exit {proc.poll()}")


def _start(workdir, args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(helpers.ROOT))
  cmd = [sys.executable, "-m", "medguide_jax.main",
         "--config=configs/guidance.py:dataset=synthetic,smoke,stages=inferior",
         f"--workdir={workdir}"] + args
  return subprocess.Popen(cmd, cwd=helpers.ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cli_reference")
  helpers.run_main(workdir, helpers.overrides(steps=24))
  return workdir


def test_sigterm_saves_exits_75_and_resumes_to_the_same_result(reference_run, tmp_path):
  proc = _start(tmp_path, helpers.overrides(steps=24))
  _wait_for_checkpoint(tmp_path, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=helpers.HANG_GUARD_S)
  if proc.returncode == 0:
    pytest.skip("the run finished before SIGTERM arrived")
  assert proc.returncode == 75, err[-3000:]
  assert "preempted" in err
  helpers.run_main(tmp_path, helpers.overrides(steps=24))
  _assert_same_run(reference_run, tmp_path)


def test_sigkill_at_any_step_then_rerun_equals_uninterrupted(reference_run, tmp_path):
  proc = _start(tmp_path, helpers.overrides(steps=24))
  _wait_for_checkpoint(tmp_path, proc)
  time.sleep(0.7)  # somewhere between checkpoints
  proc.kill()
  proc.communicate()
  helpers.run_main(tmp_path, helpers.overrides(steps=24))
  _assert_same_run(reference_run, tmp_path)


def _assert_same_run(a, b):
  helpers.assert_trees_equal(checkpointing.load_variables(a / "inferior" / "variables"),
                             checkpointing.load_variables(b / "inferior" / "variables"))
  assert helpers.metrics_without_timing(a / "inferior" / "metrics.jsonl") == (
      helpers.metrics_without_timing(b / "inferior" / "metrics.jsonl"))
  # TensorBoard's own reader sees one uninterrupted run: each step once, in order.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(b / "inferior"))
  acc.Reload()
  steps = [e.step for e in acc.Scalars("train/loss")]
  assert steps == list(range(1, 25)), steps


def test_one_device_equals_eight(reference_run, tmp_path):
  helpers.run_main(tmp_path, helpers.overrides(steps=24), devices=1)
  np.testing.assert_allclose(helpers.losses(tmp_path / "inferior" / "metrics.jsonl"),
                             helpers.losses(reference_run / "inferior" / "metrics.jsonl"),
                             rtol=1e-5)


def test_two_processes_equal_one(tmp_path):
  """2 processes x 2 CPU devices train to the losses of 1 process x 4 devices."""
  from launch import local  # pylint: disable=g-import-not-at-top
  args = ["--config=configs/guidance.py:dataset=synthetic,smoke,stages=inferior"]
  args += helpers.overrides(steps=6, batch=16)
  one = tmp_path / "one"
  helpers.run_main(one, helpers.overrides(steps=6, batch=16), devices=4)
  two = tmp_path / "two"
  code = local.launch_local(args + [f"--workdir={two}"], num_processes=2, devices_per_process=2,
                            timeout=helpers.HANG_GUARD_S)
  assert code == 0
  np.testing.assert_allclose(helpers.losses(two / "inferior" / "metrics.jsonl"),
                             helpers.losses(one / "inferior" / "metrics.jsonl"), rtol=1e-5)
  a = helpers.metrics_lines(one / "inferior" / "metrics.jsonl")[-1]
  b = helpers.metrics_lines(two / "inferior" / "metrics.jsonl")[-1]
  np.testing.assert_allclose(b["eval/validation/loss"], a["eval/validation/loss"], rtol=1e-5)
