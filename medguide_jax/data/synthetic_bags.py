"""synthetic_bags: generated H&E slides, clinical rows and ALN status (missing_modality default).

A stand-in for BCNB as BALNMP uses it (METHODS.md 2(a')): one patient, one core-biopsy "slide",
a clinical table row and N0 vs N+ (BALNMP task 0). Records are the 'bags' layout of
`medguide_jax.data.bags`, built by its helpers as the real cohorts are: each slide's tiles go
through `bags.slide_bag_records` (bags of 10 tiles drawn once by `slides.make_bags`, seeded by
the seed and the slide's name; the T mod 10 tiles left over are dropped, as in BALNMP), tiles are
PNG, `tile_xy` = (column, row) * tile_size in the slide's grid, and every bag carries its
patient's label and encoded clinical vector. The clinical table has BCNB's column names
(`COLUMNS`) and is encoded by `clinical.fit_encoder` with BALNMP's five features (age, tumour
size z-scored with the TRAINING split's statistics; ER, PR, HER2 "is negative" flags).
Splits are by patient; metadata: class_names ['N0', 'N+'], clinical_names (the encoder's),
task, bag_size 10, tile_size, and a summary (patients, N+, ER-negative, bags, tiles per split).

The design (`Design`; latent variables are never in the records):
* clinical: ER negative 30%; PR negative 90% of ER-negative, 20% of ER-positive; HER2 negative
  80%; age N(51, 11) years, tumour size gamma (mean 2.6, sd 1.1 cm).
* slide: 20-40 tiles (2-4 bags) on a 6-wide grid. Background tiles (stroma 35%, ordinary
  carcinoma 45%, lymphocytes 10%, fat 10%) plus two informative patterns:
    solid: a sheet of large, pleomorphic, dark nuclei (the high-grade look of ER- tumours);
    ring:  a gland-like ring of nuclei around a clear lumen (tubular/micropapillary ER+ look).
  The pattern that MATCHES the patient's subtype (ER-: solid, ER+: ring) covers a fraction
  ~Beta(5, 15) of the slide (mean 25%), the other pattern ~Beta(0.16, 1.84) (mean 8%; absent
  from 61% of slides, >= 20% of the tiles in 14%: a focus of the other morphology). Pattern
  tiles sit around a random focus of the grid. On average 10 of 30 tiles show a pattern.
* label: logit P(N+) = -0.7 + 1.2 z(size) - 0.2 z(age) + 2.6 z(matching-pattern fraction);
  43% N+ (BALNMP's training split: 38%). ER, PR, HER2 and the other pattern carry no signal
  of their own. So the tile evidence is GATED by ER: a model that knows ER counts the right
  pattern; a WSI-only model must count both, and the other pattern's foci mislead it. A
  model trained on both modalities and given a zero-filled vector reads every patient as
  ER-positive and ignores the solid evidence of the ER-negative ones; mean-filling blends the
  two gates (ER = 0.3), which, as ER also sets which pattern dominates the slide, ranks ER-
  patients too low. (With an additive label and a slide independent of the clinical data,
  either filling would give back the WSI-only ranking at r = 1.)
* pixels (any tile_size >= 16; geometry is in tile units, so sizes are consistent): H&E by
  the Beer-Lambert law (haematoxylin and eosin densities times stain vectors); per slide,
  stain vectors jittered +-15% per channel, stain amounts x0.8-1.2 (H) / x0.75-1.25 (E),
  brightness 0.95-1; per tile, brightness +-2%, smooth texture and collagen fibres,
  chromatin grain, Gaussian noise (sd 3 levels).

Measured (default config: 32-px tiles, 600/200/300 patients; seeds 0-9 of the generator).
Independent numpy probes, which see only the records (tests/test_synthetic_bags.py): per
tile, 6 pixel statistics (mean haematoxylin, dark-nucleus fraction, clear fraction, darkness
of the rim around clear areas, mean eosin, optical-density spread), pooled over the bag by
mean and max (12 features); L2 logistic regression trained on the training bags; test AUC on
patients (mean bag probability, BALNMP's merge); 'both' = WSI, clinical and their products
(a linear model that can gate). Missing: the clinical vector of a random fraction r of test
patients set to 0 or to the mean training patient's vector (10 draws for 0 < r < 1).
                        mean   sd     [min, max] over 10 seeds
  clinical only         0.618  0.033  [0.574, 0.684]   (BALNMP: 0.613)
  WSI only              0.807  0.021  [0.762, 0.833]   (BALNMP: 0.816)
  both                  0.878  0.013  [0.857, 0.897]   (BALNMP: 0.831; BD paper: 0.861)
  both, zero-filled  r = 0.5: 0.792   0.8: 0.744   1.0: 0.712   (sd 0.019-0.029)
  both, mean-filled  r = 0.5: 0.816   0.8: 0.789   1.0: 0.777   (sd 0.014-0.017)
Paired per seed, WSI-only minus both-with-filling: zero-filled r = 0.8 +0.062 (sd 0.021,
10/10 seeds > 0), r = 1 +0.094 (0.024, 10/10); mean-filled r = 0.8 +0.017 (0.019, 9/10),
r = 1 +0.030 (0.020, 10/10); at r = 0.5 the filled model is still about level with WSI-only
(zero +0.015, mean -0.010). Both minus WSI-only: +0.071 (0.019, 10/10). Seed 0, 95% bootstrap
intervals over its 300 test patients: clinical [0.52, 0.65], WSI [0.77, 0.87], both
[0.82, 0.90]. Re-measure with `python tests/test_synthetic_bags.py --seeds 0-9` (3 min).
Generating the default config (1100 patients, 33k tiles, 2860 bags, PNG, written by TFDS)
took 14-15 s of CPU per seed on one core of a loaded 2-core machine (rendering is about
0.3 ms per 32-px tile).

Determinism: patient `index` of split s depends only on `np.random.default_rng([seed, s,
index, 0])` (clinical row, label, slide layout: `sample_patient`) and `[seed, s, index, 1]`
(pixels: `render_slide`); its bags on the seed and its slide's name. `patient_records`
regenerates one patient's records alone (given the encoder, `fit_encoder`, which needs only the
clinical rows: no pixels). Pixels are float64 rounded to uint8; PNG bytes are identical for a
given Pillow/zlib build.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from medguide_jax.data import bags
from medguide_jax.data import clinical
from medguide_jax.data import synthetic
from medguide_jax.data.synthetic import _smooth_noise

CLASS_NAMES = ("N0", "N+")
TASK = "0: N0 vs N+(>0), BALNMP's task 0 (one label per patient, every bag carries it)"
SPLITS = synthetic.SPLITS
# Tile kinds. The first four are the background of every slide; SOLID and RING are the two
# informative patterns (which one carries the label depends on the ER status).
KINDS = ("stroma", "tumour", "lymphocytes", "fat", "solid", "ring")
STROMA, TUMOUR, LYMPHOCYTES, FAT, SOLID, RING = range(len(KINDS))
BACKGROUND_MIX = (0.35, 0.45, 0.1, 0.1)   # P(kind) of a background tile
# The clinical table's columns: BCNB's headers (clinical.FEATURES), so the default encoder
# configuration reads it as it would read the real table.
COLUMNS = {f: clinical.FEATURES[f][1] for f in clinical.BALNMP_FEATURES}
PATIENT_COLUMN = "Patient ID"
TILES_PER_SLIDE = (20, 40)      # inclusive range of a slide's tile count
GRID_COLUMNS = 6                # tiles per row of the generated slide


@dataclasses.dataclass(frozen=True)
class Design:
  """The generator's latent model (see the module docstring). The defaults are the dataset;
  they are not a builder option (other values are for experiments with `sample_patient`), so
  changing them means a new VERSION."""
  er_negative: float = 0.3            # P(ER negative)
  pr_negative: tuple[float, float] = (0.2, 0.9)   # P(PR negative | ER positive, negative)
  her2_negative: float = 0.8
  # Fraction of a slide's tiles in its subtype's matching pattern (ER-: solid, ER+: ring)
  # and in the other pattern: Beta(mean * concentration, (1 - mean) * concentration).
  matching: tuple[float, float] = (0.25, 20.0)
  other: tuple[float, float] = (0.08, 2.0)
  # logit P(N+) = bias + size * z(size) + age * z(age) + tiles * z(matching fraction)
  bias: float = -0.7
  size: float = 1.2
  age: float = -0.2
  tiles: float = 2.6


DESIGN = Design()
_AGE = (51.0, 11.0)          # years: mean, sd (clipped to 24..86)
_SIZE = (2.6, 1.1)           # cm: mean, sd of a gamma (clipped to 0.5..9)


@dataclasses.dataclass(frozen=True)
class Patient:
  """One generated patient: what the records show and the latent variables they come from."""
  name: str
  row: dict                   # the clinical table row (BCNB's column names)
  label: int                  # 0 N0, 1 N+
  er_negative: bool
  kinds: np.ndarray           # int [T] kind of each slide tile (KINDS)
  cells: np.ndarray           # int [T, 2] (column, row) of each tile in the slide grid
  logit: float                # of P(N+)

  @property
  def slide(self) -> str:
    return f"{self.name}-wsi"


def patient_name(split: str, index: int) -> str:
  return f"synthetic_bags-{split}-{index:05d}"


def _beta(rng: np.random.Generator, mean_concentration: tuple[float, float]) -> float:
  mean, k = mean_concentration
  return float(rng.beta(mean * k, (1 - mean) * k))


def _cluster_cells(rng: np.random.Generator, free: list[int], cells: np.ndarray,
                   count: int) -> list[int]:
  """`count` of the `free` grid positions around a random focus (tumour patterns are foci)."""
  if count == 0:
    return []
  focus = cells[free[int(rng.integers(len(free)))]]
  d = np.hypot(*(cells[free] - focus).T) + rng.uniform(0, 2.0, len(free))
  return [free[i] for i in np.argsort(d, kind="stable")[:count]]


def sample_patient(seed: int, split_id: int, index: int,
                   design: Design = DESIGN) -> Patient:
  """Patient `index` of split `split_id`: clinical row, label and slide layout (no pixels).

  Depends only on `np.random.default_rng([seed, split_id, index, 0])`.
  """
  rng = np.random.default_rng([seed, split_id, index, 0])
  er_neg = bool(rng.uniform() < design.er_negative)
  pr_neg = bool(rng.uniform() < design.pr_negative[int(er_neg)])
  her2_neg = bool(rng.uniform() < design.her2_negative)
  age = int(np.clip(np.round(rng.normal(*_AGE)), 24, 86))
  shape = (_SIZE[0] / _SIZE[1]) ** 2
  size = float(np.clip(np.round(rng.gamma(shape, _SIZE[0] / shape), 1), 0.5, 9.0))
  # The slide: T tiles on a grid; the patterns' tile counts, then the background's kinds.
  num_tiles = int(rng.integers(TILES_PER_SLIDE[0], TILES_PER_SLIDE[1] + 1))
  match_kind, other_kind = (SOLID, RING) if er_neg else (RING, SOLID)
  n_match = int(rng.binomial(num_tiles, _beta(rng, design.matching)))
  n_other = min(int(rng.binomial(num_tiles, _beta(rng, design.other))), num_tiles - n_match)
  cells = np.stack([np.arange(num_tiles) % GRID_COLUMNS,
                    np.arange(num_tiles) // GRID_COLUMNS], 1)
  kinds = np.asarray(rng.choice(4, size=num_tiles, p=BACKGROUND_MIX), np.int64)
  free = list(range(num_tiles))
  for kind, count in ((match_kind, n_match), (other_kind, n_other)):
    chosen = _cluster_cells(rng, free, cells, count)
    kinds[chosen] = kind
    taken = set(chosen)
    free = [i for i in free if i not in taken]
  # The label: tumour size, age and the subtype's matching pattern (PR, HER2: none).
  mean, k = design.matching
  z_match = (n_match / num_tiles - mean) / np.sqrt(mean * (1 - mean) / (k + 1))
  logit = (design.bias + design.size * (size - _SIZE[0]) / _SIZE[1]
           + design.age * (age - _AGE[0]) / _AGE[1] + design.tiles * z_match)
  label = int(rng.uniform() < 1 / (1 + np.exp(-logit)))
  sign = lambda negative: "Negative" if negative else "Positive"
  name = patient_name(SPLITS[split_id], index)
  row = {PATIENT_COLUMN: name, COLUMNS["age"]: age, COLUMNS["tumour_size"]: size,
         COLUMNS["er_negative"]: sign(er_neg), COLUMNS["pr_negative"]: sign(pr_neg),
         COLUMNS["her2_negative"]: sign(her2_neg)}
  return Patient(name, row, label, er_neg, kinds, cells, float(logit))


# --------------------------------------------------------------------------- rendering
# H&E by the Beer-Lambert law: optical density = haematoxylin * H + eosin * E, per RGB
# channel. H is Ruifrok and Johnston's haematoxylin vector (skimage.color.rgb2hed's); E
# absorbs more blue than theirs (0.07, 0.99, 0.11), which renders magenta, not eosin pink.
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.12, 0.91, 0.40])


@dataclasses.dataclass(frozen=True)
class _Stain:
  """One slide's staining and scanning: stain vectors, amounts and brightness."""
  h: np.ndarray
  e: np.ndarray
  h_amount: float
  e_amount: float
  brightness: float


