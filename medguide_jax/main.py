"""Command line: parses flags, then hands over to train.train_and_evaluate.

  python -m medguide_jax.main --config=configs/guidance.py:dataset=synthetic,smoke \
      --workdir=/tmp/guidance [--config.stages.guidance.num_steps=7 ...]

Exit codes: 0 finished; 2 bad usage or config (nothing written); 1 a failure (including a
non-finite loss); 75 preempted after a successful save (launchers requeue on 75).

`main(argv)` parses its own flags and returns the exit code, so tests and notebooks can
call it in-process as often as they like.
"""
from __future__ import annotations

import dataclasses
import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags


@dataclasses.dataclass
class _Flags:
  values: flags.FlagValues
  config: flags.FlagHolder
  workdir: flags.FlagHolder
  coordinator: flags.FlagHolder
  num_processes: flags.FlagHolder
  process_id: flags.FlagHolder


def _define(argv: list[str]) -> _Flags:
  fv = flags.FlagValues()
  return _Flags(
      values=fv,
      config=config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                             lock_config=True, flag_values=fv,
                                             sys_argv=argv),  # its overrides come from argv
      workdir=flags.DEFINE_string("workdir", None, "Output directory (local path or gs://).",
                                  flag_values=fv),
      coordinator=flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for "
                                      "multi-process runs launched by hand (launch/local.py).",
                                      flag_values=fv),
      num_processes=flags.DEFINE_integer("num_processes", 0, "With --coordinator_address.",
                                         flag_values=fv),
      process_id=flags.DEFINE_integer("process_id", -1, "With --coordinator_address.",
                                      flag_values=fv))


class _QuietLibraries(logging_std.Filter):
  """Keeps orbax/tfds/grain INFO chatter out of the run's log; their warnings still show."""
  NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/")

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or not any(
        n in record.pathname for n in self.NOISY)


def _usage(message: str) -> int:
  """One line on stderr, exit 2. config_flags embeds the traceback of a failing get_config
  in its message; the user needs its last line (the error itself)."""
  lines = [l.strip() for l in str(message).splitlines() if l.strip()]
  if any(l.startswith("Traceback") for l in lines):
    head = lines[0].split(":")[0]  # 'flag --config=...'
    lines = [f"{head}: {lines[-1]}"]
  print(f"usage error: {' '.join(lines)}", file=sys.stderr)
  return 2


def _unknown_key(error: KeyError, argv: list[str]) -> str:
  """An unknown --config.a.b (config_flags raises KeyError('name\nDid you mean ...')),
  naming the flag it came from."""
  text = str(error.args[0]) if error.args else ""
  missing = text.splitlines()[0].strip("'\"") if text else ""
  given = [a.split("=")[0] for a in argv if a.startswith("--config.") and missing in a]
  hint = " ".join(text.splitlines()[1:])
  return f"{given[0] if given else '--config'}: no such config key {missing!r}. {hint}".strip()


def _parse(argv: list[str]):
  """(flags, config), or an int exit code for --help and usage errors."""
  f = _define(argv)
  if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
    print(__doc__ + "\n" + f.values.get_help())
    return 0
  try:
    rest = f.values(argv)
  # config_flags reports an unknown or mistyped --config.key as AttributeError/TypeError/
  # ValueError, and a failing get_config(arg) as whatever it raised.
  except (flags.Error, AttributeError, TypeError, ValueError, KeyError) as e:
    key_error = e if isinstance(e, KeyError) else (e.args[0] if e.args and isinstance(
        e.args[0], KeyError) else None)
    return _usage(_unknown_key(key_error, argv) if key_error is not None else str(e))
  if len(rest) > 1:
    return _usage(f"unexpected arguments: {rest[1:]}")
  for holder in (f.config, f.workdir):
    if holder.value is None:
      return _usage(f"--{holder.name} is required")
  path = f.values["config"].config_filename.partition(":")[0]
  if not os.path.exists(path):
    return _usage(f"--config={path}: no such file (config paths are relative to the "
                  "directory you run from, usually the repository root)")
  try:
    config = f.config.value
    config.to_dict()  # a load failure surfaces on first access
  except Exception as e:  # pylint: disable=broad-except
    # The config file is loaded lazily: a missing file, or a get_config(arg) that raises.
    return _usage(f"--config={path}: " + " ".join(
        l.strip() for l in str(e).splitlines() if l.strip()))
  return f, config


def main(argv: list[str]) -> int:
  """Runs one experiment from a full argv (program name first); returns the exit code."""
  parsed = _parse(list(argv))
  if isinstance(parsed, int):
    return parsed
  f, config = parsed
  # Imported here so that --help and flag errors answer without loading JAX.
  from medguide_jax import (checkpointing, metric_writers, parallel,  # pylint: disable=g-import-not-at-top
                            train)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  parallel.initialize_distributed(f.coordinator.value, f.num_processes.value,
                                  f.process_id.value)
  try:
    train.train_and_evaluate(config, f.workdir.value)
  except (train.ConfigError, checkpointing.CheckpointMismatchError,
          metric_writers.OutputPathError) as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  except train.Preempted as e:
    logging.warning("%s", e)
    return train.EXIT_PREEMPTED
  except (train.NonFiniteError, OSError) as e:  # OSError: disk full, permissions, ...
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def run() -> None:
  # absl's own flags (logging) are left at their defaults; ours are parsed by main.
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=lambda argv: (flags.FLAGS(argv[:1]),
                                                                         argv)[1])


if __name__ == "__main__":
  run()
