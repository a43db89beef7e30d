"""Chest X-ray downstream builders of hybridmed: CheXpert, RSNA Pneumonia, SIIM-ACR, Object-CXR
and COVIDx, from their official layouts.

Every builder writes the 'cxr_findings' layout of `medguide_jax.data.cxr_findings` (one record
per image: 8-bit grey PNG shrunk so the long side is <= `max_side`, default 512, 0 native;
labels; regions with boxes and masks in the stored image's pixels) and its metadata
(label_names, region_names, class_names, a build summary per split: images, patients,
positives and uncertain per label, regions, boxes_clipped, boxes_dropped). Only pixels are
stored: no DICOM header value reaches a record but ViewPosition (as `view`).

  chexpert        CheXpert v1.0 (Irvin et al., AAAI 2019), CheXpert-v1.0-small or the full
                  CheXpert-v1.0. Read: train.csv and valid.csv (inside the release folder),
                  columns Path, Frontal/Lateral, AP/PA and the 14 observations (No Finding ...
                  Support Devices; Sex and Age are not read). The manual dir is the release
                  folder itself or the folder above it (holding CheXpert-v1.0-small/ or
                  CheXpert-v1.0/). Path ('CheXpert-v1.0-small/train/patient00001/study1/
                  view1_frontal.jpg') is relative to the folder ABOVE the release folder: it is
                  resolved there, else (a renamed release folder) with its first part replaced
                  by the release folder. patient = the patientNNNNN part, study =
                  'patientNNNNN/studyN', id = Path without its first part. Labels: the 14
                  observations in the CSV's order, raw (1 positive, 0 negative, -1 uncertain,
                  blank -> NaN): the U-ones / U-zeros policy is the downstream task's. Views
                  (option `views`, default ('frontal',); ('frontal', 'lateral') for both) by
                  Frontal/Lateral; view = AP/PA's value (AP, PA, LL, RL), else 'LATERAL' for a
                  lateral, '' for a frontal without it. Splits (selection='official', the
                  default): valid.csv -> test (MGCA and GLoRIA evaluate on the official
                  validation set); train.csv -> train / validation, 5% of the patients by hash
                  (`image_folder.hash_split`). selection='5x200' (GLoRIA's CheXpert 5x200):
                  for each of Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural
                  Effusion, `per_class` (default 200) train.csv images (of the asked views)
                  positive (1) for that class and negative (0 or blank, not -1) for the other
                  four, drawn with the fixed seed CHEXPERT_5X200_SEED (np.random.default_rng(
                  [seed, class index]), without replacement, from the candidates in CSV
                  order): disjoint across classes by construction, they are the test split;
                  label_names are exactly the five classes. The rest of train.csv is train /
                  validation by patient hash, LESS the other images of the test images'
                  patients (counted: left_out_same_patient_as_test), so no patient is in two
                  splits; valid.csv is not read. No regions.
  rsna_pneumonia  RSNA Pneumonia Detection Challenge (Kaggle, 2018). Read:
                  stage_2_train_labels.csv (patientId, x, y, width, height, Target; one row per
                  box, several per image; a Target 0 row has an empty box) and the DICOMs
                  stage_2_train_images/<patientId>.dcm; stage_2_detailed_class_info.csv
                  (patientId, class) when present, only for the summary's class counts.
                  labels [Pneumonia] = Target; one region per box (region_names
                  ['pneumonia']), box (x, y, x + width, y + height), mask its rectangle (MGCA's
                  segmentation from boxes). patient = study = id = patientId (the challenge's
                  anonymous image id). Splits 70/15/15 by patientId hash (MGCA's 70/15/15).
  siim_acr        SIIM-ACR Pneumothorax Segmentation (Kaggle, 2019). Read: train-rle.csv
                  (ImageId, EncodedPixels; '-1' = no pneumothorax; one row per region, several
                  per image) and the DICOMs dicom-images-train/**/<ImageId>.dcm (found by a
                  recursive search). EncodedPixels is the competition's run-length format
                  (its mask_functions.py): pairs (start, length), each start an offset from the
                  END of the previous run (the first from pixel 0), over the pixels in
                  COLUMN-major order (pixel (row y, column x) is number x * height + y);
                  decoded at the DICOM's size (a run past its last pixel is an error naming the
                  line). labels [Pneumothorax]; one region per RLE row (region_names
                  ['pneumothorax']), box = its mask's bounding box. A row repeated verbatim for
                  an image is counted (duplicate_rows) and written once. The DICOM's PatientID
                  is identifying: it is read only to split (its hash, never stored; an image
                  without one is split by its ImageId), and patient = study = id = ImageId.
                  Splits 70/15/15 by that hash.
  object_cxr      Object-CXR (JF Healthcare, MIDL 2020 challenge; foreign objects). Read:
                  train.csv and dev.csv (image_name, annotation) and the images
                  train/<image_name> and dev/<image_name> ('.jpg' added to a name without
                  suffix). annotation '' = no object, else ';'-separated objects
                  'type x1 y1 x2 y2 ...': type 0 a rectangle (x1 y1 x2 y2), 1 an ellipse (in its
                  bounding box x1 y1 x2 y2), 2 a polygon (x y pairs); pixels of the image,
                  (x2, y2) the exclusive corner. One region per object (region_names
                  ['foreign_object']): box = its bounding box, mask = the filled rectangle /
                  ellipse / polygon (skimage.draw, pixel centres). labels [foreign_object]
                  (any object listed). No patient ids: patient = study = id = the image name's
                  stem. Splits: dev -> test; train -> train / validation, 10% by hash.
  covidx          COVIDx CXR (COVID-Net; Wang et al., 2020), v9 and later ('patient_id
                  filename class source' per line, class positive / negative) or earlier
                  ('patient_id filename class [source]', class normal / pneumonia /
                  COVID-19). Read: train.txt, test.txt and val.txt when there (or one
                  train_COVIDx*.txt / test_COVIDx*.txt / val_COVIDx*.txt each), whitespace-
                  separated, 3 or 4 fields a line; images train/<filename>, test/<filename>,
                  val/<filename>. Classes are the class column's values over the files: in
                  COVID-Net's order for the known sets ((negative, positive); (normal,
                  pneumonia, COVID-19)), else sorted; metadata class_names = label_names =
                  them, labels one-hot (downstream reads the class as the argmax). patient =
                  '<source>/<patient_id>' (ids are per source) or patient_id without a source
                  column. Splits: test.txt -> test; val.txt -> validation when there; else
                  train.txt -> train / validation, 10% of the patients by hash.

Every builder: a release file or folder that is absent is a `builders.ManualDirError` naming it
(with the download instructions); a missing CSV column an error naming the file and column; a
bad value an error naming the file, line (and column); an image listed but absent an error
naming its path and the listing's line (default missing_files='error'; 'skip' leaves it out
and counts it). Splits are checked patient-disjoint (`bags.check_patient_splits`). Option
values other than the defaults make a separate builder config (its own folder).
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import math
import os
import re
from typing import Iterator, Sequence

import numpy as np

from data_prep import image_folder
from medguide_jax.data import builders
from medguide_jax.data import cxr_findings
from medguide_jax.data import reports

SPLITS = ("train", "validation", "test")
FormatError = cxr_findings.FindingsFormatError
Item, Region = cxr_findings.Item, cxr_findings.Region


def _require(path: str, instructions: str, folder: bool = False) -> str:
  """`path` if it is there; else a ManualDirError naming it."""
  there = os.path.isdir(path) if folder else os.path.isfile(path)
  if not there:
    kind = "folder" if folder else "file"
    raise builders.ManualDirError(f"{path}: {kind} not found in the manual dir.\n"
                                  f"{instructions}")
  return path


def _rows(path: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
  """(line, row) of a CSV table; a missing column is an error naming the file and column."""
  return reports.read_csv_rows(path, required)


def _float(text: str, where: str, column: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not math.isfinite(value):
    raise FormatError(f"{where}, column {column!r}: {text!r} is not a number")
  return value


# ---------------------------------------------------------------------------------------------
# CheXpert

CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
                   "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                   "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                   "Support Devices")
CHEXPERT_5X200 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CHEXPERT_5X200_SEED = 42
CHEXPERT_RELEASES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
CHEXPERT_COLUMNS = ("Path", "Frontal/Lateral", "AP/PA") + CHEXPERT_LABELS
CHEXPERT_VALUES = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0,
                   "": math.nan}
CHEXPERT_VALIDATION = 0.05
CHEXPERT_SELECTIONS = ("official", "5x200")
CHEXPERT_VIEWS = ("frontal", "lateral")

CHEXPERT_INSTRUCTIONS = """\
CheXpert v1.0 (Stanford ML Group, https://stanfordmlgroup.github.io/competitions/chexpert/;
Stanford University School of Medicine CheXpert Dataset Research Use Agreement). Unzip
CheXpert-v1.0-small.zip (or the full CheXpert-v1.0); the manual dir is the release folder
(holding train.csv, valid.csv, train/, valid/) or the folder above it.
  python -m data_prep.build chexpert --manual_dir=<manual_dir> --data_dir=<data_dir> \\
      [--option views=frontal,lateral] [--option selection=5x200] [--option max_side=512]
