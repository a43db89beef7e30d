"""Chest X-ray finding records of hybridmed's downstream sets: an image, its labels, its regions.

The 'cxr_findings' layout (`sources.LAYOUTS`), one TFDS schema for every downstream builder of
data_prep/cxr_downstream.py (CheXpert, RSNA Pneumonia, SIIM-ACR, Object-CXR, COVIDx). One
record per image:
  image:         8-bit grey PNG bytes (16-bit sources and DICOMs brought to 8 bits: `grey8`),
                 shrunk (area averaging) so its long side is at most the option `max_side`
                 (default 512; 0 keeps the native size)
  labels:        float32 [L] named by metadata 'label_names': 1 positive, 0 negative,
                 -1 uncertain, NaN not mentioned (CheXpert's values, stored raw: the U-ones /
                 U-zeros policy is the downstream task's); single-label sets are 0/1; COVIDx is
                 one-hot over its classes (metadata 'class_names' too; read it with argmax)
  region_labels: int64 [K] index into metadata 'region_names' of each annotated region (the
                 same dtype as the 'cxr_reports' records of synthetic_cxr, so the downstream
                 tasks read both alike)
  region_boxes:  float32 [K, 4] its box (x0, y0, x1, y1) in pixels of the STORED image,
                 x1 / y1 exclusive (synthetic_cxr's `_box` convention)
  region_masks:  [K] PNG bytes {0, 255} of its mask at the stored image's size; always a mask,
                 also for box-only sets (RSNA: the box's rectangle, as MGCA segments RSNA)
  view:          'PA', 'AP', 'LATERAL', ... (upper case; '' where the release does not say)
  study, patient, id: text (id unique in the dataset)
K = 0 for sets without regions (CheXpert, COVIDx).

Regions (`Region`) come in the SOURCE image's pixels and are made into the stored ones by
`finding_record`:
  * a box reaching outside the image is clipped to it (counted: boxes_clipped); one empty
    after clipping (or empty to begin with) is left out with its region (counted once, as
    boxes_dropped);
  * when the image is shrunk by (sx, sy) = (stored width / width, stored height / height),
    boxes are scaled by them; geometric masks (a box's rectangle, the ellipse inscribed in a
    box, a polygon) are drawn at the stored size from the scaled geometry, a pixel belonging
    to the shape when its centre (col + 0.5, row + 0.5) lies inside it; raster masks (e.g.
    SIIM's run-length masks) are shrunk by area averaging and kept where at least half
    covered. A region smaller than a stored pixel may so have an empty mask (its box stays).
  * a raster mask whose size differs from its image is a ValueError naming the file / line
    and both sizes.

8 bits (`grey8`): the DICOM reader (data/readers.py) already applies the modality LUT and the
VOI window (or the full range) onto 0..65535, so a DICOM becomes 8-bit by /257 (65535 -> 255);
a 16-bit PNG holds stored values (often 12-bit), so it is mapped linearly from its own
[min, max] onto 0..255, the reader's convention for a DICOM without a window. RGB is made grey
(ITU-R 601 luma). Only pixels are stored: no DICOM tag reaches a record, except ViewPosition
(the projection, not identifying) as `view`.

Metadata: label_names, region_names, class_names ([] except COVIDx) and a build summary:
per split images, patients, positives and uncertain per label, regions, boxes_clipped,
boxes_dropped; the missing-files policy and the files it skipped; each builder's rules.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from skimage import draw
import tensorflow_datasets as tfds

from medguide_jax.data import bags
from medguide_jax.data import builders
from medguide_jax.data import cxr
from medguide_jax.data import images
from medguide_jax.data import readers
from medguide_jax.data import reports
from medguide_jax.data.synthetic_cxr import encode_mask

LAYOUT = "cxr_findings"
LISTED = 50                # files named per reason in the build summary (all are counted)
MISSING_FILES = ("error", "skip")
SHAPES = ("box", "ellipse", "polygon", "raster")
_COUNTS = ("boxes_clipped", "boxes_dropped")


class FindingsFormatError(reports.ReportFormatError):
  """A release file (table, annotation, image) that cannot be read as expected; the message
  names the file and line (a ValueError, like the report builders' errors)."""


class MissingFileError(FindingsFormatError, FileNotFoundError):
  """A file the release lists (an image) is absent; names its path and the listing's line."""


def features() -> tfds.features.FeaturesDict:
  """TFDS features of a 'cxr_findings' record: 'cxr_reports' without the report texts."""
  return cxr.labelled_image_features()


def record(*, image: bytes, labels: Sequence[float], study: str, patient: str, view: str,
           id: str, region_labels: Sequence[int] = (), region_boxes=None,  # pylint: disable=redefined-builtin
           region_masks: Sequence[bytes] = ()) -> dict:
  """One 'cxr_findings' record; every field typed as the schema stores it."""
  k = len(region_labels)
  boxes = np.zeros((0, 4), np.float32) if region_boxes is None else np.asarray(
      region_boxes, np.float32).reshape(k, 4)
  if len(region_masks) != k:
    raise ValueError(f"{id}: {k} region labels but {len(region_masks)} masks")
  return {"image": bytes(image), "labels": np.asarray(labels, np.float32).reshape(-1),
          "region_labels": np.asarray(region_labels, np.int64).reshape(k),
          "region_boxes": boxes,
          "region_masks": np.asarray([bytes(m) for m in region_masks], dtype=object),
          "view": str(view).upper(), "study": str(study), "patient": str(patient),
          "id": str(id)}


# ---------------------------------------------------------------------------------------------
# Pixels


def grey8(image: np.ndarray, *, dicom: bool) -> np.ndarray:
  """uint8 [H, W] of a reader's image (module docstring: DICOM /257, 16-bit PNG by its own
  [min, max], RGB to luma)."""
  image = readers.to_grey(image)
  if image.dtype == np.uint8:
    return image
  if image.dtype != np.uint16 or image.ndim != 2:
    raise ValueError(f"cannot make an 8-bit image of dtype {image.dtype}, shape {image.shape}")
  if dicom:
    return np.rint(image.astype(np.float64) / 257.0).astype(np.uint8)
  low, high = float(image.min()), float(image.max())
  if high <= low:
    return np.zeros(image.shape, np.uint8)
  return np.rint((image.astype(np.float64) - low) * (255.0 / (high - low))).astype(np.uint8)


def read_grey8(path: str) -> tuple[np.ndarray, str]:
  """(uint8 [H, W] pixels, the DICOM's ViewPosition upper case or '') of an image file.
  Nothing else of a DICOM header is read into memory beyond the reader's pixel work."""
  dicom = readers.file_kind(path) == "dicom"
  pixels = grey8(readers.read_image(path), dicom=dicom)
  return pixels, dicom_view(path) if dicom else ""


def dicom_view(path: str) -> str:
  """ViewPosition (0018,5101) of a DICOM file, upper case; '' when absent."""
  import pydicom  # pylint: disable=g-import-not-at-top
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ViewPosition"],
                         force=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} cannot be read as DICOM: {e}") from e
  return " ".join(str(ds.get("ViewPosition", "") or "").upper().split())


