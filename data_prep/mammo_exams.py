"""Real mammography exams as GLAM records: NYU-style exam lists and CBIS-DDSM.

Every builder writes the GLAM record schema of `medguide_jax.data.synthetic_mammo` (one view per
record: the preprocessed 16-bit image, not standardised; image-level benign / malignant labels;
per-class lesion masks as 8-bit {0,255} PNGs, b'' with has_<class>_mask = 0 where there is none,
so Dice leaves them out; id, view, source 'mammo') after the GLAM preprocessing of
`medguide_jax.data.mammo.preprocess_view` (crop to the breast, optimal centre window, flip so
every breast faces the same way; Liu et al., MIDL 2021; nyukat/GLAM src/cropping,
src/optimal_centers, src/data_loading).

Image size (a builder config, so sizes never share files): the default is the paper's
2944 x 1920. `tag='x<k>'` (`python -m data_prep.build nyu_mammo:x8`) or
`image_shape=(2944 // k, 1920 // k)` divides both sides by k (x8: 368 x 240, for CPU runs): the
geometry is computed at 2944 x 1920, then the image is mean-pooled and the masks
majority-pooled over k x k blocks (`mammo.preprocess_view`). The size is in the metadata as
`image_shape`; `class_names` are ('benign', 'malignant').

  nyu_mammo        the layout of the NYU GLAM / GMIC / breast_cancer_classifier releases. The
                   manual dir holds the exam list (`exam_list_before_cropping.pkl` or `data.pkl`,
                   or the file named by `exam_list=`), `images/<name>.png` (raw 16-bit PNGs)
                   and optionally `segmentation/<name>_<benign|malignant>.png` (masks in the
                   final 2944 x 1920 geometry, as GLAM's sample_data; an exam's
                   `<view>_<class>_seg` entry names them when present). Views L-CC, R-CC,
                   L-MLO, R-MLO; labels are breast-level (`cancer_label`), given to each view of
                   that breast (`mammo.view_labels`). Record id: the image name. An image the
                   exam list names but the folder lacks is skipped with one warning listing
                   them (the public samples ship only some views); no image at all is an error.
                   Splits are by exam: `splits.csv` (columns exam,split) when present, else
                   80/10/10 by hash of the exam key (`patient_id`, else `exam_id`, else the
                   exam's 0-based position in the list). With fewer than 10 exams that have an
                   image the data is evaluation-only: every image is in all three splits, and
                   the description and `metadata['evaluation_only']` say so.
  nyu_glam_sample  nyu_mammo over ../shared/data/mammo_nyu_glam_sample (GLAM's sample_data:
                   exam 0's four views, masks of 0_R-CC and 0_R-MLO benign).
  nyu_bcc_sample   nyu_mammo over ../shared/data/mammo_nyu_bcc_cc_views (breast_cancer_
                   classifier's sample exams 1-2, CC views only, data.pkl, no masks).
  cbis_ddsm        CBIS-DDSM (Lee et al., Sci Data 2017; TCIA) as downloaded: the four case
                   description CSVs and the DICOM tree. One record per (patient, side, view):
                   benign = any BENIGN or BENIGN_WITHOUT_CALLBACK abnormality, malignant = any
                   MALIGNANT, over the mass and calc CSVs together; masks = union per class of
                   the ROI masks, preprocessed with the image (raw geometry). Splits: the
                   official test CSVs are test; the train CSVs are train with a 10% validation
                   holdout by hash of patient_id. A patient in a test CSV is a test patient
                   (also their rows of the train CSVs, logged), so no patient crosses splits.
                   Which way a breast points is read from the image (the brighter half is
                   the chest wall; `orientation_flip`), not assumed from its side, so the
                   crop's buffer and the flip are right for a scan stored either way.

CBIS-DDSM path quirk: the CSV paths' UID folders rarely match the NBIA download
(`Mass-Training_P_00001_LEFT_CC/07-20-2016-DDSM-74994/1.000000-full mammogram images-24515/1-1.dcm`
for `Mass-Training_P_00001_LEFT_CC/1.3.6.../000000.dcm`), so a path is resolved exactly
(under the manual dir or its CBIS-DDSM/ folder) or else by its first component, a folder
searched for .dcm files. The ROI mask and the cropped lesion share a folder (and the CSV columns
are sometimes swapped): the mask is the binary DICOM with the full image's shape. An ROI folder
without one leaves that class's mask out (has_<class>_mask = 0, logged).

Errors name the file: a missing exam list or CSV, a CSV row's line and column, a bad exam list
entry, a DICOM path found neither exactly nor by its folder. No DICOM tag reaches the records.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from data_prep import image_folder
from medguide_jax.data import mammo
from medguide_jax.data import synthetic_mammo

SPLITS = ("train", "validation", "test")
FULL_SHAPE = (2944, 1920)  # GLAM's input: H x W
CLASSES = synthetic_mammo.CLASS_NAMES  # ("benign", "malignant")
MIN_EXAMS_FOR_SPLITS = 10
EVALUATION_ONLY_NOTE = (
    "EVALUATION-ONLY: fewer than {n} exams have an image, so every image is in all three "
    "splits (train = validation = test); use it to check a trained model, not to train one.")
_SCALE_TAG = re.compile(r"^x(\d+)$")


# ---------------------------------------------------------------------------------------------
# Image size configs


@dataclasses.dataclass(eq=False)
class MammoConfig(tfds.core.BuilderConfig):
  """The size of the stored (preprocessed) images, H x W: 2944 x 1920 divided by an integer."""
  image_shape: tuple[int, int] = FULL_SHAPE


def config_name(shape: Sequence[int]) -> str:
  """'default' for 2944x1920, 'x<k>' for it divided by k."""
  factor = mammo.downsample_factor(tuple(shape), FULL_SHAPE)
  return "default" if factor == 1 else f"x{factor}"


def image_shape_of(tag: str | None = None,
                   image_shape: Sequence[int] | None = None) -> tuple[int, int]:
  """The image size asked for by a tag ('x8'; None, '' or 'default': 2944x1920) and/or
  `image_shape` (H, W).

  Raises:
    ValueError: an unknown tag, a size that is not 2944x1920 divided by one integer, or a tag
      and an image_shape that disagree.
  """
  from_tag = None
  if tag not in (None, "", "default"):
    m = _SCALE_TAG.match(str(tag))
    k = int(m.group(1)) if m else 0
    if k < 1 or FULL_SHAPE[0] % k or FULL_SHAPE[1] % k:
      raise ValueError(f"mammography tag {tag!r}: use 'x<k>', 2944x1920 divided by k, with k "
                       "dividing both (x2, x4, x8, x16, ...; x8 = 368x240).")
    from_tag = (FULL_SHAPE[0] // k, FULL_SHAPE[1] // k)
  if image_shape is not None:
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 2:
      raise ValueError(f"image_shape must be (H, W), got {image_shape}.")
    mammo.downsample_factor(image_shape, FULL_SHAPE)  # a ValueError naming the shape
    if from_tag is not None and from_tag != image_shape:
      raise ValueError(f"tag {tag!r} means image_shape {from_tag}, but image_shape="
                       f"{image_shape} was also given.")
  return image_shape or from_tag or FULL_SHAPE


def _config(shape: tuple[int, int]) -> MammoConfig:
  return MammoConfig(name=config_name(shape), image_shape=shape,
                     description=f"Preprocessed views of {shape[0]} x {shape[1]} pixels.")


# ---------------------------------------------------------------------------------------------
# Records


def glam_example(view: mammo.PreprocessedView, *, record_id: str, view_name: str,
                 labels: tuple[int, int], has_mask: Mapping[str, bool]) -> dict:
  """One record of the GLAM schema from a preprocessed view; masks only where `has_mask`."""
  return synthetic_mammo.make_record(
      view.image, record_id=record_id, view=view_name, labels=labels,
      masks={c: view.masks.get(c) if has_mask.get(c) else None for c in CLASSES})


class _MammoBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared set-up: ArrayRecord files, the GLAM schema, the image-size configs."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [_config(FULL_SHAPE), _config((368, 240))]
  HOMEPAGE = ""

  def __init__(self, *, tag: str | None = None, image_shape: Sequence[int] | None = None,
               **kwargs):
    """Usual TFDS kwargs plus the image size: a tag ('x8') or image_shape (H, W)."""
    config = _config(image_shape_of(tag, image_shape))
    listed = {c.name for c in self.BUILDER_CONFIGS}
    kwargs["config"] = config.name if config.name in listed else config
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @property
  def image_shape(self) -> tuple[int, int]:
    return tuple(self.builder_config.image_shape)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=synthetic_mammo.features(),
        description=self.__doc__,
        homepage=self.HOMEPAGE or None,
        metadata=tfds.core.MetadataDict(class_names=list(synthetic_mammo.CLASS_NAMES),
                                        image_shape=list(self.image_shape),
                                        evaluation_only=False),
    )

  def _mark_evaluation_only(self, n_exams: int) -> None:
    note = EVALUATION_ONLY_NOTE.format(n=MIN_EXAMS_FOR_SPLITS)
    self.info.metadata["evaluation_only"] = True
    self.info.as_proto.description = f"{note} ({n_exams} exam(s).)\n\n{self.__doc__}"
    logging.warning("%s: %s", self.name, note)


# ---------------------------------------------------------------------------------------------
# NYU exam lists


NYU_INSTRUCTIONS = """\
An NYU-style exam list (the layout of nyukat/GLAM, GMIC and breast_cancer_classifier
sample_data): the manual dir holds
  exam_list_before_cropping.pkl or data.pkl  a pickled list of exams, each a dict with
      'L-CC', 'R-CC', 'L-MLO', 'R-MLO' (lists of image names), 'cancer_label' (breast-level
      left_/right_ benign/malignant) and 'horizontal_flip'
  images/<name>.png                          the raw 16-bit mammograms
  segmentation/<name>_<benign|malignant>.png optional lesion masks in the final 2944x1920
                                             geometry
  splits.csv                                 optional: columns exam,split
  python -m data_prep.build nyu_mammo[:x8] --manual_dir=<manual_dir> --data_dir=<data_dir>
