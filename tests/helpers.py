"""Shared test utilities: tiny guidance configs and running the CLI in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every subprocess and wait in the tests has this limit: a hang guard, not a performance
# check (a busy machine may be many times slower). MEDGUIDE_TEST_HANG_GUARD_S changes it.
HANG_GUARD_S = float(os.environ.get("MEDGUIDE_TEST_HANG_GUARD_S", "3600"))


def tiny_guidance_config(stages=("inferior",), steps: int = 6, batch: int = 16):
  """The smoke guidance config cut to a few steps of a few stages at 32 px."""
  from configs import guidance  # pylint: disable=g-import-not-at-top
  c = guidance.get_config("dataset=synthetic,smoke")
  c.data.image_size = 32
  c.model.encoder_kwargs.width = 8
  c.model.guidance_hidden = (32, 32)
  for name in list(c.stages):
    if name not in stages:
      del c.stages[name]
      continue
    s = c.stages[name]
    s.num_steps, s.batch_size, s.eval_batch_size = steps, batch, 64
    s.log_every, s.eval_every, s.checkpoint_every, s.bootstrap = 1, 2, 2, 20
  return c


def overrides(stages=("inferior",), steps: int = 6, batch: int = 16) -> list[str]:
  """The same tiny config as command-line overrides of configs/guidance.py:smoke."""
  args = ["--config.data.image_size=32", "--config.model.encoder_kwargs.width=8",
          "--config.model.guidance_hidden=(32,32)"]
  for name in stages:
    for key, value in (("num_steps", steps), ("batch_size", batch), ("eval_batch_size", 64),
                       ("log_every", 1), ("eval_every", 2), ("checkpoint_every", 2),
                       ("bootstrap", 20)):
      args.append(f"--config.stages.{name}.{key}={value}")
  return args


def run_main(workdir, args: list[str], *, devices: int = 8, env: dict | None = None,
             config_arg: str = "dataset=synthetic,smoke,stages=inferior",
             timeout: float = HANG_GUARD_S,
             check: bool = True, config_file: str = "configs/guidance.py"
             ) -> subprocess.CompletedProcess:
  """python -m medguide_jax.main with `devices` fake CPU devices; returns the process."""
  full_env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                  JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **(env or {}))
  cmd = [sys.executable, "-m", "medguide_jax.main",
         f"--config={config_file}:{config_arg}", f"--workdir={workdir}"] + args
  proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\n"
                         f"STDERR:\n{proc.stderr[-6000:]}")
  return proc


def metrics_lines(path) -> list[dict]:
  return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def losses(path, key: str = "train/loss") -> list[float]:
  return [m[key] for m in metrics_lines(path) if key in m]


def metrics_without_timing(path) -> list[dict]:
  """metrics.jsonl without its timing fields, which differ between identical runs."""
  return [{k: v for k, v in l.items() if not k.endswith(("_sec", "per_sec"))}
          for l in metrics_lines(path)]


def assert_trees_equal(a, b) -> None:
  """Same structure and bitwise-equal leaves, naming the first leaf that differs."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
