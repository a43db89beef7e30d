"""synthetic_mammo: generated mammograms with small lesions, the default dataset of GLAM.

GLAM (Liu et al., MIDL 2021) learns to segment benign and malignant lesions in high-resolution
mammograms (2944x1920, one grey view) from image-level labels only; pixel masks are used for
evaluation (Dice) alone. This generator stands in for the NYU screening data with the same
record layout as the real builders (`features()`, `CLASS_NAMES`):

  image               16-bit grey PNG, values in the 12-bit range 0..4095 as in the NYU PNGs,
                      NOT standardised (GLAM standardises each image when it loads it).
  benign, malignant   int64 0/1 image-level labels.
  benign_mask, malignant_mask
                      8-bit grey PNG {0, 255} of the image's H, W, or b'' when there is none.
  has_benign_mask, has_malignant_mask
                      int64 0/1; 0 leaves the image out of that class's Dice.
  id, view, source    e.g. b'synthetic_mammo-train-00012', b'L-CC', b'mammo'.

Geometry follows GLAM's preprocessed views. `src/data_loading/loading.py:flip_image` with
horizontal_flip 'NO' (the NYU exam lists) flips right views, and the cropped NYU images
(e.g. sample 0_L-CC.png) have the chest wall on the left; so every preprocessed view, left or
right, CC or MLO, has the CHEST WALL ON THE LEFT (column 0) and the nipple pointing right.
Synthetic breasts are drawn that way: a half-ellipse with a wobbly border cut by the left edge,
filling most of the 2944x1920 window (MLO views add a bright pectoral muscle in the upper left).
The laterality in `view` is only a name: all views face the same way, as after `flip_image`.

Each image: background exactly 0 outside the breast; inside, fat (dark grey) and
fibroglandular tissue (bright) from a smooth, horizontally elongated 1/f^1.3-1.7 Gaussian field
through a sigmoid, denser in the interior and fatty towards the periphery and the chest wall,
plus faint curvilinear strands; the compressed-breast thickness falls off near the border, a
thin skin line is brighter; a fine grain (scales of 4-16 px) is added to outputs at least 2x
finer than the texture grid; quantum noise per output pixel. Lesions add density:

* benign: a round or oval mass (aspect 0.6-1), smooth well-defined margin, dome profile;
* malignant: an irregular (lobulated, harmonics k = 2..5) core with a softer margin and 7-13
  thin, slightly curved spicules tapering out to 1.4-2.1 core radii.

Lesion (core) radius is 50-150 px at full resolution (6-19 px in 'small'). Labels: benign and
malignant independent, each present with probability 0.35; one malignant lesion at most, one
benign lesion (two with probability 0.2). Lesions lie wholly inside the breast (outside the
pectoral muscle), away from the border by at least their reach, and never overlap. Contrast
(benign +700..1100, malignant +800..1200, over fat 600-1000 / gland 1900-2800, of 4095) is subtle
over dense tissue, clear over fat: in 'small', a lesion's centre is a median 1.9 (benign) / 2.2
(malignant) standard deviations above the ring just outside it (5th percentile 0.6).

Masks (evaluation only) are the pixels at least half covered by the lesion: a benign mass's
oval; a malignant mass's core plus its spicules, which end where they get narrower than one
full-resolution pixel (so at full resolution the mask holds the spicules down to ~1 px width;
in 'small' only their bases, a few px wide, reach half a pixel). Every synthetic image has
both masks (has_*_mask = 1); the mask of an absent class is all zero, a valid annotation ("no
lesion of this class"). Dice over an empty ground truth is not counted: it is 0/0 for an empty
prediction and 0 for any other, and the GLAM evaluation (`medguide_jax.evaluation.segmentation`)
averages Dice over images whose mask is non-empty (label 1), so these images never enter it.

Scale consistency: every case is drawn in reference coordinates (pixels of the 2944x1920
frame) from `np.random.default_rng([seed, split_id, index])` (`describe_case`); the tissue
texture lives on a fixed 368x240 grid with its own generator and is resized bilinearly to the
output shape; edges and lesions are rendered analytically with pixel-area anti-aliasing at the
output resolution; the noise has, per output pixel, the variance of the mean of the
full-resolution pixels it covers. So a 'small' image is close to the 8x8 block mean of the
'full' image of the same case (correlation 0.998 when written) and its masks agree with the
block-downsampled full masks (Dice > 0.99). Other shapes stretch the frame to fit.

Configs (`prepare('synthetic_mammo')` = 'small', `prepare('synthetic_mammo:full')`):
  small  368x240 (= 2944x1920 / 8), 1600/200/400 images: CPU training and smoke runs.
  full   2944x1920, 16/8/16 images: full-resolution inference, benchmark, visualisations.
  tiny   192x128, 96/32/32 images: the test suite's end-to-end runs.
Overrides (`image_shape`, `num_examples`, `seed`) make a derived config whose name encodes
them. On a loaded 2-core development machine rendering took 6-8 ms per 'small' image and
0.4-0.9 s per 'full' one (+0.24 s to encode its PNG, ~4.9 MB); preparing the whole 'small'
config (2200 images, 154 MB) took 35 s.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Mapping

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from medguide_jax.data import images

CLASS_NAMES = ("benign", "malignant")
SPLITS = ("train", "validation", "test")
VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
SOURCE = "mammo"
REFERENCE_SHAPE = (2944, 1920)  # GLAM's input size (H, W): case geometry is in these pixels
MAX_VALUE = 4095  # 12-bit range, as in the NYU PNGs
_TEXTURE_GRID = (368, 240)  # tissue texture is drawn here (scale-independent), then resized
_LABEL_PROBABILITY = 0.35
_SECOND_BENIGN_PROBABILITY = 0.2
_RADIUS_RANGE = (50.0, 150.0)  # lesion (core) radius in reference pixels
# Density a lesion adds at its core (12-bit units). Real masses are often no denser than
# glandular tissue; these are denser, so that a CPU-sized model learns them from image labels
# within minutes (at +350..750 a 120-step smoke run stayed at chance).
_CONTRAST = {"benign": (700.0, 1100.0), "malignant": (800.0, 1200.0)}
_F32 = np.float32


def features() -> tfds.features.FeaturesDict:
  """TFDS features of a GLAM record (see the module docstring); byte strings, no TensorFlow."""
  blob = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)  # noqa: E731
  scalar = lambda: tfds.features.Tensor(shape=(), dtype=np.int64)  # noqa: E731
  return tfds.features.FeaturesDict({
      "image": blob(),
      "benign": scalar(),
      "malignant": scalar(),
      "benign_mask": blob(),
      "malignant_mask": blob(),
      "has_benign_mask": scalar(),
      "has_malignant_mask": scalar(),
      "id": blob(),
      "view": blob(),
      "source": blob(),
  })


def encode_mask(mask: np.ndarray | None) -> bytes:
  """{0,1} [H,W] -> 8-bit {0,255} PNG bytes; None (no mask) -> b''."""
  if mask is None:
    return b""
  return images.encode_png(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8))


def make_record(image: np.ndarray, *, record_id: str, view: str, labels,
                masks: Mapping[str, np.ndarray | None]) -> dict:
  """One record of `features()`: the image as 16-bit PNG, the labels, and per class a mask
  PNG with has_<class>_mask = 1, or b'' and 0 where `masks` has None (no mask file)."""
  record = {"image": images.encode_png(image), "id": record_id.encode(),
            "view": view.encode(), "source": SOURCE.encode()}
  for name, label in zip(CLASS_NAMES, labels):
    mask = masks.get(name)
    record[name] = np.int64(label)
    record[f"{name}_mask"] = encode_mask(mask)
    record[f"has_{name}_mask"] = np.int64(mask is not None)
  return record


# --- Case geometry (reference pixels of the 2944x1920 frame; y down, x right). ---


@dataclasses.dataclass(frozen=True)
class Lesion:
  """One lesion in reference pixels.

  Attributes:
    kind: 'benign' or 'malignant'.
    centre: (y, x) of its centre.
    radius: core radius (benign: radius of the disc of the same area as the oval).
    aspect: minor/major axis ratio of a benign oval (1 for malignant).
    angle: orientation in radians.
    harmonics: (amplitude, phase) of the border's cos(k theta + phase), k = 2, 3, ...
      (malignant only; border radius = radius * (1 + sum)).
    spicules: (angle, length from the centre, half-width at the centre, bend) per spicule;
      a spicule's axis is offset sideways by bend * along^2 / length, and it ends where it
      gets narrower than one reference pixel.
    contrast: density added at the core (12-bit units, before the case gain).
  """
  kind: str
  centre: tuple[float, float]
  radius: float
  aspect: float
  angle: float
  harmonics: tuple[tuple[float, float], ...]
  spicules: tuple[tuple[float, float, float, float], ...]
  contrast: float

  @property
  def reach(self) -> float:
    """Distance from the centre beyond which the lesion adds nothing."""
    if self.kind == "benign":
      return self.radius / np.sqrt(self.aspect) + 4.0
    border = self.radius * (1 + sum(a for a, _ in self.harmonics))
    return max([border] + [1.03 * length for _, length, _, _ in self.spicules]) + 4.0


@dataclasses.dataclass(frozen=True)
class MammoCase:
  """Everything random about one image except texture and noise (drawn from their own seeds).

  The breast is the ellipse centred at (cy, x0) with semi-axes (b, a), its radius modulated by
  1 + sum amp cos(k theta + phase) (k = 2, 3, 4), cut by the image's left edge (chest wall).
  """
  view: str
  labels: tuple[int, int]  # (benign, malignant)
  x0: float
  cy: float
  a: float
  b: float
  wobble: tuple[tuple[float, float], ...]
  pectoral: tuple[float, float] | None  # MLO: (x where it meets the top, y where it meets x=0)
  fat: float
  gland: float
  muscle: float
  skin: float
  skin_width: float
  edge_width: float  # thickness fall-off band at the border
  density_bias: float
  density_gain: float
  strands: float
  texture_beta: float
  texture_elongation: float
  noise_sigma: float  # per full-resolution pixel
  gain: float
  lesions: tuple[Lesion, ...]


def _breast_rho(case: MammoCase, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Normalised breast radius (< 1 inside) at reference points y, x (broadcastable)."""
  big_x, big_y = (x - case.x0) / case.a, (y - case.cy) / case.b
  theta = np.arctan2(big_y, big_x)
  wobble = 1.0 + sum(amp * np.cos(k * theta + phase)
                     for k, (amp, phase) in enumerate(case.wobble, start=2))
  return np.hypot(big_x, big_y) / wobble


