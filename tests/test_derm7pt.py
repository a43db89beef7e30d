"""Derm7pt builder on a small fake release_v0 tree: labels, splits, bytes, the cases whose
clinical image is the dermoscopic one, errors, the CLI."""
import csv
import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from tests import helpers
import tensorflow_datasets as tfds

from data_prep import derm7pt
from medguide_jax.data import builders
from medguide_jax.data import paired

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The columns of release_v0 meta/meta.csv, in the release's order (derm7pt's example notebook).
COLUMNS = ("case_num", "diagnosis", "seven_point_score", "pigment_network", "streaks",
           "pigmentation", "regression_structures", "dots_and_globules", "blue_whitish_veil",
           "vascular_structures", "level_of_diagnostic_difficulty", "elevation", "location",
           "sex", "management", "clinic", "derm", "case_id", "notes")

# Every raw value of every grouped column, with the group it must land in (written out by hand
# from METHODS.md section 1, independently of the builder's table).
RAW_TO_GROUP = {
    "diagnosis": [
        ("basal cell carcinoma", "BCC"), ("blue nevus", "NEV"), ("clark nevus", "NEV"),
        ("combined nevus", "NEV"), ("congenital nevus", "NEV"), ("dermal nevus", "NEV"),
        ("recurrent nevus", "NEV"), ("reed or spitz nevus", "NEV"), ("melanoma", "MEL"),
        ("melanoma (in situ)", "MEL"), ("melanoma (less than 0.76 mm)", "MEL"),
        ("melanoma (0.76 to 1.5 mm)", "MEL"), ("melanoma (more than 1.5 mm)", "MEL"),
        ("melanoma metastasis", "MEL"), ("seborrheic keratosis", "SK"),
        ("dermatofibroma", "MISC"), ("lentigo", "MISC"), ("melanosis", "MISC"),
        ("miscellaneous", "MISC"), ("vascular lesion", "MISC")],
    "pigment_network": [("absent", "ABS"), ("typical", "TYP"), ("atypical", "ATP")],
    "blue_whitish_veil": [("absent", "ABS"), ("present", "PRS")],
    "vascular_structures": [
        ("absent", "ABS"), ("arborizing", "REG"), ("comma", "REG"), ("hairpin", "REG"),
        ("within regression", "REG"), ("wreath", "REG"), ("dotted", "IR"),
        ("linear irregular", "IR")],
    "pigmentation": [
        ("absent", "ABS"), ("diffuse regular", "REG"), ("localized regular", "REG"),
        ("diffuse irregular", "IR"), ("localized irregular", "IR")],
    "streaks": [("absent", "ABS"), ("regular", "REG"), ("irregular", "IR")],
    "dots_and_globules": [("absent", "ABS"), ("regular", "REG"), ("irregular", "IR")],
    "regression_structures": [
        ("absent", "ABS"), ("blue areas", "PRS"), ("white areas", "PRS"),
        ("combinations", "PRS")],
}
TASK_COLUMN = {"DIAG": "diagnosis", "PN": "pigment_network", "BWV": "blue_whitish_veil",
               "VS": "vascular_structures", "PIG": "pigmentation", "STR": "streaks",
               "DaG": "dots_and_globules", "RS": "regression_structures"}
NUM_CASES = 20  # one per diagnosis value; the other columns cycle through their values
SPLITS = {"train": [3, 0, 7, 12, 19, 5, 9, 14, 16, 1], "validation": [2, 18, 11, 6],
          "test": [4, 8, 10, 13, 15, 17]}
SPLIT_FILES = {"train": "train_indexes.csv", "validation": "valid_indexes.csv",
               "test": "test_indexes.csv"}

# Cases whose clinical image is the dermoscopic one, by row: (how the fixture makes it, the
# rule that must find it). Row 0 is as release_v0 writes its 9 (clinic = derm path, and a
# note); row 12 has the note only (its two files differ); rows 10 and 18 have no note, and
# clinic files with the derm file's bytes or, with a JPEG comment added, its pixels.
REPLACED = {0: ("same path + note", "both"), 12: ("note", "notes"),
            10: ("same bytes", "identical files"), 18: ("same pixels", "identical files")}
NOTES = {0: "Replaced clinic NEL/Nel000.jpg with derm NEL/NEL000.JPG",
         12: "CLINICAL image is  dermoscopic",
         6: "clinic and derm photos taken the same day", 9: "derm image slightly blurred"}