"""
EXAM_LISTS = ("exam_list_before_cropping.pkl", "data.pkl")


@dataclasses.dataclass(frozen=True)
class NyuImage:
  """One view image of an exam list."""
  exam: str  # the exam key (split unit)
  name: str  # image name: the record id
  view: str  # 'L-CC', ...
  horizontal_flip: str
  labels: tuple[int, int]  # (benign, malignant)
  image_path: str
  mask_paths: Mapping[str, str]  # class -> existing mask file (absent classes left out)


def find_exam_list(root: str, name: str | None = None) -> str:
  """The exam-list pickle of a manual dir (`name`, else the first of EXAM_LISTS present)."""
  candidates = (name,) if name else EXAM_LISTS
  for candidate in candidates:
    path = os.path.join(root, candidate)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{root}: no exam list {list(candidates)} found.\n{NYU_INSTRUCTIONS}")


def _exam_key(exam: Mapping, index: int) -> str:
  for key in ("patient_id", "exam_id"):
    if exam.get(key) not in (None, ""):
      return str(exam[key])
  return str(index)


def _names(value, where: str) -> list[str]:
  if isinstance(value, str):
    return [value]
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    raise ValueError(f"{where}: expected a list of image names, got {value!r}.")
  return list(value)


def _mask_paths(root: str, exam: Mapping, view: str, name: str, position: int,
                where: str) -> dict[str, str]:
  """class -> the mask file of image `name`, for the classes whose file exists."""
  out = {}
  for cls in CLASSES:
    listed = exam.get(f"{view}_{cls}_seg")
    if listed is not None:
      names = _names(listed, f"{where} key '{view}_{cls}_seg'")
      stem = names[position] if position < len(names) else f"{name}_{cls}"
    else:
      stem = f"{name}_{cls}"
    path = os.path.join(root, "segmentation", f"{stem}.png")
    if os.path.isfile(path):
      out[cls] = path
  return out


def nyu_images(root: str, exams: Sequence[Mapping],
               exam_list_path: str) -> tuple[list[NyuImage], list[str]]:
  """(the images present, the image paths the exam list names but the folder lacks)."""
  found, missing, seen = [], [], {}
  for index, exam in enumerate(exams):
    where = f"{exam_list_path} exam {index}"
    if not isinstance(exam, Mapping):
      raise ValueError(f"{where}: expected a dict, got {type(exam).__name__}.")
    if not isinstance(exam.get("cancer_label"), Mapping):
      raise ValueError(f"{where}: no 'cancer_label' dict (breast-level labels).")
    flip = str(exam.get("horizontal_flip", "NO"))
    if flip not in ("NO", "YES"):
      raise ValueError(f"{where}: horizontal_flip {flip!r}; expected 'NO' or 'YES'.")
    key = _exam_key(exam, index)
    for view in mammo.VIEWS:
      if view not in exam:
        continue
      labels = tuple(int(v) for v in mammo.view_labels(exam["cancer_label"], view))
      for position, name in enumerate(_names(exam[view], f"{where} key {view!r}")):
        if name in seen:
          raise ValueError(f"{where} key {view!r}: image name {name!r} is also in exam "
                           f"{seen[name]}; names are record ids and must be unique.")
        seen[name] = index
        path = os.path.join(root, "images", f"{name}.png")
        if not os.path.isfile(path):
          missing.append(path)
          continue
        found.append(NyuImage(exam=key, name=name, view=view, horizontal_flip=flip,
                              labels=labels, image_path=path,
                              mask_paths=_mask_paths(root, exam, view, name, position, where)))
  return found, missing


def read_splits_csv(path: str, exams: Iterable[str]) -> dict[str, str]:
  """exam key -> split from a splits.csv (columns exam,split); every exam must be listed."""
  split_of = {}
  for line, row in enumerate(image_folder.read_csv(path, ("exam", "split")), start=2):
    split = image_folder.SPLIT_ALIASES.get(row["split"].lower())
    if split is None:
      raise ValueError(f"{path} line {line}: unknown value {row['split']!r} in column 'split';"
                       f" use one of {sorted(image_folder.SPLIT_ALIASES)}.")
    split_of[row["exam"]] = split
  unlisted = sorted(set(exams) - set(split_of))
  if unlisted:
    raise ValueError(f"{path}: exams {unlisted[:10]}{' ...' if len(unlisted) > 10 else ''} "
                     "are not listed (column 'exam').")
  return split_of


def nyu_splits(items: Sequence[NyuImage],
               splits_csv: str) -> tuple[dict[str, list[NyuImage]], bool]:
  """(split -> images, evaluation_only): by `splits_csv` if that file exists; else, with fewer
  than MIN_EXAMS_FOR_SPLITS exams, every image in every split (evaluation_only True); else
  by hash of the exam key (80/10/10), so all images of an exam share a split."""
  exam_keys = sorted({item.exam for item in items})
  if os.path.isfile(splits_csv):
    split_of = read_splits_csv(splits_csv, exam_keys)
  elif len(exam_keys) < MIN_EXAMS_FOR_SPLITS:
    return {s: list(items) for s in SPLITS}, True
  else:
    split_of = {key: image_folder.hash_split(key) for key in exam_keys}
  return {s: [i for i in items if split_of[i.exam] == s] for s in SPLITS}, False


def _preprocess_nyu(item: NyuImage, shape: tuple[int, int]) -> mammo.PreprocessedView:
  masks = {cls: _read_mask_png(path) for cls, path in item.mask_paths.items()}
  return mammo.preprocess_view(mammo.read_mammogram(item.image_path), view=item.view,
                               horizontal_flip=item.horizontal_flip, out_shape=shape,
                               masks=masks or None, mask_geometry="final")


def _read_mask_png(path: str) -> np.ndarray:
  """A mask PNG (any mode) as uint8 {0,1}: non-zero is lesion."""
  with Image.open(path) as image:
    array = np.asarray(image)
  if array.ndim == 3:
    array = array[..., :3].max(axis=-1)
  return (array > 0).astype(np.uint8)


class NyuMammo(_MammoBuilder):
  """NYU-style exam lists (module docstring: nyu_mammo)."""

  name = "nyu_mammo"
  MANUAL_DOWNLOAD_INSTRUCTIONS = NYU_INSTRUCTIONS
  HOMEPAGE = "https://github.com/nyukat/GLAM"
  EXAM_LIST: str | None = None

  def __init__(self, *, exam_list: str | None = None, **kwargs):
    """Usual kwargs plus `exam_list`: the pickle's file name in the manual dir."""
    self._exam_list_name = exam_list or self.EXAM_LIST
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    path = find_exam_list(root, self._exam_list_name)
    exams = mammo.load_exam_list(path)
    items, missing = nyu_images(root, exams, path)
    if missing:
      logging.warning("%s: %d image file(s) named in %s are missing and skipped: %s",
                      self.name, len(missing), path, ", ".join(missing))
    if not items:
      raise FileNotFoundError(f"{os.path.join(root, 'images')}: none of the {len(missing)} "
                              f"images named in {path} is there.\n{NYU_INSTRUCTIONS}")
    by_split, evaluation_only = nyu_splits(items, os.path.join(root, "splits.csv"))
    if evaluation_only:
      self._mark_evaluation_only(len({item.exam for item in items}))
    return {s: self._generate_examples(part) for s, part in by_split.items() if part}

  def _generate_examples(self, items: Sequence[NyuImage]) -> Iterator[tuple[str, dict]]:
    shape = self.image_shape

    def encode(item: NyuImage) -> tuple[str, dict]:
      view = _preprocess_nyu(item, shape)
      return item.name, glam_example(view, record_id=item.name, view_name=item.view,
                                     labels=item.labels,
                                     has_mask={c: c in item.mask_paths for c in CLASSES})
    yield from image_folder.ordered_map(encode, items, workers=2)


