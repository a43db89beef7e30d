"""synthetic_paired: a generated stand-in for Derm7pt, built so that modality guidance pays off.

Every case is ONE lesion seen twice, with Derm7pt-shaped labels (`paired.TASKS`):

* superior (dermoscopy-like): the lesion fills the frame, sharp, with every 7-point criterion
  drawn as a visible pattern (network lines, blue-white veil, border streaks, dots/globules,
  red vessels, whitish regression areas, dark blotches);
* inferior (clinical-photo-like): the same rendered lesion shrunk to ~40% (area-averaged),
  pasted on a skin background with an illumination gradient, colour cast, blur and noise. Fine
  patterns (network, dots, streaks, thin vessels) mostly vanish; colour and large structures
  (veil, regression, blotches, base colour, outline) partly survive. So the inferior image holds
  some but clearly less label information than the superior one, as in the paper's premise.

Criteria are drawn conditionally on the diagnosis (melanoma: atypical network, veil, irregular
streaks/dots/pigmentation, regression), the diagnosis has Derm7pt-like priors and also its own
cues (base colour, asymmetry, BCC nests, SK milia-like cysts, vascular lacunae).

Determinism: case i of split s depends only on `np.random.default_rng([seed, s, i])`, so order and
parallelism do not matter. Pixels are computed in float64 (elementwise numpy, Pillow resampling)
and rounded to uint8, so last-bit differences between platforms' sin/exp do not reach them in
practice; PNG bytes are identical for a given Pillow (zlib) build.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from medguide_jax.data import images, paired

_DIAG = paired.CLASS_NAMES["DIAG"]  # ("BCC", "NEV", "MEL", "MISC", "SK")
BCC, NEV, MEL, MISC, SK = range(5)

# P(DIAG), roughly Derm7pt's (NEV 57%, MEL 25%, MISC 10%, BCC 4%, SK 4%), in `_DIAG` order.
DIAG_PRIOR = np.array([0.04, 0.57, 0.25, 0.10, 0.04])

# P(criterion class | DIAG): rows follow `_DIAG`, columns `paired.CLASS_NAMES[task]`.
CRITERIA_GIVEN_DIAG = {
    "PN": [[.85, .10, .05], [.30, .55, .15], [.20, .20, .60], [.50, .40, .10], [.80, .15, .05]],
    "BWV": [[.80, .20], [.92, .08], [.45, .55], [.90, .10], [.90, .10]],
    "VS": [[.20, .70, .10], [.85, .10, .05], [.55, .10, .35], [.60, .25, .15], [.55, .35, .10]],
    "PIG": [[.70, .10, .20], [.50, .35, .15], [.25, .15, .60], [.50, .35, .15], [.60, .20, .20]],
    "STR": [[.95, .03, .02], [.78, .14, .08], [.45, .15, .40], [.85, .10, .05], [.90, .05, .05]],
    "DaG": [[.70, .10, .20], [.30, .45, .25], [.20, .15, .65], [.55, .30, .15], [.60, .20, .20]],
    "RS": [[.70, .30], [.90, .10], [.50, .50], [.90, .10], [.85, .15]],
}

# Mean lesion colour (RGB, 0-255) per diagnosis; MISC has two looks (vascular, lentigo-like).
_BASE_RGB = {BCC: (185, 130, 125), NEV: (140, 95, 65), MEL: (100, 66, 50),
             SK: (165, 122, 85), MISC: (175, 135, 105)}
_VASCULAR_RGB = (170, 75, 90)
_DARK = np.array([55.0, 35.0, 28.0])
_VEIL = np.array([110.0, 132.0, 178.0])
_WHITE = np.array([236.0, 228.0, 224.0])
_RED = np.array([185.0, 45.0, 60.0])


def sample_labels(rng: np.random.Generator) -> np.ndarray:
  """Draws one case's labels: int32 [8] in `paired.TASKS` order (DIAG, then the criteria)."""
  diag = rng.choice(len(_DIAG), p=DIAG_PRIOR)
  labels = [diag]
  for task in paired.TASKS[1:]:
    probs = np.asarray(CRITERIA_GIVEN_DIAG[task][diag])
    labels.append(rng.choice(len(probs), p=probs / probs.sum()))
  return np.asarray(labels, np.int32)