def _stain(rng: np.random.Generator) -> _Stain:
  jitter = lambda v: v * rng.uniform(0.85, 1.15, 3)
  return _Stain(jitter(_H), jitter(_E), rng.uniform(0.8, 1.2), rng.uniform(0.75, 1.25),
                rng.uniform(0.95, 1.0))


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> np.ndarray:
  g = (np.arange(size) + 0.5) / size
  g.flags.writeable = False
  return g


def _nuclei(size: int, centres: np.ndarray, radii: np.ndarray, aspect: np.ndarray,
            angle: np.ndarray) -> np.ndarray:
  """Soft ellipses [n, size, size] in [0, 1] (tile units: the tile is [0, 1]^2; edges one
  pixel wide); aspect < 1 elongates, keeping the area of a disc of radius `radii`."""
  g = _grid(size)
  px = 1.0 / size
  dx = g[None, None, :] - centres[:, 0, None, None]
  dy = g[None, :, None] - centres[:, 1, None, None]
  cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  u, v = cos * dx + sin * dy, -sin * dx + cos * dy
  s = np.sqrt(aspect)[:, None, None]
  r = radii[:, None, None]
  rho = np.hypot(u * s, v / s)
  return np.clip((r - rho) / px + 0.5, 0.0, 1.0)


def _scatter(rng: np.random.Generator, n: int, radius: tuple[float, float],
             aspect: tuple[float, float], dark: tuple[float, float], margin: float = -0.02):
  """n nuclei uniformly placed: (centres, radii, aspect, angle, darkness)."""
  return (rng.uniform(margin, 1 - margin, (n, 2)), rng.uniform(*radius, n),
          rng.uniform(*aspect, n), rng.uniform(0, np.pi, n), rng.uniform(*dark, n))


