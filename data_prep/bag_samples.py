"""'bags' builders over the project's shared real samples, for the missing_modality method.

Both write the 'bags' layout of `medguide_jax.data.bags` (tiles, tile_xy, clinical, label,
patient, slide, id) and its metadata (class_names, clinical_names, task, bag_size, tile_size,
summary), and need a manual dir: the folder named in their MANUAL_DOWNLOAD_INSTRUCTIONS (here a
folder of ../shared/data). They are real-data plumbing checks at toy scale, not benchmarks.

  tcga_lung_tiles    190 TCGA lung H&E tiles (256 x 256 JPEG) of 4 slide regions, LUAD = 0 /
                     LUSC = 1, read from mahmoodlab/UNI's tcga_luadlusc.zip without unpacking
                     it. One "slide" (and "patient": the only identity known; whether two
                     regions share a TCGA patient is not recorded) per region K of the tiles'
                     names row_col_K.jpg ('LUAD_521'); tiles keep their JPEG bytes;
                     tile_xy = (col, row) x 256. No clinical data exists: the clinical vector
                     is empty (C = 0, clinical_names []); a constant would look like a
                     present-but-uninformative modality, which C = 0 says more plainly.
                     Bags: BALNMP's fixed `bag_size`-tile bags drawn once with a seed (0: one
                     bag of every tile of a region part). Splits: test = the zip's test regions
                     (2); train and validation share the zip's 2 train regions, since a held-out
                     region is impossible: validation is the bottom `validation_fraction` of
                     each train region's tile rows (1 of 7 and 1 of 6 rows by default), bagged
                     apart from the rest. So validation bags come from the same slides as
                     training bags (tile-disjoint, spatially separated by rows, but the same
                     tissue): validation numbers measure plumbing, not generalisation.
                     Default: train 11 bags, validation 2, test 6.
  ham10000_clinical  HAM10000 dermoscopy with age, sex and body site: melanoma (dx == 'mel')
                     = 1 vs the other 6 diagnoses = 0. One record per image (one image per
                     lesion in the shared subset); its bag is the image itself (original JPEG
                     bytes; tile_size 0: native size, 200 x 150 here) or, with `crops=k`, k
                     seeded random `crop_size` squares of it (PNG, lossless).
                     patient = lesion_id (HAM10000 has no patient ids), slide = image_id.
                     Splits are those of the `ham10000` builder (shared_samples: by lesion,
                     80/10/10 per diagnosis, ranked by hash of the lesion id): the same lesions
                     in each split as there, and stratified on mel vs rest too (mel is one of
                     the diagnoses). Clinical vector (`HAM_CLINICAL_SPEC`): age z-scored with
                     the training images' statistics, an age_missing flag, and sex and body
                     site (`localization`) one-hot over the training split's categories (a
                     category unseen in training is all zeros; the release's own 'unknown',
                     or an empty value, is a category). A missing age ('', 'nan', 'unknown':
                     57 rows of the full release, none of the 671-image subset) is imputed
                     with the training mean (z = 0) and flagged age_missing = 1; an age that
                     is present but not a number is an error naming the CSV line
                     (clinical.ClinicalError, from clinical.fit_encoder's 'mean_flag').

Every other inconsistency in a release is an error (SharedSamplesFormatError, a ValueError)
naming the file and the member, CSV line or column.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import zipfile
import zlib
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from data_prep import image_folder
from data_prep import shared_samples
from medguide_jax.data import bags
from medguide_jax.data import clinical

SPLITS = shared_samples.SPLITS
SharedSamplesFormatError = shared_samples.SharedSamplesFormatError


def _image_size(data: bytes, where: str) -> tuple[int, int]:
  """(width, height) of encoded image bytes; one that is not an image names `where`."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.size
  except Exception as e:  # pylint: disable=broad-except
    raise SharedSamplesFormatError(f"{where}: not a readable image: {e}") from e


# ---------------------------------------------------------------------------------------------
# TCGA LUAD / LUSC tiles