"""


@dataclasses.dataclass(eq=False)
class CheXpertConfig(cxr_findings.FindingsConfig):
  """CheXpert's options (module docstring): views, selection ('official' | '5x200'),
  per_class (the 200 of 5x200)."""
  views: tuple[str, ...] = ("frontal",)
  selection: str = "official"
  per_class: int = 200

  @classmethod
  def canonical(cls, values: dict) -> dict:
    out = super().canonical(values)
    views = [out["views"]] if isinstance(out["views"], str) else list(out["views"])
    out["views"] = tuple(sorted({cxr_findings.choice("views", v, CHEXPERT_VIEWS)
                                 for v in views}))
    if not out["views"]:
      raise ValueError(f"views=(): name at least one of {list(CHEXPERT_VIEWS)}")
    out["selection"] = cxr_findings.choice("selection", out["selection"], CHEXPERT_SELECTIONS)
    out["per_class"] = int(out["per_class"])
    if out["per_class"] < 1:
      raise ValueError(f"per_class={out['per_class']}: use a count >= 1")
    if out["selection"] == "official" and out["per_class"] != cls.per_class:
      raise ValueError(f"per_class={out['per_class']} is an option of selection='5x200' "
                       "(the official selection takes every image)")
    return out


@dataclasses.dataclass
class CheXpertRow:
  where: str
  path: str                 # as the CSV gives it
  patient: str
  study: str
  lateral: bool
  view: str
  labels: np.ndarray        # float32 [14], CHEXPERT_LABELS order
  image: str = ""           # the file, once found

  def value(self, name: str) -> float:
    return float(self.labels[CHEXPERT_LABELS.index(name)])


_CHEXPERT_PATH = re.compile(r"(?:^|/)(patient\d+)/(study\d+)/[^/]+$")


def read_chexpert_csv(path: str) -> list[CheXpertRow]:
  """The rows of train.csv / valid.csv; errors name the file, line and column."""
  out = []
  for line, row in _rows(path, CHEXPERT_COLUMNS):
    where = f"{path} line {line}"
    m = _CHEXPERT_PATH.search(row["Path"].replace("\\", "/"))
    if m is None:
      raise FormatError(f"{where}, column 'Path': {row['Path']!r} is not "
                        "'.../patientNNNNN/studyN/<image>'")
    side = row["Frontal/Lateral"].lower()
    if side not in CHEXPERT_VIEWS:
      raise FormatError(f"{where}, column 'Frontal/Lateral': {row['Frontal/Lateral']!r}; "
                        "expected Frontal or Lateral")
    labels = np.empty(len(CHEXPERT_LABELS), np.float32)
    for j, name in enumerate(CHEXPERT_LABELS):
      value = CHEXPERT_VALUES.get(row[name])
      if value is None:
        raise FormatError(f"{where}, column {name!r}: {row[name]!r}; expected 1.0, 0.0, -1.0 "
                          "or blank")
      labels[j] = value
    lateral = side == "lateral"
    view = row["AP/PA"].upper() or ("LATERAL" if lateral else "")
    out.append(CheXpertRow(where, row["Path"].replace("\\", "/"), m.group(1),
                           f"{m.group(1)}/{m.group(2)}", lateral, view, labels))
  return out


def find_chexpert_release(root: str) -> str:
  """The release folder: `root` itself or CheXpert-v1.0-small/ or CheXpert-v1.0/ under it,
  the first holding train.csv."""
  for candidate in (root, *(os.path.join(root, r) for r in CHEXPERT_RELEASES)):
    if os.path.isfile(os.path.join(candidate, "train.csv")):
      return candidate
  looked = ", ".join(os.path.join(c, "train.csv") for c in
                     (root, *(os.path.join(root, r) for r in CHEXPERT_RELEASES)))
  raise builders.ManualDirError(f"{root}: no CheXpert release (looked for {looked}).\n"
                                f"{CHEXPERT_INSTRUCTIONS}")


def chexpert_image_paths(release: str, path: str) -> list[str]:
  """Where a CSV Path may be: under the folder above the release, else under the release
  folder with the Path's first part (the release folder's original name) dropped."""
  parts = path.split("/")
  return [os.path.join(os.path.dirname(os.path.abspath(release)), *parts),
          os.path.join(release, *parts[1:])]


def select_5x200(rows: Sequence[CheXpertRow], per_class: int,
                 seed: int = CHEXPERT_5X200_SEED) -> dict[str, list[CheXpertRow]]:
  """class -> its `per_class` rows, positive for it and 0 / blank for the other four
  (module docstring). Too few candidates is an error naming the class and the count."""
  out = {}
  for j, name in enumerate(CHEXPERT_5X200):
    others = [o for o in CHEXPERT_5X200 if o != name]
    candidates = [r for r in rows if r.value(name) == 1 and all(
        r.value(o) == 0 or math.isnan(r.value(o)) for o in others)]
    if len(candidates) < per_class:
      raise ValueError(f"CheXpert 5x200: only {len(candidates)} train.csv images of the asked "
                       f"views are positive for {name} and 0 or blank for {others}; "
                       f"per_class={per_class}")
    chosen = np.random.default_rng([seed, j]).choice(len(candidates), per_class,
                                                     replace=False)
    out[name] = [candidates[i] for i in sorted(chosen)]
  return out


class CheXpert(cxr_findings.FindingsBuilder):
  """CheXpert chest X-rays with 14 observation labels (data_prep/cxr_downstream.py)."""

  name = "chexpert"
  MANUAL_DOWNLOAD_INSTRUCTIONS = CHEXPERT_INSTRUCTIONS
  CONFIG_CLASS = CheXpertConfig
  BUILDER_CONFIGS = [CheXpertConfig(
      name="default", description="Frontal views; valid.csv as test; PNG long side <= 512.")]

  def __init__(self, *, views: Sequence[str] | None = None, selection: str | None = None,
               per_class: int | None = None, max_side: int | None = None,
               missing_files: str | None = None, **kwargs):
    """Usual TFDS kwargs, plus the options of CheXpertConfig (None: the default's)."""
    super().__init__(**self._configured(kwargs, views=views, selection=selection,
                                        per_class=per_class, max_side=max_side,
                                        missing_files=missing_files))

  def _read(self, release: str, name: str) -> list[CheXpertRow]:
    """The rows of CSV `name` of the asked views whose image is there (`image` set)."""
    path = _require(os.path.join(release, name), CHEXPERT_INSTRUCTIONS)
    kept = []
    for r in read_chexpert_csv(path):
      if ("lateral" if r.lateral else "frontal") not in self.options.views:
        continue
      image = next((p for p in chexpert_image_paths(release, r.path) if os.path.isfile(p)),
                   None)
      if image is None:
        self.missing(chexpert_image_paths(release, r.path)[0], r.where)
        continue
      kept.append(dataclasses.replace(r, image=image))
    return kept

  def _split_generators(self, dl_manager):
    release = find_chexpert_release(os.fspath(dl_manager.manual_dir))
    options = self.options
    train = self._read(release, "train.csv")
    extra = {"views": list(options.views), "selection": options.selection,
             "labels": "raw: 1 positive, 0 negative, -1 uncertain, NaN blank"}
    if options.selection == "official":
      names = CHEXPERT_LABELS
      by_split = {"train": [], "validation": [],
                  "test": [self._item(r, names) for r in self._read(release, "valid.csv")]}
      for r in train:
        by_split[image_folder.hash_split(r.patient, CHEXPERT_VALIDATION, 0.0)].append(
            self._item(r, names))
      extra["split"] = ("valid.csv -> test; train.csv -> train / validation, "
                        f"{CHEXPERT_VALIDATION:.0%} of the patients by hash")
    else:
      names = CHEXPERT_5X200
      chosen = select_5x200(train, options.per_class)
      test_rows = [r for rows in chosen.values() for r in rows]
      taken, test_patients = {r.where for r in test_rows}, {r.patient for r in test_rows}
      by_split = {"train": [], "validation": [],
                  "test": [self._item(r, names) for r in test_rows]}
      same_patient = 0
      for r in train:
        if r.where in taken:
          continue
        if r.patient in test_patients:
          same_patient += 1
          continue
        by_split[image_folder.hash_split(r.patient, CHEXPERT_VALIDATION, 0.0)].append(
            self._item(r, names))
      extra.update(per_class=options.per_class, seed=CHEXPERT_5X200_SEED,
                   left_out_same_patient_as_test=same_patient,
                   test_per_class={k: len(v) for k, v in chosen.items()},
                   split=(f"5x200 (GLoRIA): {options.per_class} train.csv images per class "
                          "as test; the rest of train.csv (less the test patients' other "
                          f"images) -> train / validation, {CHEXPERT_VALIDATION:.0%} of the "
                          "patients by hash; valid.csv not read"))
    return self.splits(by_split, label_names=names, region_names=[], summary=extra)

  @staticmethod
  def _item(r: CheXpertRow, names: Sequence[str]) -> Item:
    labels = np.asarray([r.value(n) for n in names], np.float32)
    return Item(id="/".join(r.path.split("/")[1:]), path=r.image, where=r.where, labels=labels,
                study=r.study, patient=r.patient, view=r.view)


# ---------------------------------------------------------------------------------------------
# RSNA Pneumonia

RSNA_LABELS_CSV = "stage_2_train_labels.csv"
RSNA_CLASS_CSV = "stage_2_detailed_class_info.csv"
RSNA_IMAGES = "stage_2_train_images"
HASH_70_15_15 = (0.15, 0.15)   # (validation, test) fractions of `image_folder.hash_split`

RSNA_INSTRUCTIONS = f"""\
RSNA Pneumonia Detection Challenge (Kaggle; the competition's rules):
  https://www.kaggle.com/c/rsna-pneumonia-detection-challenge
The manual dir holds, unzipped:
  {RSNA_LABELS_CSV}, {RSNA_CLASS_CSV} (optional), {RSNA_IMAGES}/<patientId>.dcm
  python -m data_prep.build rsna_pneumonia --manual_dir=<manual_dir> --data_dir=<data_dir>
"""


def read_rsna_labels(path: str) -> dict[str, tuple[str, int, list[tuple[float, ...]]]]:
  """patientId -> (its first line, Target, [boxes (x0, y0, x1, y1)]), in file order. Errors
  name the file and line: a Target other than 0 / 1, one image given both, a Target 1 row
  without a box, a Target 0 row with one."""
  out: dict[str, tuple[str, int, list]] = {}
  box_columns = ("x", "y", "width", "height")
  for line, row in _rows(path, ("patientId",) + box_columns + ("Target",)):
    where = f"{path} line {line}"
    pid = row["patientId"]
    if not pid:
      raise FormatError(f"{where}: empty patientId")
    if row["Target"] not in ("0", "1"):
      raise FormatError(f"{where}, column 'Target': {row['Target']!r}; expected 0 or 1")
    target = int(row["Target"])
    first, known, boxes = out.setdefault(pid, (where, target, []))
    if known != target:
      raise FormatError(f"{where}: patientId {pid} has Target {target} here but {known} at "
                        f"{first}")
    given = [row[c] for c in box_columns]
    if target == 0:
      if any(given):
        raise FormatError(f"{where}: a Target 0 row with a box {given}")
      continue
    x, y, w, h = (_float(v, where, c) for v, c in zip(given, box_columns))
    boxes.append((x, y, x + w, y + h))
  if not out:
    raise FormatError(f"{path}: no row")
  return out


def read_rsna_classes(path: str) -> dict[str, int]:
  """class -> number of images of stage_2_detailed_class_info.csv."""
  per_image = {}
  for line, row in _rows(path, ("patientId", "class")):
    if per_image.setdefault(row["patientId"], row["class"]) != row["class"]:
      raise FormatError(f"{path} line {line}: patientId {row['patientId']} is "
                        f"{row['class']!r} here, {per_image[row['patientId']]!r} above")
  return dict(collections.Counter(per_image.values()))


class RsnaPneumonia(cxr_findings.FindingsBuilder):
  """RSNA Pneumonia Detection Challenge: labels and boxes (data_prep/cxr_downstream.py)."""

  name = "rsna_pneumonia"
  MANUAL_DOWNLOAD_INSTRUCTIONS = RSNA_INSTRUCTIONS
  BUILDER_CONFIGS = [cxr_findings.FindingsConfig(
      name="default", description="70/15/15 by patientId hash; PNG long side <= 512.")]

  def __init__(self, *, max_side: int | None = None, missing_files: str | None = None,
               **kwargs):
    """Usual TFDS kwargs, plus the options of FindingsConfig (None: the default's)."""
    super().__init__(**self._configured(kwargs, max_side=max_side,
                                        missing_files=missing_files))

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    labels = read_rsna_labels(_require(os.path.join(root, RSNA_LABELS_CSV), RSNA_INSTRUCTIONS))
    images_dir = _require(os.path.join(root, RSNA_IMAGES), RSNA_INSTRUCTIONS, folder=True)
    classes_csv = os.path.join(root, RSNA_CLASS_CSV)
    by_split = {s: [] for s in SPLITS}
    for pid, (where, target, boxes) in labels.items():
      path = os.path.join(images_dir, f"{pid}.dcm")
      if not self.found(path, where):
        continue
      item = Item(id=pid, path=path, where=where, labels=np.array([target], np.float32),
                  study=pid, patient=pid,
                  regions=[Region(0, box=b, shape="box") for b in boxes])
      by_split[image_folder.hash_split(pid, *HASH_70_15_15)].append(item)
    return self.splits(by_split, label_names=["Pneumonia"], region_names=["pneumonia"],
                       summary={
        "split": "70/15/15 by patientId hash (MGCA's proportions)",
        "masks": "each box's rectangle",
        "detailed_classes": (read_rsna_classes(classes_csv) if os.path.isfile(classes_csv)
                             else f"{RSNA_CLASS_CSV} absent")})


# ---------------------------------------------------------------------------------------------
# SIIM-ACR Pneumothorax

SIIM_RLE_CSV = "train-rle.csv"
SIIM_IMAGES = "dicom-images-train"

SIIM_INSTRUCTIONS = f"""\
SIIM-ACR Pneumothorax Segmentation (Kaggle; the competition's rules):
  https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation
The manual dir holds:
  {SIIM_RLE_CSV}, {SIIM_IMAGES}/<study>/<series>/<ImageId>.dcm (any depth)
  python -m data_prep.build siim_acr --manual_dir=<manual_dir> --data_dir=<data_dir>
"""


def parse_rle(text: str, where: str) -> np.ndarray:
  """int64 [R, 2] (start offset, length) pairs of an EncodedPixels value; an error naming
  `where` when it is not pairs of non-negative integers."""
  try:
    values = np.asarray([int(v) for v in text.split()], np.int64)
  except ValueError:
    raise FormatError(f"{where}, column 'EncodedPixels': not integers: {text[:60]!r}") \
        from None
  if len(values) == 0 or len(values) % 2 or (values < 0).any():
    raise FormatError(f"{where}, column 'EncodedPixels': want (start, length) pairs of "
                      f"non-negative integers, got {len(values)} values")
  return values.reshape(-1, 2)


def decode_rle(pairs: np.ndarray, height: int, width: int, where: str = "") -> np.ndarray:
  """bool [height, width] of the competition's run-length pairs (module docstring: each start
  relative to the end of the previous run; pixels column-major)."""
  flat = np.zeros(height * width, bool)
  position = 0
  for start, length in np.asarray(pairs, np.int64).reshape(-1, 2):
    position += int(start)
    end = position + int(length)
    if end > flat.size:
      raise FormatError(f"{where}: the run ends at pixel {end}, past the image's "
                        f"{width}x{height} = {flat.size} pixels")
    flat[position:end] = True
    position = end
  return flat.reshape(width, height).T


def index_dicoms(folder: str) -> dict[str, str]:
  """stem -> path of every .dcm under `folder` (any depth); a stem twice is an error."""
  out = {}
  for parent, dirs, files in os.walk(folder):
    dirs.sort()
    for f in sorted(files):
      if f.lower().endswith(".dcm"):
        stem = f[:-4]
        if stem in out:
          raise FormatError(f"{os.path.join(parent, f)}: ImageId {stem} also at {out[stem]}")
        out[stem] = os.path.join(parent, f)
  return out


def _split_key(path: str, image_id: str) -> str:
  """The DICOM's PatientID (for hashing only, never stored), else the ImageId."""
  import pydicom  # pylint: disable=g-import-not-at-top
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"],
                         force=True)
  except Exception as e:  # pylint: disable=broad-except
    raise FormatError(f"{path} cannot be read as DICOM: {e}") from e
  return str(ds.get("PatientID", "") or "").strip() or image_id


