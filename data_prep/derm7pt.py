"""Derm7pt (Kawahara et al., 2019) as paired clinical/dermoscopic records with 8 task labels.

Reads the official release (release_v0) from the TFDS manual dir:

  meta/meta.csv                     one row per case: labels and the two image paths
  meta/{train,valid,test}_indexes.csv  header `indexes`, then 0-based row numbers of meta.csv
  images/<clinic>, images/<derm>    paths as written in meta.csv (mixed-case extensions)

Each record is one case (`paired.features()`): case_id = case_num, the clinical photo (inferior)
and the dermoscopic image (superior) as their original JPEG bytes, and the labels grouped as in
the dataset authors' loader and DeepGuide (`LABEL_GROUPS`). Splits follow the official index
files, which are per case (a case is one lesion), so no lesion crosses splits. Nothing else from
meta.csv (sex, location, management, notes...) reaches the records.

Cases whose clinical image is the dermoscopic one. For 9 cases of release_v0 the clinical photo
was missing and the release put the dermoscopic image in its place (meta.csv: `clinic` and
`derm` name the same file, and `notes` says e.g. "Replaced clinic Fhl/Fhl017.jpg with derm
Fhl/Fhl018.jpg" or "Clinical missing and replaced with derm"). For guidance they are wrong in
kind: the "inferior" input is the superior image. By default the builder leaves them out; the
option `keep_replaced_clinic=true` keeps them. A case is left out when either rule finds it:

  notes            `note_says_replaced(notes)` (rule in its docstring: a word starting with
                   'clinic' and one starting with 'derm', plus a replacement or identity
                   word; case-insensitive)
  identical files  `same_images`: `clinic` and `derm` are the same path, or the two files have
                   the same bytes, or decode to the same pixels

Both are checked for every case (the second as a check on the first, and for copies the notes
do not mention). The builder logs, per split, how many cases it left out (or kept) and which,
with the rule that found each ('notes', 'identical files' or 'both'), and stores the same in
the dataset's metadata (`info.metadata['replaced_clinic']`). Expected on release_v0: the 9
cases 565, 800, 824, 827, 833, 834, 839, 844 and 851, each found by both rules (so DeepGuide's
`labels/ignored_img_pairs.txt` quotes their rows). DeepGuide's label CSVs (408/202/392 cases)
drop instead the case after each one (566, 801, 825, 828, 834, 835, 840, 845, 852: an
off-by-one between meta.csv line numbers and case_num), so they keep 8 of these 9, with
clinic = derm; by those CSVs' splits, 565 and 833 are train, 800, 824, 839, 844 and 851
validation, 827 test (834's split they do not show).

Every inconsistency in the release is an error that names what to fix: the column, value and
case of an unknown label; the path and case of a missing or undecodable image; the split file of
a bad or duplicated index.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import re
from typing import Iterator, Mapping

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from medguide_jax.data import builders
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
   (add --option keep_replaced_clinic=true to keep the cases whose clinical image is the
   dermoscopic one; they are left out by default)
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


def _decoded(path: epath.Path, data: bytes, case: str) -> Image.Image:
  """The fully decoded image of `data` (read from `path`); an error naming both if it is not
  one."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # full decode: catches truncated files, not just bad headers
      return image.copy()
  except Exception as e:  # Pillow raises several types for corrupt data
    raise Derm7ptFormatError(f"Image {path} of case {case} cannot be decoded: {e}") from e


def read_image_bytes(images_dir: epath.Path, relative: str, case: str) -> bytes:
  """The original encoded bytes of one image, after checking that Pillow can decode them."""
  path = images_dir / relative.strip()
  try:
    data = path.read_bytes()
  except FileNotFoundError as e:
    raise Derm7ptFormatError(f"Image {path} of case {case} not found.") from e
  _decoded(path, data, case)
  return data