def _tile(rng: np.random.Generator, kind: int, size: int, stain: _Stain) -> np.ndarray:
  """One tile, uint8 [size, size, 3]."""
  g = _grid(size)
  texture = _smooth_noise(rng, size, 4)
  angle = rng.uniform(0, np.pi)
  fibres = np.sin(2 * np.pi * 7 * (np.cos(angle) * g[None, :] + np.sin(angle) * g[:, None])
                  + 2.5 * texture)
  clear = np.zeros((size, size))
  if kind == STROMA:   # dense pink collagen, a few spindle-shaped fibroblast nuclei
    eosin = rng.uniform(0.5, 0.65) * (1 + 0.12 * texture + 0.12 * fibres)
    nuclei = _scatter(rng, int(rng.integers(3, 8)), (0.025, 0.035), (0.2, 0.4), (0.7, 0.9))
  elif kind == TUMOUR:  # ordinary carcinoma cells: pale cytoplasm, medium nuclei
    eosin = rng.uniform(0.3, 0.4) * (1 + 0.15 * texture)
    nuclei = _scatter(rng, int(rng.integers(10, 17)), (0.035, 0.05), (0.7, 1.0), (0.8, 1.05))
  elif kind == LYMPHOCYTES:  # many small, round, very dark nuclei
    eosin = rng.uniform(0.3, 0.4) * (1 + 0.15 * texture)
    nuclei = _scatter(rng, int(rng.integers(25, 46)), (0.018, 0.026), (0.85, 1.0), (1.2, 1.5))
  elif kind == FAT:  # large clear adipocytes with thin pink membranes
    eosin = rng.uniform(0.45, 0.6) * (1 + 0.1 * texture)
    m = int(rng.integers(3, 7))
    cells = _nuclei(size, rng.uniform(0.0, 1.0, (m, 2)), rng.uniform(0.16, 0.28, m),
                    rng.uniform(0.7, 1.0, m), rng.uniform(0, np.pi, m))
    clear = np.clip(cells.max(0) * 1.3 - 0.3, 0, 1)  # membranes where cells meet
    nuclei = _scatter(rng, int(rng.integers(0, 3)), (0.02, 0.03), (0.2, 0.35), (0.7, 0.9))
  elif kind == SOLID:  # a solid sheet of large, pleomorphic, dark nuclei
    eosin = rng.uniform(0.3, 0.4) * (1 + 0.15 * texture)
    nuclei = _scatter(rng, int(rng.integers(22, 33)), (0.06, 0.085), (0.55, 1.0), (1.25, 1.6))
  elif kind == RING:  # a gland-like ring: nuclei around a clear lumen, in tumour cells
    eosin = rng.uniform(0.3, 0.4) * (1 + 0.15 * texture)
    centre = rng.uniform(0.3, 0.7, 2)
    radius = rng.uniform(0.2, 0.28)
    clear = _nuclei(size, centre[None], np.array([radius - 0.07]), rng.uniform(0.75, 1.0, 1),
                    rng.uniform(0, np.pi, 1))[0]  # the lumen
    m = int(rng.integers(9, 15))
    a = (np.arange(m) + rng.uniform(-0.2, 0.2, m)) * 2 * np.pi / m + rng.uniform(0, 2 * np.pi)
    ring_r = radius * rng.uniform(0.9, 1.05, m)
    ring = (centre + np.c_[np.cos(a), np.sin(a)] * ring_r[:, None], rng.uniform(0.035, 0.045, m),
            rng.uniform(0.6, 0.9, m), a + np.pi / 2, rng.uniform(1.0, 1.25, m))
    extra = _scatter(rng, int(rng.integers(2, 6)), (0.035, 0.05), (0.7, 1.0), (0.8, 1.05))
    nuclei = tuple(np.concatenate([x, y]) for x, y in zip(ring, extra))
    # Extra nuclei stay out of the lumen.
    keep = np.hypot(*(nuclei[0] - centre).T) > radius * 0.8
    keep[:m] = True
    nuclei = tuple(x[keep] for x in nuclei)
  else:
    raise ValueError(f"tile kind {kind}; valid: 0..{len(KINDS) - 1} ({KINDS})")
  centres, radii, aspect, angles, dark = nuclei
  haem = np.full((size, size), 0.04)
  if len(radii):
    masks = _nuclei(size, centres, radii, aspect, angles)
    chromatin = 1 + 0.15 * rng.uniform(-1, 1, (size, size))
    haem = np.maximum(haem, (masks * dark[:, None, None]).max(0) * chromatin)
  tissue = 1 - clear
  od = (stain.h_amount * (haem * tissue)[..., None] * stain.h
        + stain.e_amount * (eosin * tissue + 0.03)[..., None] * stain.e)
  rgb = 255 * np.exp(-od) * stain.brightness * rng.uniform(0.98, 1.02)
  rgb = rgb + rng.normal(0, 3.0, rgb.shape)
  return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def render_slide(seed: int, split_id: int, index: int, tile_size: int,
                 patient: Patient | None = None) -> bags.SlideTiles:
  """The slide of patient `index`: its tiles and their level-0 (x, y) in the slide grid.

  Depends only on `np.random.default_rng([seed, split_id, index, 1])` (and the patient).
  """
  patient = patient or sample_patient(seed, split_id, index)
  rng = np.random.default_rng([seed, split_id, index, 1])
  stain = _stain(rng)
  tiles = [_tile(rng, int(k), tile_size, stain) for k in patient.kinds]
  xy = [(int(c) * tile_size, int(r) * tile_size) for c, r in patient.cells]
  return bags.SlideTiles(patient.slide, tiles, xy)


