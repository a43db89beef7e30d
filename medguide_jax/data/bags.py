"""Bag records of the missing_modality method: tiles of a slide, a clinical vector, a label.

Two layouts, each a TFDS schema of its own (`sources.LAYOUTS`):

'bags' (end-to-end mode, BALNMP's): one record per bag of a fixed number of tiles (N=10),
drawn once at build time with a seeded sampler; every bag carries its patient's label.
  tiles:    encoded image bytes [N] (PNG, or JPEG at quality 100 as BALNMP writes patches)
  tile_xy:  int64 [N, 2] level-0 (x, y) of each tile's top-left corner (-1 where unknown)
  clinical: float32 [C] the encoded clinical vector (names in metadata 'clinical_names')
  label:    int64 class index into metadata 'class_names'
  patient, slide, id: text (id = '<slide>/bag<k>', unique in the dataset)

'feature_bags' (feature mode, `python -m data_prep.features`): one record per slide: all its
tiles embedded once by a frozen encoder, padded to a bucketed size with a mask.
  features: float32 [B, D], B the smallest of `BUCKETS` (or a multiple of the largest)
            that holds the slide's tiles; rows past num_tiles are zero
  mask:     bool [B], True on the slide's tiles
  num_tiles: int64;  clinical, label, patient, slide, id as above (id = the slide)
  encoder:  the sha256 of the encoder's parameters that made the features; the dataset's
            metadata 'encoder' says which encoder that is ({name, source, sha256, ...}).

Builders put in their metadata: class_names, clinical_names, task (the ALN task or the
cohort's label), bag_size, tile_size and a build summary (slides with no tissue tile, ...).
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from medguide_jax.data import images, slides

BAG_SIZE = slides.BAG_SIZE
BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def features() -> tfds.features.FeaturesDict:
  """TFDS features of an end-to-end bag record ('bags' layout). The clinical vector's length
  is the dataset's (one-hot categories come from its training split): len(clinical_names)."""
  return tfds.features.FeaturesDict({
      "tiles": tfds.features.Tensor(shape=(None,), dtype=np.object_),
      "tile_xy": tfds.features.Tensor(shape=(None, 2), dtype=np.int64),
      "clinical": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      "label": tfds.features.Tensor(shape=(), dtype=np.int64),
      "patient": tfds.features.Tensor(shape=(), dtype=np.object_),
      "slide": tfds.features.Tensor(shape=(), dtype=np.object_),
      "id": tfds.features.Tensor(shape=(), dtype=np.object_),
  })


def feature_bag_features() -> tfds.features.FeaturesDict:
  """TFDS features of a per-slide feature bag ('feature_bags' layout; the feature dim is
  the dataset's metadata 'feature_dim')."""
  return tfds.features.FeaturesDict({
      "features": tfds.features.Tensor(shape=(None, None), dtype=np.float32,
                                        encoding="bytes"),
      "mask": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
      "num_tiles": tfds.features.Tensor(shape=(), dtype=np.int64),
      "encoder": tfds.features.Tensor(shape=(), dtype=np.object_),
      "clinical": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      "label": tfds.features.Tensor(shape=(), dtype=np.int64),
      "patient": tfds.features.Tensor(shape=(), dtype=np.object_),
      "slide": tfds.features.Tensor(shape=(), dtype=np.object_),
      "id": tfds.features.Tensor(shape=(), dtype=np.object_),
  })


class BagBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared set-up of every 'bags' builder: ArrayRecord files (random access without
  TensorFlow), the schema above, and the metadata a builder fills in `_split_generators`:

      self.info.metadata.update(class_names=[...], clinical_names=encoder.names, task=...,
                                bag_size=..., tile_size=..., summary={...})
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(), description=self.__doc__,
        metadata=tfds.core.MetadataDict(class_names=[], clinical_names=[], task="",
                                        bag_size=0, tile_size=0, summary={}))