@dataclasses.dataclass(frozen=True)
class _Lesion:
  """Lesion-centred coordinates on the superior pixel grid; 1.0 = mean lesion radius."""
  x: np.ndarray  # [H, W]
  y: np.ndarray  # [H, W]
  rho: np.ndarray  # [H, W] radius normalised by the (irregular) border: border at rho == 1
  theta: np.ndarray  # [H, W] angle in radians
  px_per_unit: float  # pixels per lesion unit in the superior image


def _lesion_frame(rng: np.random.Generator, diag: int, size: int) -> _Lesion:
  """Random centre, ellipse and border irregularity (melanomas are asymmetric)."""
  radius = size * rng.uniform(0.34, 0.40) * (1.08 if diag == MEL else 1.0)
  centre = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
  py, px = np.mgrid[0:size, 0:size] + 0.5
  x, y = (px - centre[0]) / radius, (py - centre[1]) / radius
  angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.8, 1.0)
  xr = (np.cos(angle) * x + np.sin(angle) * y) / aspect
  yr = -np.sin(angle) * x + np.cos(angle) * y
  theta = np.arctan2(yr, xr)
  border = np.ones_like(theta)
  # Overlapping ranges: asymmetry hints at melanoma without giving it away.
  irregularity = rng.uniform(0.03, 0.12) if diag == MEL else rng.uniform(0.015, 0.05)
  for k in (2, 3, 5):
    border += rng.normal(0, irregularity) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
  rho = np.hypot(xr, yr) / np.maximum(border, 0.5)
  return _Lesion(x=x, y=y, rho=rho, theta=theta, px_per_unit=radius)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int = 5) -> np.ndarray:
  """Low-frequency noise in about [-1, 1], [size, size] (bicubic upsampling of a coarse grid)."""
  coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
  up = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
  return np.asarray(up, np.float64)


def _blob(lesion: _Lesion, centre, radius: float) -> np.ndarray:
  """Soft disc of `radius` lesion units at `centre`, values in [0, 1]."""
  d2 = (lesion.x - centre[0]) ** 2 + (lesion.y - centre[1]) ** 2
  return np.clip(1.0 - d2 / radius**2, 0.0, 1.0) ** 0.6