SHARED_SAMPLE_INSTRUCTIONS = """\
{what}
The manual dir is ../shared/data/{folder} (the project's shared samples; its SOURCE.txt gives
origin and licence), an NYU-style exam list ({exam_list}, images/, {masks}).
  python -m data_prep.build {name}:x8 --manual_dir=../shared/data/{folder} --data_dir=<data_dir>
"""


class NyuGlamSample(NyuMammo):
  """GLAM's sample exams: exam 0's four views with benign masks (module docstring)."""

  name = "nyu_glam_sample"
  EXAM_LIST = "exam_list_before_cropping.pkl"
  MANUAL_DOWNLOAD_INSTRUCTIONS = SHARED_SAMPLE_INSTRUCTIONS.format(
      what="nyukat/GLAM sample_data: exam 0's four views (exams 1-3's images are absent), "
      "right breast benign.", folder="mammo_nyu_glam_sample", exam_list=EXAM_LIST,
      masks="segmentation/", name=name)


class NyuBccSample(NyuMammo):
  """breast_cancer_classifier's sample exams 1-2, CC views only (module docstring)."""

  name = "nyu_bcc_sample"
  EXAM_LIST = "data.pkl"
  MANUAL_DOWNLOAD_INSTRUCTIONS = SHARED_SAMPLE_INSTRUCTIONS.format(
      what="nyukat/breast_cancer_classifier sample_data: CC views of exams 1 (right "
      "malignant) and 2 (left benign).", folder="mammo_nyu_bcc_cc_views", exam_list=EXAM_LIST,
      masks="no masks", name=name)


