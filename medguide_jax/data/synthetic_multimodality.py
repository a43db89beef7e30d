"""synthetic_multimodality: a generated stand-in for the multi-modality archive of the ssl method.

Ghesu et al. (2022) pretrain with contrastive learning and online clustering (SwAV) on more than
100M radiography, CT, MR and ultrasound images, then fine-tune on a labelled task. This dataset
imitates that mixture at toy scale: grayscale 8-bit images ('L' PNG, `images.features()` schema)
whose `source` is one of `SOURCES`, 25% each, drawn independently of the label:

* xray: chest projection; dark lungs over a soft torso, bright spine and curved ribs, lung
  markings, a film-like exposure gradient, projection blur;
* ct:   axial slice; a round body in dark air with sharp organ boundaries (thorax: lungs with
  vessel dots, heart, spine; abdomen: liver, spleen, kidneys, aorta, bowel gas), quantum noise;
* mr:   axial head; scalp, dark skull, cortex with gyri, white matter, ventricles, in T1 or T2
  contrast, smooth, with a multiplicative bias field and Rician noise;
* us:   sector scan; a fan mask, layered echogenicity, an anechoic vessel/cyst, speckle and
  depth attenuation under log compression.

Every image has one of four latent classes (`CLASS_NAMES`): a small structure at a random
position, size and contrast inside the anatomy (lungs, liver, brain or the organ under the
probe), or none ('normal'). The structure is drawn in the style of the source: brighter than its
surround in x-ray and lung CT, either sign in liver CT, bright on T2 and dark on T1 MR (tiny
calcifications dark on MR), hypoechoic masses and echogenic calcifications in ultrasound. The
class is thus a matter of local shape (a smooth disc, a disc with spikes, a cluster of dots,
nothing); anatomy, source, position, contrast, noise, gain, offset and gamma are nuisances drawn
independently of it.

Measured on this generator (96x96, seed 0; balanced accuracy on 1000 test-split images, chance
0.25). Numpy probes, cheap to re-check: one-vs-rest ridge on standardised features, trained on
train-split examples 0-3999, l2 picked on examples 4000-4999:
  raw pixels (9216 features)                               0.27  (200 training images: 0.25)
  4x4-pooled pixels (576)                                  0.25
  global intensity: mean, std, 10 percentiles              0.29
  radial profile of the 19x19 crop at `lesion_centre`     0.74  (200 training images: 0.72)
(the radial profile, 30 features, is `_radial_profile` in the tests). So the class is in the
pixels as a local shape around the lesion, not in linear pixel statistics, and finding the
lesion is the hard part. A 10-conv-layer CNN (widths 12-48, batch
norm, global max+mean pooling, AdamW, flips; 16-64 and two poolings on crops) trained from
scratch on CPU reached:
  lesion-centred 33x33 crops, 4000 images, 12 epochs       0.97
  whole images, 4000 images, 24 epochs                     0.92
  whole images, 200 images, 60 epochs                      0.29  (memorises the training set)
With few labels the lesion is not found from scratch, which leaves pretraining room to help;
the lesion radius range in `_lesion` is the knob that makes the task easier or harder.
Generating the default config (5500 images, PNG-encoded, written by TFDS) took 21 s wall
(20 s CPU, imports included) on one core of a loaded development machine; rendering alone
is about 2 ms per 96x96 image.

The 'scattered' config (`synthetic_multimodality:scattered`, the ssl method's default since
2026-12-02) draws 6-10 lesions of the class per image (`SCATTERED`: radius 0.12-0.20 canvas
units, 3.8-6.4 px at the 64 px the ssl configs train at) instead of one; label, source and
anatomy of example i are the same as in 'default'. Why: SwAV and the contrastive loss learn
what two random crops of an image share. A single lesion is in few crops, so pretraining on
'default' learnt nothing of the class (kNN of the features at chance: README, SSL results),
and 400 labels were not enough to find it from scratch. Scattered lesions are in most crops.
Measured (seed 0, test split, leave-one-out 20-NN of the pooled features of the ssl cpu
size's tiny_cnn): 0.325 with random weights, 0.432 after 400 SwAV steps on the 4000
training images; an earlier 4-7 lesions of radius 0.10-0.16 gave 0.325 and a linear probe
of 0.267 (400 labels), the single lesion 0.25-0.30.

Determinism: example i of split s depends only on `np.random.default_rng([seed, s, i])`, so
order and parallelism do not matter (`generate_example` regenerates any one example). Pixels are
computed in float64 and rounded to uint8; PNG bytes are identical for a given Pillow/zlib build.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from medguide_jax.data import images
from medguide_jax.data import synthetic
from medguide_jax.data.synthetic import _smooth_noise

SOURCES = ("xray", "ct", "mr", "us")
CLASS_NAMES = ("round_lesion", "spiculated_lesion", "calcification_cluster", "normal")
ROUND, SPICULATED, CALCIFICATION, NORMAL = range(4)
SPLITS = synthetic.SPLITS  # custom_config validates counts against these


@dataclasses.dataclass(frozen=True)
class Evidence:
  """How much class evidence an image holds: `count` lesions (inclusive range, drawn per
  image) of the class, each of radius in `radius` canvas units (the canvas spans [-1, 1])."""
  count: tuple[int, int] = (1, 1)
  radius: tuple[float, float] = (0.08, 0.14)  # 3.8-6.7 px at 96x96


SINGLE = Evidence()                                       # the 'default' config
SCATTERED = Evidence(count=(6, 10), radius=(0.12, 0.20))   # the 'scattered' config


@dataclasses.dataclass(frozen=True)
class _Canvas:
  """Pixel-centre coordinates in [-1, 1] (x right, y down), the size of one pixel, and how
  much class evidence to draw on it."""
  size: int
  x: np.ndarray  # [H, W]
  y: np.ndarray  # [H, W]
  evidence: Evidence = SINGLE

  @property
  def px(self) -> float:
    return 2.0 / self.size


@functools.lru_cache(maxsize=8)
def _canvas(size: int) -> _Canvas:
  t = (np.arange(size) + 0.5) * (2.0 / size) - 1.0
  y, x = np.meshgrid(t, t, indexing="ij")
  x.flags.writeable = y.flags.writeable = False  # shared between calls
  return _Canvas(size, x, y)


def _ellipse(c: _Canvas, centre, axes, angle: float = 0.0, edge: float | None = None):
  """Soft ellipse [H, W] in [0, 1]; `edge` is the ramp width in canvas units (default 1 px)."""
  dx, dy = c.x - centre[0], c.y - centre[1]
  u = np.cos(angle) * dx + np.sin(angle) * dy
  v = -np.sin(angle) * dx + np.cos(angle) * dy
  rho = np.hypot(u / axes[0], v / axes[1])
  return np.clip((1.0 - rho) * min(axes) / (edge or c.px) + 0.5, 0.0, 1.0)


def _window(c: _Canvas, centre, extent: float) -> tuple[slice, slice]:
  """Rows and columns within `extent` canvas units of `centre` (drawing stays local and cheap)."""
  lo = np.floor((np.asarray(centre) - extent + 1.0) / c.px).astype(int)
  hi = np.ceil((np.asarray(centre) + extent + 1.0) / c.px).astype(int)
  lo, hi = np.clip(lo, 0, c.size), np.clip(hi, 0, c.size)
  return slice(lo[1], hi[1]), slice(lo[0], hi[0])


def _disc(dx, dy, radius: float, px: float):
  """Anti-aliased disc of `radius` units on local offsets dx, dy."""
  return np.clip((radius - np.hypot(dx, dy)) / px + 0.5, 0.0, 1.0)


def _round(rng, dx, dy, radius: float, px: float):
  """A smooth-bordered oval mass (area of a disc of `radius`, aspect ratio 0.7-1)."""
  angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.7, 1.0)
  u = np.cos(angle) * dx + np.sin(angle) * dy
  v = -np.sin(angle) * dx + np.cos(angle) * dy
  return _disc(u / np.sqrt(aspect), v * np.sqrt(aspect), radius, px)


def _spiculated(rng, dx, dy, radius: float, px: float):
  """A small core with 6-9 tapering spikes radiating to 1.7-2.6 radii."""
  core = radius * rng.uniform(0.45, 0.6)
  n = int(rng.integers(6, 10))
  angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * np.pi / n) + rng.uniform(0, 2 * np.pi)
  lengths = radius * rng.uniform(1.7, 2.6, n)
  base = max(core * rng.uniform(0.5, 0.65), 1.5 * px)
  cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
  along = cos * dx + sin * dy  # [n, h, w]
  across = np.abs(-sin * dx + cos * dy)
  half = base * np.clip(1.0 - along / lengths[:, None, None], 0.0, 1.0) * (along > 0)
  spikes = np.clip((half - across) / px + 0.5, 0.0, 1.0).max(0)
  return np.maximum(_disc(dx, dy, core, px), spikes)


def _calcifications(rng, dx, dy, radius: float, px: float):
  """A cluster of 5-10 tiny dense dots within one radius."""
  n = int(rng.integers(5, 11))
  r = radius * np.sqrt(rng.uniform(0, 1, n))
  a = rng.uniform(0, 2 * np.pi, n)
  dots = rng.uniform(0.018, 0.03, n)  # 0.85-1.45 px at 96x96
  out = np.zeros_like(dx)
  for cx, cy, d in zip(r * np.cos(a), r * np.sin(a), dots):
    out = np.maximum(out, _disc(dx - cx, dy - cy, max(d, 0.6 * px), px))
  return out


# label -> (draw(rng, dx, dy, radius, px) -> mask, reach of the shape in radii).
_SHAPES = {ROUND: (_round, 1.0), SPICULATED: (_spiculated, 2.6),
           CALCIFICATION: (_calcifications, 1.1)}


def _place(rng: np.random.Generator, c: _Canvas, region: np.ndarray, margin: float):
  """A random point where `region` > 0.5 (32 uniform tries, then the region's centre)."""
  points = rng.uniform(-1 + margin, 1 - margin, (32, 2))
  cols = np.clip(((points[:, 0] + 1) / c.px).astype(int), 0, c.size - 1)
  rows = np.clip(((points[:, 1] + 1) / c.px).astype(int), 0, c.size - 1)
  inside = np.flatnonzero(region[rows, cols] > 0.5)
  if inside.size:
    return points[inside[0]]
  rows, cols = np.nonzero(region > 0.5)
  if rows.size == 0:
    return np.zeros(2)
  return np.array([c.x[0, int(np.median(cols))], c.y[int(np.median(rows)), 0]])


def _lesion(rng: np.random.Generator, label: int, c: _Canvas,
            region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The class evidence: (mask [H, W] in [0, 1], centre (x, y) of the first lesion), the
  `c.evidence.count` lesions placed independently inside `region` (overlaps merge by max).

  'normal' gets an empty mask but still a centre: where a lesion would have been.
  """
  lo, hi = c.evidence.count
  count = lo if lo == hi else int(rng.integers(lo, hi + 1))  # no draw: 'default' unchanged
  mask = np.zeros((c.size, c.size))
  first = None
  for _ in range(count):
    centre = _place(rng, c, region, margin=0.15)
    first = centre if first is None else first
    if label == NORMAL:
      continue
    draw, reach = _SHAPES[label]
    radius = rng.uniform(*c.evidence.radius)
    rows, cols = _window(c, centre, reach * radius + 2 * c.px)
    dx, dy = c.x[rows, cols] - centre[0], c.y[rows, cols] - centre[1]
    mask[rows, cols] = np.maximum(mask[rows, cols], draw(rng, dx, dy, radius, c.px))
  return mask, first


def _xray(rng: np.random.Generator, label: int, c: _Canvas):
  """Chest radiograph: dense = bright, air = dark; the lesion adds attenuation inside a lung."""
  x, y = c.x, c.y
  width = rng.uniform(0.72, 0.92)
  body = _ellipse(c, (rng.uniform(-0.05, 0.05), 0.2), (width, 1.45), edge=0.1)
  lungs = np.zeros_like(x)
  for side in (-1, 1):
    centre = (side * width * rng.uniform(0.4, 0.5), rng.uniform(-0.2, -0.05))
    axes = (width * rng.uniform(0.32, 0.4), rng.uniform(0.55, 0.72))
    lungs = np.maximum(lungs, _ellipse(c, centre, axes, side * rng.uniform(0, 0.15), edge=0.06))
  heart = _ellipse(c, (rng.uniform(0.03, 0.15), rng.uniform(0.3, 0.45)),
                   (rng.uniform(0.25, 0.35), rng.uniform(0.2, 0.28)), edge=0.05)
  lungs *= (1 - heart) * body
  # Posterior ribs rise from the spine and bend down laterally; clavicles cross the apices.
  rib_y = y + rng.uniform(0.2, 0.35) * np.abs(x) - rng.uniform(0.5, 0.8) * x ** 2
  ribs = (0.5 + 0.5 * np.cos(2 * np.pi * rib_y / rng.uniform(0.16, 0.22) + rng.uniform(0, 7))) ** 4
  clavicle_y = rng.uniform(-0.78, -0.68) + rng.uniform(0.1, 0.25) * np.abs(x)
  clavicles = np.clip(1 - np.abs(y - clavicle_y) / 0.04, 0, 1) * (np.abs(x) < 0.8 * width)
  spine = _ellipse(c, (0.0, 0.2), (0.07, 2.0), edge=0.04)
  hilum = 0.6 + 0.4 * np.clip(np.abs(x) / width, 0, 1)  # lungs darker laterally
  image = (0.05 + rng.uniform(0.45, 0.6) * body - rng.uniform(0.25, 0.35) * lungs * hilum
           + body * (0.05 * (1 + lungs) * ribs + 0.12 * spine + 0.08 * clavicles)
           + 0.06 * lungs * _smooth_noise(rng, c.size, 12))
  lesion, where = _lesion(rng, label, c, lungs)
  contrast = rng.uniform(0.3, 0.5) if label == CALCIFICATION else rng.uniform(0.18, 0.32)
  image = image + contrast * lesion
  tilt = rng.uniform(0, 2 * np.pi)
  image = image + rng.uniform(0, 0.12) * (np.cos(tilt) * x + np.sin(tilt) * y)  # exposure
  image = images.gaussian_blur(image, rng.uniform(0.5, 0.9) * c.size / 96, border="edge")
  return image + rng.normal(0, rng.uniform(0.01, 0.03), image.shape), where


def _ct_thorax(rng, c: _Canvas, centre, axes) -> tuple[np.ndarray, np.ndarray]:
  """Lungs with vessel dots and a heart: (tissue values [H, W] to overlay, lung mask)."""
  (cx, cy), (ax, ay) = centre, axes
  lungs = np.zeros_like(c.x)
  for side in (-1, 1):
    lungs = np.maximum(lungs, _ellipse(
        c, (cx + side * ax * rng.uniform(0.42, 0.5), cy - ay * rng.uniform(0.0, 0.1)),
        (ax * rng.uniform(0.33, 0.4), ay * rng.uniform(0.6, 0.72))))
  heart = _ellipse(c, (cx + ax * rng.uniform(0.0, 0.15), cy - ay * 0.15),
                   (ax * rng.uniform(0.22, 0.3), ay * rng.uniform(0.35, 0.45)))
  lungs *= 1 - heart
  n = int(rng.integers(6, 14))
  points = np.c_[rng.uniform(-1, 1, n) * ax + cx, rng.uniform(-1, 1, n) * ay + cy]
  vessels = np.zeros_like(c.x)
  for p, r in zip(points, rng.uniform(0.012, 0.03, n)):
    vessels = np.maximum(vessels, _ellipse(c, p, (r, r)))
  tissue = 0.5 - 0.44 * lungs + 0.3 * vessels * lungs + 0.05 * heart
  return tissue, lungs * (1 - vessels)


def _ct_abdomen(rng, c: _Canvas, centre, axes) -> tuple[np.ndarray, np.ndarray]:
  """Liver, spleen, kidneys, aorta and bowel gas: (tissue values [H, W], liver mask)."""
  (cx, cy), (ax, ay) = centre, axes
  liver = _ellipse(c, (cx - ax * rng.uniform(0.25, 0.35), cy - ay * rng.uniform(0.05, 0.15)),
                   (ax * rng.uniform(0.4, 0.5), ay * rng.uniform(0.55, 0.68)), rng.uniform(-.3, .3))
  spleen = _ellipse(c, (cx + ax * 0.6, cy + ay * 0.1), (ax * 0.18, ay * 0.3), 0.5)
  kidneys = sum(_ellipse(c, (cx + s * ax * 0.35, cy + ay * 0.45), (ax * 0.12, ay * 0.2), s * 0.4)
                for s in (-1, 1))
  aorta = _ellipse(c, (cx + ax * 0.05, cy + ay * 0.45), (ax * 0.07, ax * 0.07))
  gas = np.zeros_like(c.x)
  for _ in range(int(rng.integers(1, 5))):
    p = (cx + ax * rng.uniform(0.0, 0.6), cy - ay * rng.uniform(0.1, 0.6))
    gas = np.maximum(gas, _ellipse(c, p, rng.uniform(0.03, 0.08, 2)))
  tissue = (0.5 + rng.uniform(0.04, 0.12) * liver + 0.06 * spleen + 0.12 * kidneys
            + 0.15 * aorta - 0.48 * gas)
  return tissue, liver * (1 - gas)


def _ct(rng: np.random.Generator, label: int, c: _Canvas):
  """Axial CT in a soft-tissue/lung window: air = 0, sharp organ edges, quantum noise."""
  centre = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.08))
  ax = rng.uniform(0.7, 0.88)
  axes = (ax, ax * rng.uniform(0.68, 0.8))
  theta = np.arctan2(c.y - centre[1], c.x - centre[0])
  wobble = 1 + 0.03 * np.cos(2 * theta + rng.uniform(0, 7)) + 0.02 * np.cos(3 * theta)
  rho = np.hypot((c.x - centre[0]) / axes[0], (c.y - centre[1]) / axes[1]) / wobble
  body = np.clip((1 - rho) * axes[1] / c.px + 0.5, 0, 1)
  fat_depth = rng.uniform(0.04, 0.1)
  muscle = np.clip((1 - fat_depth - rho) * axes[1] / c.px + 0.5, 0, 1)
  organs = _ct_thorax if rng.uniform() < 0.5 else _ct_abdomen
  tissue, region = organs(rng, c, centre, axes)
  spine = _ellipse(c, (centre[0], centre[1] + axes[1] * 0.7), (0.08, 0.07))
  image = body * (0.38 + muscle * (tissue - 0.38) + 0.35 * spine)
  lesion, where = _lesion(rng, label, c, region * muscle)
  if label == CALCIFICATION:
    contrast = rng.uniform(0.35, 0.55)
  elif organs is _ct_thorax:  # a solid nodule in aerated lung
    contrast = rng.uniform(0.25, 0.45)
  else:  # hypo- or hyperdense liver lesion
    contrast = rng.choice([-1, 1]) * rng.uniform(0.1, 0.22)
  image = image + contrast * lesion
  noise = images.gaussian_blur(rng.normal(0, 1, image.shape), 0.5 * c.size / 96, border="edge")
  return image + rng.uniform(0.03, 0.08) * noise, where


_MR_CONTRAST = {  # tissue intensities: fat, skull, csf, grey matter, white matter
    "t1": (0.9, 0.05, 0.15, 0.5, 0.72),
    "t2": (0.65, 0.05, 0.95, 0.58, 0.42),
}


def _mr(rng: np.random.Generator, label: int, c: _Canvas):
  """Axial head MR (T1 or T2): smooth contrast, bias field, Rician noise."""
  centre = np.array([rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)])
  ax = rng.uniform(0.62, 0.75)
  axes = (ax, min(ax * rng.uniform(1.1, 1.25), 0.92))
  angle = rng.uniform(-0.15, 0.15)
  dx, dy = c.x - centre[0], c.y - centre[1]
  u = (np.cos(angle) * dx + np.sin(angle) * dy) / axes[0]
  v = (-np.sin(angle) * dx + np.cos(angle) * dy) / axes[1]
  rho, theta = np.hypot(u, v), np.arctan2(v, u)
  gyri = (0.04 * np.cos(int(rng.integers(10, 17)) * theta + rng.uniform(0, 7))
          + 0.025 * np.cos(int(rng.integers(5, 9)) * theta + rng.uniform(0, 7)))
  weighting = "t1" if rng.uniform() < 0.5 else "t2"
  fat, skull, csf, grey, white = _MR_CONTRAST[weighting]
  image = np.select([rho > 1, rho > 0.93, rho > 0.86, rho > 0.83, rho > 0.62 + gyri],
                    [0.0, fat, skull, csf, grey], white)
  ventricles = sum(_ellipse(c, centre + (s * ax * 0.14, -0.04), (ax * 0.07, ax * 0.3), s * 0.2)
                   for s in (-1, 1))
  image = image + ventricles * (csf - image)
  brain = (rho < 0.8) * (1 - ventricles)
  lesion, where = _lesion(rng, label, c, brain)
  if label == CALCIFICATION:
    contrast = -rng.uniform(0.35, 0.5)  # calcium is dark on MR
  else:
    contrast = (1 if weighting == "t2" else -1) * rng.uniform(0.22, 0.4)
  image = image + contrast * lesion
  image = images.gaussian_blur(image, rng.uniform(0.4, 0.7) * c.size / 96, border="edge")
  image = image * (1 + rng.uniform(0.1, 0.35) * _smooth_noise(rng, c.size, 3))  # bias field
  sigma = rng.uniform(0.015, 0.045)
  noise = rng.normal(0, sigma, (2,) + image.shape)
  return np.hypot(image + noise[0], noise[1]), where  # Rician magnitude


def _speckle(rng: np.random.Generator, size: int) -> np.ndarray:
  """Fully developed speckle, mean 1, with cells longer laterally than axially."""
  parts = []
  for _ in range(2):  # real and imaginary parts, coarse laterally
    coarse = rng.normal(0, 1, (size, max(size // 2, 2))).astype(np.float32)
    parts.append(np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR),
                            np.float64))
  envelope = np.hypot(*parts)
  return envelope / envelope.mean()


def _us(rng: np.random.Generator, label: int, c: _Canvas):
  """Sector ultrasound: fan mask, layered echogenicity, speckle, depth attenuation."""
  apex = (rng.uniform(-0.05, 0.05), -1.05)
  r = np.hypot(c.x - apex[0], c.y - apex[1])
  theta = np.arctan2(c.x - apex[0], c.y - apex[1])
  near, half_angle = rng.uniform(0.12, 0.25), rng.uniform(0.45, 0.62)
  fan = (np.clip((half_angle - np.abs(theta)) * r / c.px + 0.5, 0, 1)
         * np.clip((r - near) / c.px + 0.5, 0, 1))
  fascia = near + rng.uniform(0.15, 0.3)
  capsule = fascia + rng.uniform(0.15, 0.35) + 0.1 * np.sin(2 * theta + rng.uniform(0, 7))
  echo = (np.where(r < fascia, 0.8, np.where(r < capsule, 0.35, rng.uniform(0.45, 0.6)))
          + 0.9 * np.exp(-0.5 * ((r - capsule) / (1.5 * c.px)) ** 2))
  organ = (r > capsule + 0.05) * fan
  if rng.uniform() < 0.6:  # an anechoic vessel, in any class
    centre, width = _place(rng, c, organ, margin=0.2), rng.uniform(0.04, 0.08)
    axes = (width * rng.uniform(2.5, 5), width)
    echo = echo * (1 - 0.95 * _ellipse(c, centre, axes, rng.uniform(-0.6, 0.6)))
  lesion, where = _lesion(rng, label, c, organ)
  if label == CALCIFICATION:
    echo = echo + rng.uniform(1.0, 2.5) * lesion  # echogenic foci
  else:
    echo = echo * (1 - rng.uniform(0.6, 0.9) * lesion)  # hypoechoic mass
  attenuation = np.exp(-rng.uniform(0.2, 0.7) * (r - near))
  signal = echo * _speckle(rng, c.size) * attenuation
  k = rng.uniform(4, 10)
  return fan * np.log1p(k * signal) / np.log1p(2 * k), where  # log compression


# source -> renderer(rng, label, canvas) -> (image float [H, W], lesion centre (x, y)).
_RENDERERS: dict[str, Callable[[np.random.Generator, int, _Canvas],
                               tuple[np.ndarray, np.ndarray]]] = {
    "xray": _xray, "ct": _ct, "mr": _mr, "us": _us}


def render(rng: np.random.Generator, label: int, source: str, size: int = 96,
           evidence: Evidence = SINGLE) -> tuple[np.ndarray, tuple[float, float]]:
  """Renders one image of class `label` in the style of `source`.

  Args:
    rng: source of all randomness of the image (anatomy, lesion, display, noise).
    label: index into `CLASS_NAMES`.
    source: one of `SOURCES`.
    size: height = width in pixels (>= 8).
    evidence: how many lesions of the class, of which radii (`SINGLE`, `SCATTERED`).

  Returns:
    (image uint8 [size, size] grey, (row, col) of the lesion centre in pixels; for 'normal',
    where a lesion would have been).

  Raises:
    ValueError: unknown source, label out of range or size < 8.
  """
  if source not in _RENDERERS:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  if not 0 <= label < len(CLASS_NAMES):
    raise ValueError(f"label must be in [0, {len(CLASS_NAMES)}), got {label}")
  if size < 8:
    raise ValueError(f"image_size must be >= 8, got {size}")
  canvas = dataclasses.replace(_canvas(size), evidence=evidence)
  image, centre = _RENDERERS[source](rng, label, canvas)
  image = np.clip(image, 0.0, 1.0)
  # Display nuisances, independent of the class: gamma, gain, offset.
  image = image ** np.exp(rng.uniform(-0.3, 0.3))
  image = image * rng.uniform(0.85, 1.1) + rng.uniform(-0.04, 0.04)
  row_col = (float((centre[1] + 1) / canvas.px - 0.5), float((centre[0] + 1) / canvas.px - 0.5))
  return np.clip(np.round(255.0 * image), 0, 255).astype(np.uint8), row_col


def _example(seed: int, split_id: int, index: int, image_size: int,
             evidence: Evidence = SINGLE):
  """(image, label, source, lesion centre) of example `index` of split `split_id`."""
  rng = np.random.default_rng([seed, split_id, index])
  label = int(rng.integers(len(CLASS_NAMES)))
  source = SOURCES[int(rng.integers(len(SOURCES)))]
  image, centre = render(rng, label, source, image_size, evidence)
  return image, label, source, centre


def generate_example(seed: int, split_id: int, index: int, image_size: int = 96,
                     evidence: Evidence = SINGLE) -> tuple[np.ndarray, int, str]:
  """Example `index` of split `split_id`: (image uint8 [H, W], label int, source str).

  It depends only on `np.random.default_rng([seed, split_id, index])` and `evidence`.
  """
  image, label, source, _ = _example(seed, split_id, index, image_size, evidence)
  return image, label, source


def lesion_centre(seed: int, split_id: int, index: int, image_size: int = 96,
                  evidence: Evidence = SINGLE) -> tuple[float, float]:
  """(row, col) in pixels of the class evidence of that example (regenerates it); with
  several lesions, the first one's.

  For 'normal' it is where a lesion would have been; not stored in the records, it is for
  checks such as lesion-centred probes and saliency maps.
  """
  return _example(seed, split_id, index, image_size, evidence)[3]


@dataclasses.dataclass(eq=False)
class SyntheticMultimodalityConfig(tfds.core.BuilderConfig):
  """Image size, examples per split (train, validation, test), seed and class evidence."""
  image_size: int = 96
  num_examples: tuple[int, int, int] = (4000, 500, 1000)
  seed: int = 0
  evidence: Evidence = SINGLE


class SyntheticMultimodality(synthetic.GeneratedBuilder):
  """X-ray/CT/MR/ultrasound-like images with four latent lesion classes (see module docstring)."""

  name = "synthetic_multimodality"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticMultimodalityConfig(
          name="default", description="96x96 grey PNG, 4000/500/1000 images, seed 0."),
      SyntheticMultimodalityConfig(
          name="scattered", evidence=SCATTERED,
          description="96x96 grey PNG, 4000/500/1000 images, seed 0; 4-7 lesions of the "
                      "class per image (the ssl method's default, see the module docstring)."),
  ]

  def __init__(self, *, tag: str | None = None, image_size: int | None = None,
               num_examples=None, seed: int | None = None, **kwargs):
    """Usual TFDS kwargs, plus a tag ('scattered'; 'synthetic_multimodality:scattered') and
    overrides (image_size, num_examples per split, seed) that derive a config from the tag's."""
    configs = {c.name: c for c in self.BUILDER_CONFIGS}
    if tag is not None and tag not in configs:
      raise ValueError(f"synthetic_multimodality tag {tag!r} is unknown; valid tags: "
                       f"{list(configs)}")
    if tag is not None:
      kwargs["config"] = tag
    if image_size is not None or num_examples is not None or seed is not None:
      base = configs[tag or "default"]
      derived = synthetic.custom_config(
          type(base), image_size or base.image_size, num_examples or base.num_examples,
          base.seed if seed is None else seed)
      prefix = "" if base.name == "default" else f"{base.name}_"  # never shares files
      kwargs["config"] = dataclasses.replace(derived, name=prefix + derived.name,
                                             evidence=base.evidence)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=images.features(),
        description=__doc__,
        metadata=tfds.core.MetadataDict(class_names=list(CLASS_NAMES),
                                        sources=list(SOURCES)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split_id, split)
            for split_id, split in enumerate(SPLITS)}

  def _generate_examples(self, split_id: int, split: str) -> Iterator[tuple[str, dict]]:
    config = self.builder_config
    for index in range(config.num_examples[split_id]):
      image, label, source = generate_example(config.seed, split_id, index, config.image_size,
                                              config.evidence)
      example_id = f"synthetic-{split}-{index:05d}"
      yield example_id, {
          "image": images.encode_png(image),
          "label": np.int64(label),
          "source": source.encode(),
          "id": example_id.encode(),
      }