def _dots(lesion: _Lesion, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
  """Union of sharp discs (dots, globules, cysts); centres [N, 2], radii [N], in lesion units."""
  mask = np.zeros_like(lesion.x)
  xs, ys = lesion.x[0], lesion.y[:, 0]  # the lesion frame is axis-aligned with the pixels
  # Edge about one pixel wide, so dots stay crisp in the superior image at any size.
  edge = 1.0 / lesion.px_per_unit
  for (cx, cy), r in zip(centres, radii):
    # Only the dot's bounding box is touched: drawing stays cheap for many dots.
    c0, c1 = np.searchsorted(xs, [cx - r - edge, cx + r + edge])
    r0, r1 = np.searchsorted(ys, [cy - r - edge, cy + r + edge])
    if c0 >= c1 or r0 >= r1:
      continue
    dist = np.hypot(xs[None, c0:c1] - cx, ys[r0:r1, None] - cy)
    disc = np.clip((r - dist) / edge + 0.5, 0.0, 1.0)
    mask[r0:r1, c0:c1] = np.maximum(mask[r0:r1, c0:c1], disc)
  return mask


def _points_in_disc(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
  """n uniform points in a disc, [n, 2]."""
  r = radius * np.sqrt(rng.uniform(0, 1, n))
  a = rng.uniform(0, 2 * np.pi, n)
  return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _mix(colour: np.ndarray, mask: np.ndarray, rgb, strength: float) -> np.ndarray:
  """Blends `rgb` into colour [H, W, 3] where mask [H, W] is high."""
  if not mask.any():  # absent criterion: nothing to draw
    return colour
  w = (strength * mask)[..., None]
  return colour * (1 - w) + np.asarray(rgb, np.float64) * w


def _base_colour(rng: np.random.Generator, diag: int, lesion: _Lesion, size: int):
  """Lesion body colour [H, W, 3] and whether it is a vascular-looking MISC lesion.

  Per-diagnosis hue with brightness jitter (hue jitter kept small so browns stay brown),
  mottling, a darker centre; melanomas are multicoloured.
  """
  vascular = diag == MISC and rng.uniform() < 0.5
  rgb = _VASCULAR_RGB if vascular else _BASE_RGB[diag]
  base = np.asarray(rgb, np.float64) * rng.uniform(0.8, 1.2) + rng.normal(0, 6, 3)
  mottle = 1 + 0.08 * _smooth_noise(rng, size)
  colour = base * mottle[..., None]
  colour = _mix(colour, np.clip(1 - lesion.rho, 0, 1), _DARK, 0.25)  # darker centre
  if diag == MEL:
    strength = rng.uniform(0.2, 0.8)
    colour = _mix(colour, np.clip(_smooth_noise(rng, size, 4), 0, 1), _DARK, strength)
    colour = _mix(colour, np.clip(-_smooth_noise(rng, size, 4), 0, 1), (165, 105, 80), strength)
  return colour, vascular


def _diagnosis_cues(rng: np.random.Generator, diag: int, vascular: bool, lesion: _Lesion,
                    colour):
  """Small diagnosis-specific structures, often (not always) present; superior-view detail."""
  if rng.uniform() > 0.7:  # typical structures are missing in some lesions, as in real ones
    return colour
  if diag == BCC:  # blue-grey ovoid nests
    n = rng.integers(2, 5)
    for c in _points_in_disc(rng, n, 0.6):
      colour = _mix(colour, _blob(lesion, c, rng.uniform(0.08, 0.14)), (95, 100, 122), 0.85)
  elif diag == SK:  # milia-like cysts
    n = rng.integers(4, 9)
    cysts = _dots(lesion, _points_in_disc(rng, n, 0.7), rng.uniform(0.035, 0.055, n))
    colour = _mix(colour, cysts, (242, 236, 220), 0.9)
  elif vascular:  # red-purple lacunae
    n = rng.integers(4, 8)
    lacunae = _dots(lesion, _points_in_disc(rng, n, 0.6), rng.uniform(0.06, 0.1, n))
    colour = _mix(colour, lacunae, (120, 30, 55), 0.8)
  return colour


def _network(rng: np.random.Generator, kind: int, lesion: _Lesion, size: int):
  """Pigment network darkening mask: 1 typical (thin, regular, fading), 2 atypical."""
  if kind == 0:
    return np.zeros_like(lesion.x)
  a = rng.uniform(0, np.pi)
  u = np.cos(a) * lesion.x + np.sin(a) * lesion.y
  v = -np.sin(a) * lesion.x + np.cos(a) * lesion.y
  period = rng.uniform(0.13, 0.16)
  if kind == 2:  # warped, thick, patchy, abruptly ending
    u = u + 0.05 * np.sin(7 * v + rng.uniform(0, 6))
    v = v + 0.05 * np.sin(6 * u + rng.uniform(0, 6))
    width, region = 0.45, (_smooth_noise(rng, size, 4) > -0.2) * (lesion.rho < 0.95)
  else:
    width, region = 0.28, np.clip((0.95 - lesion.rho) / 0.3, 0, 1)
  lines = np.maximum(np.clip(1 - np.abs(np.sin(np.pi * u / period)) / width, 0, 1),
                     np.clip(1 - np.abs(np.sin(np.pi * v / period)) / width, 0, 1))
  return lines * region * (0.55 if kind == 1 else 0.8)


def _streaks(rng: np.random.Generator, kind: int, lesion: _Lesion):
  """Radial streaks at the border: 1 regular (all round), 2 irregular (sectors, ragged)."""
  if kind == 0:
    return np.zeros_like(lesion.x)
  n = int(rng.integers(26, 38)) if kind == 1 else int(rng.integers(16, 26))
  phase = rng.uniform(0, 2 * np.pi)
  index = np.round(n * (lesion.theta - phase) / (2 * np.pi)).astype(int) % n
  if kind == 1:
    lengths, width, sector = np.full(n, 1.22), 0.03, 1.0
  else:
    lengths, width = rng.uniform(1.1, 1.45, n), 0.05
    centre = rng.uniform(-np.pi, np.pi)
    sector = np.cos(lesion.theta - centre) > rng.uniform(0.0, 0.5)
  spoke = 2 * lesion.rho * np.abs(np.sin(n * (lesion.theta - phase) / 2)) / n
  along = (lesion.rho > 0.8) & (lesion.rho < lengths[index])
  return np.clip(1 - spoke / width, 0, 1) * along * sector


def _dots_and_globules(rng: np.random.Generator, kind: int, lesion: _Lesion):
  """Dots/globules mask: 1 regular (even size, spread out), 2 irregular (varied, clustered)."""
  if kind == 0:
    return np.zeros_like(lesion.x)
  if kind == 1:
    n = int(rng.integers(12, 20))
    ring = np.sqrt((np.arange(n) + 0.5) / n) * 0.75  # even area coverage
    ang = np.arange(n) * 2.39996 + rng.uniform(0, 2 * np.pi)  # golden-angle spiral
    centres = np.stack([ring * np.cos(ang), ring * np.sin(ang)], 1)
    return _dots(lesion, centres + rng.normal(0, 0.02, (n, 2)), np.full(n, 0.045))
  n = int(rng.integers(12, 24))
  cluster = _points_in_disc(rng, 1, 0.45)
  centres = cluster + rng.normal(0, 0.2, (n, 2))
  return _dots(lesion, centres, rng.uniform(0.03, 0.09, n))


def _vessels(rng: np.random.Generator, kind: int, lesion: _Lesion):
  """Vessel mask: 1 regular (smooth, branching-like red curves), 2 irregular (dotted)."""
  if kind == 0:
    return np.zeros_like(lesion.x)
  area = _blob(lesion, _points_in_disc(rng, 1, 0.35)[0], rng.uniform(0.45, 0.65)) > 0
  if kind == 2:
    n = int(rng.integers(20, 35))
    return _dots(lesion, _points_in_disc(rng, n, 0.7), np.full(n, 0.028)) * area
  a = rng.uniform(0, np.pi)
  u = np.cos(a) * lesion.x + np.sin(a) * lesion.y
  v = -np.sin(a) * lesion.x + np.cos(a) * lesion.y
  curve = np.sin(np.pi * (u + 0.12 * np.sin(5 * v + rng.uniform(0, 6))) / 0.22)
  return np.clip(1 - np.abs(curve) / 0.3, 0, 1) * area


def _pigmentation(rng: np.random.Generator, kind: int, lesion: _Lesion, size: int):
  """Extra pigment: 1 regular (centred, even), 2 irregular (eccentric dark blotches)."""
  if kind == 0:
    return np.zeros_like(lesion.x)
  if kind == 1:
    return 0.55 * np.clip((0.7 - lesion.rho) / 0.25, 0, 1)
  mask = np.zeros_like(lesion.x)
  for _ in range(rng.integers(2, 4)):
    centre = _points_in_disc(rng, 1, 0.6)[0]
    mask = np.maximum(mask, _blob(lesion, centre, rng.uniform(0.18, 0.3)))
  ragged = 1 + 0.4 * _smooth_noise(rng, size, 7)
  return np.clip(mask * ragged, 0, 1)


def _veil(rng: np.random.Generator, present: int, lesion: _Lesion, size: int) -> np.ndarray:
  """Blue-whitish veil mask: one large, ground-glass textured bluish area."""
  if not present:
    return np.zeros_like(lesion.x)
  veil = _blob(lesion, _points_in_disc(rng, 1, 0.35)[0], rng.uniform(0.35, 0.5))
  return veil * (0.85 + 0.15 * _smooth_noise(rng, size, 9))


def _regression(rng: np.random.Generator, present: int, lesion: _Lesion):
  """Regression masks (scar, pepper): white scar-like areas with grey-blue peppering."""
  if not present:
    return np.zeros_like(lesion.x), np.zeros_like(lesion.x)
  scar = np.zeros_like(lesion.x)
  for _ in range(rng.integers(1, 3)):
    centre = _points_in_disc(rng, 1, 0.55)[0]
    scar = np.maximum(scar, _blob(lesion, centre, rng.uniform(0.18, 0.3)))
  pepper = (rng.uniform(0, 1, scar.shape) < 0.12) * (scar > 0.3)
  return scar, pepper


def _lesion_rgba(rng: np.random.Generator, labels: np.ndarray, size: int):
  """Renders the lesion in the superior frame: colour [H, W, 3] (0-255) and alpha [H, W]."""
  t = {task: int(labels[i]) for i, task in enumerate(paired.TASKS)}
  lesion = _lesion_frame(rng, t["DIAG"], size)
  colour, vascular = _base_colour(rng, t["DIAG"], lesion, size)
  colour = _mix(colour, _pigmentation(rng, t["PIG"], lesion, size), _DARK, 0.75)
  colour = _mix(colour, _network(rng, t["PN"], lesion, size), _DARK, 0.9)
  colour = _mix(colour, _veil(rng, t["BWV"], lesion, size), _VEIL, 0.8)
  scar, pepper = _regression(rng, t["RS"], lesion)
  colour = _mix(_mix(colour, scar, _WHITE, 0.85), pepper, (120, 120, 140), 0.5)
  colour = _diagnosis_cues(rng, t["DIAG"], vascular, lesion, colour)
  dag = _dots_and_globules(rng, t["DaG"], lesion)
  colour = _mix(colour, dag, _DARK * (0.6 if t["DaG"] == 2 else 1.0), 0.9)
  colour = _mix(colour, _vessels(rng, t["VS"], lesion), _RED, 0.85)
  streaks = _streaks(rng, t["STR"], lesion)
  colour = _mix(colour, streaks, _DARK * 1.2, 0.9)
  edge = 0.09 if t["DIAG"] == MEL else 0.04
  alpha = np.maximum(np.clip((1 - lesion.rho) / edge, 0, 1), streaks)
  return colour, alpha


def _to_uint8(image: np.ndarray) -> np.ndarray:
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _superior_view(rng: np.random.Generator, colour, alpha) -> np.ndarray:
  """Dermoscopy-like: even light, pale skin, sharp lesion, mild noise."""
  size = alpha.shape[0]
  skin = np.array([222.0, 178.0, 158.0]) + rng.normal(0, 8, 3)
  background = skin * (1 + 0.03 * _smooth_noise(rng, size))[..., None]
  image = colour * alpha[..., None] + background * (1 - alpha[..., None])
  return _to_uint8(image + rng.normal(0, 2.0, image.shape))


def _resize(channel: np.ndarray, size: int) -> np.ndarray:
  """Area-averaging (anti-aliased) resize of one float channel to [size, size]."""
  img = Image.fromarray(channel.astype(np.float32))
  return np.asarray(img.resize((size, size), Image.BOX), np.float64)


def _inferior_view(rng: np.random.Generator, colour, alpha) -> np.ndarray:
  """Clinical-photo-like: the same lesion small in the frame, uneven light, cast, blur, noise."""
  size = alpha.shape[0]
  small = max(4, int(round(size * rng.uniform(0.36, 0.48))))
  premultiplied = colour * alpha[..., None]
  lesion_rgb = np.stack([_resize(premultiplied[..., c], small) for c in range(3)], -1)
  lesion_alpha = _resize(alpha, small)
  skin = np.array([215.0, 165.0, 140.0]) + rng.normal(0, 14, 3)
  image = skin * (1 + 0.06 * _smooth_noise(rng, size, 6))[..., None]
  top, left = rng.integers(0, size - small + 1, 2)
  window = image[top:top + small, left:left + small]
  window[:] = lesion_rgb + window * (1 - lesion_alpha[..., None])
  yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
  direction = rng.uniform(0, 2 * np.pi)
  light = 1 + rng.uniform(0.2, 0.45) * (np.cos(direction) * xx + np.sin(direction) * yy)
  image = image * light[..., None] * rng.normal(1.0, 0.06, 3)  # gradient and colour cast
  image = images.gaussian_blur(image, rng.uniform(0.9, 1.5) * size / 96, border="edge")
  return _to_uint8(image + rng.normal(0, 4.0, image.shape))


def render_case(rng: np.random.Generator, labels: np.ndarray,
                size: int = 96) -> tuple[np.ndarray, np.ndarray]:
  """Renders one lesion in both modalities.

  Args:
    rng: source of all randomness of the case (geometry, colours, pattern placement, noise).
    labels: int [8] in `paired.TASKS` order, e.g. from `sample_labels`.
    size: image height = width in pixels.

  Returns:
    (inferior, superior): uint8 [size, size, 3] RGB images of the same lesion.
  """
  colour, alpha = _lesion_rgba(rng, np.asarray(labels), size)
  superior = _superior_view(rng, colour, alpha)
  inferior = _inferior_view(rng, colour, alpha)
  return inferior, superior


def generate_case(seed: int, split_id: int, index: int, size: int = 96):
  """Case `index` of split `split_id`: (labels int32 [8], inferior uint8, superior uint8)."""
  rng = np.random.default_rng([seed, split_id, index])
  labels = sample_labels(rng)
  inferior, superior = render_case(rng, labels, size)
  return labels, inferior, superior


SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(eq=False)
class SyntheticPairedConfig(tfds.core.BuilderConfig):
  """Image size, cases per split (train, validation, test) and seed of a synthetic dataset."""
  image_size: int = 96
  num_examples: tuple[int, int, int] = (800, 200, 400)
  seed: int = 0


class GeneratedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A generated dataset whose `image_size`, `num_examples` (per split) and `seed` can be
  overridden at construction; its BUILDER_CONFIGS[0] is the default and its configs have
  those three fields. Written as ArrayRecord (random access without TensorFlow)."""

  def __init__(self, *, image_size: int | None = None, num_examples=None,
               seed: int | None = None, **kwargs):
    """Accepts the usual TFDS kwargs, plus overrides that select a non-default config."""
    if image_size is not None or num_examples is not None or seed is not None:
      default = self.BUILDER_CONFIGS[0]
      kwargs["config"] = custom_config(
          type(default), image_size or default.image_size,
          num_examples or default.num_examples, default.seed if seed is None else seed)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)


def custom_config(config_cls, image_size: int, num_examples, seed: int):
  """A config whose name encodes its settings, so different settings never share files."""
  num_examples = tuple(int(n) for n in num_examples)
  if len(num_examples) != len(SPLITS) or min(num_examples) < 0:
    raise ValueError(f"num_examples needs one count >= 0 per split {SPLITS}, got {num_examples}")
  if int(image_size) < 8:
    raise ValueError(f"image_size must be >= 8, got {image_size}")
  name = f"s{image_size}_n{'_'.join(map(str, num_examples))}_seed{seed}"
  return config_cls(name=name, image_size=int(image_size), num_examples=num_examples,
                    seed=int(seed))


class SyntheticPaired(GeneratedBuilder):
  """Paired inferior/superior lesion images with Derm7pt-shaped labels (see module docstring)."""

  name = "synthetic_paired"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [SyntheticPairedConfig(
      name="default", description="96x96 PNG, 800/200/400 cases, seed 0.")]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=paired.features(),
        description=__doc__,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split_id, split)
            for split_id, split in enumerate(SPLITS)}

  def _generate_examples(self, split_id: int, split: str) -> Iterator[tuple[str, dict]]:
    config = self.builder_config
    for index in range(config.num_examples[split_id]):
      labels, inferior, superior = generate_case(
          config.seed, split_id, index, config.image_size)
      case_id = f"synthetic-{split}-{index:05d}"
      yield case_id, {
          "case_id": case_id.encode(),
          "image_inferior": images.encode_png(inferior),
          "image_superior": images.encode_png(superior),
          "labels": labels,
      }
