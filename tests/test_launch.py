"""Launchers: shell syntax, dry runs, requeue on exit 75, the notebook, launch.local's commands.

Nothing here trains; gcloud, srun and scontrol are replaced by fakes on PATH.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers

from launch import local

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
MAIN_ARGS = ["--config=configs/guidance.py:dataset=synthetic,smoke", "--workdir=/tmp/w",
             "--config.model.guidance_hidden=(32, 32)"]

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")


def _fake_bin(tmp_path: Path, scripts: dict[str, str]) -> dict[str, str]:
  """An environment whose PATH starts with executables named after `scripts`' keys."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in scripts.items():
    (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
    (bin_dir / name).chmod(0o755)
  return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
              LOG=str(tmp_path / "calls.log"))


def _tpu_pod(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], capture_output=True,
                        text=True, env=env, timeout=helpers.HANG_GUARD_S)


@needs_bash
@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm.sbatch"])
def test_shell_syntax(script):
  subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True, timeout=helpers.HANG_GUARD_S)


@needs_bash
def test_tpu_pod_dry_run_runs_main_on_all_workers():
  proc = _tpu_pod("--dry-run", "run", "--", *MAIN_ARGS,
                  env=dict(os.environ, TPU_NAME="pod1", ZONE="europe-west4-a"))
  assert proc.returncode == 0, proc.stderr
  run_line = next(l for l in proc.stdout.splitlines() if "medguide_jax.main" in l)
  assert run_line.startswith("gcloud compute tpus tpu-vm ssh pod1")
  for part in ("--worker=all", "--zone=europe-west4-a", "MEDGUIDE_DISTRIBUTED=1",
               "MEDGUIDE_DATA_DIR=", "python -m medguide_jax.main", MAIN_ARGS[0]):
    assert part in run_line


@needs_bash
def test_tpu_pod_dry_run_create_setup_delete():
  env = dict(os.environ, ACCELERATOR_TYPE="v5litepod-16", RUNTIME_VERSION="v2-alpha-tpuv5-lite")
  create = _tpu_pod("--dry-run", "create", env=env).stdout
  assert "tpu-vm create medguide" in create and "--accelerator-type=v5litepod-16" in create
  assert "--version=v2-alpha-tpuv5-lite" in create
  setup = _tpu_pod("--dry-run", "setup", env=env).stdout
  assert "tpu-vm scp" in setup and "--worker=all" in setup
  assert "pip install -q -e '\\''.[tpu]'\\''" in setup  # single quotes, quoted once more
  assert "tpu-vm delete medguide" in _tpu_pod("--dry-run", "delete", env=env).stdout


@needs_bash
def test_tpu_pod_usage():
  proc = _tpu_pod()
  assert proc.returncode == 2 and "tpu_pod.sh" in proc.stderr and "TPU_NAME" in proc.stderr
  assert _tpu_pod("--dry-run", "run").returncode == 2  # nothing to run


@needs_bash
def test_tpu_pod_reruns_while_preempted(tmp_path):
  # Worker 0 reports 75 for the first attempt, then 0; gcloud itself always succeeds.
  env = _fake_bin(tmp_path, {"gcloud": """echo "$*" >> "$LOG"
if [[ "$*" == *--worker=0* ]]; then
  (( $(grep -c -- --worker=all "$LOG") < 2 )) && echo 75 || echo 0
fi
"""})
  proc = _tpu_pod("run", "--", *MAIN_ARGS, env=env)
  assert proc.returncode == 0, proc.stderr
  assert "preempted" in proc.stderr
  assert (tmp_path / "calls.log").read_text().count("--worker=all") == 2


@needs_bash
@pytest.mark.parametrize("main_code", [75, 1])
def test_slurm_requeues_only_on_75(tmp_path, main_code):
  env = _fake_bin(tmp_path, {"srun": f'echo "srun $*" >> "$LOG"; exit {main_code}\n',
                             "scontrol": 'echo "scontrol $*" >> "$LOG"\n'})
  env.update(SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="4", SLURM_NTASKS_PER_NODE="1")
  proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *MAIN_ARGS], env=env,
                        capture_output=True, text=True, timeout=helpers.HANG_GUARD_S)
  assert proc.returncode == main_code, proc.stderr
  calls = (tmp_path / "calls.log").read_text()
  assert f"srun python -m medguide_jax.main {' '.join(MAIN_ARGS)}" in calls
  assert ("scontrol requeue 4242" in calls) == (main_code == 75)


def test_slurm_directives():
  text = (LAUNCH / "slurm.sbatch").read_text()
  assert "#SBATCH --requeue" in text and "#SBATCH --signal=TERM@" in text