class SiimAcr(cxr_findings.FindingsBuilder):
  """SIIM-ACR Pneumothorax: labels and segmentation masks (data_prep/cxr_downstream.py)."""

  name = "siim_acr"
  MANUAL_DOWNLOAD_INSTRUCTIONS = SIIM_INSTRUCTIONS
  BUILDER_CONFIGS = [cxr_findings.FindingsConfig(
      name="default", description="70/15/15 by patient hash; PNG long side <= 512.")]

  def __init__(self, *, max_side: int | None = None, missing_files: str | None = None,
               **kwargs):
    """Usual TFDS kwargs, plus the options of FindingsConfig (None: the default's)."""
    super().__init__(**self._configured(kwargs, max_side=max_side,
                                        missing_files=missing_files))

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    csv_path = _require(os.path.join(root, SIIM_RLE_CSV), SIIM_INSTRUCTIONS)
    dicoms = index_dicoms(_require(os.path.join(root, SIIM_IMAGES), SIIM_INSTRUCTIONS,
                                   folder=True))
    rows = collections.OrderedDict()   # ImageId -> (first line, [(line, RLE text)])
    for line, row in _rows(csv_path, ("ImageId", "EncodedPixels")):
      where = f"{csv_path} line {line}"
      rows.setdefault(row["ImageId"], (where, []))[1].append((where, row["EncodedPixels"]))
    by_split, duplicates = {s: [] for s in SPLITS}, 0
    without_patient_id = 0
    for image_id, (where, entries) in rows.items():
      regions, seen = self._regions(entries)
      duplicates += len(entries) - seen
      if image_id not in dicoms:
        self.missing(os.path.join(root, SIIM_IMAGES, "**", f"{image_id}.dcm"), where)
        continue
      key = _split_key(dicoms[image_id], image_id)
      without_patient_id += key == image_id
      item = Item(id=image_id, path=dicoms[image_id], where=where,
                  labels=np.array([float(bool(regions))], np.float32), study=image_id,
                  patient=image_id, regions=regions)
      by_split[image_folder.hash_split(key, *HASH_70_15_15)].append(item)
    return self.splits(by_split, label_names=["Pneumothorax"], region_names=["pneumothorax"],
                       summary={
        "split": "70/15/15 by a hash of the DICOM's PatientID (not stored; patient = ImageId)",
        "images_without_patient_id": without_patient_id,
        "duplicate_rows": duplicates,
        "dicoms_not_in_table": len(set(dicoms) - set(rows))})

  @staticmethod
  def _regions(entries: Sequence[tuple[str, str]]) -> tuple[list[Region], int]:
    """(the regions of an image's rows, how many distinct rows). '-1' with a mask for one
    image is an error naming both lines."""
    regions, texts = [], {}
    for where, text in entries:
      canonical = " ".join(text.split())
      if canonical in texts:
        continue
      if canonical == "-1" and regions or canonical != "-1" and "-1" in texts:
        other = texts.get("-1") or next(iter(texts.values()))
        raise FormatError(f"{where}: '-1' (no pneumothorax) and a mask for one image "
                          f"(the other at {other})")
      texts[canonical] = where
      if canonical == "-1":
        continue
      pairs = parse_rle(canonical, where)
      regions.append(Region(0, shape="raster",
                            mask=lambda h, w, p=pairs, at=where: decode_rle(p, h, w, at)))
    return regions, len(texts)


