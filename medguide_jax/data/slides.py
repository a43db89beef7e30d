"""Whole-slide images: reading, level choice, tissue detection, BALNMP tiling and bags.

Reading: pyramidal formats (.svs, .tif/.tiff, .ndpi, .mrxs, .scn, .vms, .bif) through
OpenSlide (`openslide-python` with the `openslide-bin` library, both from the package
index); JPEG/PNG slides (BCNB's slides are JPEGs) through Pillow, a single level, with its
decompression-bomb guard raised to MAX_SLIDE_PIXELS for slides only.

Tiling, BALNMP-faithful by default (bupt-ai-cz/BALNMP, `cut_tumor_regions.py`,
`cut_patches.py`; METHODS.md 2(a')): crop each tumour polygon's bounding box with white
outside the polygon, pad right and bottom to a multiple of the tile size with white, cut
non-overlapping 256x256 tiles, discard a tile whose white fraction is >= 0.3 where the
fraction is BALNMP's `sum(arr == 255) / 3 / (H W)` (it counts channel values equal to 255,
not white pixels; `rule='pixels'` counts fully white pixels instead), and draw bags of 10
tiles once with a seeded sampler, dropping tiles that cannot fill a bag. Slides without
polygons: tissue is found on a thumbnail by Otsu's threshold on the saturation channel
after a median blur (as CLAM's segmentation does), and tiles are cut at a chosen level.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Sequence

import numpy as np
from PIL import Image

OPENSLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif")
PILLOW_SUFFIXES = (".jpg", ".jpeg", ".png")
# Pillow refuses images over ~179 Mpx as a decompression bomb; BCNB's JPEG slides reach a few
# hundred Mpx. Slides (only) may have up to this many pixels (an RGB slide this size is 6 GB).
MAX_SLIDE_PIXELS = 2_000_000_000
TILE = 256
WHITE_THRESHOLD = 0.3
BAG_SIZE = 10


class SlideError(ValueError):
  """A slide that cannot be read or tiled as asked; the message names the file."""


_BOUND_LOCK = threading.Lock()
_bound = {"depth": 0, "saved": None}


@contextlib.contextmanager
def _slide_pixel_bound():
  """Pillow's bound raised to MAX_SLIDE_PIXELS while any slide is being read. Builders read
  slides in threads: a plain save-and-restore lets a thread save the raised value and put
  it back last, leaving the bound raised for good; the first reader saves, the last restores.
  (While a slide is read, an ordinary image opened in another thread gets the slide bound.)"""
  with _BOUND_LOCK:
    if _bound["depth"] == 0:
      _bound["saved"] = Image.MAX_IMAGE_PIXELS
      Image.MAX_IMAGE_PIXELS = MAX_SLIDE_PIXELS
    _bound["depth"] += 1
  try:
    yield
  finally:
    with _BOUND_LOCK:
      _bound["depth"] -= 1
      if _bound["depth"] == 0:
        Image.MAX_IMAGE_PIXELS = _bound["saved"]


class PillowSlide:
  """A JPEG/PNG slide as a one-level slide (decoded once, on first read)."""

  def __init__(self, path: str):
    self.path = path
    with _slide_pixel_bound():
      try:
        with Image.open(path) as im:
          self.dimensions = im.size  # (width, height), as OpenSlide's
      except Image.DecompressionBombError as e:
        raise SlideError(f"slide {path}: more than MAX_SLIDE_PIXELS={MAX_SLIDE_PIXELS} "
                         "pixels") from e
      except OSError as e:
        raise SlideError(f"slide {path}: cannot open it: {e}") from e
    self.level_count, self.level_downsamples = 1, (1.0,)
    self.level_dimensions = (self.dimensions,)
    self.properties: dict[str, str] = {}
    self._pixels = None

  def pixels(self) -> np.ndarray:
    if self._pixels is None:
      with _slide_pixel_bound(), Image.open(self.path) as im:
        self._pixels = np.asarray(im.convert("RGB"))
    return self._pixels

  def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]
                  ) -> np.ndarray:
    """RGB uint8 [h, w, 3] at `location` (x, y); outside the image is white."""
    del level
    (x, y), (w, h) = location, size
    out = np.full((h, w, 3), 255, np.uint8)
    px = self.pixels()
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, px.shape[1]), min(y + h, px.shape[0])
    if x1 > x0 and y1 > y0:
      out[y0 - y:y1 - y, x0 - x:x1 - x] = px[y0:y1, x0:x1]
    return out

  def thumbnail(self, max_side: int) -> np.ndarray:
    with _slide_pixel_bound(), Image.open(self.path) as im:
      im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale
      im = im.convert("RGB")
      im.thumbnail((max_side, max_side))
      return np.asarray(im)


class OpenSlideSlide:
  """A pyramidal slide through OpenSlide; regions as RGB uint8 on white."""

  def __init__(self, path: str):
    try:
      import openslide  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise SlideError(f"slide {path}: reading {os.path.splitext(path)[1]} needs OpenSlide: "
                       "pip install openslide-python openslide-bin") from e
    try:
      self._slide = openslide.OpenSlide(path)
    except (openslide.OpenSlideError, OSError) as e:
      raise SlideError(f"slide {path}: OpenSlide cannot read it: {e}") from e
    self.path = path
    self.dimensions = self._slide.dimensions
    self.level_count = self._slide.level_count
    self.level_downsamples = tuple(self._slide.level_downsamples)
    self.level_dimensions = tuple(self._slide.level_dimensions)
    self.properties = dict(self._slide.properties)

  def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]
                  ) -> np.ndarray:
    """RGB uint8 [h, w, 3]; `location` in level-0 pixels, as OpenSlide's. Transparent
    (outside the scanned area) is white."""
    rgba = self._slide.read_region(tuple(int(v) for v in location), int(level),
                                   tuple(int(v) for v in size))
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))

  def thumbnail(self, max_side: int) -> np.ndarray:
    return np.asarray(self._slide.get_thumbnail((max_side, max_side)).convert("RGB"))


def open_slide(path: str | os.PathLike):
  """The slide at `path`, by its suffix (see the module docstring)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise SlideError(f"slide {path}: no such file")
  suffix = os.path.splitext(path)[1].lower()
  if suffix in PILLOW_SUFFIXES:
    return PillowSlide(path)
  if suffix in OPENSLIDE_SUFFIXES:
    return OpenSlideSlide(path)
  raise SlideError(f"slide {path}: unknown slide format {suffix!r}; known: "
                   f"{sorted(PILLOW_SUFFIXES + OPENSLIDE_SUFFIXES)}")