# --------------------------------------------------------------------------- replaced clinic
# The notes rule. release_v0 writes "Replaced clinic Fhl/Fhl017.jpg with derm Fhl/Fhl018.jpg"
# and "Clinical missing and replaced with derm"; other wordings a copy of the release may use
# ("clinical image is dermoscopic", "clinic = derm", "clinic is a copy of the derm image") are
# matched too. Words are matched by prefix, so 'clinic' covers clinical and 'derm' covers
# dermoscopic, dermoscopy and dermatoscopic.
_CLINIC = re.compile(r"\bclinic")
_DERM = re.compile(r"\bderm")
_REPLACED = re.compile(r"\breplac|\bcop(?:y|ied)\b|\bidentical\b|\bduplicat")
_IS_DERM = re.compile(
    r"\bclinic\w*(?: (?:image|photo|picture|img))? (?:is|was|=|same as)(?: the| a| an)? derm")


def note_says_replaced(note: str) -> bool:
  """Whether a meta.csv `notes` entry says the clinical image is the dermoscopic one.

  The rule, on the note lower-cased with runs of white space made one space: it mentions
  the clinical image (a word starting with 'clinic') and the dermoscopic one (a word starting
  with 'derm'), and either has a replacement or identity word (a word starting with 'replac'
  or 'duplicat', or 'copy', 'copied', 'identical'), or says the clinical image is / was / =
  / same as the derm... one ('clinic[al] [image|photo|picture|img] is [the|a|an] derm...').
  """
  text = " ".join(str(note or "").lower().split())
  if not (_CLINIC.search(text) and _DERM.search(text)):
    return False
  return bool(_REPLACED.search(text) or _IS_DERM.search(text))


def same_images(images_dir: epath.Path, row: Mapping[str, str]) -> bool:
  """Whether the case's `clinic` and `derm` are one image: the same path, the same bytes, or
  (different bytes: e.g. other metadata) the same size, mode and decoded pixels."""
  case, clinic, derm = row["case_num"].strip(), row["clinic"].strip(), row["derm"].strip()
  if clinic == derm:
    return True
  paths = (images_dir / clinic, images_dir / derm)
  data = [p.read_bytes() for p in paths]
  if data[0] == data[1]:
    return True
  if len({_header(p, d, case) for p, d in zip(paths, data)}) > 1:
    return False  # other size or mode: no need to decode
  a, b = (np.asarray(_decoded(p, d, case)) for p, d in zip(paths, data))
  return np.array_equal(a, b)


def _header(path: epath.Path, data: bytes, case: str) -> tuple:
  """(size, mode) from the image's header alone (no pixel decoding)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      return image.size, image.mode
  except Exception as e:  # Pillow raises several types for corrupt data
    raise Derm7ptFormatError(f"Image {path} of case {case} cannot be decoded: {e}") from e


def find_replaced_clinic(images_dir: epath.Path, rows: list[Mapping[str, str]]
                         ) -> dict[str, str]:
  """{case_num: the rule that found it ('notes', 'identical files' or 'both')} for the rows
  whose clinical image is the dermoscopic one (module docstring), in the rows' order."""
  found = {}
  for row in rows:
    by_note = note_says_replaced(row.get("notes") or "")
    by_files = same_images(images_dir, row)
    if by_note or by_files:
      found[row["case_num"].strip()] = ("both" if by_note and by_files
                                        else "notes" if by_note else "identical files")
  return found


def replaced_clinic_report(cases: Mapping[str, list], found: Mapping[str, Mapping[str, str]],
                           *, kept: bool) -> dict:
  """The summary stored in the metadata: per split the cases read, the cases found
  ({case: rule}) and how many remain; whether they were kept; the rule."""
  return {
      "kept": kept,
      "rule": "left out when meta.csv notes say so (data_prep.derm7pt.note_says_replaced) or "
              "when clinic and derm are the same file, bytes or decoded pixels "
              "(data_prep.derm7pt.same_images); option keep_replaced_clinic keeps them",
      "splits": {split: {"cases_read": len(cases[split]), "found": len(found[split]),
                         "cases": dict(found[split]),
                         "remaining": len(cases[split]) - (0 if kept else len(found[split]))}
                 for split in cases},
  }