# ---------------------------------------------------------------------------------------------
# Object-CXR

OBJECT_CXR_SPLITS = {"train": "train.csv", "dev": "dev.csv"}
OBJECT_CXR_VALIDATION = 0.1
OBJECT_SHAPES = {0: "box", 1: "ellipse", 2: "polygon"}

OBJECT_CXR_INSTRUCTIONS = """\
Object-CXR (JF Healthcare, https://jfhealthcare.github.io/object-CXR/; CC BY-NC 4.0). The manual
dir holds, unzipped: train.csv, dev.csv, train/<image_name>, dev/<image_name>.
  python -m data_prep.build object_cxr --manual_dir=<manual_dir> --data_dir=<data_dir>
"""


def parse_objects(text: str, where: str) -> list[Region]:
  """The regions of an Object-CXR annotation (module docstring); errors name `where` and the
  object."""
  regions = []
  for k, part in enumerate(p for p in text.split(";") if p.strip()):
    tokens = part.split()
    try:
      kind, coords = int(tokens[0]), [float(t) for t in tokens[1:]]
    except ValueError:
      raise FormatError(f"{where}, object {k + 1}: {part.strip()!r} is not 'type x y ...' "
                        "numbers") from None
    if kind not in OBJECT_SHAPES:
      raise FormatError(f"{where}, object {k + 1}: type {kind}; expected 0 (rectangle), "
                        "1 (ellipse) or 2 (polygon)")
    shape = OBJECT_SHAPES[kind]
    if shape == "polygon":
      if len(coords) < 6 or len(coords) % 2:
        raise FormatError(f"{where}, object {k + 1}: a polygon needs 3 or more x y pairs, "
                          f"got {len(coords)} values")
      regions.append(Region(0, shape="polygon", points=np.asarray(coords).reshape(-1, 2)))
      continue
    if len(coords) != 4:
      raise FormatError(f"{where}, object {k + 1}: a {shape} needs x1 y1 x2 y2, got "
                        f"{len(coords)} values")
    x1, y1, x2, y2 = coords
    regions.append(Region(0, box=(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)),
                          shape=shape))
  return regions