# ---------------------------------------------------------------------------------------------
# CBIS-DDSM


CBIS_INSTRUCTIONS = """\
CBIS-DDSM (Lee et al., "A curated mammography data set for use in computer-aided detection and
diagnosis research", Sci Data 2017; TCIA, CC BY 3.0, doi:10.7937/K9/TCIA.2016.7O02S9CY).
Download the DICOM images with the NBIA Data Retriever and the four case description CSVs into
one folder, the manual dir:
  mass_case_description_train_set.csv  mass_case_description_test_set.csv
  calc_case_description_train_set.csv  calc_case_description_test_set.csv
  CBIS-DDSM/<Mass-Training_P_00001_LEFT_CC>/.../*.dcm  (or the case folders at the top level)
  python -m data_prep.build cbis_ddsm[:x8] --manual_dir=<manual_dir> --data_dir=<data_dir>
"""
CBIS_CSVS = {"mass_case_description_train_set.csv": "train",
             "mass_case_description_test_set.csv": "test",
             "calc_case_description_train_set.csv": "train",
             "calc_case_description_test_set.csv": "test"}
CBIS_COLUMNS = ("patient_id", "left or right breast", "image view", "abnormality id",
                "pathology", "image file path", "ROI mask file path", "cropped image file path")
CBIS_PATHOLOGY = {"BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign",
                  "MALIGNANT": "malignant"}