TCGA_ZIP = "tcga_luadlusc.zip"
TCGA_CLASSES = ("LUAD", "LUSC")
TCGA_RELEASE_SPLITS = ("train", "test")
TCGA_TILE = 256
_TILE_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)\.jpe?g$", re.IGNORECASE)

TCGA_LUNG_INSTRUCTIONS = f"""\
TCGA lung H&E tiles, LUAD vs LUSC (mahmoodlab/UNI, assets/data/tcga_luadlusc.zip; CC BY-NC-ND
4.0, images from TCGA / NCI GDC): 190 JPEG tiles of 256 x 256 in
<prefix>/{{train,test}}/{{LUAD,LUSC}}/row_col_K.jpg, K one slide region (4 regions). The
project's copy is ../shared/data/histo_tcga_luad_lusc_tiles; the manual dir is the folder
holding {TCGA_ZIP}, which is read as is (never unpacked, never modified).
  python -m data_prep.build tcga_lung_tiles \\
      --manual_dir=../shared/data/histo_tcga_luad_lusc_tiles --data_dir=<data_dir>
"""


@dataclasses.dataclass
class Region:
  """One slide region of the zip: its tiles' JPEG bytes and (row, col), sorted by position."""
  slide: str                          # '<class>_<K>', e.g. 'LUAD_521'
  release_split: str                  # 'train' | 'test' (the zip's folder)
  label: int
  tiles: list[bytes] = dataclasses.field(default_factory=list)
  rowcol: list[tuple[int, int]] = dataclasses.field(default_factory=list)


def read_tcga_zip(path: str, instructions: str = TCGA_LUNG_INSTRUCTIONS) -> list[Region]:
  """The regions of tcga_luadlusc.zip, read in memory (nothing is written beside it).

  A missing or unreadable zip, a {train,test}/{LUAD,LUSC} folder with no tile, a tile whose
  name is not row_col_K.jpg or that is not a 256 x 256 image, and a region K found in two
  folders are errors naming the zip and the folder or member.
  """
  if not os.path.isfile(path):
    raise SharedSamplesFormatError(f"{path} not found.\n{instructions}")
  regions: dict[str, Region] = {}
  folder_of: dict[str, str] = {}
  try:
    archive = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise SharedSamplesFormatError(f"{path} cannot be read as a zip file: {e}") from e
  with archive:
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
      parts = info.filename.split("/")
      if (info.is_dir() or len(parts) < 3 or any(p.startswith((".", "__MACOSX")) for p in parts)
          or parts[-3] not in TCGA_RELEASE_SPLITS or parts[-2] not in TCGA_CLASSES):
        continue  # folders, macOS metadata, and anything outside the class folders
      split, cls, name = parts[-3:]
      where = f"{path}: member {info.filename}"
      m = _TILE_NAME.match(name)
      if not m:
        raise SharedSamplesFormatError(f"{where}: expected a tile named row_col_K.jpg.")
      row, col, k = (int(g) for g in m.groups())
      folder = "/".join(parts[:-1])
      slide = f"{cls}_{k}"
      if folder_of.setdefault(slide, folder) != folder:
        raise SharedSamplesFormatError(f"{where}: region K={k} also has tiles in "
                                       f"{folder_of[slide]}/; a region has one folder.")
      try:
        data = archive.read(info)
      except (OSError, zipfile.BadZipFile, zlib.error) as e:
        raise SharedSamplesFormatError(f"{where} cannot be read: {e}") from e
      size = _image_size(data, where)
      if size != (TCGA_TILE, TCGA_TILE):
        raise SharedSamplesFormatError(f"{where}: a {size[0]} x {size[1]} image; tiles are "
                                       f"{TCGA_TILE} x {TCGA_TILE}.")
      region = regions.setdefault(slide, Region(slide, split, TCGA_CLASSES.index(cls)))
      region.tiles.append(data)
      region.rowcol.append((row, col))
  found = {(r.release_split, TCGA_CLASSES[r.label]) for r in regions.values()}
  missing = [f"{s}/{c}/" for s in TCGA_RELEASE_SPLITS for c in TCGA_CLASSES
             if (s, c) not in found]
  if missing:
    raise SharedSamplesFormatError(
        f"{path}: no tile in {missing} (found {sorted(f'{s}/{c}/' for s, c in found)}); "
        f"the zip needs tiles in every {{train,test}}/{{LUAD,LUSC}} folder.\n{instructions}")
  out = []
  for slide in sorted(regions):
    r = regions[slide]
    order = sorted(range(len(r.tiles)), key=lambda i: r.rowcol[i])
    out.append(Region(r.slide, r.release_split, r.label, [r.tiles[i] for i in order],
                      [r.rowcol[i] for i in order]))
  return out