# ---------------------------------------------------------------------------------------------
# Regions and records


Box = tuple[float, float, float, float]


@dataclasses.dataclass
class Region:
  """One annotated region in the SOURCE image's pixels.

  shape: how its mask is made: 'box' (the box's rectangle), 'ellipse' (inscribed in the box),
    'polygon' (`points`), 'raster' (`mask`).
  box: (x0, y0, x1, y1), x1/y1 exclusive; None: the bounding box of the polygon or mask.
  points: float [P, 2] polygon vertices (x, y) in pixels (x = 0 the image's left edge).
  mask: bool [H, W] at the image's size, or a function (height, width) -> that array (made
    when the image's size is known, e.g. decoded from run-length text).
  """
  label: int
  box: Box | None = None
  shape: str = "box"
  points: np.ndarray | None = None
  mask: np.ndarray | Callable[[int, int], np.ndarray] | None = None


@dataclasses.dataclass
class Item:
  """One image to write, as a builder read it from the release."""
  id: str
  path: str
  where: str                        # the listing's file and line, for errors
  labels: np.ndarray                # float32 [L]
  study: str
  patient: str
  view: str = ""                    # '': a DICOM's ViewPosition, else ''
  regions: list[Region] = dataclasses.field(default_factory=list)


def bounding_box(mask: np.ndarray) -> Box:
  """(x0, y0, x1, y1) of a mask's pixels, x1/y1 exclusive (synthetic_cxr's `_box`); all 0
  for an empty mask."""
  rows, cols = np.nonzero(mask)
  if not len(rows):
    return (0.0, 0.0, 0.0, 0.0)
  return (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))