def _pectoral_distance(case: MammoCase, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Signed distance (reference px) into the pectoral muscle (> 0 inside); -inf for CC."""
  if case.pectoral is None:
    return np.full(np.broadcast_shapes(np.shape(y), np.shape(x)), -np.inf, _F32)
  top_x, left_y = case.pectoral
  return ((1.0 - x / top_x - y / left_y) / np.hypot(1.0 / top_x, 1.0 / left_y)).astype(_F32)


def _lesion_fits(case: MammoCase, centre, reach: float, placed) -> bool:
  """Whole lesion inside the breast (rho <= 0.88), outside the muscle, in the frame, apart."""
  cy, cx = centre
  height, width = REFERENCE_SHAPE
  if not (reach + 20 < cx < width - reach and reach < cy < height - reach):
    return False
  angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
  ys = np.r_[cy, cy + reach * np.sin(angles)]
  xs = np.r_[cx, cx + reach * np.cos(angles)]
  if np.any(_breast_rho(case, ys, xs) > 0.88):
    return False
  if np.any(_pectoral_distance(case, ys, xs) > -30.0):
    return False
  return all(np.hypot(cy - other.centre[0], cx - other.centre[1]) > reach + other.reach + 20
             for other in placed)


def _draw_lesion(rng: np.random.Generator, kind: str) -> Lesion:
  """Shape of a lesion (centre still unset)."""
  radius = rng.uniform(*_RADIUS_RANGE)
  angle = rng.uniform(0, np.pi)
  if kind == "benign":
    return Lesion(kind, (0.0, 0.0), radius, rng.uniform(0.6, 1.0), angle, (), (),
                  rng.uniform(*_CONTRAST["benign"]))
  harmonics = tuple((rng.uniform(0.02, 0.09), rng.uniform(0, 2 * np.pi)) for _ in range(4))
  n = int(rng.integers(7, 14))
  angles = angle + (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * np.pi / n)
  lengths = radius * rng.uniform(1.4, 2.1, n)
  widths = radius * rng.uniform(0.1, 0.2, n)
  bends = rng.uniform(-0.2, 0.2, n)
  spicules = tuple(zip(angles.tolist(), lengths.tolist(), widths.tolist(), bends.tolist()))
  return Lesion(kind, (0.0, 0.0), radius, 1.0, angle, harmonics, spicules,
                rng.uniform(*_CONTRAST["malignant"]))


def _place(rng: np.random.Generator, case: MammoCase, lesion: Lesion, placed) -> Lesion:
  """Puts `lesion` at a random spot of the breast where it fits (rejection sampling)."""
  for _ in range(512):
    centre = (rng.uniform(0, REFERENCE_SHAPE[0]), rng.uniform(0, case.x0 + case.a))
    if _lesion_fits(case, centre, lesion.reach, placed):
      return dataclasses.replace(lesion, centre=(float(centre[0]), float(centre[1])))
  # Not seen for the breasts `describe_case` draws (a whole case took < 64 tries in 6000
  # cases); a change there that makes lesions not fit fails loudly here.
  raise RuntimeError(f"could not place a {lesion.kind} lesion in the breast of {case}")


def describe_case(seed: int, split_id: int, index: int) -> MammoCase:
  """The geometry of case `index` of split `split_id` (independent of the output shape).

  It depends only on `np.random.default_rng([seed, split_id, index])`.
  """
  rng = np.random.default_rng([seed, split_id, index])
  height, width = REFERENCE_SHAPE
  view = VIEWS[int(rng.integers(len(VIEWS)))]
  mlo = view.endswith("MLO")
  x0 = -rng.uniform(0.0, 0.15) * width
  a = rng.uniform(0.74, 0.95) * width - x0  # nipple at 74-95% of the width
  if mlo:
    cy, b = rng.uniform(0.48, 0.58) * height, rng.uniform(0.5, 0.6) * height
    pectoral = (rng.uniform(0.3, 0.5) * width, rng.uniform(0.35, 0.6) * height)
  else:
    cy, b = rng.uniform(0.46, 0.54) * height, rng.uniform(0.4, 0.5) * height
    pectoral = None
  wobble = tuple((rng.uniform(0.0, 0.03), rng.uniform(0, 2 * np.pi)) for _ in range(3))
  case = MammoCase(
      view=view, labels=(0, 0), x0=x0, cy=cy, a=a, b=b, wobble=wobble, pectoral=pectoral,
      fat=rng.uniform(600, 1000), gland=rng.uniform(1900, 2800), muscle=rng.uniform(1800, 2600),
      skin=rng.uniform(150, 350), skin_width=rng.uniform(12, 24),
      edge_width=rng.uniform(120, 260), density_bias=rng.uniform(-1.0, 0.8),
      density_gain=rng.uniform(1.2, 2.5), strands=rng.uniform(0.1, 0.25),
      texture_beta=float(rng.choice([1.3, 1.4, 1.5, 1.6, 1.7])),
      texture_elongation=float(rng.choice([1.5, 2.0, 2.5])),
      noise_sigma=rng.uniform(20, 45), gain=rng.uniform(0.9, 1.1), lesions=())
  benign = int(rng.uniform() < _LABEL_PROBABILITY)
  malignant = int(rng.uniform() < _LABEL_PROBABILITY)
  kinds = []
  if benign:
    kinds += ["benign"] * (2 if rng.uniform() < _SECOND_BENIGN_PROBABILITY else 1)
  if malignant:
    kinds.append("malignant")
  placed: list[Lesion] = []
  for kind in sorted(kinds, key=lambda k: k != "malignant"):  # the biggest reach first
    placed.append(_place(rng, case, _draw_lesion(rng, kind), placed))
  return dataclasses.replace(case, labels=(benign, malignant), lesions=tuple(placed))


# --- Rendering. ---


def _pixel_centres(shape: tuple[int, int]):
  """Reference coordinates of the pixel centres: y [H, 1], x [1, W], and the pixel size."""
  height, width = shape
  sy, sx = REFERENCE_SHAPE[0] / height, REFERENCE_SHAPE[1] / width
  y = ((np.arange(height, dtype=np.float64) + 0.5) * sy).astype(_F32)[:, None]
  x = ((np.arange(width, dtype=np.float64) + 0.5) * sx).astype(_F32)[None, :]
  return y, x, float(np.sqrt(sy * sx))


@functools.lru_cache(maxsize=64)
def _amplitude(shape: tuple[int, int], beta: float, elongation: float, cutoff: float,
               low: float) -> np.ndarray:
  """|spectrum| of a Gaussian field on an rfft grid of `shape`: 1/f^beta between `low` and
  `cutoff` (cycles per grid pixel), frequencies along x weighted by `elongation` (features
  longer along x). Normalised so that the field has unit variance."""
  fy = np.fft.fftfreq(shape[0])[:, None]
  fx = np.fft.rfftfreq(shape[1])[None, :]
  f = np.hypot(fy, fx * elongation)
  amplitude = (f * f + low * low) ** (-beta / 2) * np.exp(-(f / cutoff) ** 2)
  amplitude[0, 0] = 0.0
  weight = np.where((np.arange(amplitude.shape[1]) == 0)
                    | (np.arange(amplitude.shape[1]) * 2 == shape[1]), 1.0, 2.0)
  variance = 2.0 * np.sum(weight * amplitude ** 2) / (shape[0] * shape[1]) ** 2
  return (amplitude / np.sqrt(variance)).astype(_F32)


def _gaussian_field(rng: np.random.Generator, shape: tuple[int, int], beta: float,
                    elongation: float, cutoff: float = 0.35, low: float = 0.01) -> np.ndarray:
  """A zero-mean, about unit-std Gaussian random field [H, W] (float32) with the spectrum of
  `_amplitude`, drawn as random complex Fourier coefficients (one inverse real FFT)."""
  amplitude = _amplitude(shape, beta, elongation, cutoff, low)
  noise = rng.standard_normal(amplitude.shape + (2,), _F32).view(np.complex64)[..., 0]
  return np.fft.irfft2(noise * amplitude, s=shape).astype(_F32, copy=False)


def _resize(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Bilinear resize (pixel-centre aligned; area-filtered when shrinking) of a float32 field."""
  if grid.shape == tuple(shape):
    return grid
  resized = Image.fromarray(grid).resize((shape[1], shape[0]), Image.BILINEAR)
  return np.asarray(resized, _F32)


def _density(case: MammoCase, rng: np.random.Generator, rho: np.ndarray,
             x: np.ndarray) -> np.ndarray:
  """Fibroglandular density in [0, ~1.1] on `_TEXTURE_GRID` (rho, x: its breast radius and
  reference x): soft blobs in the interior, fat towards the border and the chest wall,
  faint curvilinear strands (ligaments, ducts) running mostly along x."""
  height, width = _TEXTURE_GRID
  blobs = _gaussian_field(rng, _TEXTURE_GRID, case.texture_beta, case.texture_elongation)
  # Coarser fields on coarser grids (frequencies in cycles per pixel of their own grid).
  lines = _resize(_gaussian_field(rng, (height // 2, width // 2), 1.2, 4.0, cutoff=0.4,
                                  low=0.04), _TEXTURE_GRID)
  patches = _resize(_gaussian_field(rng, (height // 8, width // 8), 2.0, 1.0, cutoff=0.4,
                                    low=0.08), _TEXTURE_GRID)
  envelope = (np.clip((0.9 - rho) / 0.35, 0, 1)
              * np.sqrt(np.clip(x / (0.12 * REFERENCE_SHAPE[1]), 0, 1)))
  gland = envelope / (1.0 + np.exp(-case.density_gain * (blobs + case.density_bias)))
  strands = (np.exp(-(lines / 0.1) ** 2) * np.clip(0.5 + 0.5 * patches, 0, 1)
             * np.clip((1.0 - rho) / 0.1, 0, 1))
  return gland + case.strands * strands * (1.0 - gland)


def _fine_detail(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  """Zero-mean fine texture (scales of 4-16 reference px) for outputs finer than the texture
  grid; its 8x8 block means are about 0, so it does not change the 'small' rendition."""
  grid = (REFERENCE_SHAPE[0] // 2, REFERENCE_SHAPE[1] // 2)
  field = _gaussian_field(rng, grid, 0.8, 1.5, cutoff=0.25, low=1.0 / 8)
  return _resize(field, shape)


def _box_coverage(across: np.ndarray, half_width: np.ndarray, pixel: float) -> np.ndarray:
  """Fraction of a pixel (width `pixel`) covered by a band of `half_width` at distance
  `across` >= 0 from the pixel centre (1D box overlap, exact for axis-aligned bands)."""
  overlap = np.minimum(across + half_width, pixel / 2) - np.maximum(across - half_width,
                                                                    -pixel / 2)
  return np.clip(overlap / pixel, 0.0, 1.0)


def _render_lesion(lesion: Lesion, dy: np.ndarray, dx: np.ndarray, pixel: float):
  """(added density, coverage in [0, 1]) of `lesion` at offsets dy, dx from its centre."""
  cos, sin = np.cos(lesion.angle), np.sin(lesion.angle)
  u, v = cos * dx + sin * dy, cos * dy - sin * dx
  if lesion.kind == "benign":
    q = np.hypot(u * np.sqrt(lesion.aspect), v / np.sqrt(lesion.aspect))
    inside = lesion.radius - q
    coverage = np.clip(inside / pixel + 0.5, 0.0, 1.0)
    margin = np.clip(inside / max(pixel, 0.04 * lesion.radius) + 0.5, 0.0, 1.0)
    dome = np.sqrt(np.clip(1.0 - (q / lesion.radius) ** 2, 0.0, 1.0))
    return lesion.contrast * margin * (0.7 + 0.3 * dome), coverage
  r = np.hypot(u, v)
  theta = np.arctan2(v, u)
  border = lesion.radius * (1.0 + sum(amp * np.cos(k * theta + phase) for k, (amp, phase)
                                      in enumerate(lesion.harmonics, start=2)))
  inside = border - r
  core = np.clip(inside / pixel + 0.5, 0.0, 1.0)
  margin = np.clip(inside / max(pixel, 0.12 * lesion.radius) + 0.5, 0.0, 1.0)
  dome = np.sqrt(np.clip(1.0 - (r / border) ** 2, 0.0, 1.0))
  spikes = np.zeros_like(r)
  for angle, length, width, bend in lesion.spicules:
    along = np.cos(angle) * dx + np.sin(angle) * dy
    across = np.abs(np.cos(angle) * dy - np.sin(angle) * dx - (bend / length) * along * along)
    half = width * np.clip(1.0 - along / length, 0.0, 1.0)
    half = np.where((along > 0) & (half >= 0.5), half, 0.0)  # ends where under 1 px wide
    np.maximum(spikes, _box_coverage(across, half, pixel), out=spikes)
  density = lesion.contrast * np.maximum(margin * (0.75 + 0.25 * dome), 0.7 * spikes)
  return density, np.maximum(core, spikes)


def _window(lesion: Lesion, shape: tuple[int, int]) -> tuple[slice, slice]:
  """Output pixels that `lesion` can touch."""
  sy, sx = REFERENCE_SHAPE[0] / shape[0], REFERENCE_SHAPE[1] / shape[1]
  (cy, cx), reach = lesion.centre, lesion.reach
  r0, r1 = int(np.floor((cy - reach) / sy)), int(np.ceil((cy + reach) / sy)) + 1
  c0, c1 = int(np.floor((cx - reach) / sx)), int(np.ceil((cx + reach) / sx)) + 1
  return (slice(max(r0, 0), min(r1, shape[0])), slice(max(c0, 0), min(c1, shape[1])))


def render(case: MammoCase, shape: tuple[int, int], texture_seed, noise_seed):
  """Renders `case` at `shape` (H, W) (see `render_case`).

  Args:
    case: from `describe_case`.
    shape: output (H, W).
    texture_seed: seed of the tissue texture (drawn on a fixed grid: shape-independent).
    noise_seed: seed of the per-pixel noise.

  Returns:
    (image uint16 [H, W] in 0..4095, masks {'benign', 'malignant'}: uint8 [H, W] in {0, 1}).
  """
  shape = (int(shape[0]), int(shape[1]))
  y, x, pixel = _pixel_centres(shape)
  rho = _breast_rho(case, y, x)
  texture_rng = np.random.default_rng(texture_seed)
  if shape == _TEXTURE_GRID:
    density = _density(case, texture_rng, rho, x)
  else:
    grid_y, grid_x, _ = _pixel_centres(_TEXTURE_GRID)
    density = _resize(_density(case, texture_rng, _breast_rho(case, grid_y, grid_x), grid_x),
                      shape)
  # Radial distance to the border (reference px), > 0 inside.
  depth = np.hypot(x - case.x0, y - case.cy) * (1.0 / np.maximum(rho, 1e-6) - 1.0)
  thickness = np.sqrt(np.clip(depth / case.edge_width, 0.0, 1.0))
  contrast = case.gland - case.fat
  tissue = case.fat + contrast * density
  if pixel < 4.0:  # at least twice finer than the texture grid: add the fine grain
    tissue += (0.06 * contrast) * (0.3 + density) * _fine_detail(texture_rng, shape)
  if case.pectoral is not None:
    inside = _pectoral_distance(case, y, x)
    muscle = np.clip(inside / max(pixel, 10.0) + 0.5, 0.0, 1.0)
    level = case.muscle * (0.85 + 0.15 * np.clip(inside / 400.0, 0.0, 1.0))
    tissue += muscle * (level - tissue)
  masks = {name: np.zeros(shape, np.uint8) for name in CLASS_NAMES}
  for lesion in case.lesions:
    rows, cols = _window(lesion, shape)
    dy = y[rows] - _F32(lesion.centre[0])
    dx = x[:, cols] - _F32(lesion.centre[1])
    added, coverage = _render_lesion(lesion, dy, dx, pixel)
    tissue[rows, cols] += added
    masks[lesion.kind][rows, cols] |= (coverage > 0.5).astype(np.uint8)
  tissue *= thickness
  skin_width = max(case.skin_width, pixel)
  tissue += case.skin * np.clip(1.0 - np.abs(depth - case.skin_width) / skin_width, 0.0, 1.0)
  # Noise of the mean of the full-resolution pixels that one output pixel covers.
  noise = np.random.default_rng(noise_seed).standard_normal(shape, _F32)
  tissue += _F32(case.noise_sigma / pixel) * noise
  cover = np.clip(depth / pixel + 0.5, 0.0, 1.0)
  image = np.clip(np.round(case.gain * cover * tissue), 0, MAX_VALUE).astype(np.uint16)
  return image, masks


def render_case(seed: int, split_id: int, index: int, shape: tuple[int, int] = (368, 240)):
  """Case `index` of split `split_id` rendered at `shape` (H, W).

  Args:
    seed: dataset seed.
    split_id: index into `SPLITS` (any int works).
    index: case number.
    shape: output (H, W); (368, 240) is 'small', `REFERENCE_SHAPE` is 'full'. Other shapes
      stretch the 2944x1920 frame to fit.

  Returns:
    (image uint16 [H, W] in 0..4095, labels (benign, malignant) ints,
     masks {'benign': uint8 [H, W] in {0, 1}, 'malignant': ...}).

  Raises:
    ValueError: shape is not two ints >= 8.
  """
  shape = _checked_shape(shape, "shape")
  case, image, masks = _render_indexed(seed, split_id, index, shape)
  return image, case.labels, masks


def _render_indexed(seed: int, split_id: int, index: int, shape: tuple[int, int]):
  """(case, image, masks) of case `index` of split `split_id` at `shape`."""
  case = describe_case(seed, split_id, index)
  image, masks = render(case, shape, texture_seed=[seed, split_id, index, 1],
                        noise_seed=[seed, split_id, index, 2, int(shape[0]), int(shape[1])])
  return case, image, masks


# --- The TFDS builder. ---


@dataclasses.dataclass(eq=False)
class SyntheticMammoConfig(tfds.core.BuilderConfig):
  """Output (H, W), images per split (train, validation, test) and seed."""
  image_shape: tuple[int, int] = (368, 240)
  num_examples: tuple[int, int, int] = (1600, 200, 400)
  seed: int = 0


_CONFIGS = {
    "small": SyntheticMammoConfig(
        name="small", image_shape=(368, 240), num_examples=(1600, 200, 400),
        description="368x240 (2944x1920 / 8) 16-bit PNG, 1600/200/400 images, seed 0."),
    "full": SyntheticMammoConfig(
        name="full", image_shape=REFERENCE_SHAPE, num_examples=(16, 8, 16),
        description="2944x1920 16-bit PNG, 16/8/16 images, seed 0."),
    # For tests: small, and both sides multiples of 16 (the saliency map's stride), which
    # 2944x1920 / 16 = 184x120 is not.
    "tiny": SyntheticMammoConfig(
        name="tiny", image_shape=(192, 128), num_examples=(96, 32, 32),
        description="192x128 16-bit PNG, 96/32/32 images, seed 0 (tests)."),
}
TAGS = tuple(_CONFIGS)


def _checked_shape(shape, field: str = "image_shape") -> tuple[int, int]:
  """`shape` as (H, W) ints; a ValueError naming `field` unless it is two ints >= 8."""
  try:
    checked = tuple(int(s) for s in shape)
  except (TypeError, ValueError):
    checked = ()
  if len(checked) != 2 or min(checked) < 8:
    raise ValueError(f"{field} must be (H, W) with H, W >= 8, got {shape!r}")
  return checked


def custom_config(base, image_shape=None, num_examples=None,
                  seed: int | None = None) -> SyntheticMammoConfig:
  """Config `base` (a tag, 'small' or 'full', or a config) with some fields overridden; its
  name encodes them all, so different settings never share files
  (e.g. 'small_368x240_n40_8_16_seed0').

  Raises:
    ValueError: unknown tag, or a bad image_shape / num_examples.
  """
  if isinstance(base, SyntheticMammoConfig):
    default, tag = base, base.name.split("_")[0]
  elif base in _CONFIGS:
    default, tag = _CONFIGS[base], base
  else:
    raise ValueError(f"synthetic_mammo tag {base!r} is unknown; valid tags: {list(TAGS)}")
  shape = _checked_shape(default.image_shape if image_shape is None else image_shape)
  try:
    counts = tuple(int(n) for n in (default.num_examples if num_examples is None
                                    else num_examples))
  except (TypeError, ValueError):
    counts = ()
  if len(counts) != len(SPLITS) or min(counts) < 0:
    raise ValueError(f"num_examples needs one count >= 0 per split {SPLITS}, got {num_examples}")
  seed = default.seed if seed is None else int(seed)
  name = f"{tag}_{shape[0]}x{shape[1]}_n{'_'.join(map(str, counts))}_seed{seed}"
  return SyntheticMammoConfig(name=name, image_shape=shape, num_examples=counts, seed=seed,
                              description=f"{default.description} Overridden: {name}.")


class SyntheticMammo(tfds.core.GeneratorBasedBuilder):
  """Synthetic mammograms with benign/malignant lesions and masks (see the module docstring)."""

  name = "synthetic_mammo"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = list(_CONFIGS.values())  # the first ('small') is the default

  def __init__(self, *, tag: str | None = None, image_shape=None, num_examples=None,
               seed: int | None = None, **kwargs):
    """Usual TFDS kwargs, plus the config `tag` ('small' by default, or 'full') and overrides
    (image_shape (H, W), num_examples per split, seed) that select a derived config.

    Raises:
      ValueError: unknown tag, both tag and config given, or a bad override.
    """
    if tag is not None and kwargs.get("config") is not None:
      raise ValueError(f"give synthetic_mammo a tag or a config, not both (tag={tag!r}, "
                       f"config={kwargs['config']!r})")
    if tag is not None and tag not in _CONFIGS:
      raise ValueError(f"synthetic_mammo tag {tag!r} is unknown; valid tags: {list(TAGS)}")
    if tag is not None:
      kwargs["config"] = tag
    if image_shape is not None or num_examples is not None or seed is not None:
      kwargs["config"] = custom_config(kwargs.get("config") or "small", image_shape,
                                       num_examples, seed)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(),
        description=__doc__,
        metadata=tfds.core.MetadataDict(
            class_names=list(CLASS_NAMES),
            image_shape=list(self.builder_config.image_shape)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split_id, split)
            for split_id, split in enumerate(SPLITS)}

  def _generate_examples(self, split_id: int, split: str) -> Iterator[tuple[str, dict]]:
    config = self.builder_config
    for index in range(config.num_examples[split_id]):
      case, image, masks = _render_indexed(config.seed, split_id, index, config.image_shape)
      example_id = f"synthetic_mammo-{split}-{index:05d}"
      yield example_id, make_record(image, record_id=example_id, view=case.view,
                                    labels=case.labels, masks=masks)