def encode_jpeg(tile: np.ndarray, quality: int = 100) -> bytes:
  """uint8 [H, W, 3] as JPEG; quality 100 is what BALNMP's cut_patches.py writes."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(tile, np.uint8), mode="RGB").save(buf, format="JPEG",
                                                              quality=quality)
  return buf.getvalue()


def encode_tile(tile: np.ndarray, tile_format: str) -> bytes:
  if tile_format == "png":
    return images.encode_png(tile)
  if tile_format == "jpeg":
    return encode_jpeg(tile)
  raise ValueError(f"tile_format {tile_format!r}; valid: 'png', 'jpeg'")


def bag_record(tiles: Sequence[bytes], tile_xy, clinical: np.ndarray, label: int, *,
               patient: str, slide: str, bag: int) -> dict:
  """One 'bags' record (tiles already encoded)."""
  xy = np.asarray(tile_xy, np.int64).reshape(len(tiles), 2)
  return {"tiles": np.asarray(list(tiles), dtype=object), "tile_xy": xy,
          "clinical": np.asarray(clinical, np.float32), "label": np.int64(label),
          "patient": str(patient), "slide": str(slide), "id": f"{slide}/bag{bag}"}


def bucket(n: int, buckets: Sequence[int] = BUCKETS) -> int:
  """The smallest bucket >= n (beyond the largest: the next multiple of it); n >= 1."""
  if n < 1:
    raise ValueError(f"a feature bag needs >= 1 tile, got {n}")
  for b in buckets:
    if n <= b:
      return int(b)
  return int(-(-n // buckets[-1]) * buckets[-1])


def pad_features(x: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(x [n, D] zero-padded to [size, D], mask [size]); size >= n."""
  n = len(x)
  if size < n:
    raise ValueError(f"cannot pad {n} tiles to {size}")
  out = np.zeros((size, x.shape[1]), np.float32)
  out[:n] = x
  return out, np.arange(size) < n


# --------------------------------------------------------------------------- slides to bags
@dataclasses.dataclass(frozen=True)
class TilingOptions:
  """How a slide becomes tiles (module slides.py; BALNMP's defaults)."""
  tile: int = slides.TILE
  white_rule: str = "balnmp"          # or 'pixels'
  white_threshold: float = slides.WHITE_THRESHOLD
  fill_outside: bool = True           # white outside the tumour polygon
  level: int = 0                      # slides without polygons: tiles at this level
  min_tissue: float = 0.5             # slides without polygons: tissue fraction per tile


@dataclasses.dataclass
class SlideTiles:
  slide: str
  tiles: list[np.ndarray]             # uint8 [tile, tile, 3]
  xy: list[tuple[int, int]]           # level-0 top-left of each


def read_polygons(path: str) -> list[list[tuple[float, float]]]:
  """BCNB's tumour annotation `<id>.json`: {'positive': [{'vertices': [[x, y], ...]}, ...]}
  (level-0 pixels). A file that is not that shape is a SlideError naming it."""
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(path) as f:
      doc = json.load(f)
    polygons = [[(float(x), float(y)) for x, y in p["vertices"]] for p in doc["positive"]]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise slides.SlideError(f"annotation {path}: expected {{'positive': [{{'vertices': "
                            f"[[x, y], ...]}}, ...]}}: {type(e).__name__}: {e}") from e
  return polygons


def slide_tiles(path: str, polygons: Sequence[Sequence[tuple[float, float]]] | None,
                options: TilingOptions = TilingOptions()) -> SlideTiles:
  """The kept tiles of one slide: inside its tumour polygons (BALNMP) when it has any, else
  on the tissue found on its thumbnail (slides.tissue_tiles) at `options.level`."""
  slide = slides.open_slide(path)
  name = os.path.splitext(os.path.basename(path))[0]
  out = SlideTiles(name, [], [])
  if polygons:
    for vertices in polygons:
      region, origin = slides.polygon_region(slide, vertices, fill_outside=options.fill_outside)
      for t in slides.region_tiles(region, origin, tile=options.tile, rule=options.white_rule,
                                   threshold=options.white_threshold):
        out.tiles.append(t.pixels)
        out.xy.append((t.x, t.y))
    return out
  for x, y in slides.tissue_tiles(slide, level=options.level, tile=options.tile,
                                  min_tissue=options.min_tissue):
    pixels = slide.read_region((x, y), options.level, (options.tile, options.tile))
    if slides.keep_tile(pixels, rule=options.white_rule, threshold=options.white_threshold):
      out.tiles.append(pixels)
      out.xy.append((x, y))
  return out


