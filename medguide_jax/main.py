"""Command line: parses flags, then hands over to train.train_and_evaluate.

  python -m medguide_jax.main --config=configs/guidance.py:dataset=synthetic,smoke \
      --workdir=/tmp/guidance [--config.stages.guidance.num_steps=7 ...]

Exit codes: 0 finished; 2 bad usage or config (nothing written); 1 a failure (including a
non-finite loss); 75 preempted after a successful save (launchers requeue on 75).
"""
from __future__ import annotations

import logging as logging_std
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (local path or gs://).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for "
                                   "multi-process runs launched by hand (launch/local.py).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "With --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging_std.Filter):
  """Keeps orbax/tfds/grain INFO chatter out of the run's log; their warnings still show."""
  NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/")

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or not any(
        n in record.pathname for n in self.NOISY)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = _CONFIG.value
  except Exception as e:  # config_flags loads the file lazily; any failure is bad usage
    print(f"config error: {e}", file=sys.stderr)
    return 2
  # Imported here so that --help and flag errors answer without loading JAX.
  from medguide_jax import checkpointing, parallel, train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except (train.ConfigError, checkpointing.CheckpointMismatchError) as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  except train.Preempted as e:
    logging.warning("%s", e)
    return train.EXIT_PREEMPTED
  except train.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def _parse_flags(argv: list[str]) -> list[str]:
  """Flag errors (unknown key, wrong type, bad config arg) exit 2 with absl's message."""
  try:
    return flags.FLAGS(argv)
  # config_flags reports an unknown or mistyped --config.key as AttributeError/TypeError/
  # ValueError, and a failing get_config(arg) as whatever it raised.
  except (flags.Error, AttributeError, TypeError, ValueError, KeyError) as e:
    print(f"usage error: {e}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