class ObjectCxr(cxr_findings.FindingsBuilder):
  """Object-CXR: foreign objects on chest X-rays, boxes and masks (data_prep/cxr_downstream.py)."""

  name = "object_cxr"
  MANUAL_DOWNLOAD_INSTRUCTIONS = OBJECT_CXR_INSTRUCTIONS
  BUILDER_CONFIGS = [cxr_findings.FindingsConfig(
      name="default", description="dev as test; train 90/10 by hash; PNG long side <= 512.")]

  def __init__(self, *, max_side: int | None = None, missing_files: str | None = None,
               **kwargs):
    """Usual TFDS kwargs, plus the options of FindingsConfig (None: the default's)."""
    super().__init__(**self._configured(kwargs, max_side=max_side,
                                        missing_files=missing_files))

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    by_split = {s: [] for s in SPLITS}
    for part, csv_name in OBJECT_CXR_SPLITS.items():
      csv_path = _require(os.path.join(root, csv_name), OBJECT_CXR_INSTRUCTIONS)
      folder = _require(os.path.join(root, part), OBJECT_CXR_INSTRUCTIONS, folder=True)
      for line, row in _rows(csv_path, ("image_name", "annotation")):
        where = f"{csv_path} line {line}"
        name = row["image_name"]
        if not name:
          raise FormatError(f"{where}: empty image_name")
        filename = name if os.path.splitext(name)[1] else f"{name}.jpg"
        path = os.path.join(folder, filename)
        regions = parse_objects(row["annotation"], where)
        if not self.found(path, where):
          continue
        stem = os.path.splitext(filename)[0]
        split = "test" if part == "dev" else image_folder.hash_split(
            stem, OBJECT_CXR_VALIDATION, 0.0)
        by_split[split].append(Item(
            id=f"{part}/{filename}", path=path, where=where, study=stem, patient=stem,
            labels=np.array([float(bool(regions))], np.float32), regions=regions))
    return self.splits(by_split, label_names=["foreign_object"],
                       region_names=["foreign_object"], summary={
        "split": f"dev.csv -> test; train.csv -> train / validation, "
                 f"{OBJECT_CXR_VALIDATION:.0%} by hash of the image name",
        "patients": "Object-CXR has no patient ids: one image = one patient"})