def validation_rows(rows: Sequence[int], fraction: float) -> set[int]:
  """The bottom `fraction` of a region's distinct tile rows (at least one row when
  fraction > 0, never all of them)."""
  distinct = sorted(set(rows))
  if fraction <= 0 or len(distinct) < 2:
    return set()
  n = min(max(1, round(fraction * len(distinct))), len(distinct) - 1)
  return set(distinct[-n:])


@dataclasses.dataclass(eq=False)
class TcgaLungConfig(tfds.core.BuilderConfig):
  """Tiles per bag (0: one bag of every tile of a region part), the validation fraction of
  each train region's tile rows, and the bag sampler's seed."""
  bag_size: int = bags.BAG_SIZE
  validation_fraction: float = 0.2
  seed: int = 0


def _tcga_config(bag_size: int, validation_fraction: float, seed: int) -> TcgaLungConfig:
  default = TcgaLungConfig(name="default")
  if bag_size < 0:
    raise ValueError(f"bag_size={bag_size} must be >= 1, or 0 for one bag per region part")
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1)")
  if (bag_size, validation_fraction, seed) == (default.bag_size, default.validation_fraction,
                                               default.seed):
    return default
  val = f"{100 * validation_fraction:g}".replace(".", "p")
  return TcgaLungConfig(name=f"bag{bag_size}_val{val}_seed{seed}", bag_size=bag_size,
                        validation_fraction=validation_fraction, seed=seed,
                        description=f"{bag_size or 'all'}-tile bags, validation = bottom "
                        f"{100 * validation_fraction:g}% of train rows, seed {seed}.")


