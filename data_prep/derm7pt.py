"""Derm7pt (Kawahara et al., 2019) as paired clinical/dermoscopic records with 8 task labels.

Reads the official release (release_v0) from the TFDS manual dir:

  meta/meta.csv                     one row per case: labels and the two image paths
  meta/{train,valid,test}_indexes.csv  header `indexes`, then 0-based row numbers of meta.csv
  images/<clinic>, images/<derm>    paths as written in meta.csv (mixed-case extensions)

Each record is one case (`paired.features()`): case_id = case_num, the clinical photo (inferior)
and the dermoscopic image (superior) as their original JPEG bytes, and the labels grouped as in
the dataset authors' loader and DeepGuide (`LABEL_GROUPS`). Splits follow the official index
files, which are per case (a case is one lesion), so no lesion crosses splits. Nothing else from
meta.csv (sex, location, management...) reaches the records.

Every inconsistency in the release is an error that names what to fix: the column, value and
case of an unknown label; the path and case of a missing or undecodable image; the split file of
a bad or duplicated index.
"""
from __future__ import annotations

import csv
import io
from typing import Iterator, Mapping

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from medguide_jax.data import paired

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Derm7pt cannot be downloaded automatically: its licence requires registration.
1. Register and download `release_v0.zip` at https://derm.cs.sfu.ca (Kawahara et al., "Seven-
   point checklist and skin lesion classification using multitask multimodal neural nets",
   IEEE JBHI 2019).
2. Unzip it. The folder that holds `meta/` and `images/` is the manual dir:
     <manual_dir>/meta/meta.csv, <manual_dir>/meta/{train,valid,test}_indexes.csv,
     <manual_dir>/images/<clinic and derm paths listed in meta.csv>
3. Build the TFDS dataset once:
     python -m data_prep.build derm7pt --manual_dir=<manual_dir> --data_dir=<data_dir>
"""


def _groups(table: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
  """{group: raw values} -> {raw value: group}."""
  return {raw: group for group, raws in table.items() for raw in raws}


_NEVI = ("blue nevus", "clark nevus", "combined nevus", "congenital nevus", "dermal nevus",
         "recurrent nevus", "reed or spitz nevus")
_MELANOMAS = ("melanoma", "melanoma (in situ)", "melanoma (less than 0.76 mm)",
              "melanoma (0.76 to 1.5 mm)", "melanoma (more than 1.5 mm)", "melanoma metastasis")
_ABS_REG_IR = {"ABS": ("absent",), "REG": ("regular",), "IR": ("irregular",)}

# task -> (meta.csv column, {raw value: group name in paired.CLASS_NAMES[task]}).
LABEL_GROUPS: dict[str, tuple[str, dict[str, str]]] = {
    "DIAG": ("diagnosis", _groups({
        "BCC": ("basal cell carcinoma",), "NEV": _NEVI, "MEL": _MELANOMAS,
        "MISC": ("dermatofibroma", "lentigo", "melanosis", "miscellaneous", "vascular lesion"),
        "SK": ("seborrheic keratosis",)})),
    "PN": ("pigment_network", _groups(
        {"ABS": ("absent",), "TYP": ("typical",), "ATP": ("atypical",)})),
    "BWV": ("blue_whitish_veil", _groups({"ABS": ("absent",), "PRS": ("present",)})),
    "VS": ("vascular_structures", _groups({
        "ABS": ("absent",),
        "REG": ("arborizing", "comma", "hairpin", "within regression", "wreath"),
        "IR": ("dotted", "linear irregular")})),
    "PIG": ("pigmentation", _groups({
        "ABS": ("absent",), "REG": ("diffuse regular", "localized regular"),
        "IR": ("diffuse irregular", "localized irregular")})),
    "STR": ("streaks", _groups(_ABS_REG_IR)),
    "DaG": ("dots_and_globules", _groups(_ABS_REG_IR)),
    "RS": ("regression_structures", _groups({
        "ABS": ("absent",), "PRS": ("blue areas", "white areas", "combinations")})),
}
assert tuple(LABEL_GROUPS) == paired.TASKS

# Split name -> index file in meta/ (the release calls validation "valid").
SPLIT_FILES = {"train": "train_indexes.csv", "validation": "valid_indexes.csv",
               "test": "test_indexes.csv"}
_REQUIRED_COLUMNS = ("case_num", "clinic", "derm") + tuple(c for c, _ in LABEL_GROUPS.values())


class Derm7ptFormatError(ValueError):
  """The release on disk does not look like Derm7pt release_v0; the message says where."""


def read_meta(path: epath.Path) -> list[dict[str, str]]:
  """Rows of meta.csv as dicts; checks the columns we need are there."""
  if not path.exists():
    raise Derm7ptFormatError(f"{path} not found.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  # utf-8-sig: a spreadsheet-saved copy starts with a BOM that would rename the first column.
  reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline=""))
  rows = list(reader)
  columns = reader.fieldnames or []
  missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
  if missing:
    raise Derm7ptFormatError(f"{path}: missing columns {missing}; found {columns}")
  return rows


def case_labels(row: Mapping[str, str]) -> np.ndarray:
  """Grouped labels of one meta.csv row: int32 [8] in `paired.TASKS` order."""
  labels = []
  for task, (column, groups) in LABEL_GROUPS.items():
    raw = row[column].strip().lower()
    if raw not in groups:
      raise Derm7ptFormatError(
          f"Unknown value {row[column]!r} in column {column!r} of case {row['case_num']!r}; "
          f"known values: {sorted(groups)}")
    labels.append(paired.CLASS_NAMES[task].index(groups[raw]))
  return np.asarray(labels, np.int32)


def read_split_indexes(path: epath.Path, num_rows: int) -> list[int]:
  """0-based meta.csv row numbers listed in one split file (header `indexes`)."""
  if not path.exists():
    raise Derm7ptFormatError(f"Split file {path} not found.")
  lines = [line.strip() for line in path.read_text().splitlines()]
  lines = [line for line in lines if line]
  if lines and not lines[0].lstrip("-").isdigit():
    lines = lines[1:]  # the header
  indexes = []
  for line in lines:
    if not line.lstrip("-").isdigit() or not 0 <= int(line) < num_rows:
      raise Derm7ptFormatError(
          f"Split file {path}: index {line!r} is not a row of meta.csv (0..{num_rows - 1}).")
    indexes.append(int(line))
  return indexes


def read_splits(meta_dir: epath.Path, rows: list[dict[str, str]]) -> dict[str, list[int]]:
  """Split name -> row numbers; a case (case_num) in two splits is an error naming the files."""
  splits, owner = {}, {}
  for split, filename in SPLIT_FILES.items():
    path = meta_dir / filename
    splits[split] = read_split_indexes(path, len(rows))
    for index in splits[split]:
      case = rows[index]["case_num"].strip()
      if case in owner:  # also catches a row listed twice, or two rows with one case_num
        where = "twice in" if owner[case] == path else f"in both {owner[case]} and"
        raise Derm7ptFormatError(f"Case {case} (row {index}) is listed {where} {path}.")
      owner[case] = path
  return splits


def check_images_exist(images_dir: epath.Path, row: Mapping[str, str]) -> None:
  """Fails fast, before any encoding, if one of the case's two images is missing."""
  for column in ("clinic", "derm"):
    path = images_dir / row[column].strip()
    if not path.exists():
      raise Derm7ptFormatError(f"Image {path} of case {row['case_num']} not found.")


