"""Builds a TFDS dataset once, so experiments can read it: the data preparation command.

    python -m data_prep.build derm7pt --manual_dir=/data/release_v0 --data_dir=~/medguide_data
    python -m data_prep.build synthetic_paired            # data_dir defaults to $MEDGUIDE_DATA_DIR
    python -m data_prep.build image_folder:scans --manual_dir=/data/scans \
        --option skip_unreadable=true --option max_side=512

Prints the split sizes and where the dataset was written. Exit codes: 0 done (or already
prepared), 2 bad usage (unknown dataset, bad flag, unknown or mistyped --option, a manual dir
that is missing or empty), 1 the release on disk is broken (the message says which file or
case). A failed build leaves nothing behind: the partly written dataset folder, and the empty
folders above it that the build created, are removed. --rebuild deletes a prepared dataset
(e.g. one with a corrupt file) and builds it again with the options it was built with.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap

from medguide_jax.data import builders


class _Parser(argparse.ArgumentParser):
  """Lists every dataset's builder options under --help, importing the builders only then."""

  def format_help(self) -> str:
    self.epilog = _options_help()
    return super().format_help()


def _options_help() -> str:
  lines = ["builder options (--option KEY=VALUE, repeatable):"]
  for name in sorted(builders.DATASETS):
    options = builders.builder_options(builders.DATASETS[name])
    described = ", ".join(f"{k} ({builders.describe_option_type(t)})"
                          for k, t in options.items())
    lines += textwrap.wrap(f"{name}: {described or 'none'}", 90, initial_indent="  ",
                           subsequent_indent="      ", break_on_hyphens=False)
  return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m data_prep.build", description=__doc__.split("\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name", help=f"one of {sorted(builders.DATASETS)}")
  parser.add_argument("--data_dir", default=None,
                      help="output root (local or gs://); default $MEDGUIDE_DATA_DIR, "
                           "else ~/medguide_data")
  parser.add_argument("--manual_dir", default=None,
                      help="the unpacked manual download of a real dataset")
  parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="a builder option, typed as its config field (true|false, ints, "
                           "comma-separated tuples, 'none'); repeatable; listed below")
  parser.add_argument("--rebuild", action="store_true",
                      help="delete the prepared dataset first and build it again (e.g. a "
                           "corrupt file), keeping the options it was built with")
  return parser


def _options(parser: argparse.ArgumentParser, name: str, given: list[str]) -> dict:
  """--option KEY=VALUE flags as builder kwargs; exits 2 on an unknown key or a bad value."""
  valid = builders.builder_options(builders.DATASETS[name.partition(":")[0]])
  out = {}
  for text in given:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
      parser.error(f"--option {text!r}: expected KEY=VALUE")
    if key not in valid:
      listed = f"valid options: {sorted(valid)}" if valid else "it takes no options"
      parser.error(f"--option {key}: {name} has no option {key!r}; {listed}")
    try:
      out[key] = builders.parse_option(value, valid[key])
    except ValueError as e:
      parser.error(f"--option {key}={value}: {e}; expected "
                   f"{builders.describe_option_type(valid[key])}")
  return out


def _command_line_hint(message: str) -> str:
  """Builders phrase option hints for Python ('prepare with skip_unreadable=True'); here the
  user follows them on the command line, as an --option flag."""
  return re.sub(r"prepare with (\w+)=(\w+)",
                lambda m: f"rerun with --option {m[1]}={m[2].lower()}", message)


def _usage_error(message: str) -> int:
  """One line on stderr, exit 2: bad usage, nothing was built."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  return 2


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)  # exits 2 on bad flags
  if args.name.partition(":")[0] not in builders.DATASETS:
    parser.error(f"unknown dataset {args.name!r}; valid names: {sorted(builders.DATASETS)}")
  options = _options(parser, args.name, args.option)
  data_dir = os.path.expanduser(args.data_dir) if args.data_dir else None
  manual_dir = os.path.expanduser(args.manual_dir) if args.manual_dir else None
  if manual_dir is not None and not os.path.isdir(manual_dir):
    return _usage_error(f"--manual_dir={manual_dir} is not a directory")
  try:
    builder = builders.prepare(args.name, data_dir=data_dir, manual_dir=manual_dir,
                               rebuild=args.rebuild, **options)
  except builders.DatasetNotPreparedError as e:  # a real dataset without --manual_dir
    parser.error(str(e))
  except builders.ManualDirError as e:  # missing or empty: nothing to build from
    return _usage_error(str(e))
  except (ValueError, OSError) as e:
    # A broken release, not a bug: the message names the file or case to fix; no traceback.
    print(f"error: {_command_line_hint(str(e))}", file=sys.stderr)
    return 1
  order = {"train": 0, "validation": 1, "test": 2}
  for split in sorted(builder.info.splits, key=lambda s: (order.get(s, 3), s)):
    print(f"{split}: {builder.info.splits[split].num_examples} examples")
  print(f"prepared {builder.info.full_name} in {builder.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