# --------------------------------------------------------------------------- records
def clinical_rows(seed: int, num_patients: Sequence[int]) -> list[dict]:
  """Every patient's clinical row, train split first (no pixels are rendered)."""
  return [sample_patient(seed, split_id, i).row
          for split_id, n in enumerate(num_patients) for i in range(n)]


def fit_encoder(seed: int, num_patients: Sequence[int]) -> clinical.Encoder:
  """BALNMP's clinical encoding of the table, statistics from the training split."""
  rows = clinical_rows(seed, num_patients)
  return clinical.fit_encoder(rows, features=clinical.BALNMP_FEATURES, columns=COLUMNS,
                              fit_rows=range(num_patients[0]), where="synthetic_bags table")


def patient_records(seed: int, split_id: int, index: int, tile_size: int,
                    encoder: clinical.Encoder) -> list[tuple[str, dict]]:
  """(key, record) of each bag of patient `index` of split `split_id`, exactly as the
  builder writes them (PNG tiles); depends on this patient and the encoder only."""
  patient = sample_patient(seed, split_id, index)
  slide = render_slide(seed, split_id, index, tile_size, patient)
  return bags.slide_bag_records(slide, encoder.encode(patient.row, where=patient.name),
                                patient.label, patient=patient.name, seed=seed,
                                bag_size=bags.BAG_SIZE, tile_format="png")