def clip_box(box: Box, width: int, height: int) -> tuple[Box | None, bool]:
  """(the box clipped to [0, width] x [0, height] or None when empty after it, whether
  clipping changed it)."""
  x0, y0, x1, y1 = (float(v) for v in box)
  clipped = (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
             min(max(x1, 0.0), width), min(max(y1, 0.0), height))
  changed = clipped != (x0, y0, x1, y1)
  if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
    return None, changed
  return clipped, changed


def box_mask(box: Box, height: int, width: int) -> np.ndarray:
  """bool [height, width]: the pixels whose centre lies in the box (an integer box covers
  exactly columns x0..x1-1, rows y0..y1-1)."""
  x0, y0, x1, y1 = box
  cols = (np.arange(width) + 0.5 >= x0) & (np.arange(width) + 0.5 < x1)
  rows = (np.arange(height) + 0.5 >= y0) & (np.arange(height) + 0.5 < y1)
  return rows[:, None] & cols[None, :]


def ellipse_mask(box: Box, height: int, width: int) -> np.ndarray:
  """bool [height, width]: the pixels whose centre lies strictly inside the ellipse inscribed
  in `box` (skimage.draw.ellipse, whose pixel (r, c) has its centre at (r, c): hence -0.5)."""
  x0, y0, x1, y1 = box
  out = np.zeros((height, width), bool)
  if x1 <= x0 or y1 <= y0:
    return out
  rr, cc = draw.ellipse((y0 + y1) / 2 - 0.5, (x0 + x1) / 2 - 0.5, (y1 - y0) / 2,
                        (x1 - x0) / 2, shape=(height, width))
  out[rr, cc] = True
  return out


def polygon_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
  """bool [height, width]: the pixels whose centre lies inside the polygon of (x, y) `points`
  (skimage.draw.polygon, pixel centres at integers there: hence -0.5)."""
  points = np.asarray(points, np.float64).reshape(-1, 2)
  out = np.zeros((height, width), bool)
  rr, cc = draw.polygon(points[:, 1] - 0.5, points[:, 0] - 0.5, shape=(height, width))
  out[rr, cc] = True
  return out


def _shrunk_raster(mask: np.ndarray, max_side: int | None) -> np.ndarray:
  """A raster mask shrunk as its image is (area averaging), kept where at least half covered."""
  if max_side is None or max(mask.shape) <= max_side:
    return mask
  cover = readers.downsize(np.where(mask, 255, 0).astype(np.uint8), max_side)
  return cover >= 128


def _raster(region: Region, height: int, width: int, where: str, index: int) -> np.ndarray:
  mask = region.mask(height, width) if callable(region.mask) else region.mask
  if mask is None:
    raise ValueError(f"{where}: region {index} has shape 'raster' but no mask")
  mask = np.asarray(mask)
  if mask.shape != (height, width):
    size = f"{mask.shape[1]}x{mask.shape[0]}" if mask.ndim == 2 else str(mask.shape)
    raise FindingsFormatError(f"{where}: region {index}: mask of size {size} (width x height)"
                              f" but its image is {width}x{height}")
  return mask.astype(bool)


def finding_record(image: np.ndarray, item: Item, *, max_side: int
                   ) -> tuple[dict, dict[str, int]]:
  """(the 'cxr_findings' record of `item` with its uint8 [H, W] `image`, counts
  {'boxes_clipped', 'boxes_dropped', 'regions'}) (module docstring: clipping, shrinking,
  masks). max_side 0 keeps the native size."""
  if image.dtype != np.uint8 or image.ndim != 2 or 0 in image.shape:
    raise ValueError(f"{item.where}: {item.path}: want a uint8 [H, W] image, got "
                     f"{image.dtype} {image.shape}")
  height, width = image.shape
  side = max_side or None
  stored = readers.downsize(image, side)
  h, w = stored.shape
  sx, sy = w / width, h / height
  counts = collections.Counter({k: 0 for k in (*_COUNTS, "regions")})
  labels, boxes, masks = [], [], []
  for i, region in enumerate(item.regions):
    if region.shape not in SHAPES:
      raise ValueError(f"{item.where}: region {i} shape {region.shape!r}; use one of {SHAPES}")
    raster = _raster(region, height, width, item.where, i) if region.shape == "raster" \
        else None
    box = region.box
    if box is None:
      box = bounding_box(raster) if raster is not None else _points_box(region, item.where, i)
    clipped, changed = clip_box(box, width, height)
    if clipped is None:   # counted once: as dropped
      counts["boxes_dropped"] += 1
      continue
    counts["boxes_clipped"] += changed
    scale = np.array([sx, sy, sx, sy])
    stored_box = tuple(float(v) for v in np.asarray(clipped) * scale)
    if raster is not None:
      mask = _shrunk_raster(raster, side)
    elif region.shape == "box":
      mask = box_mask(stored_box, h, w)
    elif region.shape == "ellipse":
      mask = ellipse_mask(tuple(np.asarray(box, np.float64) * scale), h, w)
    else:
      mask = polygon_mask(np.asarray(region.points, np.float64) * [sx, sy], h, w)
    labels.append(region.label)
    boxes.append(stored_box)
    masks.append(encode_mask(mask))
  counts["regions"] = len(labels)
  return record(image=images.encode_png(stored), labels=item.labels, study=item.study,
                patient=item.patient, view=item.view, id=item.id, region_labels=labels,
                region_boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                region_masks=masks), dict(counts)


