"""Data errors a user can act on (issue 12): corrupt dataset files, and data_prep's usage.

A corrupt, truncated or missing ArrayRecord file raises CorruptDatasetError naming the dataset,
the split, the file and the command that rebuilds it, whether it is met when opening the
splits, reading a record, or inside a grain worker; that command rebuilds it. The data_prep
command line takes builder options (--option KEY=VALUE), answers an unknown option or an
empty/missing manual dir with exit 2 and one line (no traceback), and a failed build leaves
no dataset folder behind.
"""
from __future__ import annotations

import os
import pickle
import re
import shlex
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from tests import helpers

from data_prep import build
from medguide_jax.data import builders, pipeline, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"num_examples": (40, 4, 4), "image_size": 16}  # 40 records: many chunks in the file


def _tiny_paired(data_dir):
  """A small synthetic_paired dataset of its own config in `data_dir`."""
  return builders.prepare("synthetic_paired", data_dir=data_dir, **TINY)


def _train_file(builder) -> str:
  (instruction,) = builder.info.splits["train"].file_instructions
  return os.fspath(instruction.filename)


def _damage_middle(path) -> None:
  """Overwrites 64 bytes in the middle of the file's records (its chunk hashes then fail)."""
  data = bytearray(open(path, "rb").read())
  end = data.find(b"\0" * 256)  # the records come first, then padding and the footer
  assert end > 1000, "the file holds too few records to damage one in the middle"
  data[end // 2:end // 2 + 64] = b"\xff" * 64
  with open(path, "wb") as f:
    f.write(bytes(data))


def _read_all(source) -> None:
  for i in range(len(source)):
    source[i]


def _assert_names_everything(message: str, name: str, split: str, path: str) -> None:
  assert f"dataset {name!r}" in message and f"split {split!r}" in message, message
  assert path in message, message
  assert f"python -m data_prep.build {name}" in message and "--rebuild" in message, message


# ---------------------------------------------------------------------------------------------
# Corrupt dataset files


def test_corrupt_record_names_dataset_split_file_and_rebuild_command(tmp_path):
  builder = _tiny_paired(tmp_path / "data")
  path = _train_file(builder)
  _damage_middle(path)
  opened = sources.open_prepared(builder, "synthetic_paired", ("train", "test"))
  with pytest.raises(builders.CorruptDatasetError) as caught:
    _read_all(opened["train"])
  message = str(caught.value)
  _assert_names_everything(message, "synthetic_paired", "train", path)
  # The command rebuilds this very config, in this data dir.
  assert f"--data_dir={tmp_path / 'data'}" in message
  assert "--option image_size=16" in message and "--option num_examples=40,4,4" in message
  assert "Riegeli" in message  # the reader's own words stay, as the detail
  assert isinstance(caught.value, RuntimeError)  # what the reader raised before
  with pytest.raises(builders.CorruptDatasetError, match="records of the ArrayRecord file"):
    opened["train"].__getitems__(list(range(40)))
  _read_all(opened["test"])  # other splits read as before


def test_truncated_or_missing_file_fails_when_opening(tmp_path):
  builder = _tiny_paired(tmp_path / "data")
  path = _train_file(builder)
  with open(path, "r+b") as f:
    f.truncate(1000)
  with pytest.raises(builders.CorruptDatasetError) as caught:
    sources.open_prepared(builder, "synthetic_paired", ("train",))
  _assert_names_everything(str(caught.value), "synthetic_paired", "train", path)
  os.remove(path)
  with pytest.raises(builders.CorruptDatasetError, match="No such file"):
    sources.open_prepared(builder, "synthetic_paired", ("train",))


def test_checked_source_reads_like_the_source_it_wraps(tmp_path):
  builder = _tiny_paired(tmp_path / "data")
  opened = sources.open_prepared(builder, "synthetic_paired", ("train",))["train"]
  raw = builder.as_data_source("train")
  assert len(opened) == len(raw) == 40
  assert opened.dataset_info.version == raw.dataset_info.version
  assert opened.dataset_info.metadata == raw.dataset_info.metadata
  assert opened[3]["case_id"] == raw[3]["case_id"]
  assert [r["case_id"] for r in opened.__getitems__([5, 1])] == [raw[5]["case_id"],
                                                                raw[1]["case_id"]]
  assert len(list(opened)) == 40
  with pytest.raises(ValueError):  # a bad index is the caller's bug, not a corrupt file
    opened[40]
  # Keyed by identity, so the wrapper is made once per open: every stage shares it.
  calls = []
  sources.once_per_source(opened, "k", lambda: calls.append(1))
  sources.once_per_source(opened, "k", lambda: calls.append(1))
  assert calls == [1]
  copy = pickle.loads(pickle.dumps(opened))  # what grain workers get
  assert copy[3]["case_id"] == raw[3]["case_id"]


def test_corrupt_file_error_reaches_the_trainer_from_a_grain_worker(tmp_path):
  builder = _tiny_paired(tmp_path / "data")
  path = _train_file(builder)
  opened = sources.open_prepared(builder, "synthetic_paired", ("train",))["train"]
  _damage_middle(path)  # after opening: the file went bad while training ran
  ds = pipeline.make_dataset(opened, example_fn=lambda record, rng: {"x": np.zeros(1)},
                             global_batch_size=8, rows=(0, 8), seed=0, train=True,
                             num_batches=5, num_workers=1)
  with pytest.raises(builders.CorruptDatasetError) as caught:
    for _ in ds:
      pass
  _assert_names_everything(str(caught.value), "synthetic_paired", "train", path)


def _archive(root, n: int = 12, broken: bool = False):
  """A folder of small PNGs in class folders a/ and b/ (optionally one unreadable file)."""
  for i in range(n):
    folder = root / ("a" if i % 2 else "b")
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), (20 * i) % 256, np.uint8)).save(folder / f"{i}.png")
  if broken:
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  return root