@dataclasses.dataclass(eq=False)
class SyntheticBagsConfig(tfds.core.BuilderConfig):
  """Tile side in pixels, patients per split (train, validation, test) and seed."""
  tile_size: int = 32
  num_patients: tuple[int, int, int] = (600, 200, 300)
  seed: int = 0


def custom_config(tile_size: int, num_patients, seed: int) -> SyntheticBagsConfig:
  """A config whose name encodes its settings, so different settings never share files
  (synthetic.custom_config's naming, with this builder's option names)."""
  try:
    counts = tuple(int(n) for n in num_patients)
  except (TypeError, ValueError):
    counts = ()
  if len(counts) != len(SPLITS) or min(counts) < 0 or counts[0] < 1:
    raise ValueError(f"num_patients needs one count per split {SPLITS}, >= 1 for train (the "
                     f"clinical encoder is fitted on it) and >= 0 for the others, got "
                     f"{num_patients!r}")
  if int(tile_size) < 16:
    raise ValueError(f"tile_size must be >= 16 (nuclei are a few pixels wide at 32), got "
                     f"{tile_size}")
  name = f"s{int(tile_size)}_n{'_'.join(map(str, counts))}_seed{int(seed)}"
  return SyntheticBagsConfig(name=name, tile_size=int(tile_size), num_patients=counts,
                             seed=int(seed), description=f"Overridden: {name}.")