def _points_box(region: Region, where: str, index: int) -> Box:
  if region.points is None or len(region.points) == 0:
    raise ValueError(f"{where}: region {index} ({region.shape}) has neither a box nor points")
  p = np.asarray(region.points, np.float64).reshape(-1, 2)
  return (float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()),
          float(p[:, 1].max()))


# ---------------------------------------------------------------------------------------------
# Build summary


class Listing:
  """Counted reasons, each with the first LISTED items named."""

  def __init__(self):
    self.entries: dict[str, dict] = {}

  def add(self, reason: str, item: str) -> None:
    entry = self.entries.setdefault(reason, {"count": 0, "listed": []})
    entry["count"] += 1
    if len(entry["listed"]) < LISTED:
      entry["listed"].append(item)

  def count(self, reason: str) -> int:
    return self.entries.get(reason, {}).get("count", 0)

  def as_dict(self) -> dict:
    return {k: {"count": v["count"], "listed": list(v["listed"])}
            for k, v in self.entries.items()}


class Summary:
  """Per split: images, patients, positives and uncertain per label (from the items), regions,
  boxes_clipped, boxes_dropped (counted as the records are written)."""

  def __init__(self, label_names: Sequence[str]):
    self.label_names = list(label_names)
    self.splits: dict[str, dict] = {}

  def add_items(self, split: str, items: Sequence[Item]) -> None:
    labels = np.asarray([it.labels for it in items], np.float32).reshape(
        len(items), len(self.label_names))
    self.splits[split] = {
        "images": len(items), "patients": len({it.patient for it in items}),
        "positives": {n: int((labels[:, j] == 1).sum()) for j, n in enumerate(self.label_names)},
        "uncertain": {n: int((labels[:, j] == -1).sum()) for j, n in enumerate(self.label_names)},
        "regions": 0, **{k: 0 for k in _COUNTS}}

  def add_counts(self, split: str, counts: Mapping[str, int]) -> None:
    entry = self.splits[split]
    for key in ("regions", *_COUNTS):
      entry[key] += int(counts.get(key, 0))

  def as_dict(self) -> dict:
    total = {k: sum(s[k] for s in self.splits.values()) for k in ("regions", *_COUNTS)}
    return {"splits": {k: dict(v) for k, v in self.splits.items()}, **total}


# ---------------------------------------------------------------------------------------------
# Options as builder configs


@dataclasses.dataclass(eq=False)
class FindingsConfig(tfds.core.BuilderConfig):
  """Options of every downstream builder: max_side (long side of the stored image; 0 native)
  and missing_files ('error' or 'skip': a listed image absent from the folder)."""
  max_side: int = 512
  missing_files: str = "error"

  @classmethod
  def canonical(cls, values: dict) -> dict:
    """Option values validated and in canonical form (subclasses add theirs)."""
    out = dict(values)
    out["missing_files"] = choice("missing_files", out["missing_files"], MISSING_FILES)
    out["max_side"] = int(out["max_side"])
    if out["max_side"] < 0:
      raise ValueError(f"max_side={out['max_side']}: use 0 (native size) or a size >= 1")
    return out


def choice(option: str, value, choices: Sequence[str]) -> str:
  value = str(value).strip().lower()
  if value not in choices:
    raise ValueError(f"{option}={value!r}: use one of {list(choices)}")
  return value