_SIDES = {"LEFT": "L", "RIGHT": "R"}
CBIS_VALIDATION_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Abnormality:
  """One CSV row: a lesion of an image."""
  cls: str  # 'benign' | 'malignant'
  roi_path: str  # as written in the CSV
  cropped_path: str
  where: str  # 'file line N'


@dataclasses.dataclass
class CbisImage:
  """One mammogram (patient, side, view) and every abnormality listed for it."""
  record_id: str  # 'P_00001_LEFT_CC'
  patient: str
  view: str  # 'L-CC', ...
  image_path: str  # as written in the first CSV row
  where: str
  official_splits: set[str] = dataclasses.field(default_factory=set)
  abnormalities: list[Abnormality] = dataclasses.field(default_factory=list)

  def labels(self) -> tuple[int, int]:
    return tuple(int(any(a.cls == c for a in self.abnormalities)) for c in CLASSES)


def _cbis_value(row: Mapping[str, str], column: str, allowed: Iterable[str] | None,
                where: str) -> str:
  value = row[column].strip()
  if not value:
    raise ValueError(f"{where}: empty value in column {column!r}.")
  if allowed is not None and value.upper() not in allowed:
    raise ValueError(f"{where}: unknown value {value!r} in column {column!r}; known: "
                     f"{sorted(allowed)}.")
  return value