def load_cases(root: epath.Path) -> dict[str, list[tuple[dict[str, str], np.ndarray]]]:
  """Split name -> [(meta.csv row, labels)], with labels, splits and image paths checked."""
  rows = read_meta(root / "meta" / "meta.csv")
  cases = {}
  for split, indexes in read_splits(root / "meta", rows).items():
    cases[split] = [(rows[i], case_labels(rows[i])) for i in indexes]
    for row, _ in cases[split]:
      check_images_exist(root / "images", row)
  return cases


def read_image_bytes(images_dir: epath.Path, relative: str, case: str) -> bytes:
  """The original encoded bytes of one image, after checking that Pillow can decode them."""
  path = images_dir / relative.strip()
  try:
    data = path.read_bytes()
  except FileNotFoundError as e:
    raise Derm7ptFormatError(f"Image {path} of case {case} not found.") from e
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # full decode: catches truncated files, not just bad headers
  except Exception as e:  # Pillow raises several types for corrupt data
    raise Derm7ptFormatError(f"Image {path} of case {case} cannot be decoded: {e}") from e
  return data


class Derm7pt(tfds.core.GeneratorBasedBuilder):
  """Derm7pt release_v0: clinical (inferior) + dermoscopic (superior) image pairs."""

  name = "derm7pt"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: official splits, standard label groupings."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, **kwargs):
    # ArrayRecord: random access through tfds.data_source, no TensorFlow needed.
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=paired.features(),
        description=__doc__,
        homepage="https://derm.cs.sfu.ca",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    root = epath.Path(dl_manager.manual_dir)
    # Everything but image decoding is checked here, before any record is written: a bad
    # release fails in seconds, not after most of it has been encoded.
    cases = load_cases(root)
    return {split: self._generate_examples(root / "images", split_cases)
            for split, split_cases in cases.items()}

  def _generate_examples(self, images_dir: epath.Path, cases) -> Iterator[tuple[str, dict]]:
    for row, labels in cases:
      case = row["case_num"].strip()
      yield case, {
          "case_id": case.encode(),
          "image_inferior": read_image_bytes(images_dir, row["clinic"], case),
          "image_superior": read_image_bytes(images_dir, row["derm"], case),
          "labels": labels,
      }


_CITATION = """\
@article{kawahara2019seven,
  title={Seven-Point Checklist and Skin Lesion Classification using Multitask Multimodal
         Neural Nets},
  author={Kawahara, Jeremy and Daneshvar, Sara and Argenziano, Giuseppe and Hamarneh, Ghassan},
  journal={IEEE Journal of Biomedical and Health Informatics},
  volume={23}, number={2}, pages={538--546}, year={2019}
}"""