def _name_part(key: str, value) -> str:
  if key == "max_side":
    return "native" if value == 0 else f"side{value}"
  if isinstance(value, (tuple, list)):
    value = "_".join(str(v) for v in value)
  return re.sub(r"[^A-Za-z0-9_]", "", f"{key}_{value}".lower())


def make_config(config_cls: type, **given) -> FindingsConfig | None:
  """The config of the options `given` (builders.options_config; None: the default)."""
  return builders.options_config(config_cls, given, canonical=config_cls.canonical,
                                 name_part=_name_part)


# ---------------------------------------------------------------------------------------------
# The builder base


class FindingsBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared set-up of every 'cxr_findings' builder: ArrayRecord files (random access without
  TensorFlow), the schema above, its metadata and build summary.

  A builder's `_split_generators` reads the release into `Item`s per split (checking each
  listed image with `self.found`), then returns `self.splits(by_split, label_names=...,
  region_names=..., summary=...)`, which checks that no patient is in two splits, fills the
  metadata and writes each split's records through `finding_record`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  CONFIG_CLASS: type = FindingsConfig

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self._summary: Summary | None = None
    self._extra: dict = {}
    self._missing = Listing()

  def _configured(self, kwargs: dict, **options) -> dict:
    config = make_config(self.CONFIG_CLASS, **options)
    if config is not None:
      kwargs["config"] = config
    return kwargs

  @property
  def options(self) -> FindingsConfig:
    return self.builder_config

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(), description=self.__doc__,
        metadata=tfds.core.MetadataDict(label_names=[], region_names=[], class_names=[],
                                        summary={}))

  def found(self, path: str, where: str, what: str = "image") -> bool:
    """Whether the listed file `path` is there; when absent, `self.missing`."""
    if os.path.isfile(path):
      return True
    self.missing(path, where, what)
    return False

  def missing(self, path: str, where: str, what: str = "image") -> None:
    """A listed file that is absent: an error naming it and `where` (missing_files='error'),
    or counted in the summary (missing_files='skip')."""
    if self.options.missing_files == "error":
      raise MissingFileError(f"{path}: {what} listed by {where} is not there (build with the "
                             "option missing_files=skip to leave such images out, counted)")
    self._missing.add(what, path)

  def splits(self, by_split: Mapping[str, Sequence[Item]], *, label_names: Sequence[str],
             region_names: Sequence[str], summary: Mapping, class_names: Sequence[str] = ()
             ) -> dict[str, Iterator[tuple[str, dict]]]:
    """Checks the splits (patients disjoint, ids unique), fills the metadata and returns the
    split generators of the non-empty splits."""
    bags.check_patient_splits({s: [it.patient for it in v] for s, v in by_split.items()},
                              self.name)
    seen = {}
    for items in by_split.values():
      for it in items:
        if seen.setdefault(it.id, it.where) != it.where:
          raise FindingsFormatError(f"{it.where}: image {it.id} already listed at "
                                    f"{seen[it.id]}")
    self._summary = Summary(label_names)
    for split, items in by_split.items():
      self._summary.add_items(split, items)
    self._extra = {**dict(summary), "max_side": self.options.max_side,
                   "missing_files": {"policy": self.options.missing_files,
                                     **self._missing.as_dict()}}
    self.info.metadata.update(label_names=list(label_names), region_names=list(region_names),
                              class_names=list(class_names), summary=self._summary_dict())
    return {s: self._generate_examples(s, list(v)) for s, v in by_split.items() if v}

  def _summary_dict(self) -> dict:
    return {**self._summary.as_dict(), **self._extra}

  def _encode(self, item: Item) -> tuple[str, dict, dict]:
    try:
      pixels, header_view = read_grey8(item.path)
    except ValueError as e:
      raise FindingsFormatError(f"{item.where}: {e}") from e
    if not item.view and header_view:
      item = dataclasses.replace(item, view=header_view)
    example, counts = finding_record(pixels, item, max_side=self.options.max_side)
    return item.id, example, counts

  def _generate_examples(self, split: str, items: Sequence[Item]
                         ) -> Iterator[tuple[str, dict]]:
    # data_prep's thread pool (decoding and PNG encoding release the GIL).
    from data_prep import image_folder  # pylint: disable=g-import-not-at-top
    for key, example, counts in image_folder.ordered_map(self._encode, items):
      self._summary.add_counts(split, counts)
      yield key, example
    # The counts of writing (clipped / dropped boxes, regions) join the summary; TFDS writes
    # the metadata after every split is generated.
    self.info.metadata["summary"] = self._summary_dict()