def cbis_images(root: str) -> list[CbisImage]:
  """Every image listed in the case description CSVs present in `root`, with its lesions."""
  present = [name for name in CBIS_CSVS if os.path.isfile(os.path.join(root, name))]
  if not present:
    raise FileNotFoundError(f"{root}: none of the CBIS-DDSM case description CSVs "
                            f"{list(CBIS_CSVS)} found.\n{CBIS_INSTRUCTIONS}")
  absent = sorted(set(CBIS_CSVS) - set(present))
  if absent:
    logging.warning("cbis_ddsm: %s not found in %s; building from %s.", absent, root, present)
  by_key: dict[str, CbisImage] = {}
  for name in present:
    path = os.path.join(root, name)
    for line, row in enumerate(image_folder.read_csv(path, CBIS_COLUMNS), start=2):
      where = f"{path} line {line}"
      patient = _cbis_value(row, "patient_id", None, where)
      side = _cbis_value(row, "left or right breast", _SIDES, where).upper()
      view = _cbis_value(row, "image view", ("CC", "MLO"), where).upper()
      pathology = _cbis_value(row, "pathology", CBIS_PATHOLOGY, where).upper()
      key = f"{patient}_{side}_{view}"
      image = by_key.setdefault(key, CbisImage(
          record_id=key, patient=patient, view=f"{_SIDES[side]}-{view}",
          image_path=_cbis_value(row, "image file path", None, where), where=where))
      image.official_splits.add(CBIS_CSVS[name])
      image.abnormalities.append(Abnormality(
          cls=CBIS_PATHOLOGY[pathology], where=where,
          roi_path=row["ROI mask file path"].strip(),
          cropped_path=row["cropped image file path"].strip()))
  return sorted(by_key.values(), key=lambda i: i.record_id)