def _data_config(name: str, data_dir) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"name": name, "data_dir": str(data_dir),
                                    "manual_dir": "", "mixture": ""})


def test_printed_rebuild_command_rebuilds_a_corrupt_image_folder(tmp_path, capsys):
  root = _archive(tmp_path / "archive", n=60, broken=True)
  data_dir = tmp_path / "data"
  builder = builders.prepare("image_folder:scans", data_dir=data_dir, manual_dir=root,
                             skip_unreadable=True)
  path = _train_file(builder)
  _damage_middle(path)
  opened = sources.open_splits(_data_config("image_folder:scans", data_dir), ("train",))
  with pytest.raises(builders.CorruptDatasetError) as caught:
    _read_all(opened["train"])
  message = str(caught.value)
  _assert_names_everything(message, "image_folder:scans", "train", path)
  command = message.splitlines()[-1].strip()
  assert f"--manual_dir={root}" in command  # the archive it was built from
  argv = shlex.split(command)
  assert argv[:3] == ["python", "-m", "data_prep.build"]
  assert build.main(argv[3:]) == 0
  assert "prepared image_folder/scans/1.0.0" in capsys.readouterr().out
  rebuilt = sources.open_splits(_data_config("image_folder:scans", data_dir), ("train",))
  _read_all(rebuilt["train"])
  # Rebuilt with the options it was built with (the folder that stored them was deleted).
  again = builders.prepare("image_folder:scans", data_dir=data_dir)
  assert again.builder_config.skip_unreadable


def test_mixture_names_the_corrupt_dataset(tmp_path):
  data_dir = tmp_path / "data"
  for tag in ("one", "two"):
    builders.prepare(f"image_folder:{tag}", data_dir=data_dir,
                     manual_dir=_archive(tmp_path / tag, n=60))
  _damage_middle(_train_file(builders.prepare("image_folder:two", data_dir=data_dir)))
  data = _data_config("mixture", data_dir)
  data.mixture = "image_folder:one:1,image_folder:two:1"
  opened = sources.open_splits(data, ("train",))
  with pytest.raises(builders.CorruptDatasetError, match="dataset 'image_folder:two'"):
    _read_all(opened["train"])


# ---------------------------------------------------------------------------------------------
# python -m data_prep.build


def _cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "data_prep.build", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=helpers.HANG_GUARD_S)


def _datasets_left(data_dir) -> list[str]:
  """What a build left in data_dir, but the hidden lock files of the file lock."""
  if not os.path.isdir(data_dir):
    return []
  return sorted(n for n in os.listdir(data_dir) if not n.endswith(".lock"))