# Each method's notebook and what its code must use (it explores a finished run).
NOTEBOOKS = {
    "explore_guidance.ipynb": ("medguide_jax.load_run(WORKDIR)", "results.json", "metrics.jsonl",
                               'dataset("test", train=False)', "run.predict("),
    "explore_ssl.ipynb": ("medguide_jax.load_run(WORKDIR)", "results.json", "metrics.jsonl",
                          'dataset("test", train=False)', "run.predict(", "robust/",
                          "train/swav_loss"),
    "explore_glam.ipynb": ("medguide_jax.load_run(WORKDIR)", "results.json", "metrics.jsonl",
                           'dataset("test", train=False)', "run.predict(", "picture_maps(",
                           "visualization", "dice_per_image("),
    "explore_missing_modality.ipynb": ("medguide_jax.load_run(WORKDIR)", "results.json",
                                       "metrics.jsonl", 'dataset("test", train=False)',
                                       "run.predict(", "predictions.csv", "attention_m",
                                       "auc_vs_missing_rate.png"),
    "explore_hybridmed.ipynb": ("medguide_jax.load_run(WORKDIR)", "results.json", "metrics.jsonl",
                                'dataset("test", train=False)', "run.predict(",
                                "generated/captioner", "region_boxes", "embed_texts"),
    "explore_downstream.ipynb": ("medguide_jax.load_run(WORKDIR, stage=", "results.json",
                                 "metrics.jsonl", 'dataset("test", train=False)', "run.predict(",
                                 "probs/", '["logits"]', "detection.nms(", '"answers"'),
}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_structure_and_code_compiles(name):
  nb = json.loads((LAUNCH / name).read_text())
  assert nb["nbformat"] == 4 and isinstance(nb["metadata"], dict)
  code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code_cells and all(c["cell_type"] in ("code", "markdown") for c in nb["cells"])
  sources = []
  for i, cell in enumerate(code_cells):
    assert {"source", "metadata", "outputs", "execution_count"} <= set(cell)
    lines = "".join(cell["source"]).splitlines()
    src = "\n".join(l for l in lines if not l.lstrip().startswith(("!", "%")))
    compile(src, f"<code cell {i}>", "exec")
    sources.append(src)
  code = "\n".join(sources)
  for part in NOTEBOOKS[name]:
    assert part in code, part


def test_process_commands():
  cmds = local.process_commands(MAIN_ARGS, 3, port=12345, python="py")
  assert len(cmds) == 3
  for i, cmd in enumerate(cmds):
    assert cmd[:3] == ["py", "-m", "medguide_jax.main"]
    assert cmd[3:3 + len(MAIN_ARGS)] == MAIN_ARGS
    assert cmd[3 + len(MAIN_ARGS):] == ["--coordinator_address=localhost:12345",
                                        "--num_processes=3", f"--process_id={i}"]


def test_process_env_keeps_other_xla_flags():
  env = local.process_env(4, {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8",
                              "MEDGUIDE_DATA_DIR": "/d"})
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
  assert env["JAX_PLATFORMS"] == "cpu" and env["MEDGUIDE_DATA_DIR"] == "/d"
  assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep)


def test_parse_args():
  args, main_args = local.parse_args(["--num_processes=4", "--devices_per_process=2", "--",
                                      *MAIN_ARGS])
  assert (args.num_processes, args.devices_per_process, args.timeout) == (4, 2, None)
  assert main_args == MAIN_ARGS
  with pytest.raises(SystemExit):
    local.parse_args(["--num_processes=2"])  # no `-- <main args>`


def test_free_port():
  assert 0 < local.free_port() < 65536


def test_launch_local_returns_first_failure(monkeypatch, tmp_path):
  # Stand-in processes that exit at once: process 1 fails with 3, the others succeed.
  monkeypatch.setattr(local, "process_commands", lambda args, n, port: [
      [sys.executable, "-c", f"import sys; print('hi'); sys.exit({3 if i == 1 else 0})"]
      for i in range(n)])
  assert local.launch_local(MAIN_ARGS, 3, 1, timeout=helpers.HANG_GUARD_S) == 3
  # A failure stops the peers, which would otherwise sleep for an hour: they are gone when
  # it returns (checked by their pids, not by a clock).
  pids = tmp_path / "pids"
  pids.mkdir()
  sleep = [sys.executable, "-c", f"import os, time; open(os.path.join({str(pids)!r}, "
           "str(os.getpid())), 'w').close(); time.sleep(3600)"]
  monkeypatch.setattr(local, "process_commands", lambda args, n, port: [
      # The failing process waits for its peer to be up, so the check below has a pid.
      [sys.executable, "-c", f"import os, sys, time\nwhile not os.listdir({str(pids)!r}): "
       "time.sleep(0.05)\nsys.exit(5)"]] + [sleep] * (n - 1))
  assert local.launch_local(MAIN_ARGS, 2, 1, timeout=helpers.HANG_GUARD_S) == 5
  assert len(list(pids.iterdir())) == 1
  for pid in (int(p.name) for p in pids.iterdir()):
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)
  monkeypatch.setattr(local, "process_commands", lambda args, n, port: [sleep] * n)
  assert local.launch_local(MAIN_ARGS, 2, 1, timeout=0.5) == local.EXIT_TIMEOUT


def test_no_test_has_a_wall_clock_limit_a_slow_machine_can_hit():
  """Subprocess and wait limits are the one hang guard (helpers.HANG_GUARD_S); a literal one
  is allowed only where it is the behaviour under test (the launcher's own timeout)."""
  import re  # pylint: disable=g-import-not-at-top
  literal = re.compile(r"timeout=\d")
  timed = re.compile(r"(monotonic|time\.time)\(\) - \w+ <")
  found = []
  for path in sorted((helpers.ROOT / "tests").glob("*.py")):
    for n, line in enumerate(path.read_text().splitlines(), 1):
      if (literal.search(line) and "launch_local" not in line) or timed.search(line):
        found.append(f"{path.name}:{n}: {line.strip()}")
  assert not found, found