class TcgaLungTiles(bags.BagBuilder):
  """TCGA lung H&E tile bags, LUAD vs LUSC, 4 slide regions (module docstring)."""

  name = "tcga_lung_tiles"
  MANUAL_DOWNLOAD_INSTRUCTIONS = TCGA_LUNG_INSTRUCTIONS
  BUILDER_CONFIGS = [TcgaLungConfig(name="default", description=(
      "10-tile bags, validation = bottom 20% of each train region's rows, seed 0."))]

  def __init__(self, *, bag_size: int | None = None, validation_fraction: float | None = None,
               seed: int | None = None, **kwargs):
    """Usual TFDS kwargs, plus the options of TcgaLungConfig (None: the default's)."""
    if bag_size is not None or validation_fraction is not None or seed is not None:
      default = self.BUILDER_CONFIGS[0]
      kwargs["config"] = _tcga_config(
          default.bag_size if bag_size is None else int(bag_size),
          default.validation_fraction if validation_fraction is None
          else float(validation_fraction), default.seed if seed is None else int(seed))
    super().__init__(**kwargs)

  def split_records(self, regions: Sequence[Region]) -> tuple[dict[str, list], dict]:
    """(split -> [(key, record)], the per-region summary)."""
    config = self.builder_config
    splits = {s: [] for s in SPLITS}
    summary = {}
    for r in regions:
      held_out = (validation_rows([row for row, _ in r.rowcol], config.validation_fraction)
                  if r.release_split == "train" else set())
      parts = ({"train": [], "validation": []} if r.release_split == "train"
               else {"test": []})
      for i, (row, _) in enumerate(r.rowcol):
        parts["validation" if row in held_out else r.release_split].append(i)
      info = {"release_split": r.release_split, "class": TCGA_CLASSES[r.label],
              "tiles": len(r.tiles), "rows": len(set(row for row, _ in r.rowcol)),
              "validation_rows": sorted(held_out), "bags": {}, "dropped_tiles": 0}
      first = 0
      for split, chosen in parts.items():
        records = bags.draw_bags(
            [r.tiles[i] for i in chosen],
            [(col * TCGA_TILE, row * TCGA_TILE) for row, col in (r.rowcol[i] for i in chosen)],
            np.zeros((0,), np.float32), r.label, patient=r.slide, slide=r.slide,
            seed=config.seed, seed_key=f"{r.slide}/{split}", bag_size=config.bag_size,
            first_bag=first)
        first += len(records)
        splits[split] += records
        info["bags"][split] = len(records)
        info["dropped_tiles"] += len(chosen) - sum(len(rec["tiles"]) for _, rec in records)
      summary[r.slide] = info
    bags.check_patient_splits({s: sorted({rec["patient"] for _, rec in splits[s]})
                               for s in ("train", "test")}, f"{self.name} train/test")
    return splits, summary

  def _split_generators(self, dl_manager):
    path = os.path.join(os.fspath(dl_manager.manual_dir), TCGA_ZIP)
    splits, regions = self.split_records(read_tcga_zip(path))
    config = self.builder_config
    self.info.metadata.update(
        class_names=list(TCGA_CLASSES), clinical_names=[],
        task="LUAD (0) vs LUSC (1), one label per slide region",
        bag_size=config.bag_size, tile_size=TCGA_TILE,
        summary={"regions": regions, "bags": {s: len(v) for s, v in splits.items()},
                 "validation": (f"bottom {100 * config.validation_fraction:g}% of the rows "
                                "of each train region (same slides as train: plumbing only)"),
                 "clinical": "none (C = 0)", "seed": config.seed})
    return {s: self._generate_examples(items) for s, items in splits.items() if items}

  def _generate_examples(self, items) -> Iterator[tuple[str, dict]]:
    yield from items


# ---------------------------------------------------------------------------------------------
# HAM10000 with clinical data


HAM_CLASSES = ("non-melanoma", "melanoma")
HAM_CLINICAL_COLUMNS = ("age", "sex", "localization")

HAM10000_CLINICAL_INSTRUCTIONS = """\
HAM10000 (Tschandl et al., "The HAM10000 dataset...", Sci Data 2018; CC BY-NC 4.0, ISIC archive /
Harvard Dataverse doi:10.7910/DVN/DBW86T): 10,015 dermoscopic images of 7 diagnoses, with the
patients' age, sex and body site (localization). The project's 671-image subset is
../shared/data/derm_ham10000_small. The manual dir holds metadata_subset.csv (or the release's
HAM10000_metadata.csv; columns lesion_id,image_id,dx,age,sex,localization) and the images as
images/<image_id>.jpg (or the release's HAM10000_images_part_1/ and HAM10000_images_part_2/).
  python -m data_prep.build ham10000_clinical --manual_dir=../shared/data/derm_ham10000_small \\
      --data_dir=<data_dir> [--option crops=4 --option crop_size=128]
"""


# The metadata files the `ham10000` builder looks for, in its order of preference.
_HAM_METADATA = shared_samples.HAM_METADATA


def metadata_path(root: str) -> str:
  """The HAM10000 metadata file of a manual dir, chosen as the `ham10000` builder does."""
  for name in _HAM_METADATA:
    if os.path.isfile(os.path.join(root, name)):
      return os.path.join(root, name)
  raise SharedSamplesFormatError(f"{root}: none of {list(_HAM_METADATA)} found.\n"
                                 f"{HAM10000_CLINICAL_INSTRUCTIONS}")