# Split -> {case_num: rule} the builder must report (written out from REPLACED and SPLITS).
LEFT_OUT = {"train": {"1": "both", "13": "notes"}, "validation": {"19": "identical files"},
            "test": {"11": "identical files"}}


def _case(i: int) -> dict:
  """Row i of the fake meta.csv, with mixed-case image paths as in the release."""
  row = {c: "" for c in COLUMNS}
  row.update(case_num=str(i + 1), seven_point_score="1", location="back", sex="female",
             management="excision", elevation="flat", level_of_diagnostic_difficulty="low")
  for column, values in RAW_TO_GROUP.items():
    row[column] = values[i % len(values)][0]
  folder = ("NEL", "Fcl", "Aal")[i % 3]
  row["clinic"] = f"{folder}/{folder.capitalize()}{i:03d}.jpg"
  row["derm"] = f"{folder}/{folder.upper()}{i:03d}.JPG"
  row["notes"] = NOTES.get(i, "")
  if REPLACED.get(i, ("",))[0] == "same path + note":
    row["clinic"] = row["derm"]
  return row


def _expected_labels(i: int) -> np.ndarray:
  groups = [RAW_TO_GROUP[TASK_COLUMN[t]][i % len(RAW_TO_GROUP[TASK_COLUMN[t]])][1]
            for t in paired.TASKS]
  return np.array([paired.CLASS_NAMES[t].index(g) for t, g in zip(paired.TASKS, groups)])