def level_for(slide, *, downsample: float | None = None, magnification: float | None = None
              ) -> int:
  """The level whose downsample is the largest not above the one asked, given directly or
  as a magnification (from the slide's objective power; 20x on a 40x scan is 2)."""
  if (downsample is None) == (magnification is None):
    raise ValueError("give exactly one of downsample= and magnification=")
  if magnification is not None:
    power = slide.properties.get("openslide.objective-power")
    if power is None:
      raise SlideError(f"slide {slide.path}: no objective power recorded, so magnification="
                       f"{magnification} cannot be resolved; give downsample= instead")
    downsample = float(power) / float(magnification)
  fits = [i for i, d in enumerate(slide.level_downsamples) if d <= downsample * (1 + 1e-6)]
  return max(fits, key=lambda i: slide.level_downsamples[i]) if fits else 0


# --------------------------------------------------------------------------- BALNMP tiling
def white_fraction(tile: np.ndarray, rule: str = "balnmp") -> float:
  """'balnmp': sum(tile == 255) / 3 / (H W), as BALNMP computes it (channel values equal
  to 255, over 3: a pixel (255, 255, 0) counts 2/3); 'pixels': the fraction of pixels that
  are (255, 255, 255)."""
  h, w = tile.shape[:2]
  if rule == "balnmp":
    return float(np.sum(tile == 255)) / 3 / (h * w)
  if rule == "pixels":
    return float(np.mean(np.all(tile == 255, axis=-1)))
  raise ValueError(f"white rule {rule!r}; valid: 'balnmp', 'pixels'")


def keep_tile(tile: np.ndarray, *, rule: str = "balnmp",
              threshold: float = WHITE_THRESHOLD) -> bool:
  """BALNMP keeps a tile whose white fraction is below the threshold (>= is discarded)."""
  return white_fraction(tile, rule) < threshold