# HAM10000's clinical columns as clinical.fit_encoder features: age z-scored with the
# training statistics (a missing age is the training mean, with an age_missing flag), sex and
# body site one-hot over the training split's values (empty is 'unknown', HAM10000's word).
HAM_CLINICAL_SPEC = {"age": ("numeric", "age"), "sex": ("category", "sex"),
                     "body_site": ("category", "localization")}


def fit_ham_encoder(train: Sequence["HamImage"]) -> clinical.Encoder:
  return clinical.fit_encoder([im.clinical for im in train], features=tuple(HAM_CLINICAL_SPEC),
                              spec=HAM_CLINICAL_SPEC, missing={"age": "mean_flag"},
                              wheres=[im.where for im in train], where="HAM10000 metadata")


@dataclasses.dataclass(frozen=True)
class HamImage:
  """One metadata row: image path (relative to the manual dir), ids, label, clinical row."""
  relative: str
  lesion: str
  image_id: str
  dx: str
  label: int
  clinical: Mapping[str, str]
  where: str                          # '<metadata> line <n>'


def read_ham_images(root: str) -> list[HamImage]:
  """Every row of the HAM10000 metadata with its clinical columns, checked: the clinical
  columns first (a file without 'age' is an error naming it and the column), then the
  `ham10000` builder's checks (diagnosis, lesion consistency, image present)."""
  path = metadata_path(root)
  try:
    table = image_folder.read_csv(path, ("lesion_id", "image_id", "dx")
                                  + HAM_CLINICAL_COLUMNS)
  except ValueError as e:  # names the file and the missing columns
    raise SharedSamplesFormatError(f"{e}\n(ham10000_clinical needs the clinical columns "
                                   f"{list(HAM_CLINICAL_COLUMNS)})") from e
  # shared_samples.Ham10000.rows reads only class attributes: reused as is, so the two
  # builders accept and reject the same releases.
  ham = shared_samples.Ham10000
  rows = ham.rows(root)
  if len(rows) != len(table):
    raise SharedSamplesFormatError(f"{path}: {len(table)} rows but {len(rows)} images.")
  out = []
  for line, ((relative, lesion, dx_index), row) in enumerate(zip(rows, table), start=2):
    dx = ham.CLASS_NAMES[dx_index]
    out.append(HamImage(relative, lesion, row["image_id"], dx, int(dx == "mel"),
                        {c: row[c] for c in HAM_CLINICAL_COLUMNS}, f"{path} line {line}"))
  return out


def ham_split_of(images: Sequence[HamImage]) -> dict[str, str]:
  """lesion_id -> split: the `ham10000` builder's lesion splits (stratified by diagnosis,
  hence by mel vs rest too)."""
  ham = shared_samples.Ham10000
  return ham.lesion_splits([(im.relative, im.lesion, ham.CLASS_NAMES.index(im.dx))
                                 for im in images])


def random_crops(image: np.ndarray, k: int, size: int, seed, where: str
                 ) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
  """k `size` x `size` crops at uniform random positions (seeded), and their (x, y)."""
  h, w = image.shape[:2]
  if size > min(h, w):
    raise SharedSamplesFormatError(f"{where}: crop_size {size} exceeds the image "
                                   f"({w} x {h}).")
  rng = np.random.default_rng(seed)
  xs = rng.integers(0, w - size + 1, k)
  ys = rng.integers(0, h - size + 1, k)
  return ([image[y:y + size, x:x + size] for x, y in zip(xs, ys)],
          [(int(x), int(y)) for x, y in zip(xs, ys)])


@dataclasses.dataclass(eq=False)
class Ham10000ClinicalConfig(tfds.core.BuilderConfig):
  """Crops per bag (0: the whole image is the bag's one tile), their side and seed."""
  crops: int = 0
  crop_size: int = 128
  seed: int = 0


