"""Whole-slide cohorts as 'bags' datasets (medguide_jax.data.bags): BCNB, and a user's slides.

    python -m data_prep.build bcnb --manual_dir=/data/BCNB
    python -m data_prep.build bcnb --manual_dir=/data/BCNB --option task=3 --option stats=all
    python -m data_prep.build wsi_folder:my_cohort --manual_dir=/data/my_slides \
        --option clinical=age:Age,tumour_size:Size --option level=1

Both builders write one record per bag of `bag_size` tiles (BALNMP's N=10), drawn once with a
seeded sampler (bags.slide_bag_records: seeded by `seed` and the slide's name, so a slide's
bags never depend on which other slides are built); every bag carries its patient's label
and clinical vector. Splits are patient-level: no patient is in two splits.

bcnb: the BCNB release (Xu et al., Front. Oncol. 2021; bupt-ai-cz/BALNMP) as downloaded:
  WSIs/<id>.jpg, WSIs/<id>.json     the slides and their tumour polygons
                                    ({"positive": [{"vertices": [[x, y], ...]}, ...]})
  patient-clinical-data.xlsx        one row per patient: 'Patient ID', 'Age(years)',
                                    'Tumour Size(cm)', 'ER', 'PR', 'HER2', ... 'ALN status'
  dataset-splitting/{train,val,test}_id.txt   the official 6:2:2 patient split
  Tiles are BALNMP's (slides.py): each polygon's bounding box, white outside the polygon,
  256 x 256 tiles, a tile dropped at a white fraction >= 0.3 (BALNMP's channel-counting
  rule, or 'pixels'). A slide whose JSON lists no polygon is tiled on its detected tissue.
  Instead of the WSIs, the processed-patches archive (paper_patches.zip) can be the source:
  patches/<id>/<id>_<region>_<x>_<y>.jpg (also under paper_patches/), tiles already cut and
  filtered by BALNMP; bags are drawn from them with the same seeded sampler, and the JPEG
  bytes are kept as they are (tile_format 'jpeg'). It is used with `patches=true`, or on its
  own when there is no WSIs/ folder. Tile positions are level-0 pixels when WSIs/<id>.json
  gives the region's origin, else -1.
  The label is the ALN task's (clinical.TASKS, 0: N0 vs N+(>0) by default); patients whose
  ALN status is outside the task are left out and counted in the summary. The clinical
  vector is clinical.BALNMP_FEATURES by default (age and tumour size z-scored, ER/PR/HER2
  'is negative' flags), with statistics from the training split ('train') or, as BALNMP's
  released tables, from every patient of the task in the three split files ('all').

wsi_folder:<tag>: a folder of slides of any format slides.open_slide reads (.svs, .tif,
  .ndpi, .mrxs, ... through OpenSlide; .jpg/.png through Pillow) and a CSV (`csv`, default
  slides.csv in the folder) with one row per slide: its file (relative to the folder, or
  absolute), patient, label and clinical columns, named by options. A `<slide>.json` beside
  a slide (same name, .json suffix) holds BCNB-style tumour polygons: BALNMP tiling at level
  0; otherwise tiles are cut on the tissue found by slides.tissue_tiles at `level` (or the
  level of `magnification`, from the slide's objective power) where at least `min_tissue`
  of the tile is tissue. Splits: `split_column` (train/validation/test, also val, test...),
  else a 'split' column if the CSV has one, else a patient-level hash of the patient id
  (seeded by `seed`): 70% train, 15% validation, 15% test. Labels: class_names are the
  label column's values, sorted (numerically when all are integers). Clinical features:
  `clinical=feature:column,...` (features of clinical.FEATURES, a bare name reading its
  BCNB column; a new feature as feature:column:kind, kind numeric, negative or category);
  none by default (an empty clinical vector). Every option is stored in the dataset's
  metadata: a prepared tag is reused with its options, and asking for it with other
  options is an error (use another tag).

Both: a missing numeric value is an error naming its row unless the feature is listed in
`missing` (e.g. missing=ki67): then it is the mean, plus a '<feature>_missing' column
(clinical.fit_encoder's 'mean_flag'). Categorical features are one-hot over the training
split's categories.

Each non-default bcnb option set is its own builder config (folder), e.g. 'task3_stats-all',
so settings never share files. Metadata: class_names, clinical_names, task (the ALN task
number for bcnb; the label column for wsi_folder), bag_size, tile_size, and a build summary:
patients, slides and bags per split, patients left out (outside the task, in no split
file), and the slides left out because no tile was kept (all background) or too few for
one bag; each of those is also a logged warning naming the slide.

Bad input is an error naming the file, the row or line, and the column: a slide (or patch
folder) listed but absent, a polygon outside its image (slides.SlideError), a clinical table
without a configured column or with a non-numeric value (clinical.ClinicalError), a patient
in two split files or two splits, a split whose slides give no bag at all. A failed build
leaves nothing behind (builders.prepare removes its folder).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Iterator, Mapping, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from data_prep import image_folder
from medguide_jax.data import bags
from medguide_jax.data import builders
from medguide_jax.data import clinical
from medguide_jax.data import images
from medguide_jax.data import slides

SPLITS = ("train", "validation", "test")
STATS = ("train", "all")
WHITE_RULES = ("balnmp", "pixels")
TILE_FORMATS = ("jpeg", "png")
KINDS = ("numeric", "negative", "category")
# Each ALN task's class names, by label (the statuses clinical.TASKS maps to each label).
TASK_CLASS_NAMES = {
    0: ("N0", "N+(>0)"),
    1: ("N+(1-2)", "N+(>2)"),
    2: ("N0", "N+(1-2)", "N+(>2)"),
    3: ("N0", "N+(1-2)"),
    4: ("N0", "N+(>2)"),
}
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# The BCNB release's files (bupt-ai-cz/BALNMP README and the BCNB dataset page).
BCNB_TABLE = "patient-clinical-data.xlsx"
BCNB_PATIENT_COLUMN = "Patient ID"
BCNB_SPLIT_DIR = "dataset-splitting"
BCNB_SPLIT_FILES = {"train": "train_id.txt", "validation": "val_id.txt", "test": "test_id.txt"}
BCNB_WSI_DIR = "WSIs"
BCNB_PATCH_DIRS = ("patches", os.path.join("paper_patches", "patches"))
_PATCH_RE = re.compile(r"^(?P<id>.+)_(?P<region>\d+)_(?P<x>\d+)_(?P<y>\d+)\.jpe?g$",
                       re.IGNORECASE)

BCNB_INSTRUCTIONS = """\
BCNB (Early Breast Cancer Core-Needle Biopsy WSI dataset; Xu et al., Front. Oncol. 2021;
non-commercial licence): request it from https://bupt-ai-cz.github.io/BCNB/ (links in
github.com/bupt-ai-cz/BALNMP download_dataset.md) and unpack it; the manual dir holds
  WSIs/<id>.jpg and WSIs/<id>.json       slides and tumour polygons (WSIs.zip)
  patient-clinical-data.xlsx             the clinical table
  dataset-splitting/{train,val,test}_id.txt