def report_message(report: Mapping) -> str:
  """One line per split: how many cases were left out (or kept), which, and by which rule."""
  verb = "kept" if report["kept"] else "left out"
  lines = []
  for split, r in report["splits"].items():
    listed = ", ".join(f"{case} ({rule})" for case, rule in r["cases"].items()) or "none"
    lines.append(f"derm7pt {split}: {verb} {r['found']} of {r['cases_read']} cases whose "
                 f"clinical image is the dermoscopic one: {listed}")
  hint = ("(built with keep_replaced_clinic=true)" if report["kept"] else
          "(--option keep_replaced_clinic=true keeps them)")
  return "\n".join(lines) + f"\n{hint}"


@dataclasses.dataclass(eq=False)
class Derm7ptConfig(tfds.core.BuilderConfig):
  """The builder's option: keep_replaced_clinic keeps the cases whose clinical image is the
  dermoscopic one (module docstring); by default they are left out."""
  keep_replaced_clinic: bool = False


class Derm7pt(tfds.core.GeneratorBasedBuilder):
  """Derm7pt release_v0: clinical (inferior) + dermoscopic (superior) image pairs."""

  name = "derm7pt"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: official splits, standard label groupings.",
      "1.1.0": "Leaves out by default the cases whose clinical image is the dermoscopic one "
               "(meta.csv notes or identical files; option keep_replaced_clinic keeps "
               "them); metadata['replaced_clinic'] lists them per split.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [Derm7ptConfig(
      name="default", description="Cases whose clinical image is the dermoscopic one left out.")]

  def __init__(self, *, keep_replaced_clinic: bool | None = None, **kwargs):
    """Usual TFDS kwargs, plus the option of Derm7ptConfig (None: the default's)."""
    config = builders.options_config(
        Derm7ptConfig, {"keep_replaced_clinic": keep_replaced_clinic},
        canonical=lambda v: {k: bool(x) for k, x in v.items()}, name_part=lambda k, v: k)
    if config is not None:
      kwargs["config"] = config
    # ArrayRecord: random access through tfds.data_source, no TensorFlow needed.
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=paired.features(),
        description=__doc__,
        homepage="https://derm.cs.sfu.ca",
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(replaced_clinic={}),
    )

  def _split_generators(self, dl_manager):
    root = epath.Path(dl_manager.manual_dir)
    # Everything but image decoding is checked here, before any record is written: a bad
    # release fails in seconds, not after most of it has been encoded.
    cases = load_cases(root)
    cases = self._without_replaced_clinic(root, cases)
    return {split: self._generate_examples(root / "images", split_cases)
            for split, split_cases in cases.items()}

  def _without_replaced_clinic(self, root: epath.Path, cases: dict) -> dict:
    """`cases` less those whose clinical image is the dermoscopic one (unless the option
    keeps them); logs and stores in the metadata what was found."""
    keep = self.builder_config.keep_replaced_clinic
    if cases and not any("notes" in row for split in cases.values() for row, _ in split):
      logging.warning("derm7pt: %s has no 'notes' column; cases whose clinical image is the "
                      "dermoscopic one are found by identical files only.",
                      root / "meta" / "meta.csv")
    found = {split: find_replaced_clinic(root / "images", [row for row, _ in split_cases])
             for split, split_cases in cases.items()}
    report = replaced_clinic_report(cases, found, kept=keep)
    self.info.metadata["replaced_clinic"] = report
    log = logging.warning if any(found.values()) else logging.info
    log("%s", report_message(report))
    if keep:
      return cases
    return {split: [(row, labels) for row, labels in split_cases
                    if row["case_num"].strip() not in found[split]]
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