class SyntheticBags(bags.BagBuilder):
  """Generated H&E slides in bags, a clinical vector and N0/N+ (see the module docstring)."""

  name = "synthetic_bags"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticBagsConfig(name="default",
                          description="32x32 PNG tiles, 600/200/300 patients, seed 0."),
      # 'synthetic_bags:tiny': the test suite's end-to-end runs (a run check, not a result).
      SyntheticBagsConfig(name="tiny", tile_size=16, num_patients=(48, 16, 24),
                          description="16x16 PNG tiles, 48/16/24 patients, seed 0."),
  ]

  def __init__(self, *, tag: str | None = None, tile_size: int | None = None,
               num_patients: tuple[int, int, int] | None = None, seed: int | None = None,
               **kwargs):
    """Usual TFDS kwargs, plus a tag ('tiny'; 'synthetic_bags:tiny') or overrides
    (tile_size, num_patients per split, seed) that select a non-default config."""
    tags = [c.name for c in self.BUILDER_CONFIGS]
    if tag is not None and tag not in tags:
      raise ValueError(f"synthetic_bags tag {tag!r} is unknown; valid tags: {tags}")
    if tag is not None:
      kwargs["config"] = tag
    if tile_size is not None or num_patients is not None or seed is not None:
      default = self.BUILDER_CONFIGS[0]
      kwargs["config"] = custom_config(
          default.tile_size if tile_size is None else tile_size,
          default.num_patients if num_patients is None else num_patients,
          default.seed if seed is None else seed)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    info.metadata.update(class_names=list(CLASS_NAMES), task=TASK, bag_size=bags.BAG_SIZE,
                         tile_size=self.builder_config.tile_size)
    return info

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    patients = {split: [sample_patient(config.seed, split_id, i)
                        for i in range(config.num_patients[split_id])]
                for split_id, split in enumerate(SPLITS)}
    bags.check_patient_splits({s: [p.name for p in v] for s, v in patients.items()}, self.name)
    encoder = fit_encoder(config.seed, config.num_patients)
    summary = {s: {"patients": len(v), "n_plus": sum(p.label for p in v),
                   "er_negative": sum(p.er_negative for p in v),
                   "bags": sum(len(p.kinds) // bags.BAG_SIZE for p in v),
                   "tiles": sum(len(p.kinds) for p in v)}
               for s, v in patients.items()}
    self.info.metadata.update(
        class_names=list(CLASS_NAMES), clinical_names=encoder.names, task=TASK,
        bag_size=bags.BAG_SIZE, tile_size=config.tile_size,
        summary={"splits": summary, "seed": config.seed,
                 "clinical_stats": {f: list(v) for f, v in encoder.stats.items()},
                 "tiles_per_slide": list(TILES_PER_SLIDE),
                 "design": dataclasses.asdict(DESIGN)})
    return {split: self._generate_examples(split_id, encoder)
            for split_id, split in enumerate(SPLITS)}

  def _generate_examples(self, split_id: int, encoder: clinical.Encoder
                         ) -> Iterator[tuple[str, dict]]:
    config = self.builder_config
    for index in range(config.num_patients[split_id]):
      yield from patient_records(config.seed, split_id, index, config.tile_size, encoder)