and, instead of or beside WSIs/, optionally patches/<id>/<id>_<region>_<x>_<y>.jpg (the
processed patches, paper_patches.zip; used with --option patches=true or when WSIs/ is absent).
  python -m data_prep.build bcnb --manual_dir=<manual_dir> --data_dir=<data_dir>
"""

WSI_FOLDER_INSTRUCTIONS = """\
wsi_folder:<tag> builds bags from a folder of your own whole-slide images (.svs, .tif, .ndpi,
.mrxs through OpenSlide; .jpg/.png through Pillow) and a CSV (default slides.csv in the folder)
with columns slide (file, relative to the folder), patient, label[, split] and any clinical
columns (--option clinical=age:Age,tumour_size:Size). An optional <slide>.json beside a slide
holds tumour polygons ({"positive": [{"vertices": [[x, y], ...]}]}); otherwise the tissue is
detected and tiled at --option level=<k> (or magnification=<x>).
  python -m data_prep.build wsi_folder:<tag> --manual_dir=<folder> --data_dir=<data_dir>
"""


class SlideCohortError(ValueError):
  """A cohort that does not look as expected; the message names the file, row and column."""


class MissingFileError(SlideCohortError, FileNotFoundError):
  """A file the cohort lists (a slide, a patch folder, a table) is not there."""


# ---------------------------------------------------------------------------------------------
# Configs


@dataclasses.dataclass(eq=False)
class SlideBagConfig(tfds.core.BuilderConfig):
  """What both builders share: clinical features, their statistics, tiling and bags."""
  clinical: tuple[str, ...] = ()
  missing: tuple[str, ...] = ()
  stats: str = "train"
  bag_size: int = slides.BAG_SIZE
  tile: int = slides.TILE
  white_rule: str = "balnmp"
  seed: int = 0
  tile_format: str = "jpeg"


@dataclasses.dataclass(eq=False)
class BcnbConfig(SlideBagConfig):
  """The ALN task, the clinical features by name, and whether to use the patches archive."""
  task: int = 0
  clinical: tuple[str, ...] = clinical.BALNMP_FEATURES
  patches: bool = False


@dataclasses.dataclass(eq=False)
class WsiFolderConfig(SlideBagConfig):
  """One user cohort (name = tag): its CSV and columns, clinical mapping and tiling."""
  csv: str = "slides.csv"
  slide_column: str = "slide"
  patient_column: str = "patient"
  label_column: str = "label"
  split_column: str | None = None
  level: int = 0
  magnification: float | None = None
  min_tissue: float = 0.5

  def options(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name in _WSI_FOLDER_OPTIONS}


_COMMON_OPTIONS = tuple(f.name for f in dataclasses.fields(SlideBagConfig)
                        if f.name not in {g.name for g in
                                          dataclasses.fields(tfds.core.BuilderConfig)})
_WSI_FOLDER_OPTIONS = _COMMON_OPTIONS + ("csv", "slide_column", "patient_column",
                                         "label_column", "split_column", "level",
                                         "magnification", "min_tissue")


def _check_common(config: SlideBagConfig) -> None:
  """A ValueError naming the option, for values no build could use."""
  if config.stats not in STATS:
    raise ValueError(f"stats={config.stats!r}; valid: {list(STATS)} ('all' = BALNMP's)")
  if int(config.bag_size) < 1:
    raise ValueError(f"bag_size={config.bag_size} must be >= 1")
  if int(config.tile) < 8:
    raise ValueError(f"tile={config.tile} must be >= 8 pixels")
  if config.white_rule not in WHITE_RULES:
    raise ValueError(f"white_rule={config.white_rule!r}; valid: {list(WHITE_RULES)}")
  if config.tile_format not in TILE_FORMATS:
    raise ValueError(f"tile_format={config.tile_format!r}; valid: {list(TILE_FORMATS)}")


def canonical_missing(entries: Sequence[str]) -> tuple[str, ...]:
  """The features whose missing values are imputed ('mean_flag'), sorted: how a `missing`
  option is stored, so equal settings are equal configs."""
  return tuple(sorted(f for f, p in parse_missing(entries).items() if p == "mean_flag"))


def bcnb_config(*, task: int = 0, clinical_features: Sequence[str] = clinical.BALNMP_FEATURES,
                missing: Sequence[str] = (), stats: str = "train",
                bag_size: int = slides.BAG_SIZE, tile: int = slides.TILE,
                white_rule: str = "balnmp", seed: int = 0, tile_format: str = "jpeg",
                patches: bool = False) -> BcnbConfig:
  """The config of a bcnb option set; its name spells out each non-default option
  ('default' when none is), so different settings never share files."""
  features = tuple(str(f).strip() for f in clinical_features)
  if int(task) not in clinical.TASKS:
    raise ValueError(f"task={task}; valid ALN tasks: {sorted(clinical.TASKS)}")
  unknown = [f for f in features if f not in clinical.FEATURES]
  if unknown:
    raise ValueError(f"clinical features {unknown} are unknown; valid: "
                     f"{sorted(clinical.FEATURES)} (BCNB's columns are fixed)")
  parse_clinical(features)  # a feature given twice
  imputed = canonical_missing(missing)
  parts = []
  if int(task):
    parts.append(f"task{int(task)}")
  if features != clinical.BALNMP_FEATURES:
    parts.append("clin-" + ("-".join(features) or "none"))
  if imputed:
    parts.append("missing-" + "-".join(imputed))
  if stats != "train":
    parts.append(f"stats-{stats}")
  if int(bag_size) != slides.BAG_SIZE:
    parts.append(f"bag{int(bag_size)}")
  if int(tile) != slides.TILE:
    parts.append(f"tile{int(tile)}")
  if white_rule != "balnmp":
    parts.append(f"white-{white_rule}")
  if int(seed):
    parts.append(f"seed{int(seed)}")
  if tile_format != "jpeg":
    parts.append(tile_format)
  if patches:
    parts.append("patches")
  name = "_".join(parts) or "default"
  config = BcnbConfig(
      name=name, task=int(task), clinical=features, missing=imputed, stats=stats,
      bag_size=int(bag_size), tile=int(tile), white_rule=white_rule, seed=int(seed),
      tile_format=tile_format, patches=bool(patches),
      description=f"BCNB ALN task {int(task)} bags ({name}).")
  _check_common(config)
  return config


# ---------------------------------------------------------------------------------------------
# Reading tables


def _cell_text(value) -> str:
  """A table cell as text: '' for empty, '3' for 3 and 3.0, else str(value) stripped."""
  if value is None:
    return ""
  if isinstance(value, float) and math.isfinite(value) and value == int(value):
    return str(int(value))
  return str(value).strip()


def read_xlsx(path: str) -> list[tuple[int, dict[str, str]]]:
  """(Excel row number, {column: text}) of each non-empty row of the first sheet, the first
  row being the header (openpyxl, read-only)."""
  import openpyxl  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise MissingFileError(f"{path} not found.\n{BCNB_INSTRUCTIONS}")
  try:
    workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise SlideCohortError(f"{path} cannot be read as an .xlsx workbook: "
                           f"{type(e).__name__}: {e}") from e
  try:
    rows = workbook.worksheets[0].iter_rows(values_only=True)
    header = [_cell_text(v) for v in next(rows, ())]
    named = [h for h in header if h]
    twice = sorted({h for h in named if named.count(h) > 1})
    if not named:
      raise SlideCohortError(f"{path}: the first row holds no column names")
    if twice:
      raise SlideCohortError(f"{path}: columns {twice} appear twice in the header row")
    out = []
    for number, values in enumerate(rows, start=2):
      texts = [_cell_text(v) for v in values]
      texts += [""] * (len(header) - len(texts))
      if any(texts):
        out.append((number, {h: t for h, t in zip(header, texts) if h}))
    if not out:
      raise SlideCohortError(f"{path}: no row below the header")
    return out
  finally:
    workbook.close()


def read_id_file(path: str) -> list[tuple[int, str]]:
  """(line number, id) of each non-blank line; an id listed twice is an error."""
  if not os.path.isfile(path):
    raise MissingFileError(f"{path} not found.\n{BCNB_INSTRUCTIONS}")
  out, seen = [], {}
  with open(path, encoding="utf-8-sig") as f:
    for number, line in enumerate(f, start=1):
      value = _cell_text(line)
      if not value:
        continue
      if value.endswith(".0") and value[:-2].isdigit():  # '12.0' written by a spreadsheet
        value = value[:-2]
      if value in seen:
        raise SlideCohortError(f"{path} line {number}: patient {value!r} is listed twice "
                               f"(also line {seen[value]})")
      seen[value] = number
      out.append((number, value))
  return out


def _check_columns(have: Sequence[str], wanted: Sequence[str], where: str) -> None:
  missing = sorted({c for c in wanted if c not in have})
  if missing:
    raise clinical.ClinicalError(f"{where}: no column(s) {missing}; it has {sorted(have)}")


def _fit_clinical(rows: Sequence[tuple[str, Mapping]], fit: Sequence[int] | None,
                  header: Sequence[str], config: SlideBagConfig, table: str
                  ) -> tuple[clinical.Encoder, list[np.ndarray]]:
  """(the encoder fitted on rows[i] for i in fit (None: all), each row's clinical vector).

  `rows` are (where, row), `where` naming the file and row, so that a value that is not a
  number (or neither 'Negative' nor 'Positive') names its row, in the fitting rows or not.
  """
  features, columns, spec = parse_clinical(config.clinical)
  _check_columns(header, list(columns.values()), table)
  if fit is not None and not fit:
    raise SlideCohortError(f"{table}: no training patient to fit the clinical statistics "
                           "on (stats='train'); use stats='all' or add training patients")
  encoder = clinical.fit_encoder(
      [r for _, r in rows], features=features, columns=columns, spec=spec,
      missing=parse_missing(config.missing), fit_rows=fit, wheres=[w for w, _ in rows],
      where=table)
  return encoder, [encoder.encode(row, where) for where, row in rows]


def parse_clinical(entries: Sequence[str]
                   ) -> tuple[tuple[str, ...], dict[str, str], dict[str, tuple[str, str]]]:
  """'feature', 'feature:column' or 'feature:column:kind' entries as (features, {feature:
  column}, spec of the features beyond clinical.FEATURES). A bare feature of FEATURES reads
  its BCNB column; a new feature needs its kind: numeric, negative or category."""
  features, columns, spec = [], {}, {}
  for entry in entries:
    feature, column, kind = (list(map(str.strip, str(entry).split(":", 2))) + ["", ""])[:3]
    if feature in columns:
      raise ValueError(f"clinical entry {entry!r}: feature {feature!r} is given twice")
    if kind:
      if kind not in KINDS:
        raise ValueError(f"clinical entry {entry!r}: kind {kind!r}; valid: {list(KINDS)}")
      spec[feature] = (kind, column or feature)
    elif feature not in clinical.FEATURES:
      raise ValueError(f"clinical entry {entry!r}: unknown feature {feature!r}; valid: "
                       f"{sorted(clinical.FEATURES)}, or a new one as feature:column:kind "
                       f"(kind {'/'.join(KINDS)})")
    if not feature or (":" in str(entry) and not column):
      raise ValueError(f"clinical entry {entry!r}: write feature, feature:column or "
                       "feature:column:kind")
    features.append(feature)
    columns[feature] = column or clinical.FEATURES[feature][1]
  return tuple(features), columns, spec


def parse_missing(entries: Sequence[str]) -> dict[str, str]:
  """'feature' or 'feature:policy' entries (clinical.MISSING_POLICIES; a bare feature is
  'mean_flag': a missing value is the mean, plus a '<feature>_missing' column)."""
  out = {}
  for entry in entries:
    feature, _, policy = (x.strip() for x in str(entry).partition(":"))
    policy = policy or "mean_flag"
    if not feature or policy not in clinical.MISSING_POLICIES:
      raise ValueError(f"missing entry {entry!r}: write feature or feature:policy, policy "
                       f"one of {list(clinical.MISSING_POLICIES)}")
    out[feature] = policy
  return out


# ---------------------------------------------------------------------------------------------
# The shared builder


@dataclasses.dataclass
class SlideJob:
  """One slide to tile into bags."""
  slide: str                         # its name in records (unique in the dataset)
  path: str                          # the slide file, or the patient's patch folder
  patient: str
  label: int
  clinical: np.ndarray
  annotation: str | None = None      # polygon JSON (BALNMP tiling), if any
  kind: str = "wsi"                  # 'wsi' or 'patches'


class _SlideCohort(bags.BagBuilder, skip_registration=True):
  """Tiles each split's slides into bags, on a thread pool, and keeps the build summary."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = ""

  def __init__(self, *, workers: int | None = None, **kwargs):
    self._workers = workers
    super().__init__(**kwargs)

  def _new_summary(self, **fields) -> dict:
    """The summary dict, stored in the metadata now and filled in while splits are built."""
    summary = {"patients": {}, "slides": {}, "bags": {}, "no_tissue": [],
               "too_few_tiles": [], "patients_without_bags": [], **fields}
    self.info.metadata["summary"] = summary
    return summary

  def _tiling(self, path: str) -> bags.TilingOptions:
    """How the slide at `path` is tiled (BALNMP's level-0 tiling, by default)."""
    del path  # the same for every slide
    config = self.builder_config
    return bags.TilingOptions(tile=int(config.tile), white_rule=config.white_rule)

  def _slide_records(self, job: SlideJob) -> tuple[list[tuple[str, dict]], int]:
    """(the (key, record) of each bag of one slide, how many tiles it kept)."""
    config = self.builder_config
    if job.kind == "patches":
      return _patch_records(job, config)
    polygons = bags.read_polygons(job.annotation) if job.annotation else None
    if job.annotation and not polygons:
      logging.info("%s lists no polygon: %s is tiled on its detected tissue.",
                   job.annotation, job.path)
    tiles = bags.slide_tiles(job.path, polygons, self._tiling(job.path))
    tiles.slide = job.slide
    records = bags.slide_bag_records(tiles, job.clinical, job.label, patient=job.patient,
                                     seed=int(config.seed), bag_size=int(config.bag_size),
                                     tile_format=config.tile_format)
    return records, len(tiles.tiles)

  def _generate_examples(self, split: str, jobs: Sequence[SlideJob]
                         ) -> Iterator[tuple[str, dict]]:
    summary = self.info.metadata["summary"]
    summary["bags"][split] = 0
    bagged = set()
    workers = self._workers or min(4, os.cpu_count() or 1)
    for job, (records, kept) in zip(jobs, image_folder.ordered_map(self._slide_records, jobs,
                                                                   workers)):
      if not kept:
        summary["no_tissue"].append(job.slide)
        logging.warning("%s: slide %s (%s) has no tile that is not background; it is left "
                        "out.", self.name, job.slide, job.path)
      elif not records:
        summary["too_few_tiles"].append(job.slide)
        logging.warning("%s: slide %s (%s) has %d tile(s), fewer than bag_size=%d; it is "
                        "left out.", self.name, job.slide, job.path, kept,
                        self.builder_config.bag_size)
      if records:
        bagged.add(job.patient)
      summary["bags"][split] += len(records)
      yield from records
    if not summary["bags"][split]:
      raise SlideCohortError(
          f"{self.name}: no slide of split {split!r} gives a bag ({len(jobs)} slide(s): "
          f"no tissue tile, or fewer than bag_size={self.builder_config.bag_size} tiles); "
          "check the slides, or lower bag_size / min_tissue")
    summary["patients_without_bags"] += sorted({j.patient for j in jobs} - bagged)

  def _split_jobs(self, jobs_by_split: Mapping[str, list[SlideJob]]) -> dict:
    """The generators of the non-empty splits, with the summary's per-split counts."""
    summary = self.info.metadata["summary"]
    for split, jobs in jobs_by_split.items():
      summary["patients"][split] = len({j.patient for j in jobs})
      summary["slides"][split] = len(jobs)
    return {split: self._generate_examples(split, jobs)
            for split, jobs in jobs_by_split.items() if jobs}


def _patch_records(job: SlideJob, config: SlideBagConfig) -> tuple[list[tuple[str, dict]], int]:
  """Bags of one patient's already-cut patches (BALNMP's patches/<id>/ folder), drawn with
  the seeded sampler of bags.draw_bags; JPEG bytes are kept as they are."""
  origins = {}
  if job.annotation:
    for region, vertices in enumerate(bags.read_polygons(job.annotation)):
      v = np.asarray(vertices, np.float64)
      if v.size:
        origins[region] = (int(np.floor(v[:, 0].min())), int(np.floor(v[:, 1].min())))
  found = []
  for name in sorted(os.listdir(job.path)):
    if name.startswith("."):
      continue
    m = _PATCH_RE.match(name)
    if not m or m["id"] != job.slide:
      raise SlideCohortError(f"{os.path.join(job.path, name)}: not a patch of patient "
                             f"{job.slide!r} (expected {job.slide}_<region>_<x>_<y>.jpg)")
    region, x, y = int(m["region"]), int(m["x"]), int(m["y"])
    found.append(((region, y, x), os.path.join(job.path, name)))
  found.sort()  # region by region, row by row: the order slide_tiles cuts a region in
  paths, xy = [], []
  for (region, y, x), path in found:
    paths.append(path)
    origin = origins.get(region)
    xy.append((-1, -1) if origin is None else (origin[0] + x, origin[1] + y))
  # The sampler of bags.slide_bag_records, so a patient's bags are drawn as from its slide.
  out = bags.draw_bags(paths, xy, job.clinical, job.label, patient=job.patient,
                       slide=job.slide, seed=int(config.seed), bag_size=int(config.bag_size),
                       encode=lambda p: _patch_bytes(p, int(config.tile), config.tile_format))
  return out, len(paths)


def _patch_bytes(path: str, tile: int, tile_format: str) -> bytes:
  """A patch file's bytes (re-encoded only for tile_format 'png'); its size must be `tile`."""
  try:
    with Image.open(path) as im:
      size = im.size
      pixels = np.asarray(im.convert("RGB")) if tile_format == "png" else None
  except OSError as e:
    raise slides.SlideError(f"patch {path}: cannot read it: {e}") from e
  if size != (tile, tile):
    raise slides.SlideError(f"patch {path} is {size[0]} x {size[1]}, not tile={tile}; the "
                            f"archive's patches are already cut: build with tile={size[0]}")
  if tile_format == "png":
    return images.encode_png(pixels)
  with open(path, "rb") as f:
    return f.read()


# ---------------------------------------------------------------------------------------------
# BCNB


class Bcnb(_SlideCohort):
  """BCNB core-needle-biopsy slides as bags, ALN status labels (module docstring: bcnb)."""

  name = "bcnb"
  BUILDER_CONFIGS = [bcnb_config()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = BCNB_INSTRUCTIONS
  HOMEPAGE = "https://bupt-ai-cz.github.io/BCNB/"

  def __init__(self, *, task: int | None = None, clinical: Sequence[str] | None = None,
               missing: Sequence[str] | None = None, stats: str | None = None,
               bag_size: int | None = None, tile: int | None = None,
               white_rule: str | None = None, seed: int | None = None,
               tile_format: str | None = None, patches: bool | None = None,
               workers: int | None = None, **kwargs):
    """Usual TFDS kwargs plus the options (None: the default) that select a config.

    Args:
      task: the ALN task, clinical.TASKS (0: N0 vs N+(>0); 1: N+(1-2) vs N+(>2); 2: three
        classes; 3: N0 vs N+(1-2); 4: N0 vs N+(>2)).
      clinical: the clinical feature names (clinical.FEATURES), in order; default BALNMP's.
      missing: numeric features whose missing values are imputed ('ki67' or
        'ki67:mean_flag': the mean, plus a 'ki67_missing' flag); default: an error.
      stats: 'train' (z-score statistics of the training split) or 'all' (BALNMP's).
      bag_size: tiles per bag (BALNMP: 10).
      tile: tile side in pixels (BALNMP: 256).
      white_rule: 'balnmp' (channel values at 255 / 3) or 'pixels' (white pixels).
      seed: seeds the bag sampler.
      tile_format: 'jpeg' (quality 100, as BALNMP's patches) or 'png'.
      patches: build from the processed-patches archive even when WSIs/ is there.
      workers: slides tiled at once (default min(4, CPUs)); not part of the config.
      **kwargs: data_dir, ... for tfds.core.GeneratorBasedBuilder.
    """
    if kwargs.get("config") is None:
      given = dict(task=task, clinical_features=clinical, missing=missing, stats=stats,
                   bag_size=bag_size, tile=tile, white_rule=white_rule, seed=seed,
                   tile_format=tile_format, patches=patches)
      given = {k: v for k, v in given.items() if v is not None}
      if given:
        default = self.BUILDER_CONFIGS[0]
        config = bcnb_config(**{
            "task": default.task, "clinical_features": default.clinical,
            "missing": default.missing, "stats": default.stats,
            "bag_size": default.bag_size, "tile": default.tile,
            "white_rule": default.white_rule, "seed": default.seed,
            "tile_format": default.tile_format, "patches": default.patches, **given})
        kwargs["config"] = default.name if config.name == default.name else config
    super().__init__(workers=workers, **kwargs)

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    config = self.builder_config
    table = os.path.join(root, BCNB_TABLE)
    header, by_patient = self._table(table)
    split_files = {s: os.path.join(root, BCNB_SPLIT_DIR, f)
                   for s, f in BCNB_SPLIT_FILES.items()}
    listed = {s: read_id_file(p) for s, p in split_files.items()}
    bags.check_patient_splits({s: [p for _, p in ids] for s, ids in listed.items()},
                              where=os.path.join(root, BCNB_SPLIT_DIR))
    source = self._tile_source(root)

    kept, outside = [], {s: 0 for s in SPLITS}
    for split, ids in listed.items():
      for line, patient in ids:
        if patient not in by_patient:
          raise SlideCohortError(f"{split_files[split]} line {line}: patient {patient!r} has "
                                 f"no row in {table}")
        where, row = by_patient[patient]
        try:
          label = clinical.aln_label(row[clinical.ALN_COLUMN], config.task)
        except clinical.ClinicalError as e:
          raise clinical.ClinicalError(f"{where}, column {clinical.ALN_COLUMN!r}: {e}") from e
        if label is None:  # an ALN status the task leaves out
          outside[split] += 1
        else:
          kept.append(_Patient(patient, split, label, where, row, split_files[split]))

    fit = None if config.stats == "all" else [
        i for i, p in enumerate(kept) if p.split == "train"]
    encoder, vectors = _fit_clinical([(p.where, p.row) for p in kept], fit, header, config,
                                     table)
    jobs = {s: [] for s in SPLITS}
    for patient, vector in zip(kept, vectors):
      jobs[patient.split].append(self._job(root, source, patient, vector))

    in_splits = {p for ids in listed.values() for _, p in ids}
    self.info.metadata.update(
        class_names=list(TASK_CLASS_NAMES[config.task]), clinical_names=encoder.names,
        task=config.task, bag_size=config.bag_size, tile_size=config.tile,
        tiles_from=source, clinical_stats=config.stats)
    self._new_summary(tiles_from=source, outside_task=outside,
                      not_in_split_files=len(set(by_patient) - in_splits))
    return self._split_jobs(jobs)

  def _table(self, table: str) -> tuple[list[str], dict[str, tuple[str, dict[str, str]]]]:
    """(the clinical table's columns, patient -> (where: the file and row, its row))."""
    rows = read_xlsx(table)
    header = list(rows[0][1])
    _check_columns(header, [BCNB_PATIENT_COLUMN, clinical.ALN_COLUMN], table)
    out, numbers = {}, {}
    for number, row in rows:
      patient = row[BCNB_PATIENT_COLUMN]
      if not patient:
        raise SlideCohortError(f"{table}, row {number}: empty {BCNB_PATIENT_COLUMN!r}")
      if patient in out:
        raise SlideCohortError(f"{table}, row {number}: patient {patient!r} is also in row "
                               f"{numbers[patient]}")
      numbers[patient] = number
      out[patient] = (f"{table}, row {number} (patient {patient})", row)
    return header, out

  def _tile_source(self, root: str) -> str:
    """'patches' (the processed-patches archive) when asked, or when there is no WSIs/
    folder but a patches one; else 'wsi'."""
    if self.builder_config.patches or (_patch_dir(root) and
                                       not os.path.isdir(os.path.join(root, BCNB_WSI_DIR))):
      if _patch_dir(root) is None:
        raise MissingFileError(f"{root}: no patches/ folder (the processed-patches archive) "
                               f"for patches=true.\n{BCNB_INSTRUCTIONS}")
      if self.builder_config.white_rule != "balnmp":
        raise SlideCohortError(f"{_patch_dir(root)}: the patches are already cut and "
                               "filtered by BALNMP's white rule; white_rule applies to WSIs")
      return "patches"
    if not os.path.isdir(os.path.join(root, BCNB_WSI_DIR)):
      raise MissingFileError(f"{os.path.join(root, BCNB_WSI_DIR)} not found (nor a patches/ "
                             f"folder).\n{BCNB_INSTRUCTIONS}")
    return "wsi"

  def _job(self, root: str, source: str, patient: _Patient, vector: np.ndarray) -> SlideJob:
    """The slide (or patch folder) of one patient; absent: an error naming the split file."""
    annotation = os.path.join(root, BCNB_WSI_DIR, f"{patient.id}.json")
    if source == "patches":
      path = os.path.join(_patch_dir(root), patient.id)
      if not os.path.isdir(path):
        raise MissingFileError(f"{patient.split_file} lists patient {patient.id!r}, but its "
                               f"patch folder {path} is not there")
      return SlideJob(patient.id, path, patient.id, patient.label, vector,
                      annotation if os.path.isfile(annotation) else None, kind="patches")
    path = os.path.join(root, BCNB_WSI_DIR, f"{patient.id}.jpg")
    if not os.path.isfile(path):
      raise MissingFileError(f"{patient.split_file} lists patient {patient.id!r}, but its "
                             f"slide {path} is not there")
    if not os.path.isfile(annotation):
      raise MissingFileError(f"slide {path}: its tumour annotation {annotation} is not "
                             "there (BALNMP tiles the annotated regions)")
    return SlideJob(patient.id, path, patient.id, patient.label, vector, annotation)


@dataclasses.dataclass(frozen=True)
class _Patient:
  """A BCNB patient in the task: where its row is, and which split file lists it."""
  id: str
  split: str
  label: int
  where: str
  row: Mapping[str, str]
  split_file: str


def _patch_dir(root: str) -> str | None:
  """The processed-patches folder of a BCNB manual dir (patches/ or paper_patches/patches/)."""
  return next((os.path.join(root, d) for d in BCNB_PATCH_DIRS
               if os.path.isdir(os.path.join(root, d))), None)


# ---------------------------------------------------------------------------------------------
# A user's slide folder


def patient_split(patient: str, seed: int = 0) -> str:
  """The split of a patient without a split column: a seeded hash, 70/15/15."""
  return image_folder.hash_split(f"{int(seed)}/{patient}", validation=0.15, test=0.15)


class WsiFolder(_SlideCohort):
  """A user's folder of whole-slide images as bags (module docstring: wsi_folder)."""

  name = "wsi_folder"
  BUILDER_CONFIGS = [WsiFolderConfig(name="default", description="An untagged cohort.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = WSI_FOLDER_INSTRUCTIONS

  def __init__(self, *, tag: str | None = None, csv: str | None = None,
               slide_column: str | None = None, patient_column: str | None = None,
               label_column: str | None = None, split_column: str | None = None,
               clinical: Sequence[str] | None = None, missing: Sequence[str] | None = None,
               stats: str | None = None, bag_size: int | None = None,
               tile: int | None = None,
               white_rule: str | None = None, seed: int | None = None,
               tile_format: str | None = None, level: int | None = None,
               magnification: float | None = None, min_tissue: float | None = None,
               workers: int | None = None, **kwargs):
    """Usual TFDS kwargs plus the cohort's tag and options.

    Options left at None take their default when building, and whatever the tag was built
    with when it is already prepared (so training, which passes none, reuses it); an option
    given explicitly must match a prepared tag's.

    Args:
      tag: the cohort's name: its config and folder (letters, digits, '_', '-', '.').
      csv: the slide table, relative to the manual dir (default slides.csv).
      slide_column, patient_column, label_column: its columns (slide, patient, label).
      split_column: a column of train/validation/test (default: 'split' if there, else a
        70/15/15 hash of the patient id, seeded by `seed`).
      clinical: 'feature:column' entries (features of clinical.FEATURES; a bare name reads
        its BCNB column), or 'feature:column:kind' for a new feature (kind numeric, negative
        or category); default none.
      missing: numeric features whose missing values are imputed (as bcnb's).
      stats: 'train' (z-score statistics of the training split) or 'all'.
      bag_size, tile, white_rule, seed, tile_format: as bcnb's.
      level: the slide level tiles are cut at on detected tissue (default 0).
      magnification: instead of level: the level of this magnification (e.g. 20 on a 40x
        scan is level with downsample 2), from the slide's objective power.
      min_tissue: fraction of a tile that must be tissue (default 0.5).
      workers: slides tiled at once (default min(4, CPUs)); not stored.
      **kwargs: data_dir, ... for tfds.core.GeneratorBasedBuilder.
    """
    name = "default" if tag is None else str(tag)
    if not _TAG_RE.match(name):
      raise ValueError(f"wsi_folder tag {name!r}: use letters, digits, '_', '-' and '.' "
                       "(it names a folder).")
    given = dict(csv=csv, slide_column=slide_column, patient_column=patient_column,
                 label_column=label_column, split_column=split_column,
                 clinical=None if clinical is None else tuple(str(c) for c in clinical),
                 missing=None if missing is None else canonical_missing(missing),
                 stats=stats, bag_size=None if bag_size is None else int(bag_size),
                 tile=None if tile is None else int(tile), white_rule=white_rule,
                 seed=None if seed is None else int(seed), tile_format=tile_format,
                 level=None if level is None else int(level),
                 magnification=None if magnification is None else float(magnification),
                 min_tissue=None if min_tissue is None else float(min_tissue))
    given = {k: v for k, v in given.items() if v is not None}
    options = builders.tagged_options(type(self), kwargs.get("data_dir"), name, given,
                                      WsiFolderConfig(name=name).options())
    config = WsiFolderConfig(name=name, description=f"User slide cohort {name!r}.", **options)
    _check_common(config)
    parse_clinical(config.clinical)
    if config.level < 0:
      raise ValueError(f"level={config.level} must be >= 0")
    if config.magnification is not None and not config.magnification > 0:
      raise ValueError(f"magnification={config.magnification} must be > 0")
    if not 0 < config.min_tissue <= 1:
      raise ValueError(f"min_tissue={config.min_tissue} must be in (0, 1]")
    kwargs["config"] = config
    super().__init__(workers=workers, **kwargs)

  def _tiling(self, path: str) -> bags.TilingOptions:
    """The tiling of one slide: its level from `magnification` when given."""
    config = self.builder_config
    level = config.level
    slide = slides.open_slide(path)
    if config.magnification is not None:
      level = slides.level_for(slide, magnification=config.magnification)
    if level >= slide.level_count:
      raise slides.SlideError(f"slide {path}: level {level} asked, but it has "
                              f"{slide.level_count} level(s)")
    return bags.TilingOptions(tile=int(config.tile), white_rule=config.white_rule,
                              level=level, min_tissue=float(config.min_tissue))

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    config = self.builder_config
    csv_path = config.csv if os.path.isabs(config.csv) else os.path.join(root, config.csv)
    if not os.path.isfile(csv_path):
      raise MissingFileError(f"{csv_path} not found: wsi_folder needs a slide table (option "
                             f"csv).\n{WSI_FOLDER_INSTRUCTIONS}")
    required = [config.slide_column, config.patient_column, config.label_column]
    if config.split_column:
      required.append(config.split_column)
    rows = image_folder.read_csv(csv_path, tuple(required))
    if not rows:
      raise SlideCohortError(f"{csv_path}: no slide is listed")
    split_column = config.split_column or ("split" if "split" in rows[0] else None)
    _, columns, _ = parse_clinical(config.clinical)
    _check_columns(list(rows[0]), list(columns.values()), csv_path)

    patients: dict[str, dict] = {}  # patient -> {line, row, label, split}
    entries, names = [], {}         # (line, slide name, path, patient)
    for line, row in enumerate(rows, start=2):  # line 1 is the header
      where = f"{csv_path} line {line}"
      value = row[config.slide_column].replace("\\", "/")
      patient, label = row[config.patient_column], row[config.label_column]
      for column, text in ((config.slide_column, value), (config.patient_column, patient),
                           (config.label_column, label)):
        if not text:
          raise SlideCohortError(f"{where}: empty {column!r}")
      path = value if os.path.isabs(value) else os.path.join(root, *value.split("/"))
      if not os.path.exists(path):
        raise MissingFileError(f"{where}: slide {value!r} is not there ({path})")
      name = os.path.splitext(value.lstrip("/"))[0]
      if name in names:
        raise SlideCohortError(f"{where}: slide {name!r} is listed twice (also line "
                               f"{names[name]})")
      names[name] = line
      split = self._split_of(row, split_column, patient, where)
      first = patients.setdefault(patient, {"line": line, "row": row, "label": label,
                                            "split": split})
      if first["label"] != label:
        raise SlideCohortError(f"{where}: patient {patient!r} has label {label!r}, but "
                               f"{first['label']!r} on line {first['line']}")
      differ = [c for c in columns.values() if first["row"][c] != row[c]]
      if differ:
        raise SlideCohortError(f"{where}: patient {patient!r} has other clinical values in "
                               f"columns {differ} than on line {first['line']}")
      entries.append((line, name, path, patient, split))
    bags.check_patient_splits(
        {s: [p for _, _, _, p, sp in entries if sp == s] for s in SPLITS}, where=csv_path)

    class_names = image_folder.sort_class_names(p["label"] for p in patients.values())
    index = {c: i for i, c in enumerate(class_names)}
    order = list(patients)
    fit = None if config.stats == "all" else [
        i for i, p in enumerate(order) if patients[p]["split"] == "train"]
    encoder, vectors = _fit_clinical(
        [(f"{csv_path} line {patients[p]['line']}", patients[p]["row"]) for p in order],
        fit, list(rows[0]), config, csv_path)
    vector_of = dict(zip(order, vectors))
    jobs = {s: [] for s in SPLITS}
    for _, name, path, patient, split in entries:
      annotation = os.path.splitext(path)[0] + ".json"
      jobs[split].append(SlideJob(name, path, patient, index[patients[patient]["label"]],
                                  vector_of[patient],
                                  annotation if os.path.isfile(annotation) else None))

    self.info.metadata.update(
        class_names=class_names, clinical_names=encoder.names, task=config.label_column,
        bag_size=config.bag_size, tile_size=config.tile, options=config.options(),
        archive=root, clinical_stats=config.stats)
    self._new_summary(
        split_from=split_column or f"hash of the patient id (seed {config.seed})",
        with_polygons=sum(1 for js in jobs.values() for j in js if j.annotation))
    return self._split_jobs(jobs)

  def _split_of(self, row: Mapping[str, str], column: str | None, patient: str,
                where: str) -> str:
    if column is None:
      return patient_split(patient, self.builder_config.seed)
    split = image_folder.SPLIT_ALIASES.get(row[column].strip().lower())
    if split is None:
      raise SlideCohortError(f"{where}, column {column!r}: unknown split {row[column]!r}; "
                             f"use one of {sorted(image_folder.SPLIT_ALIASES)}")
    return split