def cbis_splits(items: Sequence[CbisImage]) -> dict[str, list[CbisImage]]:
  """split -> images: official test patients are test; train patients go to validation when
  hash(patient_id) < 10%, else train."""
  test_patients = {i.patient for i in items if "test" in i.official_splits}
  moved = sorted({i.patient for i in items
                  if i.patient in test_patients and "train" in i.official_splits})
  if moved:
    logging.warning("cbis_ddsm: %d patient(s) listed in both train and test CSVs are test "
                    "patients (all their images go to test): %s", len(moved), ", ".join(moved))
  out = {s: [] for s in SPLITS}
  for item in items:
    if item.patient in test_patients:
      out["test"].append(item)
    elif image_folder.hash_unit(item.patient) < CBIS_VALIDATION_FRACTION:
      out["validation"].append(item)
    else:
      out["train"].append(item)
  return out


class DicomTree:
  """Finds the DICOM files of CSV paths in a download whose UID folders differ from the CSV."""

  def __init__(self, root: str):
    self.root = root
    self._by_folder: dict[str, list[str]] | None = None

  def _index(self) -> dict[str, list[str]]:
    """folder name -> every .dcm file below a folder of that name (built once)."""
    if self._by_folder is None:
      self._by_folder = {}
      for directory, dirs, files in os.walk(self.root, followlinks=True):
        dirs.sort()
        relative = os.path.relpath(directory, self.root)
        parts = [] if relative == os.curdir else relative.split(os.sep)
        for name in sorted(files):
          if name.lower().endswith(".dcm") and not name.startswith("."):
            for part in parts:
              self._by_folder.setdefault(part, []).append(os.path.join(directory, name))
    return self._by_folder

  def exact(self, relative: str) -> str | None:
    relative = relative.replace("\\", "/").strip("/")
    for base in (self.root, os.path.join(self.root, "CBIS-DDSM")):
      path = os.path.join(base, *relative.split("/"))
      if os.path.isfile(path):
        return path
    return None

  def folder(self, relative: str) -> list[str]:
    """The .dcm files under the folder named by the path's first component."""
    first = relative.replace("\\", "/").strip("/").split("/")[0]
    return list(self._index().get(first, []))

  def resolve_image(self, relative: str, where: str, column: str) -> str:
    """The full mammogram: the exact path, else the largest DICOM of its folder."""
    path = self.exact(relative)
    if path is not None:
      return path
    candidates = self.folder(relative)
    if not candidates:
      raise FileNotFoundError(self._not_found(relative, where, column))
    return max(candidates, key=lambda p: int(np.prod(dicom_shape(p))))

  def roi_mask(self, abnormality: Abnormality, shape: tuple[int, int]) -> np.ndarray | None:
    """The ROI mask of a lesion, uint8 {0,1} [shape]: the binary DICOM of the image's shape
    among the files of its ROI and cropped-image folders (the CSV columns are sometimes
    swapped); None if there is none."""
    candidates = []
    for column, relative in (("ROI mask file path", abnormality.roi_path),
                             ("cropped image file path", abnormality.cropped_path)):
      if not relative:
        continue
      exact = self.exact(relative)
      found = ([exact] if exact else []) + self.folder(relative)
      if not found and column == "ROI mask file path":
        raise FileNotFoundError(self._not_found(relative, abnormality.where, column))
      candidates.extend(p for p in found if p not in candidates)
    for path in candidates:
      if dicom_shape(path) == tuple(shape):
        mask = read_binary_dicom(path)
        if mask is not None:
          return mask
    return None

  def _not_found(self, relative: str, where: str, column: str) -> str:
    first = relative.replace("\\", "/").strip("/").split("/")[0]
    return (f"{where} column {column!r}: DICOM {relative!r} not found under {self.root} "
            f"(neither that path nor any .dcm file under a folder named {first!r}).")