def test_option_flag_follows_the_builders_own_hint(tmp_path, capsys):
  root = _archive(tmp_path / "archive", broken=True)
  data_dir = tmp_path / "data"
  assert build.main(["image_folder:scans", f"--manual_dir={root}",
                     f"--data_dir={data_dir}"]) == 1
  err = capsys.readouterr().err
  assert "a/broken.png" in err and "--option skip_unreadable=true" in err, err
  assert build.main(["image_folder:scans", f"--manual_dir={root}", f"--data_dir={data_dir}",
                     "--option", "skip_unreadable=true", "--option=max_side=4"]) == 0
  builder = builders.prepare("image_folder:scans", data_dir=data_dir)
  assert builder.builder_config.skip_unreadable and builder.builder_config.max_side == 4
  ids = {r["id"] for s in builder.info.splits for r in builder.as_data_source(s)}
  assert len(ids) == 12 and b"a/broken.png" not in ids
  assert re.search(r"image_folder:.*skip_unreadable\s+\(true\|false\)", " ".join(
      build._parser().format_help().split()))


@pytest.mark.parametrize("option, expected", [
    ("skip=true", r"no option 'skip'; valid options: \['folder_labels', 'max_side', "
                  r"'skip_unreadable', 'slice_every', 'source'\]"),
    ("max_side=big", r"max_side=big: 'big' is not an int"),
    ("skip_unreadable", r"expected KEY=VALUE"),
])
def test_bad_option_exits_2(tmp_path, capsys, option, expected):
  with pytest.raises(SystemExit) as caught:
    build.main(["image_folder:scans", f"--manual_dir={_archive(tmp_path / 'a')}",
                f"--data_dir={tmp_path / 'data'}", "--option", option])
  assert caught.value.code == 2
  assert re.search(expected, capsys.readouterr().err)
  assert _datasets_left(tmp_path / "data") == []


def test_options_are_typed_from_the_config_fields():
  options = builders.builder_options(builders.DATASETS["synthetic_paired"])
  assert builders.parse_option("40,4,4", options["num_examples"]) == (40, 4, 4)
  with pytest.raises(ValueError, match="3 comma-separated"):
    builders.parse_option("40,4", options["num_examples"])
  folder = builders.builder_options(builders.DATASETS["image_folder"])
  assert builders.parse_option("none", folder["max_side"]) is None
  assert builders.parse_option("No", folder["skip_unreadable"]) is False
  assert builders.builder_options(builders.DATASETS["derm7pt"]) == {"keep_replaced_clinic": bool}
  assert [builders.format_option(v) for v in ((3, 4), True, 7, "ct")] == [
      "3,4", "true", "7", "ct"]


@pytest.mark.parametrize("name", ["image_folder:scans", "derm7pt"])
def test_empty_or_missing_manual_dir_is_one_line_exit_2(tmp_path, name):
  (tmp_path / "empty").mkdir()  # TFDS's AssertionError traceback, before
  (tmp_path / "no_files" / "sub").mkdir(parents=True)  # folders, but no file
  for folder, words in ((tmp_path / "empty", "is empty"), (tmp_path / "no_files", "is empty"),
                        (tmp_path / "missing", "is not a directory")):
    run = _cli(name, f"--manual_dir={folder}", f"--data_dir={tmp_path / 'data'}")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    errors = [l for l in run.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and str(folder) in errors[0] and words in errors[0], run.stderr
  assert _datasets_left(tmp_path / "data") == []


def test_failed_build_leaves_no_dataset_folder(tmp_path):
  root = _archive(tmp_path / "archive", broken=True)
  data_dir = tmp_path / "data"
  run = _cli("image_folder:scans", f"--manual_dir={root}", f"--data_dir={data_dir}")
  assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
  assert _datasets_left(data_dir) == []  # no image_folder/, downloads/ or partial version
  # Another config of the same dataset, already built, is left as it was.
  good = _archive(tmp_path / "good")
  builders.prepare("image_folder:good", data_dir=data_dir, manual_dir=good)
  with pytest.raises(ValueError, match="broken.png"):
    builders.prepare("image_folder:scans", data_dir=data_dir, manual_dir=root)
  assert sorted(os.listdir(data_dir / "image_folder")) == [".config", "good"]
  assert builders.prepare("image_folder:good", data_dir=data_dir).info.splits


def test_relative_data_dir(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert build.main(["synthetic_paired", "--data_dir=rel", "--option", "image_size=16",
                     "--option", "num_examples=4,2,2"]) == 0
  assert str(tmp_path / "rel" / "synthetic_paired") in capsys.readouterr().out