def _jpeg(seed: int, size: int = 24) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _with_comment(jpeg: bytes) -> bytes:
  """The same JPEG with a comment segment after SOI: other bytes, the same pixels."""
  text = b"copied"
  return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def _write_meta(root, rows) -> None:
  with open(root / "meta" / "meta.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def _write_split(root, split: str, indexes) -> None:
  text = "indexes\n" + "".join(f"{i}\n" for i in indexes)
  (root / "meta" / SPLIT_FILES[split]).write_text(text)


@pytest.fixture
def release(tmp_path):
  """A fake release_v0 tree; returns (root, rows)."""
  root = tmp_path / "release_v0"
  (root / "meta").mkdir(parents=True)
  rows = [_case(i) for i in range(NUM_CASES)]
  _write_meta(root, rows)
  for split, indexes in SPLITS.items():
    _write_split(root, split, indexes)
  for i, row in enumerate(rows):
    for k, column in enumerate(("clinic", "derm")):
      path = root / "images" / row[column]
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(_jpeg(2 * i + k))
    copy = {"same bytes": lambda b: b, "same pixels": _with_comment}.get(REPLACED.get(i, ("",))[0])
    if copy:
      derm = (root / "images" / row["derm"]).read_bytes()
      (root / "images" / row["clinic"]).write_bytes(copy(derm))
  return root, rows


def _prepare(root, tmp_path, **options):
  return builders.prepare("derm7pt", data_dir=tmp_path / "data", manual_dir=root, **options)


def _records(builder, split: str) -> dict:
  return {r["case_id"].decode(): r for r in builder.as_data_source(split=split)}


def test_records_match_the_release(release, tmp_path):
  root, rows = release
  builder = _prepare(root, tmp_path)
  assert builder.info.full_name == "derm7pt/default/1.1.0"
  by_split = {}
  for split, indexes in SPLITS.items():
    records = _records(builder, split)
    by_split[split] = set(records)
    kept = [i for i in indexes if i not in REPLACED]
    assert by_split[split] == {rows[i]["case_num"] for i in kept}
    for i in kept:
      record = records[rows[i]["case_num"]]
      np.testing.assert_array_equal(record["labels"], _expected_labels(i))
      assert record["image_inferior"] == (root / "images" / rows[i]["clinic"]).read_bytes()
      assert record["image_superior"] == (root / "images" / rows[i]["derm"]).read_bytes()
      assert set(record) == {"case_id", "image_inferior", "image_superior", "labels"}
  assert not by_split["train"] & by_split["validation"]
  assert not by_split["train"] & by_split["test"]
  assert not by_split["validation"] & by_split["test"]


@pytest.mark.parametrize("note", [
    "Replaced clinic Fhl/Fhl017.jpg with derm Fhl/Fhl018.jpg",  # release_v0's two wordings
    "Clinical missing and replaced with derm",
    "clinical image is dermoscopic", "Clinic image is the DERMOSCOPIC one", "clinic = derm",
    "clinic photo is a copy of the dermoscopy image", "clinic identical to derm"])
def test_notes_that_say_the_clinical_image_is_dermoscopic(note):
  assert derm7pt.note_says_replaced(note)


@pytest.mark.parametrize("note", [
    "", None, "derm image slightly blurred", "clinic photo blurry, derm fine",
    "clinic and derm photos taken the same day", "replaced derm NEL/NEL001.JPG",
    "clinical follow up"])
def test_other_notes_are_not_flagged(note):
  assert not derm7pt.note_says_replaced(note)


def test_same_images_by_path_bytes_and_pixels(tmp_path):
  jpeg, other = _jpeg(1), _jpeg(2)
  files = {"a.jpg": jpeg, "copy.jpg": jpeg, "comment.jpg": _with_comment(jpeg),
           "other.jpg": other, "small.jpg": _jpeg(1, size=12)}
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  assert _with_comment(jpeg) != jpeg
  same = lambda clinic, derm: derm7pt.same_images(
      tmp_path, {"case_num": "1", "clinic": clinic, "derm": derm})
  assert same("a.jpg", " a.jpg") and same("a.jpg", "copy.jpg") and same("a.jpg", "comment.jpg")
  assert not same("a.jpg", "other.jpg") and not same("a.jpg", "small.jpg")


def test_replaced_clinic_left_out_by_default(release, tmp_path, caplog):
  root, rows = release
  with caplog.at_level("WARNING"):
    builder = _prepare(root, tmp_path)
  for split, indexes in SPLITS.items():
    assert len(builder.as_data_source(split=split)) == len(indexes) - len(LEFT_OUT[split])
    assert not set(_records(builder, split)) & set(LEFT_OUT[split])
  # The report, as stored with the dataset (read back from its folder).
  report = tfds.builder_from_directory(builder.data_path).info.metadata["replaced_clinic"]
  assert report["kept"] is False
  for split, indexes in SPLITS.items():
    assert report["splits"][split] == {
        "cases_read": len(indexes), "found": len(LEFT_OUT[split]), "cases": LEFT_OUT[split],
        "remaining": len(indexes) - len(LEFT_OUT[split])}
  assert list(report["splits"]["train"]["cases"]) == ["1", "13"]  # in split-file order
  message = caplog.text
  assert "derm7pt train: left out 2 of 10 cases whose clinical image is the dermoscopic " \
         "one: 1 (both), 13 (notes)" in message
  assert "derm7pt test: left out 1 of 6 cases" in message and "11 (identical files)" in message


def test_keep_option_keeps_them_and_still_reports(release, tmp_path, caplog):
  root, rows = release
  with caplog.at_level("WARNING"):
    builder = _prepare(root, tmp_path, keep_replaced_clinic=True)
  assert builder.builder_config.name == "keep_replaced_clinic"
  for split, indexes in SPLITS.items():
    records = _records(builder, split)
    assert set(records) == {rows[i]["case_num"] for i in indexes}
  case_1 = _records(builder, "train")["1"]  # kept as the release has it: both images one file
  assert case_1["image_inferior"] == case_1["image_superior"]
  report = builder.info.metadata["replaced_clinic"]
  assert report["kept"] is True
  assert {s: r["cases"] for s, r in report["splits"].items()} == LEFT_OUT
  assert "derm7pt validation: kept 1 of 4 cases" in caplog.text
  # The default build is another folder: one setting never reads the other's files.
  default = _prepare(root, tmp_path)
  assert default.data_path != builder.data_path
  assert len(default.as_data_source(split="train")) == 8


def test_release_without_notes_column_uses_identical_files(release, tmp_path, caplog):
  root, rows = release
  with open(root / "meta" / "meta.csv", "w", newline="") as f:
    columns = [c for c in COLUMNS if c != "notes"]
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  with caplog.at_level("WARNING"):
    builder = _prepare(root, tmp_path)
  assert "has no 'notes' column" in caplog.text
  report = builder.info.metadata["replaced_clinic"]
  assert report["splits"]["train"]["cases"] == {"1": "identical files"}  # 13 needs its note
  assert len(builder.as_data_source(split="train")) == 9


def test_every_raw_value_is_covered():
  """The fake release exercises every raw value the builder knows, and nothing else."""
  for task, column in TASK_COLUMN.items():
    assert derm7pt.LABEL_GROUPS[task][0] == column
    assert set(derm7pt.LABEL_GROUPS[task][1]) == {raw for raw, _ in RAW_TO_GROUP[column]}
    assert {_case(i)[column] for i in range(NUM_CASES)} == {r for r, _ in RAW_TO_GROUP[column]}


def test_missing_image_names_the_path(release, tmp_path):
  root, rows = release
  missing = root / "images" / rows[7]["derm"]
  missing.unlink()
  with pytest.raises(derm7pt.Derm7ptFormatError, match="not found") as error:
    _prepare(root, tmp_path)
  assert str(missing) in str(error.value) and "case 8" in str(error.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_names_the_path(release, tmp_path, damage):
  root, rows = release
  broken = root / "images" / rows[4]["clinic"]
  data = broken.read_bytes()
  broken.write_bytes(b"not an image" if damage == "garbage" else data[: len(data) // 2])
  with pytest.raises(derm7pt.Derm7ptFormatError, match="cannot be decoded") as error:
    _prepare(root, tmp_path)
  assert str(broken) in str(error.value)


def test_unknown_label_names_column_value_and_case(release, tmp_path):
  root, rows = release
  rows[11]["pigment_network"] = "checkered"
  _write_meta(root, rows)
  with pytest.raises(derm7pt.Derm7ptFormatError) as error:
    _prepare(root, tmp_path)
  message = str(error.value)
  assert "pigment_network" in message and "checkered" in message and "'12'" in message


def test_out_of_range_index_names_the_split_file(release, tmp_path):
  root, _ = release
  _write_split(root, "validation", SPLITS["validation"] + [NUM_CASES])
  with pytest.raises(derm7pt.Derm7ptFormatError, match="valid_indexes.csv"):
    _prepare(root, tmp_path)


def test_case_in_two_splits_names_the_files(release, tmp_path):
  root, _ = release
  _write_split(root, "test", SPLITS["test"] + [SPLITS["train"][0]])
  with pytest.raises(derm7pt.Derm7ptFormatError, match="train_indexes.csv.*test_indexes.csv"):
    _prepare(root, tmp_path)


def test_unprepared_real_dataset_says_how_to_build_it(tmp_path):
  with pytest.raises(builders.DatasetNotPreparedError,
                     match="python -m data_prep.build derm7pt --manual_dir="):
    builders.prepare("derm7pt", data_dir=tmp_path)


def test_unknown_dataset_lists_valid_names(tmp_path):
  with pytest.raises(ValueError, match="derm7pt.*synthetic_paired"):
    builders.prepare("derm8pt", data_dir=tmp_path)


def _build_cli(*args):
  return subprocess.run([sys.executable, "-m", "data_prep.build", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=helpers.HANG_GUARD_S)


def test_cli_builds_and_prints_split_sizes(release, tmp_path):
  root, _ = release
  data_dir = tmp_path / "cli_data"
  run = _build_cli("derm7pt", f"--manual_dir={root}", f"--data_dir={data_dir}")
  assert run.returncode == 0, run.stderr
  for line in ("train: 8 examples", "validation: 3 examples", "test: 5 examples"):
    assert line in run.stdout
  assert str(data_dir / "derm7pt" / "default" / "1.1.0") in run.stdout
  # The report reaches the terminal: counts, cases and rules per split, and the option.
  for text in ("derm7pt train: left out 2 of 10 cases", "1 (both), 13 (notes)",
               "derm7pt validation: left out 1 of 4 cases", "19 (identical files)",
               "derm7pt test: left out 1 of 6 cases", "11 (identical files)",
               "--option keep_replaced_clinic=true keeps them"):
    assert text in run.stderr, run.stderr


def test_cli_option_keeps_replaced_clinic(release, tmp_path):
  root, _ = release
  data_dir = tmp_path / "cli_data"
  run = _build_cli("derm7pt", f"--manual_dir={root}", f"--data_dir={data_dir}",
                   "--option", "keep_replaced_clinic=true")
  assert run.returncode == 0, run.stderr
  for line in ("train: 10 examples", "validation: 4 examples", "test: 6 examples"):
    assert line in run.stdout
  assert str(data_dir / "derm7pt" / "keep_replaced_clinic" / "1.1.0") in run.stdout
  assert "derm7pt train: kept 2 of 10 cases" in run.stderr, run.stderr


def test_cli_unknown_dataset_exits_2(tmp_path):
  run = _build_cli("derm8pt", f"--data_dir={tmp_path}")
  assert run.returncode == 2
  assert "unknown dataset 'derm8pt'" in run.stderr