def draw_bags(tiles: Sequence, xy: Sequence[tuple[int, int]], clinical: np.ndarray,
              label: int, *, patient: str, slide: str, seed: int, bag_size: int = BAG_SIZE,
              seed_key: str | None = None, first_bag: int = 0,
              encode: Callable[[Any], bytes] | None = None) -> list[tuple[str, dict]]:
  """(key, record) of each bag of one slide's tiles: slides.make_bags seeded by `seed` and
  crc32 of `seed_key` (default the slide's name), so a slide's bags do not depend on the
  order slides are built in; bags numbered from `first_bag` (ids stay unique when a slide
  is bagged in parts). `encode` turns a chosen tile into its bytes (tiles that are already
  bytes need none); only the tiles a bag takes are encoded."""
  import zlib  # pylint: disable=g-import-not-at-top
  key = slide if seed_key is None else seed_key
  members = slides.make_bags(len(tiles), bag_size=bag_size,
                             seed=(seed, zlib.crc32(key.encode())))
  out = []
  for k, chosen in enumerate(members, start=first_bag):
    encoded = [tiles[i] if encode is None else encode(tiles[i]) for i in chosen]
    record = bag_record(encoded, [xy[i] for i in chosen], clinical, label, patient=patient,
                        slide=slide, bag=k)
    out.append((record["id"], record))
  return out


def slide_bag_records(tiles: SlideTiles, clinical: np.ndarray, label: int, *, patient: str,
                      seed: int, bag_size: int = BAG_SIZE, tile_format: str = "jpeg"
                      ) -> list[tuple[str, dict]]:
  """draw_bags over a slide's cut tiles, encoded as `tile_format`."""
  return draw_bags(tiles.tiles, tiles.xy, clinical, label, patient=patient, slide=tiles.slide,
                   seed=seed, bag_size=bag_size,
                   encode=lambda t: encode_tile(t, tile_format))


def decode_tiles(encoded: Sequence[bytes], size: int | None = None) -> np.ndarray:
  """uint8 [N, H, W, 3] from encoded tiles, resized to `size` x `size` when given."""
  out = []
  for b in encoded:
    with Image.open(io.BytesIO(b)) as im:
      im = im.convert("RGB")
      if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
      out.append(np.asarray(im))
  return np.stack(out)


# BALNMP normalises patches with ImageNet's statistics (its backbones are ImageNet-trained).
IMAGENET_MEAN = np.asarray((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.asarray((0.229, 0.224, 0.225), np.float32)


def bag_example(record: Mapping, rng: np.random.Generator | None, *, image_size: int
                ) -> dict[str, np.ndarray]:
  """A 'bags' record -> {'tiles' float32 [N, S, S, 3] (ImageNet-normalised, as BALNMP),
  'clinical' float32 [C], 'label' int32}. Training (`rng` given): each tile flipped and
  rotated by a multiple of 90 degrees at random (histology has no orientation)."""
  x = decode_tiles(record["tiles"], image_size).astype(np.float32) / 255.0
  if rng is not None:
    k = rng.integers(0, 4, len(x))
    flip = rng.random(len(x)) < 0.5
    x = np.stack([np.rot90(t[:, ::-1] if f else t, int(r)) for t, r, f in zip(x, k, flip)])
  return {"tiles": (x - IMAGENET_MEAN) / IMAGENET_STD,
          "clinical": np.asarray(record["clinical"], np.float32),
          "label": np.int32(record["label"])}


def feature_bag_example(record: Mapping, rng: np.random.Generator | None, *, max_tiles: int
                        ) -> dict[str, np.ndarray]:
  """A 'feature_bags' record -> {'features' float32 [max_tiles, D], 'tile_mask' bool
  [max_tiles], 'clinical', 'label'}: one shape for every slide, so slides batch together. A
  slide with more tiles keeps max_tiles of them: a random subset in training (`rng`
  given), evenly spaced ones in evaluation."""
  n = int(record["num_tiles"])
  x = np.asarray(record["features"], np.float32)[:n]
  if n > max_tiles:
    keep = (np.sort(rng.choice(n, max_tiles, replace=False)) if rng is not None
            else np.linspace(0, n - 1, max_tiles).round().astype(int))
    x = x[keep]
  features, mask = pad_features(x, max_tiles)
  return {"features": features, "tile_mask": mask,
          "clinical": np.asarray(record["clinical"], np.float32),
          "label": np.int32(record["label"])}


def check_patient_splits(patients_by_split: Mapping[str, Sequence[str]], where: str) -> None:
  """A patient in two splits is an error naming it and both splits."""
  seen: dict[str, str] = {}
  for split, patients in patients_by_split.items():
    for p in patients:
      if seen.setdefault(p, split) != split:
        raise ValueError(f"{where}: patient {p!r} is in both {seen[p]!r} and {split!r}")