def polygon_region(slide, vertices: Sequence[Sequence[float]], *, fill_outside: bool = True
                   ) -> tuple[np.ndarray, tuple[int, int]]:
  """(the bounding box of a tumour polygon as RGB uint8 with white outside the polygon,
  its level-0 top-left (x, y)). `vertices` are (x, y) level-0 pixels."""
  from skimage import draw  # pylint: disable=g-import-not-at-top
  v = np.asarray(vertices, np.float64)
  if v.ndim != 2 or v.shape[1] != 2 or len(v) < 3:
    raise SlideError(f"slide {slide.path}: a polygon needs >= 3 (x, y) vertices, got "
                     f"shape {v.shape}")
  width, height = slide.dimensions
  x0, y0 = int(np.floor(v[:, 0].min())), int(np.floor(v[:, 1].min()))
  x1, y1 = int(np.ceil(v[:, 0].max())), int(np.ceil(v[:, 1].max()))
  if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
    raise SlideError(f"slide {slide.path}: polygon bounding box ({x0}, {y0})-({x1}, {y1}) "
                     f"lies outside the image ({width} x {height})")
  region = slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0)).copy()
  if fill_outside:
    inside = draw.polygon2mask(region.shape[:2], v[:, ::-1] - (y0, x0))  # (row, col)
    region[~inside] = 255
  return region, (x0, y0)


def pad_to_multiple(region: np.ndarray, tile: int = TILE) -> np.ndarray:
  """White padding on the right and bottom up to a multiple of `tile`."""
  h, w = region.shape[:2]
  out = np.full((-(-h // tile) * tile, -(-w // tile) * tile, 3), 255, np.uint8)
  out[:h, :w] = region
  return out


@dataclasses.dataclass(frozen=True)
class Tile:
  x: int              # level-0 pixels of the tile's top-left corner
  y: int
  pixels: np.ndarray  # uint8 [tile, tile, 3]


def region_tiles(region: np.ndarray, origin: tuple[int, int], *, tile: int = TILE,
                 rule: str = "balnmp", threshold: float = WHITE_THRESHOLD) -> list[Tile]:
  """The kept non-overlapping tiles of a (padded) region, row by row."""
  padded = pad_to_multiple(region, tile)
  out = []
  for r in range(0, padded.shape[0], tile):
    for c in range(0, padded.shape[1], tile):
      pixels = padded[r:r + tile, c:c + tile]
      if keep_tile(pixels, rule=rule, threshold=threshold):
        out.append(Tile(origin[0] + c, origin[1] + r, pixels))
  return out


def make_bags(num_tiles: int, *, bag_size: int = BAG_SIZE, seed: int) -> list[list[int]]:
  """Bags of `bag_size` tile indices drawn once without replacement from a seeded
  permutation; tiles that cannot fill a bag are dropped (as BALNMP). bag_size=0: one bag
  of every tile (the whole slide; none when it has no tile)."""
  if bag_size < 0:
    raise ValueError(f"bag_size={bag_size} must be >= 1, or 0 for one bag of every tile")
  if bag_size == 0:
    return [list(range(num_tiles))] if num_tiles else []
  order = np.random.default_rng(seed).permutation(num_tiles)
  return [sorted(order[i:i + bag_size].tolist())
          for i in range(0, num_tiles - bag_size + 1, bag_size)]


# --------------------------------------------------------------------------- tissue
def tissue_mask(thumbnail: np.ndarray, *, median: int = 7) -> np.ndarray:
  """Tissue on an RGB thumbnail: Otsu's threshold on the HSV saturation after a median
  blur (CLAM's segmentation); bool [h, w]."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  from skimage import color, filters  # pylint: disable=g-import-not-at-top
  saturation = color.rgb2hsv(thumbnail)[..., 1]
  saturation = ndimage.median_filter(saturation, size=median)
  if np.ptp(saturation) == 0:  # a blank slide: no tissue
    return np.zeros(saturation.shape, bool)
  return saturation > filters.threshold_otsu(saturation)


def tissue_tiles(slide, *, level: int = 0, tile: int = TILE, min_tissue: float = 0.5,
                 thumbnail_side: int = 2048) -> list[tuple[int, int]]:
  """Level-0 (x, y) of the `tile` x `tile` tiles at `level` whose area is at least
  `min_tissue` tissue on the thumbnail's mask, row by row."""
  thumb = slide.thumbnail(thumbnail_side)
  mask = tissue_mask(thumb)
  width, height = slide.dimensions
  down = slide.level_downsamples[level]
  step = tile * down  # level-0 pixels per tile
  sy, sx = mask.shape[0] / height, mask.shape[1] / width  # thumbnail px per level-0 px
  out = []
  for y in np.arange(0, height - step + 1, step):
    for x in np.arange(0, width - step + 1, step):
      r0, r1 = int(y * sy), max(int((y + step) * sy), int(y * sy) + 1)
      c0, c1 = int(x * sx), max(int((x + step) * sx), int(x * sx) + 1)
      if mask[r0:r1, c0:c1].mean() >= min_tissue:
        out.append((int(x), int(y)))
  return out