# ---------------------------------------------------------------------------------------------
# COVIDx

COVIDX_FILES = {"train": "train", "test": "test", "validation": "val"}   # split -> file stem
COVIDX_CLASS_ORDERS = (("negative", "positive"), ("normal", "pneumonia", "COVID-19"))
COVIDX_VALIDATION = 0.1

COVIDX_INSTRUCTIONS = """\
COVIDx CXR (COVID-Net, https://github.com/lindawangg/COVID-Net, the Kaggle 'COVIDx CXR-3/4'
releases; each source's licence). The manual dir holds the split files train.txt, test.txt
(val.txt when the release has it; or train_COVIDx*.txt ...) and the image folders train/,
test/ (val/).
  python -m data_prep.build covidx --manual_dir=<manual_dir> --data_dir=<data_dir>
"""


@dataclasses.dataclass
class CovidxLine:
  where: str
  patient: str
  filename: str
  label: str


def find_covidx_file(root: str, stem: str, required: bool) -> str | None:
  """<stem>.txt, else the one <stem>_COVIDx*.txt; None (or a ManualDirError if `required`)."""
  exact = os.path.join(root, f"{stem}.txt")
  if os.path.isfile(exact):
    return exact
  matches = sorted(glob.glob(os.path.join(root, f"{stem}_COVIDx*.txt")))
  if len(matches) > 1:
    raise FormatError(f"{root}: several {stem} split files {matches}; keep one")
  if matches:
    return matches[0]
  if required:
    _require(exact, COVIDX_INSTRUCTIONS)
  return None


