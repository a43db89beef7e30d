"""Builds a TFDS dataset once, so experiments can read it: the data preparation command.

    python -m data_prep.build derm7pt --manual_dir=/data/release_v0 --data_dir=~/medguide_data
    python -m data_prep.build synthetic_paired            # data_dir defaults to $MEDGUIDE_DATA_DIR

Prints the split sizes and where the dataset was written. Exit codes: 0 done (or already
prepared), 2 bad usage (unknown dataset, bad flag), 1 the release on disk is broken (the
message says which file or case).
"""
from __future__ import annotations

import argparse
import os
import sys

from medguide_jax.data import builders


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.build", description=__doc__.split("\n")[0])
  parser.add_argument("name", help=f"one of {sorted(builders.DATASETS)}")
  parser.add_argument("--data_dir", default=None,
                      help="output root (local or gs://); default $MEDGUIDE_DATA_DIR, "
                           "else ~/medguide_data")
  parser.add_argument("--manual_dir", default=None,
                      help="the unpacked manual download of a real dataset")
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)  # exits 2 on bad flags
  if args.name.partition(":")[0] not in builders.DATASETS:
    parser.error(f"unknown dataset {args.name!r}; valid names: {sorted(builders.DATASETS)}")
  data_dir = os.path.expanduser(args.data_dir) if args.data_dir else None
  manual_dir = os.path.expanduser(args.manual_dir) if args.manual_dir else None
  if manual_dir is not None and not os.path.isdir(manual_dir):
    parser.error(f"--manual_dir={manual_dir} is not a directory")
  try:
    builder = builders.prepare(args.name, data_dir=data_dir, manual_dir=manual_dir)
  except builders.DatasetNotPreparedError as e:  # a real dataset without --manual_dir
    parser.error(str(e))
  except ValueError as e:
    # A broken release, not a bug: the message names the file or case to fix; no traceback.
    print(f"error: {e}", file=sys.stderr)
    return 1
  order = {"train": 0, "validation": 1, "test": 2}
  for split in sorted(builder.info.splits, key=lambda s: (order.get(s, 3), s)):
    print(f"{split}: {builder.info.splits[split].num_examples} examples")
  print(f"prepared {builder.info.full_name} in {builder.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
