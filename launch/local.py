r"""Runs N processes of medguide_jax.main on this machine, as a multi-host job would.

  python -m launch.local --num_processes=2 --devices_per_process=2 -- \
      --config=configs/guidance.py:dataset=synthetic,smoke --workdir=/tmp/guidance_2proc

Each process gets `--coordinator_address=localhost:<free port> --num_processes=N
--process_id=i`, JAX on CPU with K fake devices (`XLA_FLAGS=--xla_force_host_platform_
device_count=K`, `JAX_PLATFORMS=cpu`), and its output lines prefixed with `[i] `. The exit
code is the first non-zero one of any process (0 when all finish); when a process fails,
the others are stopped. This is how multi-host code paths (per-process data rows, collective
checkpoints, process-0-only writes) are tested without a pod.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EXIT_PREEMPTED = 75  # main's "preempted after a successful save" (DESIGN.md, exit codes)
EXIT_TIMEOUT = 124   # as coreutils' timeout
_GRACE_SEC = 10.0    # how long stopped processes get before SIGKILL
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port that is free on localhost now (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_commands(main_args: list[str], num_processes: int, port: int,
                     python: str = sys.executable) -> list[list[str]]:
  """The command line of each process i in 0..num_processes-1."""
  return [[python, "-m", "medguide_jax.main", *main_args,
           f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
           f"--process_id={i}"] for i in range(num_processes)]


def process_env(devices_per_process: int, env: dict | None = None) -> dict[str, str]:
  """os.environ + `env`, with K fake CPU devices and the repository on PYTHONPATH."""
  full = dict(os.environ, **(env or {}))
  # Keep other XLA flags the caller set; replace only the device count.
  xla_flags = [f for f in full.get("XLA_FLAGS", "").split()
               if not f.startswith(_DEVICE_COUNT_FLAG)]
  full["XLA_FLAGS"] = " ".join(xla_flags + [f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
  full["JAX_PLATFORMS"] = "cpu"
  full["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed, not at exit
  full["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(REPO_ROOT), full.get("PYTHONPATH", "")) if p)
  return full


def _stream(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
  """Copies a process's output to ours, line by line, with a prefix."""
  for line in proc.stdout:
    with lock:
      sys.stdout.write(prefix + line)
      sys.stdout.flush()


def _stop(procs: list[subprocess.Popen], grace: float = _GRACE_SEC) -> None:
  """SIGTERM to the running processes (they may save), then SIGKILL after `grace` s."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def _wait_all(procs: list[subprocess.Popen], timeout: float | None) -> int:
  """Waits for every process; the first non-zero exit code stops the others."""
  deadline = None if timeout is None else time.monotonic() + timeout
  while True:
    codes = [p.poll() for p in procs]
    failed = [c for c in codes if c not in (None, 0)]
    if failed:
      if failed[0] == EXIT_PREEMPTED:  # peers saved collectively and are exiting too
        _wait_quietly(procs, _GRACE_SEC * 6)
      _stop(procs)
      return failed[0]
    if all(c == 0 for c in codes):
      return 0
    if deadline is not None and time.monotonic() > deadline:
      print(f"launch.local: timed out after {timeout} s", file=sys.stderr)
      _stop(procs)
      return EXIT_TIMEOUT
    time.sleep(0.1)


def _wait_quietly(procs: list[subprocess.Popen], seconds: float) -> None:
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.1)


def _forward_sigterm(procs: list[subprocess.Popen]):
  """Passes a SIGTERM of the launcher on to its processes (they save and exit 75).

  Returns the previous handler, or None where handlers cannot be set (not the main thread).
  """
  if threading.current_thread() is not threading.main_thread():
    return None

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  return signal.signal(signal.SIGTERM, forward)


def launch_local(main_args: list[str], num_processes: int, devices_per_process: int,
                 env: dict | None = None, timeout: float | None = None) -> int:
  """Runs `num_processes` processes of medguide_jax.main; returns the first non-zero exit code.

  Args:
    main_args: arguments of medguide_jax.main (--config, --workdir, --config.x=y ...).
    num_processes: how many processes (one per simulated host).
    devices_per_process: fake CPU devices of each process.
    env: extra environment variables for every process (on top of os.environ).
    timeout: seconds before every process is stopped and 124 returned; None waits forever.

  Returns:
    0 if every process exited 0, else the first non-zero exit code seen.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError("num_processes and devices_per_process must be >= 1")
  full_env, lock = process_env(devices_per_process, env), threading.Lock()
  procs, threads = [], []
  for i, cmd in enumerate(process_commands(main_args, num_processes, free_port())):
    procs.append(subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, bufsize=1))
    threads.append(threading.Thread(target=_stream, args=(procs[-1], f"[{i}] ", lock),
                                    daemon=True))
    threads[-1].start()
  previous = _forward_sigterm(procs)
  try:
    code = _wait_all(procs, timeout)
  except BaseException:  # Ctrl-C: stop the children, then re-raise
    _stop(procs)
    raise
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  for t in threads:
    t.join(timeout=5)
  return code


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits `[launcher flags] -- [main args]`; returns (launcher flags, main args)."""
  parser = argparse.ArgumentParser(
      prog="python -m launch.local", description=__doc__.split("\n")[0],
      usage="%(prog)s [--num_processes=N] [--devices_per_process=K] [--timeout=S] -- "
            "<args of medguide_jax.main>")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--timeout", type=float, default=None, help="seconds; default none")
  own, main_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
      else (argv, [])
  args = parser.parse_args(own)
  if not main_args:
    parser.error("nothing to run: put the arguments of medguide_jax.main after `--`")
  return args, main_args


def main(argv: list[str] | None = None) -> int:
  args, main_args = parse_args(sys.argv[1:] if argv is None else argv)
  return launch_local(main_args, args.num_processes, args.devices_per_process,
                      timeout=args.timeout)


if __name__ == "__main__":
  sys.exit(main())