def dicom_shape(path: str) -> tuple[int, int]:
  """(Rows, Columns) from the DICOM header only."""
  import pydicom  # pylint: disable=g-import-not-at-top
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return int(ds.Rows), int(ds.Columns)
  except Exception as e:
    raise ValueError(f"{path}: cannot read the DICOM header (Rows, Columns): {e}") from e


def read_binary_dicom(path: str) -> np.ndarray | None:
  """uint8 {0,1} [H,W] if the DICOM's stored pixels take at most two values, the lower 0 (an
  ROI mask); None otherwise (a cropped lesion image)."""
  import pydicom  # pylint: disable=g-import-not-at-top
  try:
    stored = pydicom.dcmread(path, force=True).pixel_array
  except Exception as e:
    raise ValueError(f"{path}: cannot decode the DICOM pixel data: {e}") from e
  if stored.ndim != 2:
    return None
  values = np.unique(stored)
  if len(values) > 2 or values[0] != 0:
    return None
  return (stored > 0).astype(np.uint8)


def cbis_masks(tree: DicomTree, item: CbisImage,
               shape: tuple[int, int]) -> dict[str, np.ndarray | None]:
  """class -> union of its ROI masks (uint8 {0,1} at the raw image's shape); None for a class
  without lesions or with a lesion whose mask was not found (logged)."""
  masks: dict[str, np.ndarray | None] = {}
  for cls in CLASSES:
    lesions = [a for a in item.abnormalities if a.cls == cls]
    if not lesions:
      continue
    union = np.zeros(shape, np.uint8)
    for lesion in lesions:
      mask = tree.roi_mask(lesion, shape)
      if mask is None:
        logging.warning("cbis_ddsm %s: no binary ROI mask of shape %s near %r (%s); its %s "
                        "mask is left out.", item.record_id, shape, lesion.roi_path,
                        lesion.where, cls)
        union = None
        break
      union |= mask
    masks[cls] = union
  return masks


def orientation_flip(image: np.ndarray, view: str) -> str:
  """The exam-list `horizontal_flip` under which `mammo.preprocess_view` sees `image` the way
  it points: 'NO' when the breast points as in an NYU image of this view (L views right, R
  views left), else 'YES'. The chest wall is taken to be the brighter half of the image."""
  half = image.shape[1] // 2
  left, right = float(image[:, :half].mean()), float(image[:, image.shape[1] - half:].mean())
  pointing = "right" if left >= right else "left"
  return "NO" if mammo.breast_pointing(view, "NO") == pointing else "YES"


class CbisDdsm(_MammoBuilder):
  """CBIS-DDSM mass and calcification cases (module docstring: cbis_ddsm)."""

  name = "cbis_ddsm"
  MANUAL_DOWNLOAD_INSTRUCTIONS = CBIS_INSTRUCTIONS
  HOMEPAGE = "https://doi.org/10.7937/K9/TCIA.2016.7O02S9CY"

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    splits = cbis_splits(cbis_images(root))
    tree = DicomTree(root)
    return {s: self._generate_examples(tree, part) for s, part in splits.items() if part}

  def _generate_examples(self, tree: DicomTree,
                         items: Sequence[CbisImage]) -> Iterator[tuple[str, dict]]:
    shape = self.image_shape

    def encode(item: CbisImage) -> tuple[str, dict]:
      path = tree.resolve_image(item.image_path, item.where, "image file path")
      image = mammo.read_mammogram(path)
      masks = cbis_masks(tree, item, image.shape)
      present = {c: m for c, m in masks.items() if m is not None}
      flip = orientation_flip(image, item.view)
      view = mammo.preprocess_view(image, view=item.view, horizontal_flip=flip,
                                   out_shape=shape, masks=present or None,
                                   mask_geometry="raw")
      return item.record_id, glam_example(view, record_id=item.record_id, view_name=item.view,
                                          labels=item.labels(),
                                          has_mask={c: c in present for c in CLASSES})
    yield from image_folder.ordered_map(encode, items, workers=2)