def _ham_config(crops: int, crop_size: int, seed: int) -> Ham10000ClinicalConfig:
  if crops < 0 or crop_size < 1:
    raise ValueError(f"crops={crops} must be >= 0 (0: whole images) and crop_size="
                     f"{crop_size} >= 1")
  if crops == 0:  # crop_size and seed do not apply to whole images
    return Ham10000ClinicalConfig(name="default")
  return Ham10000ClinicalConfig(
      name=f"crops{crops}_size{crop_size}_seed{seed}", crops=crops, crop_size=crop_size,
      seed=seed, description=f"Bags of {crops} random {crop_size}-px crops, seed {seed}.")


class Ham10000Clinical(bags.BagBuilder):
  """HAM10000 melanoma vs rest with age, sex and body site (module docstring)."""

  name = "ham10000_clinical"
  MANUAL_DOWNLOAD_INSTRUCTIONS = HAM10000_CLINICAL_INSTRUCTIONS
  BUILDER_CONFIGS = [Ham10000ClinicalConfig(
      name="default", description="One whole image (original JPEG) per bag.")]

  def __init__(self, *, crops: int | None = None, crop_size: int | None = None,
               seed: int | None = None, **kwargs):
    """Usual TFDS kwargs, plus the options of Ham10000ClinicalConfig (None: the default's)."""
    if crops is not None or crop_size is not None or seed is not None:
      default = self.BUILDER_CONFIGS[0]
      kwargs["config"] = _ham_config(default.crops if crops is None else int(crops),
                                     default.crop_size if crop_size is None else int(crop_size),
                                     default.seed if seed is None else int(seed))
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    images = read_ham_images(root)
    split_of = ham_split_of(images)
    by_split = {s: [im for im in images if split_of[im.lesion] == s] for s in SPLITS}
    bags.check_patient_splits({s: [im.lesion for im in v] for s, v in by_split.items()},
                              self.name)
    train = by_split["train"]
    encoder = fit_ham_encoder(train)
    config = self.builder_config
    summary = {s: {"bags": len(v), "melanoma": sum(im.label for im in v),
                   "lesions": len({im.lesion for im in v}),
                   "missing_age": sum(clinical.is_missing(im.clinical["age"]) for im in v)}
               for s, v in by_split.items()}
    self.info.metadata.update(
        class_names=list(HAM_CLASSES), clinical_names=encoder.names,
        task="melanoma (dx == 'mel') = 1 vs the other 6 HAM10000 diagnoses = 0",
        bag_size=config.crops or 1, tile_size=config.crop_size if config.crops else 0,
        summary={"splits": summary, "age_mean": encoder.stats["age"][0],
                 "age_std": encoder.stats["age"][1],
                 "missing_age": "imputed with the training mean (z = 0), age_missing = 1",
                 "tiles": (f"{config.crops} random {config.crop_size}-px crops (PNG), seed "
                           f"{config.seed}" if config.crops else
                           "the whole image, original JPEG bytes (tile_size 0: native size)"),
                 "metadata": os.path.basename(metadata_path(root))})
    return {s: self._generate_examples(root, v, encoder) for s, v in by_split.items() if v}

  def _generate_examples(self, root: str, images: Sequence[HamImage],
                         encoder: clinical.Encoder) -> Iterator[tuple[str, dict]]:
    config = self.builder_config

    def encode(im: HamImage) -> tuple[str, dict]:
      path = os.path.join(root, im.relative)
      with open(path, "rb") as f:
        data = f.read()
      _image_size(data, path)  # a file that is not an image is an error naming it
      if config.crops:
        with Image.open(io.BytesIO(data)) as pil:
          pixels = np.asarray(pil.convert("RGB"))
        crops, xy = random_crops(pixels, config.crops, config.crop_size,
                                 (config.seed, zlib.crc32(im.image_id.encode())), path)
        tiles = [bags.encode_tile(c, "png") for c in crops]
      else:  # the whole image: its bytes as they are
        tiles, xy = [data], [(0, 0)]
      record = bags.bag_record(tiles, xy, encoder.encode(im.clinical, im.where), im.label,
                               patient=im.lesion, slide=im.image_id, bag=0)
      return record["id"], record

    yield from image_folder.ordered_map(encode, images)