def read_covidx(path: str) -> list[CovidxLine]:
  """The lines of a COVIDx split file: 'patient_id filename class [source]'."""
  out = []
  with open(path, "rb") as f:
    content = reports.Decoder()(f.read(), path)   # not UTF-8: an error naming the offset
  for line, text in enumerate(content.splitlines(), 1):
    fields = text.split()
    if not fields:
      continue
    if len(fields) not in (3, 4):
      raise FormatError(f"{path} line {line}: {len(fields)} fields; expected 'patient_id "
                        "filename class source' (or 3 without the source)")
    patient = fields[0] if len(fields) == 3 else f"{fields[3]}/{fields[0]}"
    out.append(CovidxLine(f"{path} line {line}", patient, fields[1], fields[2]))
  if not out:
    raise FormatError(f"{path}: no line")
  return out


def covidx_classes(labels: Sequence[str]) -> list[str]:
  """The class names of a release's class column values (module docstring)."""
  found = {v.lower() for v in labels}
  for order in COVIDX_CLASS_ORDERS:
    if found <= {c.lower() for c in order} and len(found) > 1:
      return list(order)
  return sorted(set(labels))


class Covidx(cxr_findings.FindingsBuilder):
  """COVIDx CXR: COVID-19 classification, one-hot labels (data_prep/cxr_downstream.py)."""

  name = "covidx"
  MANUAL_DOWNLOAD_INSTRUCTIONS = COVIDX_INSTRUCTIONS
  BUILDER_CONFIGS = [cxr_findings.FindingsConfig(
      name="default", description="test.txt as test; PNG long side <= 512.")]

  def __init__(self, *, max_side: int | None = None, missing_files: str | None = None,
               **kwargs):
    """Usual TFDS kwargs, plus the options of FindingsConfig (None: the default's)."""
    super().__init__(**self._configured(kwargs, max_side=max_side,
                                        missing_files=missing_files))

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    lines = {}
    for split, stem in COVIDX_FILES.items():
      path = find_covidx_file(root, stem, required=split != "validation")
      if path:
        lines[split] = (stem, path, read_covidx(path))
    classes = covidx_classes([x.label for _, _, rows in lines.values() for x in rows])
    index = {c.lower(): j for j, c in enumerate(classes)}
    by_split = {s: [] for s in SPLITS}
    for split, (stem, _, rows) in lines.items():
      folder = _require(os.path.join(root, stem), COVIDX_INSTRUCTIONS, folder=True)
      for x in rows:
        path = os.path.join(folder, x.filename)
        if not self.found(path, x.where):
          continue
        labels = np.zeros(len(classes), np.float32)
        labels[index[x.label.lower()]] = 1.0
        target = split if split != "train" or "validation" in lines else \
            image_folder.hash_split(x.patient, COVIDX_VALIDATION, 0.0)
        by_split[target].append(Item(id=f"{stem}/{x.filename}", path=path, where=x.where,
                                     labels=labels, study=f"{stem}/{x.filename}",
                                     patient=x.patient))
    return self.splits(by_split, label_names=classes, region_names=[], class_names=classes,
                       summary={
        "split": ("official train / val / test files" if "validation" in lines else
                  f"test.txt -> test; train.txt -> train / validation, "
                  f"{COVIDX_VALIDATION:.0%} of the patients by hash"),
        "labels": "one-hot over class_names (the class is the argmax)",
        "files": {s: os.path.basename(path) for s, (_, path, _) in lines.items()}})
