"""synthetic_cxr: generated chest radiographs with reports, the default dataset of hybridmed.

HybridMED (Jiang et al., arXiv 2410.00448; METHODS.md 3) pretrains a chest X-ray encoder from
reports: the global image vector is aligned with the IMPRESSION, the image tokens with the
FINDINGS (local), and a summariser findings -> impression (the teacher) is distilled into a
captioner image -> impression. This generator stands in for MIMIC-CXR / IU X-ray so that
those effects are measurable at CPU size: the findings state every local finding with its
location words, the impression concludes from them, and the pixels show the findings with
less certainty than the words. Records are the 'cxr_reports' layout of `data/cxr.py` (one
PA image per study; patient = study; id '<study>/pa'), with region labels, boxes and masks.

Orientation (ORIENTATION). Images are displayed as radiographs are read: the PATIENT'S RIGHT
ON THE IMAGE'S LEFT. 'right'/'left' in labels, masks and words are always the patient's: a
'right lower lobe' opacity lies in the image's lower left (columns left of the midline).

Images (`render`; uint8 grey, default 128 x 128, any size >= 64: geometry is drawn in relative
units, so sizes show the same chest). A density map (air 0.04, soft tissue 0.5, mediastinum /
heart / abdomen 0.68-0.7, lungs 0.16) becomes grey by a per-study exposure. Anatomy
(`sample_anatomy`): two lung fields (rounded apices, lateral walls, hemidiaphragm domes with
sharp costophrenic angles, the left dome lower), mediastinum with trachea, carina and aortic
knob, a cardiac silhouette (ellipse, 28-38% of it right of the midline), liver/spleen and a
gastric bubble (70%) below the diaphragm, spine, posterior ribs and clavicles faintly, lung
markings fanning from the hila. Per study: lung width 0.33-0.40 of the image (each side
x0.96-1.02), apex at y 0.09-0.15, dome 0.52-0.62 lower, midline +-0.012 (sd), tilt sd 1.4
degrees, contrast x0.8-1.2, brightness +-0.06, gamma 0.8-1.25, an exposure gradient, a 0.5 px
blur and Gaussian noise (sd 1.5-4% of the grey range). Unlabelled look-alikes: 0-3 faint
round densities per study (vessels end-on, nipple shadows; contrast 0.02-0.07) and breast
shadows over the lower lateral zones in half the studies.

Findings and labels (LABEL_NAMES, 12; LABEL_GROUPS folds them into 5 CheXpert-like groups):
  opacity_{right,left}_{upper,middle,lower}  a lobar opacity: 2-4 soft lobes (radius 3.5-6.5%
      of the image) in the zone, contrast 0.07-0.22 (the lung is 0.16, soft tissue 0.5),
      bounded by the zone like a lobe by its fissures. Zones are thirds of the lung's height
      from the apex to its dome (`Anatomy.zone_bounds`); words: upper lobe / upper zone /
      apex / apical; middle lobe / mid zone / midlung, and on the left the lingula; lower
      lobe / lower zone / base / basilar; 'bilateral', 'both', 'bibasilar' for both sides.
      P(any) 0.30; a second one with P 0.25 (half the time the other side's same zone);
      zones upper 0.3 / middle 0.25 / lower 0.45. Character words follow the pixels:
      'dense' (the top 40% of contrasts), 'focal' (small), else 'patchy' or 'hazy'.
  effusion_{right,left}  fluid filling the base up to a meniscus that rises laterally:
      'small' (4.5-8.5% of the image above the costophrenic angle: a blunted angle) or
      'moderate' (11-17%: over the dome). P 0.14: right 0.4, left 0.35, both 0.25.
  cardiomegaly  cardiothoracic ratio (heart width / both lungs' width) 0.52-0.64 ('mild'
      below 0.58, else 'moderate'), normal hearts 0.39-0.50. P 0.15.
  pneumothorax_{right,left}  a lucent rim without lung markings along the apex and upper
      lateral wall, 'small' (2.2-3.4% deep) or 'moderate' (4-6%), and the visceral pleural
      line (1 px) at its edge. P 0.07.
  support_devices  endotracheal tube (P 0.07; a bright line in the trachea, tip 3-5 cm above
      the carina, which the report states) and central venous catheter (P 0.12; right
      internal jugular 55%, left subclavian 30%, right subclavian 15%; a thin bright curve
      to the superior vena cava or the cavoatrial junction, as the report says).
Findings are independent (cardiomegaly is decided with the anatomy). 39.0% of studies are
normal (sd 0.6% over seeds); label prevalences (train, seeds 0-4): opacity cells 4.8-8.3%,
effusion 8.5-9.2% per side, cardiomegaly 14.6%, pneumothorax 3.3-3.6% per side, devices 18%.

Regions: one per finding (`Region`; a study's K regions in the order of its findings): the
label, a binary mask at the image's size (PNG {0, 255}: the opacity's pixels over half
covered, the fluid, the heart, the pneumothorax rim, the tube or line) and its box (x0, y0,
x1, y1): the mask's bounding box in pixels, x1/y1 exclusive.

Reports (`write_report`). FINDINGS: devices, heart (or a normal statement), mediastinum
sometimes, the opacities with their location words (or a normal lung statement; 'the lungs
are otherwise clear' after them half the time), effusion / pneumothorax or the negatives for
those absent ('No pleural effusion or pneumothorax.'), bones half the time; several templates
per finding and per normal statement (2,401 distinct findings texts among 3,000 training
studies; 592 among the normal ones; 25 words on average, 60 at most; vocabulary 159 words).
IMPRESSION: the conclusions the findings imply, most urgent first ('Small right
pneumothorax.', 'Right lower lobe opacity, concerning for pneumonia.', 'Bibasilar opacities,
which may represent atelectasis or pneumonia.', 'Small left pleural effusion.',
'Cardiomegaly.', 'Endotracheal tube in standard position.'), sometimes numbered, or one of
five normal conclusions ('No acute cardiopulmonary process.'); 972 distinct impressions, 7
words on average. Both sections state exactly the study's labels.

The grammar (`parse_labels(text) -> frozenset` of label names; NORMAL = frozenset() for a
normal text): per sentence, finding mentions (with synonyms: consolidation, airspace disease,
infiltrate, pneumonia, atelectasis; a blunted costophrenic angle; an enlarged heart; tubes,
lines, catheters, support devices), negated by a preceding cue (no, not, without, negative
for, ...) unless a terminator (', consistent with', 'but', 'with', ...) intervenes; location
words are read per piece of the sentence (pieces split between mentions of different kinds)
and grouped ('right upper and left lower lobes' -> right upper, left lower). It recovers the
labels of every generated findings and impression text exactly (tests: 12,000 texts) and is
meant for the clinical accuracy of generated impressions (part 2).

Tag 'iu_text' (`synthetic_cxr:iu_text`): the REAL reports of IU X-ray (indiana_reports.csv,
read with the csv module) with images rendered from their MeSH tags. The texts are stored as
normalised by `data/reports.normalise` (whitespace collapsed, each 'XXXX' -> '[DEID]'), the
indication and comparison too; only the 3,331 studies with both findings and impression
(the others counted in the summary, 'lacking'). Tags drawn (`interpret_tag`): Opacity,
Consolidation, Pneumonia, Infiltrate, Airspace Disease, Pulmonary Atelectasis with a lung
side and zone ('Opacity/lung/base/left', 'lingula' -> left middle, 'retrocardiac' -> left
lower, 'bilateral' -> both sides); Pleural Effusion and a blunted or obscured Costophrenic
Angle with a side (size from small/mild vs moderate/large); Cardiomegaly and an enlarged
Cardiac Shadow (CTR by borderline / mild / moderate / severe); Pneumothorax with a side;
Catheters, Indwelling / (Implanted) Medical Device on the chest (a line from that side) and
Tube, Inserted in the trachea (an endotracheal tube); Lung/hypoinflation and
Lung/hyperdistention change the lung height (no label). All other tags (calcinosis,
granuloma, degenerative spine, tortuous aorta, an opacity without a side or zone, ...) are
ignored and counted per tag in the summary ('tags': drawn and ignored, per tag, and totals:
3,054 drawn, 3,818 ignored); 'normal' studies render normal. Labels are those of the drawn
tags (2,506 of the 3,331 studies have none). Splits by a hash of the uid (80/10/10%:
2,691 / 326 / 314 studies). The manual dir is the folder holding indiana_reports.csv (by
default $MEDGUIDE_SHARED_DATA/cxr_iu_xray_reports if that is set, else the project's
../shared/data/cxr_iu_xray_reports beside the repository); without it the build is a
`builders.ManualDirError` naming the folder (`python -m data_prep.build` exits 2).

Configs (`prepare('synthetic_cxr')` = 'default'):
  default  128 x 128 PNG, 3,000 / 400 / 400 studies, seed 0.
  tiny     64 x 64 PNG, 64 / 16 / 16 studies: the test suite's end-to-end runs.
  iu_text  128 x 128 PNG, the IU X-ray reports (see above).
Overrides (image_size, num_studies per split, seed) derive a config from the tag's whose name
encodes them ('s96_n3000_400_400_seed3', 'iu_text_s64_seed0'); num_studies does not apply to
iu_text. Metadata: label_names, image_size, source ('synthetic' or 'iu_text'), orientation,
the tokenizer trained on the training split's findings and impressions (data/cxr.py), and a
label_groups (LABEL_GROUPS: zero-shot classes and the probe's tasks), summary (per split:
studies, normal studies, regions and per-label counts; the design; for
iu_text the tag counts and the sections lacking).

Measured (default config, seeds 0-4, built by the builder). Independent numpy probes that see
only the records (tests/test_synthetic_cxr.py): targets are the IMPRESSION's labels read by
the grammar; L2 logistic regressions trained on the train split, evaluated on test.
(a) findings -> impression vs image -> impression. Text: binary unigrams + bigrams of the
FINDINGS. Pixels: 16 x 16 block means and their left-right mirror differences.
                        mean   sd     [min, max] over 5 seeds
  text  macro-AUC       1.000  0.000  [1.000, 1.000]   exact match 0.994 (sd 0.002)
  image macro-AUC       0.902  0.010  [0.885, 0.913]   exact match 0.623 (sd 0.016)
  per label (image AUC): opacity upper / middle cells 0.97-0.99, right lower 0.95, left lower
  (behind the heart, over the gastric bubble) 0.85; effusion 0.98; cardiomegaly 0.999;
  pneumothorax 0.62 / 0.65 (sd 0.06-0.11); support devices 0.88. Text minus image, paired:
  macro-AUC +0.097 (sd 0.010, >= 0.087 on every seed), exact match +0.370 (sd 0.016).
(b) location words carry local image signal. Six fixed cells of the image (side x upper /
middle / lower third of a typical lung field); per cell its mean, 75th and 90th percentile,
sd and their differences from the mirror cell. One logistic probe over (image, cell) pairs
is trained on the training studies whose findings name an opacity, the target being the
cells the WORDS name; test: top-1 localisation (argmax cell = the named one) on the ~100 test
studies naming exactly one cell (chance 1/6 = 0.167):
  named-cell probe              0.568  0.020  [0.542, 0.598]   AUC named vs other cells 0.817
  whole-image statistics        0.224  0.060  [0.147, 0.306]   AUC 0.579
  trained on shuffled words     0.214  0.058  [0.118, 0.300]   AUC 0.566
Named minus the better control, paired: top-1 +0.330 (sd 0.067, >= 0.26 on every seed), AUC
+0.23 (>= 0.18). (The image -> impression probe's per-cell AUCs in (a) say the same: the
pixels of the named region tell which cell the words name.) Re-measure with
`python tests/test_synthetic_cxr.py --seeds 0-4` (~4 min); `--config test` measures the tests'
smaller in-memory config (64 px, 900 / 0 / 600 studies; seeds 0-9: text macro-AUC 0.999,
image 0.892 (sd 0.008, max 0.903), gap >= 0.097; exact 0.961 vs 0.592; localisation 0.602
(sd 0.048, min 0.504) vs whole-image 0.200 and shuffled words 0.220, margin >= 0.23).

Generation: rendering and encoding a study takes ~6 ms at 128 px (1.5 ms at 64 px); preparing
the default config (3,800 studies, 48 MB, TFDS ArrayRecord, with the tokenizer) took 16-21 s
of CPU per seed on one core of a loaded 2-core machine; iu_text at 128 px ~20 s.

Determinism: study `index` of split s depends only on `np.random.default_rng([seed, s,
index, 0])` (anatomy, findings), `[seed, s, index, 2]` (the wording) and `[seed, s, index,
1]` (pixels: `render`); an IU study on its uid (`[seed, 3, uid, 0 / 1]`). `study_record`
regenerates one study's record alone. Pixels are float64 rounded to uint8; PNG bytes are
identical for a given Pillow/zlib build.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import os
import re
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from scipy import ndimage
import tensorflow_datasets as tfds

from medguide_jax.data import builders
from medguide_jax.data import cxr
from medguide_jax.data import images
from medguide_jax.data import reports
from medguide_jax.data.synthetic import _smooth_noise

SPLITS = ("train", "validation", "test")
SIDES = ("right", "left")          # the PATIENT's sides; right is drawn on the image's LEFT
ZONES = ("upper", "middle", "lower")
OPACITY_LABELS = tuple(f"opacity_{s}_{z}" for s in SIDES for z in ZONES)
EFFUSION_LABELS = ("effusion_right", "effusion_left")
PNEUMOTHORAX_LABELS = ("pneumothorax_right", "pneumothorax_left")
LABEL_NAMES = (OPACITY_LABELS + EFFUSION_LABELS + ("cardiomegaly",) + PNEUMOTHORAX_LABELS
               + ("support_devices",))
# Coarser, CheXpert-like groups of the labels (e.g. for a 5-way clinical accuracy).
LABEL_GROUPS = {"opacity": OPACITY_LABELS, "effusion": EFFUSION_LABELS,
                "cardiomegaly": ("cardiomegaly",), "pneumothorax": PNEUMOTHORAX_LABELS,
                "support_devices": ("support_devices",)}
NORMAL = frozenset()               # the label set of a normal study (and of a normal text)
VIEW = "PA"
ORIENTATION = ("PA, displayed as radiographs are: the patient's RIGHT on the image's LEFT "
               "(columns x < midline) and the patient's LEFT on the image's right; 'right' "
               "and 'left' in the reports and labels are the patient's.")
IMAGE_HEIGHT_CM = 43.0             # a 14 x 17 inch detector: the image's height in cm
IU_FOLDER = "cxr_iu_xray_reports"
IU_REPORTS_CSV = "indiana_reports.csv"
IU_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def opacity_label(side: str, zone: str) -> str:
  return f"opacity_{side}_{zone}"


def label_vector(labels: Iterable[str]) -> np.ndarray:
  """A label set -> float32 [len(LABEL_NAMES)] 0/1 (unknown names are an error)."""
  labels = set(labels)
  unknown = labels - set(LABEL_NAMES)
  if unknown:
    raise ValueError(f"unknown labels {sorted(unknown)}; valid: {LABEL_NAMES}")
  return np.asarray([n in labels for n in LABEL_NAMES], np.float32)


def label_set(vector: Sequence[float]) -> frozenset[str]:
  """float [L] (> 0.5 is present) -> the label set."""
  return frozenset(n for n, v in zip(LABEL_NAMES, np.asarray(vector).reshape(-1)) if v > 0.5)


# --------------------------------------------------------------------------- the design
@dataclasses.dataclass(frozen=True)
class Design:
  """The generator's latent model (see the module docstring). The defaults are the dataset;
  changing them means a new VERSION."""
  # Prevalences (independent findings).
  opacity: float = 0.30             # P(any lobar opacity)
  second_opacity: float = 0.25      # P(a second opacity | one)
  second_mirror: float = 0.5        # P(the second is the other side's same zone | second)
  zone_mix: tuple[float, float, float] = (0.3, 0.25, 0.45)   # upper, middle, lower
  effusion: float = 0.14
  effusion_sides: tuple[float, float, float] = (0.4, 0.35, 0.25)  # right, left, both
  cardiomegaly: float = 0.15
  pneumothorax: float = 0.07
  endotracheal_tube: float = 0.07
  central_line: float = 0.12
  # Appearance.
  opacity_contrast: tuple[float, float] = (0.07, 0.22)   # density added at the core
  opacity_radius: tuple[float, float] = (0.035, 0.065)   # image widths
  ctr_normal: tuple[float, float] = (0.39, 0.50)
  ctr_enlarged: tuple[float, float] = (0.52, 0.64)
  noise_sd: tuple[float, float] = (0.015, 0.04)          # of the 0..1 grey range


DESIGN = Design()


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """One patient's chest in relative image units (x right, y down, both in [0, 1] of the
  image side; patient's right lung on the image's left). Index 0 of the pairs is the right
  lung, 1 the left."""
  cx: float                         # midline x
  tilt: float                       # radians, rotation of the chest about the image centre
  width: tuple[float, float]        # lateral extent of each lung from the midline (at its base)
  top: tuple[float, float]          # y of each apex
  dome: tuple[float, float]         # y of each hemidiaphragm's dome
  angle: tuple[float, float]        # y of each costophrenic angle (below the dome)
  mediastinum: float                # half-width of the upper mediastinum
  ctr: float                        # cardiothoracic ratio: heart width / (width[0] + width[1])
  heart_right: float                # fraction of the heart's width right of the midline
  heart_height: float               # vertical semi-axis of the heart ellipse
  carina: float                     # y of the carina
  gastric_bubble: bool
  exposure: tuple[float, float, float]   # contrast, brightness, gamma
  gradient: tuple[float, float]     # exposure gradient in x, y
  noise_sd: float
  markings: float                   # amplitude of the lung markings

  def zone_bounds(self, k: int) -> tuple[float, float]:
    """y of the upper/middle and middle/lower zone boundaries of lung k (thirds of the
    height from the apex to the dome)."""
    top, dome = self.top[k], self.dome[k]
    return top + (dome - top) / 3, top + 2 * (dome - top) / 3

  @property
  def heart(self) -> tuple[float, float, float, float]:
    """Heart ellipse: centre x, centre y, horizontal and vertical semi-axes."""
    w = self.ctr * (self.width[0] + self.width[1])
    a_r, a_l = w * self.heart_right, w * (1 - self.heart_right)
    hb = self.heart_height
    return self.cx + (a_l - a_r) / 2, min(self.dome) - 0.35 * hb, w / 2, hb


@dataclasses.dataclass(frozen=True)
class Finding:
  """One drawn finding: kind ('opacity', 'effusion', 'cardiomegaly', 'pneumothorax',
  'endotracheal_tube', 'central_line'), its side / zone where it has one, a size word and
  its geometry (relative units)."""
  kind: str
  side: str = ""
  zone: str = ""
  size: str = ""                    # effusion/pneumothorax: small, moderate; heart: mild, ...
  character: str = ""               # opacity: dense, patchy, hazy, focal
  params: tuple = ()                # geometry, per kind (see _sample_*)

  @property
  def label(self) -> str:
    if self.kind == "opacity":
      return opacity_label(self.side, self.zone)
    if self.kind in ("effusion", "pneumothorax"):
      return f"{self.kind}_{self.side}"
    if self.kind in ("endotracheal_tube", "central_line"):
      return "support_devices"
    return self.kind


@dataclasses.dataclass(frozen=True)
class Study:
  """One generated study: what the record shows and the latent variables it comes from."""
  name: str
  anatomy: Anatomy
  findings: tuple[Finding, ...]
  findings_text: str
  impression_text: str
  seed: tuple[int, ...]             # the pixel generator's seed sequence

  @property
  def labels(self) -> frozenset[str]:
    return frozenset(f.label for f in self.findings)

  @property
  def normal(self) -> bool:
    return not self.findings


def study_name(split: str, index: int) -> str:
  return f"synthetic_cxr-{split}-{index:05d}"


# --------------------------------------------------------------------------- sampling
def sample_anatomy(rng: np.random.Generator, design: Design = DESIGN, *,
                   enlarged_heart: bool = False,
                   ctr: tuple[float, float] | None = None, inflation: float = 1.0) -> Anatomy:
  """A random chest; `inflation` scales the lung height (IU's hypoinflation < 1 <
  hyperdistention)."""
  u = rng.uniform
  w = u(0.33, 0.40)
  width = (w * u(0.96, 1.02), w * u(0.96, 1.02))
  top0 = u(0.09, 0.15)
  dome_r = float(np.clip(top0 + u(0.52, 0.62) * inflation, 0.55, 0.86))
  dome = (dome_r, min(dome_r + u(0.0, 0.04), 0.88))
  drop = u(0.06, 0.11)
  angle = (dome[0] + drop * u(0.9, 1.1), dome[1] + drop * u(0.9, 1.1))
  if ctr is None:
    ctr = design.ctr_enlarged if enlarged_heart else design.ctr_normal
  return Anatomy(
      cx=0.5 + rng.normal(0, 0.012), tilt=rng.normal(0, 0.025),
      width=width, top=(top0 + u(-0.01, 0.01), top0 + u(-0.01, 0.01)),
      dome=dome, angle=angle, mediastinum=u(0.055, 0.075), ctr=u(*ctr),
      heart_right=u(0.28, 0.38), heart_height=u(0.13, 0.17),
      carina=top0 + u(0.17, 0.21), gastric_bubble=bool(u() < 0.7),
      exposure=(u(0.8, 1.2), u(-0.06, 0.06), u(0.8, 1.25)),
      gradient=(u(-0.05, 0.05), u(-0.05, 0.05)), noise_sd=u(*design.noise_sd),
      markings=u(0.05, 0.09))


def _outer_profile(t):
  """The lateral lung border's distance from the midline, as a fraction of the lung's
  width, at height fraction t (0 apex, 1 costophrenic angle): rounded above, full below."""
  return 0.62 + 0.38 * np.sqrt(np.clip(t / 0.55, 0, 1))


def _lung_extent(an: Anatomy, k: int, y: float) -> tuple[float, float]:
  """(inner, outer) distance from the midline of lung k's field at height y (inner: the
  mediastinum or the heart border)."""
  t = np.clip((y - an.top[k]) / (an.angle[k] - an.top[k]), 0, 1)
  outer = an.width[k] * float(_outer_profile(t))
  inner = an.mediastinum
  hx, hy, ha, hb = an.heart
  dy = (y - hy) / hb
  if abs(dy) < 1:
    half = ha * np.sqrt(1 - dy * dy)
    border = (half - (hx - an.cx)) if k == 0 else (half + (hx - an.cx))
    inner = max(inner, border)
  return inner, outer


def _sample_opacity(rng: np.random.Generator, an: Anatomy, side: str, zone: str,
                    design: Design = DESIGN) -> Finding:
  """A lobar opacity in (side, zone): 2-4 soft lobes around a centre in the zone."""
  k = SIDES.index(side)
  z = ZONES.index(zone)
  y_top, dome = an.top[k], an.dome[k]
  y = y_top + (dome - y_top) * (z + rng.uniform(0.35, 0.65)) / 3
  inner, outer = _lung_extent(an, k, y)
  s = inner + rng.uniform(0.35, 0.65) * max(outer - inner, 0.02)
  radius = rng.uniform(*design.opacity_radius)
  n = int(rng.integers(2, 5))
  lobes = np.c_[rng.normal(0, 0.5 * radius, (n, 2)), radius * rng.uniform(0.6, 1.0, n)]
  lo, hi = design.opacity_contrast
  contrast = rng.uniform(lo, hi)
  strength = (contrast - lo) / (hi - lo)
  if strength > 0.6:
    character = "dense"
  elif radius < 0.043:
    character = "focal"
  else:
    character = ("patchy", "hazy")[int(rng.integers(2))]
  return Finding("opacity", side, zone, character=character,
                 params=(float(s), float(y), float(contrast),
                         tuple(map(tuple, lobes.tolist()))))


def _sample_effusion(rng: np.random.Generator, side: str, size: str | None = None) -> Finding:
  size = size or ("small", "moderate")[int(rng.uniform() < 0.35)]
  height = rng.uniform(0.045, 0.085) if size == "small" else rng.uniform(0.11, 0.17)
  return Finding("effusion", side, size=size,
                 params=(float(height), float(rng.uniform(0.04, 0.08))))


def _sample_pneumothorax(rng: np.random.Generator, side: str, size: str | None = None
                         ) -> Finding:
  size = size or ("small", "moderate")[int(rng.uniform() < 0.4)]
  depth = rng.uniform(0.022, 0.034) if size == "small" else rng.uniform(0.04, 0.06)
  return Finding("pneumothorax", side, size=size,
                 params=(float(depth), float(rng.uniform(0.45, 0.75))))


def _sample_cardiomegaly(an: Anatomy) -> Finding:
  return Finding("cardiomegaly", size="mild" if an.ctr < 0.58 else "moderate")


def _sample_tube(rng: np.random.Generator, an: Anatomy) -> Finding:
  above = rng.uniform(0.065, 0.12)   # tip above the carina (3-5 cm)
  return Finding("endotracheal_tube", size=f"{above * IMAGE_HEIGHT_CM:.0f}",
                 params=(float(an.carina - above), float(rng.normal(0, 0.004))))


LINE_ROUTES = ("right internal jugular", "left subclavian", "right subclavian")


def _sample_line(rng: np.random.Generator, an: Anatomy, route: str | None = None) -> Finding:
  """A central venous catheter: a quadratic Bezier from the neck / below the clavicle to the
  superior vena cava (right of the midline, i.e. image-left of it)."""
  route = route or LINE_ROUTES[int(rng.choice(3, p=(0.55, 0.3, 0.15)))]
  cx = an.cx
  hx, hy, _, hb = an.heart
  heart_top = hy - hb
  tip_y = rng.uniform(an.carina + 0.0, heart_top + 0.04)
  tip = (cx - rng.uniform(0.025, 0.045), tip_y)
  if route == "right internal jugular":
    p0, p1 = (cx - rng.uniform(0.08, 0.12), -0.02), (cx - rng.uniform(0.06, 0.09), 0.16)
  elif route == "left subclavian":
    p0 = (cx + an.width[1] * rng.uniform(0.8, 0.95), an.top[1] + rng.uniform(-0.01, 0.02))
    p1 = (cx + rng.uniform(0.0, 0.05), an.top[1] + rng.uniform(0.05, 0.08))
  else:
    p0 = (cx - an.width[0] * rng.uniform(0.8, 0.95), an.top[0] + rng.uniform(-0.01, 0.02))
    p1 = (cx - rng.uniform(0.06, 0.1), an.top[0] + rng.uniform(0.03, 0.06))
  where = "cavoatrial junction" if tip_y > heart_top + 0.01 else "superior vena cava"
  return Finding("central_line", size=route, character=where,
                 params=(tuple(p0), tuple(p1), tip))


def sample_findings(rng: np.random.Generator, an: Anatomy, design: Design = DESIGN
                    ) -> list[Finding]:
  """The study's findings given its anatomy (cardiomegaly is decided with the anatomy)."""
  out = []
  if an.ctr > 0.5:
    out.append(_sample_cardiomegaly(an))
  if rng.uniform() < design.opacity:
    side = SIDES[int(rng.integers(2))]
    zone = ZONES[int(rng.choice(3, p=design.zone_mix))]
    cells = [(side, zone)]
    if rng.uniform() < design.second_opacity:
      if rng.uniform() < design.second_mirror:
        cells.append((SIDES[1 - SIDES.index(side)], zone))
      else:
        others = [(s, z) for s in SIDES for z in ZONES if (s, z) != (side, zone)]
        cells.append(others[int(rng.integers(len(others)))])
    out += [_sample_opacity(rng, an, s, z, design) for s, z in cells]
  if rng.uniform() < design.effusion:
    which = int(rng.choice(3, p=design.effusion_sides))
    sides = (SIDES[which],) if which < 2 else SIDES
    out += [_sample_effusion(rng, s) for s in sides]
  if rng.uniform() < design.pneumothorax:
    out.append(_sample_pneumothorax(rng, SIDES[int(rng.integers(2))]))
  if rng.uniform() < design.endotracheal_tube:
    out.append(_sample_tube(rng, an))
  if rng.uniform() < design.central_line:
    out.append(_sample_line(rng, an))
  return out


def sample_study(seed: int, split_id: int, index: int, design: Design = DESIGN) -> Study:
  """Study `index` of split `split_id`: anatomy, findings and report (no pixels).

  Depends only on `np.random.default_rng([seed, split_id, index, 0])` (anatomy, findings)
  and `[seed, split_id, index, 2]` (the report's wording); the pixels (`render`) on
  `[seed, split_id, index, 1]`.
  """
  rng = np.random.default_rng([seed, split_id, index, 0])
  enlarged = bool(rng.uniform() < design.cardiomegaly)
  an = sample_anatomy(rng, design, enlarged_heart=enlarged)
  found = tuple(sample_findings(rng, an, design))
  findings, impression = write_report(found, np.random.default_rng([seed, split_id, index, 2]))
  return Study(study_name(SPLITS[split_id], index), an, found, findings, impression,
               (seed, split_id, index, 1))


# --------------------------------------------------------------------------- rendering
@dataclasses.dataclass(frozen=True)
class Region:
  """A drawn finding's label, binary mask [S, S] and box (x0, y0, x1, y1) in pixels: the
  mask's bounding box, x1/y1 exclusive."""
  label: str
  mask: np.ndarray
  box: tuple[float, float, float, float]


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  g = (np.arange(size) + 0.5) / size
  x, y = np.meshgrid(g, g)
  x.flags.writeable = False
  y.flags.writeable = False
  return x, y


def _soft(d: np.ndarray, width: float) -> np.ndarray:
  """Signed distance-like d (> 0 inside) -> a soft mask in [0, 1] with an edge `width` wide."""
  return np.clip(d / width + 0.5, 0.0, 1.0)


def _segment_distance(x, y, p0, p1) -> np.ndarray:
  (x0, y0), (x1, y1) = p0, p1
  dx, dy = x1 - x0, y1 - y0
  t = np.clip(((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0, 1)
  return np.hypot(x - x0 - t * dx, y - y0 - t * dy)


def _curve_distance(x, y, points: np.ndarray) -> np.ndarray:
  """Distance from each pixel to a polyline [n, 2]."""
  d = np.full(x.shape, np.inf)
  for p0, p1 in zip(points[:-1], points[1:]):
    d = np.minimum(d, _segment_distance(x, y, p0, p1))
  return d


def _bezier(p0, p1, p2, n: int = 24) -> np.ndarray:
  t = np.linspace(0, 1, n)[:, None]
  p0, p1, p2 = (np.asarray(p, np.float64) for p in (p0, p1, p2))
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


class _Frame:
  """The chest's coordinates on an image of `size` pixels: x, y (tilted with the chest) and
  per lung s (distance from the midline towards that lung's side), margins and zones."""

  def __init__(self, an: Anatomy, size: int):
    gx, gy = _pixel_grid(size)
    c, s = np.cos(an.tilt), np.sin(an.tilt)
    self.x = 0.5 + c * (gx - 0.5) + s * (gy - 0.5)
    self.y = 0.5 - s * (gx - 0.5) + c * (gy - 0.5)
    self.size = size
    self.edge = max(1.0 / size, 0.006)  # soft edge of anatomical boundaries
    self.an = an
    hx, hy, ha, hb = an.heart
    rho = np.hypot((self.x - hx) / ha, (self.y - hy) / hb)
    self.heart = _soft((1 - rho) * min(ha, hb), self.edge * 1.5)
    self.s, self.shape, self.diaphragm = [], [], []
    for k in range(2):
      sk = (an.cx - self.x) if k == 0 else (self.x - an.cx)
      w, top, dome, angle = an.width[k], an.top[k], an.dome[k], an.angle[k]
      t = np.clip((self.y - top) / (angle - top), 0, 1)
      outer = w * _outer_profile(t)
      apex = top + 1.6 * (sk - 0.45 * w) ** 2 / w
      sd = 0.4 * w
      lateral = np.clip((sk - sd) / (w - sd), 0, None)
      medial = np.clip((sd - sk) / sd, 0, 1)
      floor = np.where(sk >= sd, dome + (angle - dome) * lateral ** 2,
                       dome + 0.5 * (angle - dome) * medial ** 2)
      margin = np.minimum.reduce([self.y - apex, floor - self.y, outer - sk,
                                  sk - an.mediastinum])
      self.s.append(sk)
      self.shape.append(_soft(margin, self.edge))
      self.diaphragm.append(floor)
    # The visible lung fields: the hemithoraces less the heart.
    self.field = [sh * (1 - self.heart) for sh in self.shape]

  def zone_window(self, k: int, zone: str) -> np.ndarray:
    """A soft band of lung k's zone (fissure-like borders between zones)."""
    b1, b2 = self.an.zone_bounds(k)
    z = ZONES.index(zone)
    lo = -np.inf if z == 0 else (b1, b2)[z - 1]
    hi = np.inf if z == 2 else (b1, b2)[z]
    return _soft(np.minimum(self.y - lo, hi - self.y), self.edge)


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
  rows, cols = np.nonzero(mask)
  if not len(rows):
    return (0.0, 0.0, 0.0, 0.0)
  return (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))


def render(study: Study, size: int = 128) -> tuple[np.ndarray, list[Region]]:
  """The study's radiograph, uint8 [size, size], and one Region per finding (in the order of
  `study.findings`). Depends only on the study and `np.random.default_rng(study.seed)`."""
  return render_findings(study.anatomy, study.findings, size,
                         np.random.default_rng(list(study.seed)))


def render_findings(an: Anatomy, findings: Sequence[Finding], size: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, list[Region]]:
  """Draws the chest `an` with `findings` (see `render`)."""
  if size < 64:
    raise ValueError(f"image_size must be >= 64 (ribs and lines are ~1 px at 64), got {size}")
  f = _Frame(an, size)
  x, y = f.x, f.y
  px = 1.0 / size
  # Soft tissue inside the body outline (narrower at the neck), air outside.
  half = max(an.width) + 0.07
  neck = 0.11 + (half - 0.11) * np.clip((y + 0.02) / (min(an.top) + 0.08), 0, 1) ** 0.6
  body = _soft(neck - np.abs(x - an.cx), f.edge * 2)
  dens = 0.04 + 0.46 * body
  # Below the diaphragm: liver and spleen, a gastric bubble under the left dome.
  below = np.where(x < an.cx, _soft(y - f.diaphragm[0], f.edge),
                   _soft(y - f.diaphragm[1], f.edge))
  dens += 0.18 * below * body
  if an.gastric_bubble:
    gx, gy = an.cx + 0.45 * an.width[1], an.dome[1] + 0.055
    bubble = _soft(1 - np.hypot((x - gx) / 0.05, (y - gy) / 0.028), 0.15)
    dens -= 0.25 * bubble * below
  # Mediastinum, aortic knob and heart.
  hx, hy, ha, hb = an.heart
  upper = _soft(an.mediastinum - np.abs(x - an.cx), f.edge) * _soft(hy - y, f.edge) * body
  knob = _soft(1 - np.hypot((x - an.cx - an.mediastinum * 0.9) / 0.035,
                            (y - an.carina + 0.03) / 0.03), 0.2)
  medi = np.maximum.reduce([upper, knob, f.heart])
  dens = dens * (1 - medi) + 0.7 * medi
  # Lungs: dark fields with markings (vessels fanning out from the hila).
  vessels = np.exp(-(_smooth_noise(rng, size, 9) / 0.12) ** 2)
  vessels = np.maximum(vessels, 0.7 * np.exp(-(_smooth_noise(rng, size, 16) / 0.1) ** 2))
  texture = vessels + 0.3 * _smooth_noise(rng, size, 24)
  lung_dens = np.zeros_like(x)
  field = f.field[0] + f.field[1]
  rim = np.zeros_like(x)
  line = np.zeros_like(x)
  for k in range(2):
    taper = np.clip(1 - f.s[k] / an.width[k], 0.15, 1.0)
    hilum = np.exp(-(((f.s[k] - an.mediastinum - 0.035) / 0.03) ** 2
                     + ((y - an.carina - 0.08) / 0.05) ** 2))
    lung_dens += f.field[k] * (an.markings * taper * texture + 0.1 * hilum)
  for finding in findings:
    if finding.kind == "pneumothorax":
      r, l = _pneumothorax(f, finding)
      rim, line = np.maximum(rim, r), np.maximum(line, l)
  lung_dens += _look_alikes(f, rng)
  lung_dens = (0.16 + lung_dens * (1 - rim) - 0.05 * rim + 0.16 * line)
  dens = dens * (1 - field) + lung_dens * field
  # Ribs (posterior arcs) and clavicles.
  bones = np.zeros_like(x)
  for k in range(2):
    w, top, angle = an.width[k], an.top[k], an.angle[k]
    spacing = (angle - top) / 9.0
    inside = _soft(w + 0.02 - f.s[k], f.edge) * _soft(f.s[k] - 0.02, f.edge)
    inside *= _soft(f.diaphragm[k] + 0.02 - y, f.edge)
    r = np.clip(f.s[k] / w, 0, 1)
    phase = (y - top + 0.02 - 0.16 * r ** 1.6 + 0.05 * r) / spacing
    bones += inside * 0.055 * np.exp(-((phase - np.round(phase)) * spacing / 0.011) ** 2)
    sign = -1 if k == 0 else 1
    p0 = (an.cx + sign * 0.035, top + 0.045)
    p1 = (an.cx + sign * (w + 0.06), top - 0.035)
    bones += 0.1 * _soft(0.011 - _segment_distance(x, y, p0, p1), px)
  spine = 0.05 * _soft(0.032 - np.abs(x - an.cx), f.edge) * body
  dens += bones + spine
  # Trachea (air column) down to the carina.
  tx = an.cx + 0.004
  dens -= 0.2 * _soft(0.016 - np.abs(x - tx), px) * _soft(an.carina - y, f.edge) * body
  # Local findings (each with its mask), then the exposure.
  regions = []
  for finding in findings:
    dens, mask = _draw(f, finding, dens, rim, line)
    regions.append(Region(finding.label, mask, _box(mask)))
  dens = ndimage.gaussian_filter(dens, 0.5)
  contrast, brightness, gamma = an.exposure
  grey = (dens - 0.4) * contrast + 0.45 + brightness
  grey += an.gradient[0] * (x - 0.5) + an.gradient[1] * (y - 0.5)
  grey = np.clip(grey, 0, 1) ** gamma
  grey = grey + rng.normal(0, an.noise_sd, grey.shape)
  return np.clip(np.round(grey * 255), 0, 255).astype(np.uint8), regions


def _look_alikes(f: _Frame, rng: np.random.Generator) -> np.ndarray:
  """Unlabelled densities over the lung fields that a reader learns to ignore: 0-3 faint
  round ones (vessels seen end-on, nipple shadows; contrast 0.02-0.07, a third of an
  opacity's) anywhere in either lung, and in half the studies breast shadows over the lower
  lateral zones (up to 0.08)."""
  an, y = f.an, f.y
  out = np.zeros_like(y)
  for _ in range(int(rng.integers(0, 4))):
    k = int(rng.integers(2))
    y0 = rng.uniform(an.top[k] + 0.04, an.dome[k])
    inner, outer = _lung_extent(an, k, y0)
    s0 = inner + rng.uniform(0.15, 0.85) * max(outer - inner, 0.02)
    r = rng.uniform(0.02, 0.05)
    out += rng.uniform(0.02, 0.07) * np.exp(-((f.s[k] - s0) ** 2 + (y - y0) ** 2) / (2 * r * r))
  if rng.uniform() < 0.5:
    amount = rng.uniform(0.02, 0.08)
    for k in range(2):
      edge = an.dome[k] - rng.uniform(0.06, 0.16)
      lateral = np.clip(f.s[k] / an.width[k], 0, 1) ** 1.5
      out += amount * rng.uniform(0.8, 1.2) * _soft(y - edge, 0.04) * lateral * f.field[k]
  return out


def _pneumothorax(f: _Frame, finding: Finding) -> tuple[np.ndarray, np.ndarray]:
  """(lucent rim, pleural line) of a pneumothorax: the lung's apical/lateral edge moved in
  by `depth` (tapering down the lateral wall to zero at height fraction `extent`)."""
  k = SIDES.index(finding.side)
  depth, extent = finding.params
  an = f.an
  hard = f.shape[k] > 0.5
  outside = ~hard & ((f.s[k] > 0.4 * an.width[k]) | (f.y < an.top[k] + 0.05)) & (f.s[k] > 0)
  dist = ndimage.distance_transform_edt(~outside) / f.size
  t = np.clip((f.y - an.top[k]) / (an.angle[k] - an.top[k]), 0, 1)
  d = depth * np.clip(1 - t / extent, 0, 1) ** 0.5
  inside = hard & (t < extent) & (f.s[k] > 0.25 * an.width[k])
  rim = (inside & (dist <= d)).astype(np.float64)
  line = (inside & (np.abs(dist - d) < 0.75 / f.size) & (d > 0.5 / f.size)).astype(np.float64)
  return rim, line


def _draw(f: _Frame, finding: Finding, dens: np.ndarray, rim: np.ndarray,
          line: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Adds `finding` to the density map; returns it and the finding's binary mask."""
  an, x, y = f.an, f.x, f.y
  kind = finding.kind
  if kind == "opacity":
    k = SIDES.index(finding.side)
    s0, y0, contrast, lobes = finding.params
    sk = f.s[k]
    blob = np.zeros_like(x)
    for ds, dy, r in lobes:
      blob = np.maximum(blob, np.exp(-((sk - s0 - ds) ** 2 + (y - y0 - dy) ** 2) / (2 * r * r)))
    amount = np.clip((blob - 0.2) / 0.5, 0, 1) * f.zone_window(k, finding.zone) * f.field[k]
    mask = amount > 0.5
    return dens + contrast * amount, mask
  if kind == "effusion":
    k = SIDES.index(finding.side)
    height, meniscus = finding.params
    level = an.angle[k] - height
    rel = np.clip((f.s[k] - an.mediastinum) / (an.width[k] - an.mediastinum), 0, 1)
    surface = level - meniscus * rel ** 2
    fluid = _soft(y - surface, f.edge) * f.field[k]
    return dens * (1 - fluid) + 0.58 * fluid, fluid > 0.5
  if kind == "cardiomegaly":
    return dens, f.heart > 0.5
  if kind == "pneumothorax":   # drawn with the lung markings (render); here its mask
    r, _ = _pneumothorax(f, finding)
    return dens, r > 0.5
  if kind == "endotracheal_tube":
    tip, dx = finding.params
    d = np.abs(x - an.cx - 0.004 - dx)
    width = max(0.007, 0.9 / f.size)
    tube = _soft(width - d, 1.0 / f.size) * _soft(tip - y, 1.0 / f.size) * (y > -0.01)
    return dens + 0.3 * tube, tube > 0.5
  if kind == "central_line":
    p0, p1, tip = finding.params
    d = _curve_distance(x, y, _bezier(p0, p1, tip))
    width = max(0.0045, 0.7 / f.size)
    cath = _soft(width - d, 1.0 / f.size)
    return dens + 0.3 * cath, cath > 0.5
  raise ValueError(f"unknown finding kind {kind!r}")


# --------------------------------------------------------------------------- reports
# Location words of each (side, zone): nouns ('in the ___') and modifiers ('___ opacity').
_NOUN = {
    ("right", "upper"): ("right upper lobe", "right upper zone", "right apex", "right upper lung"),
    ("right", "middle"): ("right middle lobe", "right mid zone", "right midlung"),
    ("right", "lower"): ("right lower lobe", "right lung base", "right lower zone", "right base"),
    ("left", "upper"): ("left upper lobe", "left upper zone", "left apex", "left upper lung"),
    ("left", "middle"): ("lingula", "left mid zone", "left midlung"),
    ("left", "lower"): ("left lower lobe", "left lung base", "left lower zone", "left base"),
}
_MODIFIER = {
    ("right", "upper"): ("right upper lobe", "right apical", "right upper zone"),
    ("right", "middle"): ("right middle lobe", "right midlung", "right mid zone"),
    ("right", "lower"): ("right lower lobe", "right basilar", "right lower zone"),
    ("left", "upper"): ("left upper lobe", "left apical", "left upper zone"),
    ("left", "middle"): ("lingular", "left midlung", "left mid zone"),
    ("left", "lower"): ("left lower lobe", "left basilar", "left lower zone"),
}
_LOBE = {("right", "upper"): "right upper lobe", ("right", "middle"): "right middle lobe",
         ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
         ("left", "middle"): "lingular", ("left", "lower"): "left lower lobe"}
_BOTH_NOUN = {"upper": ("both upper lobes", "both upper zones", "both apices"),
              "middle": ("both mid zones", "both midlungs", "right middle lobe and lingula"),
              "lower": ("both lung bases", "both lower lobes", "both lower zones")}
_BOTH_MODIFIER = {"upper": ("bilateral upper lobe", "biapical", "bilateral upper zone"),
                  "middle": ("bilateral mid zone", "bilateral midlung"),
                  "lower": ("bibasilar", "bilateral lower lobe", "bilateral basilar")}
_NORMAL_HEART = ("Heart size is normal.", "The cardiomediastinal silhouette is within normal "
                 "limits.", "Normal heart size.", "The heart is not enlarged.",
                 "The cardiac silhouette is normal in size.")
_NORMAL_LUNGS = ("The lungs are clear.", "Lungs are clear bilaterally.",
                 "No focal consolidation.", "There is no focal airspace opacity.",
                 "The lungs are well expanded and clear.")
_OTHERWISE_CLEAR = ("The lungs are otherwise clear.", "The remaining lungs are clear.",
                    "Elsewhere the lungs are clear.")
_NORMAL_PLEURA = ("No pleural effusion or pneumothorax.", "There is no pleural effusion or "
                  "pneumothorax.", "No pneumothorax or pleural effusion.",
                  "The costophrenic angles are sharp. No pneumothorax.")
_NO_EFFUSION = ("No pleural effusion.", "There is no pleural effusion.",
                "No effusion is seen.")
_NO_PNEUMOTHORAX = ("No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen.")
_BONES = ("No acute osseous abnormality.", "The visualized osseous structures are "
          "unremarkable.", "Osseous structures are intact.")
_MEDIASTINUM = ("The mediastinal contours are normal.", "Mediastinal contours are unremarkable.")
_NORMAL_IMPRESSION = ("No acute cardiopulmonary process.", "No acute cardiopulmonary "
                      "abnormality.", "Normal chest radiograph.", "No acute intrathoracic "
                      "process.", "No acute cardiopulmonary disease.")
_ROUTE_WORDS = {"right internal jugular": ("right internal jugular", "right IJ"),
                "left subclavian": ("left subclavian",),
                "right subclavian": ("right subclavian",)}
_TIP_WORDS = {"superior vena cava": ("superior vena cava", "SVC", "mid SVC"),
              "cavoatrial junction": ("cavoatrial junction",)}
_ADVERB = {"mild": "mildly", "moderate": "moderately"}


def _cap(text: str) -> str:
  return text[:1].upper() + text[1:]


def _a(word: str) -> str:
  return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


class _Writer:
  """Template choices from one generator (the wording of one report)."""

  def __init__(self, rng: np.random.Generator):
    self.rng = rng

  def pick(self, options):
    return options[int(self.rng.integers(len(options)))]

  def chance(self, p: float) -> bool:
    return bool(self.rng.uniform() < p)

  # Opacities ---------------------------------------------------------------------------
  def opacity_findings(self, ops: Sequence[Finding]) -> list[str]:
    cells = [(f.side, f.zone) for f in ops]
    c = ops[0].character
    if len(ops) == 2 and cells[0][1] == cells[1][1] and cells[0][0] != cells[1][0]:
      zone = cells[0][1]
      return [self.pick((f"{_cap(c)} opacities in {self.pick(_BOTH_NOUN[zone])}.",
                         f"There are {c} {self.pick(_BOTH_MODIFIER[zone])} opacities.",
                         f"{_cap(self.pick(_BOTH_MODIFIER[zone]))} {c} opacities."))]
    if len(ops) == 2 and self.chance(0.5):
      n1, n2 = (self.pick(_NOUN[cell]) for cell in cells)
      return [self.pick((f"{_cap(c)} opacities in the {n1} and {n2}.",
                         f"There are {c} opacities in the {n1} and the {n2}."))]
    out = [self._one_opacity(ops[0])]
    if len(ops) == 2:
      out.append(f"There is also {_a(ops[1].character)} opacity in the "
                 f"{self.pick(_NOUN[cells[1]])}.")
    return out

  def _one_opacity(self, f: Finding) -> str:
    c, n, m = f.character, self.pick(_NOUN[(f.side, f.zone)]), self.pick(
        _MODIFIER[(f.side, f.zone)])
    return self.pick((f"There is {_a(c)} opacity in the {n}.",
                      f"{_cap(c)} airspace opacity in the {n}.",
                      f"{_cap(c)} {m} opacity.",
                      f"{_cap(c)} consolidation is seen in the {n}.",
                      f"An area of {c} opacification projects over the {n}.",
                      f"{_cap(c)} opacity is present in the {n}."))

  def opacity_impression(self, ops: Sequence[Finding]) -> str:
    cells = [(f.side, f.zone) for f in ops]
    if len(ops) == 1:
      lobe = _LOBE[cells[0]] if self.chance(0.7) else self.pick(_MODIFIER[cells[0]])
      return self.pick((f"{_cap(lobe)} opacity, concerning for pneumonia.",
                        f"{_cap(lobe)} pneumonia.",
                        f"Findings consistent with {lobe} pneumonia.",
                        f"{_cap(lobe)} consolidation, likely pneumonia.",
                        f"{_cap(lobe)} airspace disease, which may represent pneumonia or "
                        "atelectasis."))
    if cells[0][1] == cells[1][1] and cells[0][0] != cells[1][0]:
      both = self.pick(_BOTH_MODIFIER[cells[0][1]])
      return self.pick((f"{_cap(both)} opacities, which may represent atelectasis or "
                        "pneumonia.", f"{_cap(both)} pneumonia.",
                        f"{_cap(both)} opacities, concerning for multifocal pneumonia."))
    l1, l2 = (_LOBE[cell] for cell in cells)
    n1, n2 = (_NOUN[cell][0] for cell in cells)
    return self.pick((f"{_cap(l1)} and {l2} opacities, concerning for multifocal pneumonia.",
                      f"Multifocal pneumonia involving the {n1} and {n2}."))

  # Pleura ------------------------------------------------------------------------------
  def effusion_findings(self, effs: Sequence[Finding]) -> str:
    if len(effs) == 1:
      s, z = effs[0].side, effs[0].size
      options = [f"There is {_a(z)} {s} pleural effusion.", f"{_cap(z)} {s} pleural effusion.",
                 f"A {z} {s} pleural effusion is present."]
      if z == "small":
        options += [f"Blunting of the {s} costophrenic angle, consistent with a small "
                    "pleural effusion.", f"The {s} costophrenic angle is blunted by a small "
                    "pleural effusion."]
      else:
        options += [f"Moderate {s} pleural effusion with a meniscus at the {s} base."]
      return self.pick(options)
    zr, zl = effs[0].size, effs[1].size
    both = zr if zr == zl else "small to moderate"
    return self.pick((f"There are {both} bilateral pleural effusions.",
                      f"{_cap(both)} bilateral effusions.",
                      f"Both costophrenic angles are blunted, consistent with {both} bilateral "
                      "pleural effusions.",
                      f"{_cap(zr)} right and {zl} left pleural effusions."))

  def effusion_impression(self, effs: Sequence[Finding]) -> str:
    if len(effs) == 1:
      s, z = effs[0].side, effs[0].size
      return self.pick((f"{_cap(z)} {s} pleural effusion.", f"{_cap(s)} pleural effusion.",
                        f"{_cap(z)} {s} effusion."))
    zr, zl = effs[0].size, effs[1].size
    both = zr if zr == zl else "small to moderate"
    return self.pick(("Bilateral pleural effusions.", f"{_cap(both)} bilateral pleural "
                      "effusions.", f"{_cap(zr)} right and {zl} left pleural effusions."))

  def pneumothorax_findings(self, f: Finding) -> str:
    s, z = f.side, f.size
    return self.pick((f"There is {_a(z)} {s} apical pneumothorax.",
                      f"A {z} {s} pneumothorax is present.",
                      f"A pleural line is seen at the {s} apex without lung markings beyond "
                      f"it, consistent with a {z} pneumothorax.",
                      f"{_cap(z)} {s} pneumothorax with a visible pleural line at the {s} "
                      "apex."))

  def pneumothorax_impression(self, f: Finding) -> str:
    s, z = f.side, f.size
    return self.pick((f"{_cap(z)} {s} pneumothorax.", f"{_cap(s)} apical pneumothorax.",
                      f"{_cap(z)} {s} pneumothorax. Clinical correlation is recommended."))

  # Heart and devices -------------------------------------------------------------------
  def cardiomegaly_findings(self, f: Finding) -> str:
    z, adv = f.size, _ADVERB[f.size]
    return self.pick((f"The heart is {adv} enlarged.", f"{_cap(z)} cardiomegaly.",
                      f"The cardiac silhouette is {adv} enlarged.",
                      f"Heart size is {adv} enlarged.",
                      f"There is {z} enlargement of the cardiac silhouette."))

  def cardiomegaly_impression(self, f: Finding) -> str:
    z = f.size
    return self.pick(("Cardiomegaly.", f"{_cap(z)} cardiomegaly.",
                      "Enlarged cardiac silhouette.",
                      f"{_cap(z)} cardiomegaly without pulmonary edema."))

  def tube_findings(self, f: Finding) -> str:
    n = f.size
    return self.pick((f"An endotracheal tube terminates {n} cm above the carina.",
                      f"Endotracheal tube tip is {n} cm above the carina.",
                      f"The ET tube is in place, {n} cm above the carina."))

  def tube_impression(self, f: Finding) -> str:
    return self.pick(("Endotracheal tube in standard position.",
                      "ET tube in appropriate position.",
                      f"Endotracheal tube tip {f.size} cm above the carina."))

  def line_findings(self, f: Finding) -> str:
    route, tip = self.pick(_ROUTE_WORDS[f.size]), self.pick(_TIP_WORDS[f.character])
    return self.pick((f"{_cap(route)} central venous catheter with its tip in the {tip}.",
                      f"A {route} central line terminates in the {tip}.",
                      f"{_cap(route)} catheter tip projects over the {tip}."))

  def line_impression(self, f: Finding) -> str:
    route = self.pick(_ROUTE_WORDS[f.size])
    return self.pick((f"{_cap(route)} central venous catheter in appropriate position.",
                      "Central line in standard position.",
                      f"{_cap(route)} central line tip in the {f.character}."))


def write_report(findings: Sequence[Finding], rng: np.random.Generator) -> tuple[str, str]:
  """(FINDINGS, IMPRESSION) of a study with `findings`: every finding described with its
  location words in FINDINGS and stated as a conclusion in the IMPRESSION; absent findings
  as normal statements (a sample of them)."""
  w = _Writer(rng)
  by_kind: dict[str, list[Finding]] = {}
  for f in findings:
    by_kind.setdefault(f.kind, []).append(f)
  ops = sorted(by_kind.get("opacity", []),
               key=lambda f: (ZONES.index(f.zone), SIDES.index(f.side)))
  effs = sorted(by_kind.get("effusion", []), key=lambda f: SIDES.index(f.side))
  ptx = by_kind.get("pneumothorax", [])
  heart = by_kind.get("cardiomegaly", [])
  tubes, lines = by_kind.get("endotracheal_tube", []), by_kind.get("central_line", [])
  # FINDINGS: devices, heart and mediastinum, lungs, pleura, bones.
  out = [w.tube_findings(f) for f in tubes] + [w.line_findings(f) for f in lines]
  out.append(w.cardiomegaly_findings(heart[0]) if heart else w.pick(_NORMAL_HEART))
  if w.chance(0.3):
    out.append(w.pick(_MEDIASTINUM))
  if ops:
    out += w.opacity_findings(ops)
    if w.chance(0.5):
      out.append(w.pick(_OTHERWISE_CLEAR))
  else:
    out.append(w.pick(_NORMAL_LUNGS))
  if effs:
    out.append(w.effusion_findings(effs))
  if ptx:
    out.append(w.pneumothorax_findings(ptx[0]))
  if not effs and not ptx:
    out.append(w.pick(_NORMAL_PLEURA))
  elif not effs:
    out.append(w.pick(_NO_EFFUSION))
  elif not ptx:
    out.append(w.pick(_NO_PNEUMOTHORAX))
  if w.chance(0.5):
    out.append(w.pick(_BONES))
  # IMPRESSION: the conclusions, most urgent first; devices; 'no acute process' if normal.
  imp = []
  if ptx:
    imp.append(w.pneumothorax_impression(ptx[0]))
  if ops:
    imp.append(w.opacity_impression(ops))
  if effs:
    imp.append(w.effusion_impression(effs))
  if heart:
    imp.append(w.cardiomegaly_impression(heart[0]))
  if (ops or effs) and not ptx and w.chance(0.3):
    imp.append(w.pick(_NO_PNEUMOTHORAX))
  if tubes and lines and w.chance(0.5):
    imp.append(w.pick(("Lines and tubes in standard position.",
                       "Support devices in standard position.")))
  else:
    imp += [w.tube_impression(f) for f in tubes] + [w.line_impression(f) for f in lines]
  if not (ptx or ops or effs or heart):
    imp.append(w.pick(_NORMAL_IMPRESSION))
  if len(imp) > 1 and w.chance(0.3):
    impression = " ".join(f"{i + 1}. {s}" for i, s in enumerate(imp))
  else:
    impression = " ".join(imp)
  return " ".join(out), impression


# --------------------------------------------------------------------------- the grammar
_SENTENCE_END = re.compile(r"[.!?;]+(?=\s|$)|\n+")
_MENTION_PATTERNS = (
    ("pneumothorax", re.compile(r"\bpneumothora(?:x|ces)\b")),
    ("effusion", re.compile(r"(?<!pericardial )\beffusions?\b")),
    ("opacity", re.compile(r"\b(?:opacit(?:y|ies)|opacification|consolidations?|consolidative|"
                           r"airspace disease|infiltrates?|pneumonias?|atelectasis|"
                           r"increased density)\b")),
    ("cardiomegaly", re.compile(
        r"\bcardiomegaly\b|\b(?:heart|cardiac|cardiomediastinal)\b[^.;]{0,30}?"
        r"\benlarge(?:d|ment)\b|\benlarge(?:d|ment)(?: of the)? (?:heart|cardiac)\b")),
    ("support_devices", re.compile(
        r"\b(?:endotracheal|et tube|ett|enteric tube|nasogastric|"
        r"central (?:venous )?(?:line|catheter)s?|(?:venous )?catheters?|picc|"
        r"lines? (?:and|or) tubes?|tubes? (?:and|or) lines?|support devices?|pacemaker|"
        r"pacer)\b")),
)
_BLUNTING = re.compile(r"\bblunt(?:ed|ing)?\b")
_NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of|absence of|resolved|"
                       r"resolution of|removed|clear of|rather than)\b")
_NEGATION_END = re.compile(
    r",\s*(?:consistent|compatible|concerning|suspicious|suggest\w*|likely|which|possibly|"
    r"probably|may|could|representing|in keeping)\b|\b(?:but|however|although|though|with)\b")
_SEGMENT_CUT = re.compile(r",|\band\b|\bwith\b|\bwithout\b|\bplus\b|\bas well as\b")
_BOTH = frozenset(SIDES)
_SIDE_WORDS = {"right": frozenset({"right"}), "left": frozenset({"left"}), "bilateral": _BOTH,
               "bilaterally": _BOTH, "both": _BOTH}
_ZONE_WORDS = {"upper": "upper", "apex": "upper", "apices": "upper", "apical": "upper",
               "middle": "middle", "mid": "middle", "midlung": "middle", "midlungs": "middle",
               "midzone": "middle",
               "perihilar": "middle", "lower": "lower", "base": "lower", "bases": "lower",
               "basilar": "lower", "basal": "lower", "basally": "lower"}
_SIDE_ZONE_WORDS = {"bibasilar": (_BOTH, "lower"), "bibasal": (_BOTH, "lower"),
                    "biapical": (_BOTH, "upper"), "lingula": (frozenset({"left"}), "middle"),
                    "lingular": (frozenset({"left"}), "middle")}


def _mentions(sentence: str) -> list[tuple[str, int, int]]:
  """(kind, start, end) of each finding mention in a lower-case sentence, in order."""
  found = [(m.start(), m.end(), kind) for kind, p in _MENTION_PATTERNS
           for m in p.finditer(sentence)]
  if "costophrenic" in sentence:
    found += [(m.start(), m.end(), "effusion") for m in _BLUNTING.finditer(sentence)]
  out, end = [], -1
  for start, stop, kind in sorted(found, key=lambda m: (m[0], -m[1])):
    if start >= end:  # overlapping matches: the first (longest) wins
      out.append((kind, start, stop))
      end = stop
  return out


def _negated(sentence: str, start: int, end: int) -> bool:
  """Whether a negation cue before (or inside) the mention reaches it: no scope terminator
  ('but', ', consistent with', 'with', ...) between the cue and the mention."""
  for cue in _NEGATION.finditer(sentence[:end]):
    if not _NEGATION_END.search(sentence[cue.end():max(start, cue.end())]):
      return True
  return False


def _location_groups(text: str) -> list[tuple[frozenset, set]]:
  """(sides, zones) groups of the location words in `text` ('right upper and left lower
  lobes' -> ({right}, {upper}), ({left}, {lower}); 'bibasilar' -> ({right, left}, {lower}))."""
  groups: list[tuple[set, set]] = []
  for word in re.findall(r"[a-z]+", text):
    if word in _SIDE_ZONE_WORDS:
      sides, zone = _SIDE_ZONE_WORDS[word]
      groups.append((set(sides), {zone}))
    elif word in _SIDE_WORDS:
      if groups and (not groups[-1][1] or not groups[-1][0]):
        groups[-1][0].update(_SIDE_WORDS[word])   # 'right and left lower', 'upper lobe ... right'
      else:
        groups.append((set(_SIDE_WORDS[word]), set()))
    elif word in _ZONE_WORDS:
      if not groups:
        groups.append((set(), set()))
      groups[-1][1].add(_ZONE_WORDS[word])
  return [(frozenset(s), z) for s, z in groups]


def parse_labels(text: str) -> frozenset[str]:
  """The finding labels (LABEL_NAMES) a report text asserts: the inverse of the report
  templates, robust to their paraphrases (`NORMAL`, the empty set, for a normal text).

  Per sentence: finding mentions (opacity / consolidation / pneumonia / airspace disease /
  infiltrate / atelectasis; effusion or a blunted costophrenic angle; pneumothorax;
  cardiomegaly or an enlarged heart; endotracheal tube, central line, catheter, support
  devices), each negated when a cue (no, not, without, negative for, ...) precedes it with no
  terminator (', consistent with', 'but', 'with', ...) in between. Mentions of different
  kinds split the sentence at the last ',' / 'and' / 'with' between them; each piece's
  location words (right, left, bilateral, both; upper, apex/apical, middle, mid, lingula,
  lower, base/basilar, bibasilar, ...) locate its positive mentions. An opacity needs a side
  and a zone, an effusion or pneumothorax a side; unlocated ones are not labels.
  """
  labels = set()
  for sentence in _SENTENCE_END.split(text.lower()):
    mentions = _mentions(sentence)
    if not mentions:
      continue
    # Pieces: consecutive mentions of one kind share one; a new kind starts a new piece.
    bounds, start = [], 0
    for (kind, _, end), (nxt, nstart, _) in zip(mentions, mentions[1:]):
      if nxt != kind:
        cuts = list(_SEGMENT_CUT.finditer(sentence, end, nstart))
        cut = cuts[-1].start() if cuts else nstart
        bounds.append((start, cut))
        start = cut
    bounds.append((start, len(sentence)))
    for lo, hi in bounds:
      piece = [m for m in mentions if lo <= m[1] < hi]
      positive = [m for m in piece if not _negated(sentence, m[1], m[2])]
      if not positive:
        continue
      kind = positive[0][0]
      groups = _location_groups(sentence[lo:hi])
      if kind == "opacity":
        labels.update(opacity_label(s, z) for sides, zones in groups for s in sides
                      for z in zones)
      elif kind in ("effusion", "pneumothorax"):
        labels.update(f"{kind}_{s}" for sides, _ in groups for s in sides)
      else:
        labels.add(kind)
  return frozenset(labels)


# --------------------------------------------------------------------------- records
def encode_mask(mask: np.ndarray) -> bytes:
  """bool [S, S] -> 8-bit PNG {0, 255}."""
  return images.encode_png(np.where(np.asarray(mask), 255, 0).astype(np.uint8))


def study_record(study: Study, image_size: int) -> tuple[str, dict]:
  """(key, 'cxr_reports' record) of one study, exactly as the builder writes it."""
  image, regions = render(study, image_size)
  record_id = f"{study.name}/{VIEW.lower()}"
  return record_id, cxr.record(
      image=images.encode_png(image), findings=study.findings_text,
      impression=study.impression_text, study=study.name, patient=study.name, view=VIEW,
      id=record_id, labels=label_vector(study.labels),
      region_labels=[LABEL_NAMES.index(r.label) for r in regions],
      region_boxes=np.asarray([r.box for r in regions], np.float32).reshape(-1, 4),
      region_masks=[encode_mask(r.mask) for r in regions])


def label_counts(studies: Iterable[Study]) -> dict:
  counts = {"studies": 0, "normal": 0, "regions": 0, **{n: 0 for n in LABEL_NAMES}}
  for st in studies:
    counts["studies"] += 1
    counts["normal"] += st.normal
    counts["regions"] += len(st.findings)
    for n in st.labels:
      counts[n] += 1
  return counts


# --------------------------------------------------------------------------- IU X-ray tags
_IU_OPACITY_HEADS = ("Opacity", "Consolidation", "Pneumonia", "Infiltrate", "Airspace Disease",
                     "Pulmonary Atelectasis")
_IU_NOT_LUNG = {"ribs", "mediastinum", "thorax", "heart", "adipose tissue", "clavicle",
                "pleura", "paratracheal", "supracardiac", "sulcus", "spine", "breast",
                "anterior", "posterior"}
_IU_ZONES = {"apex": "upper", "upper lobe": "upper", "middle lobe": "middle",
             "lingula": "middle", "hilum": "middle", "base": "lower", "lower lobe": "lower",
             "costophrenic angle": "lower", "retrocardiac": "lower"}
_IU_CTR = {"borderline": (0.51, 0.54), "mild": (0.53, 0.58), "moderate": (0.58, 0.63),
           "severe": (0.63, 0.68)}
_IU_INFLATION = {"Lung/hypoinflation": 0.9, "Lung/hyperdistention": 1.1}


def _iu_sides(quals: set[str]) -> tuple[str, ...]:
  if "bilateral" in quals or {"right", "left"} <= quals:
    return SIDES
  return tuple(s for s in SIDES if s in quals)


def _iu_size(quals: set[str]) -> str | None:
  if quals & {"small", "mild"}:
    return "small"
  if quals & {"moderate", "large", "severe"}:
    return "moderate"
  return None


def interpret_tag(tag: str) -> list[tuple] | None:
  """What the generator draws for one IU X-ray MeSH tag: a list of (kind, side, zone, size)
  specs (kind 'opacity', 'effusion', 'pneumothorax', 'cardiomegaly', 'endotracheal_tube',
  'central_line', or 'inflation' with the factor as size), [] for 'normal', None when the
  tag is not drawn (ignored: calcinosis, granuloma, degenerative spine, an opacity without
  a side or zone, ...)."""
  parts = [p.strip() for p in tag.split("/")]
  head, quals = parts[0], set(parts[1:])
  if tag.strip().lower() == "normal":
    return []
  sides = _iu_sides(quals)
  if head in _IU_OPACITY_HEADS:
    if quals & _IU_NOT_LUNG:
      return None
    zones = sorted({_IU_ZONES[q] for q in quals if q in _IU_ZONES}, key=ZONES.index)
    if not sides:   # lobes that name their side
      sides = tuple(s for s, q in (("right", "middle lobe"), ("left", "lingula"),
                                   ("left", "retrocardiac")) if q in quals)
    if not sides or not zones:
      return None
    if "lingula" in quals or "retrocardiac" in quals:
      cells = {("left", "middle" if "lingula" in quals else "lower")}
      cells |= {(s, z) for s in sides for z in zones
                if z != ("middle" if "lingula" in quals else "lower")}
    else:
      cells = {(s, z) for s in sides for z in zones}
    return [("opacity", s, z, None) for s, z in sorted(cells)]
  if head == "Pleural Effusion" or (head == "Costophrenic Angle"
                                    and quals & {"blunted", "obscured"}):
    size = "small" if head == "Costophrenic Angle" else _iu_size(quals)
    return [("effusion", s, "", size) for s in sides] or None
  if head == "Cardiomegaly" or (head == "Cardiac Shadow" and quals & {"enlarged", "borderline"}):
    severity = next((q for q in ("severe", "moderate", "mild", "borderline") if q in quals), "")
    return [("cardiomegaly", "", "", severity)]
  if head == "Pneumothorax":
    return [("pneumothorax", s, "", _iu_size(quals)) for s in sides] or None
  device_quals = {"left", "right", "bilateral", "thorax", "heart", "heart atria"}
  if head in ("Catheters, Indwelling", "Implanted Medical Device", "Medical Device"):
    if not quals <= device_quals:
      return None
    default = "left" if head == "Implanted Medical Device" else "right"
    return [("central_line", s, "", None) for s in (sides or (default,))]
  if head == "Tube, Inserted" and quals & {"trachea", "trachea, carina"}:
    return [("endotracheal_tube", "", "", None)]
  for prefix, factor in _IU_INFLATION.items():
    if tag.startswith(prefix):
      return [("inflation", "", "", factor)]
  return None


def _uid_number(uid: str) -> int:
  return int(uid) if uid.isdigit() else int(hashlib.sha256(uid.encode()).hexdigest()[:12], 16)


def iu_split(uid: str) -> str:
  """The split of an IU X-ray study: a hash of its uid (80/10/10%)."""
  h = int(hashlib.sha256(f"synthetic_cxr:{uid}".encode()).hexdigest()[:12], 16) / 16 ** 12
  train, validation, _ = IU_SPLIT_FRACTIONS
  return SPLITS[0] if h < train else SPLITS[1] if h < train + validation else SPLITS[2]


def iu_study(uid: str, tags: Sequence[str], findings_text: str, impression_text: str,
             seed: int = 0, design: Design = DESIGN) -> tuple[Study, list[str], list[str]]:
  """(study, drawn tags, ignored tags) of an IU X-ray report: its MeSH tags drawn on a
  random chest (`np.random.default_rng([seed, 3, uid, 0])`; pixels `[seed, 3, uid, 1]`),
  its real texts beside them."""
  specs, drawn, ignored = [], [], []
  for tag in tags:
    spec = interpret_tag(tag)
    (ignored if spec is None else drawn).append(tag)
    specs += spec or []
  number = _uid_number(uid)
  rng = np.random.default_rng([seed, 3, number, 0])
  heart = [s for s in specs if s[0] == "cardiomegaly"]
  inflation = float(np.prod([s[3] for s in specs if s[0] == "inflation"] or [1.0]))
  ctr = None
  if heart:
    severities = [s[3] for s in heart if s[3]]
    ctr = _IU_CTR[severities[0]] if severities else design.ctr_enlarged
  an = sample_anatomy(rng, design, enlarged_heart=bool(heart), ctr=ctr, inflation=inflation)
  found, seen = [], set()
  if heart:
    found.append(_sample_cardiomegaly(an))
  for kind, side, zone, size in specs:
    if kind in ("cardiomegaly", "inflation") or (kind, side, zone) in seen:
      continue
    seen.add((kind, side, zone))
    if kind == "opacity":
      found.append(_sample_opacity(rng, an, side, zone, design))
    elif kind == "effusion":
      found.append(_sample_effusion(rng, side, size))
    elif kind == "pneumothorax":
      found.append(_sample_pneumothorax(rng, side, size))
    elif kind == "endotracheal_tube":
      found.append(_sample_tube(rng, an))
    elif kind == "central_line":
      route = "left subclavian" if side == "left" else ("right internal jugular", "right "
                                                        "subclavian")[int(rng.integers(2))]
      found.append(_sample_line(rng, an, route))
  study = Study(f"iu_xray-{uid}", an, tuple(found), findings_text, impression_text,
                (seed, 3, number, 1))
  return study, drawn, ignored


def default_iu_folder() -> str:
  """$MEDGUIDE_SHARED_DATA/cxr_iu_xray_reports, else the project's
  ../shared/data/cxr_iu_xray_reports beside the repository."""
  shared = os.environ.get("MEDGUIDE_SHARED_DATA") or os.path.join(
      os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "..",
      "shared", "data")
  return os.path.normpath(os.path.join(shared, IU_FOLDER))


def read_iu_reports(folder: str) -> list[dict]:
  """The rows of `folder`/indiana_reports.csv (csv module, UTF-8): uid, MeSH, Problems,
  findings, impression, indication, comparison as stored."""
  path = os.path.join(folder, IU_REPORTS_CSV)
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = {"uid", "MeSH", "findings", "impression"} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{path}: missing columns {sorted(missing)}; found {reader.fieldnames}")
    return list(reader)


# --------------------------------------------------------------------------- the builder
@dataclasses.dataclass(eq=False)
class SyntheticCxrConfig(tfds.core.BuilderConfig):
  """Image side in pixels, studies per split (train, validation, test), seed, and the source
  of the findings: 'synthetic' (generated reports) or 'iu_text' (real IU X-ray reports)."""
  image_size: int = 128
  num_studies: tuple[int, int, int] = (3000, 400, 400)
  seed: int = 0
  source: str = "synthetic"


def custom_config(image_size: int, num_studies, seed: int, source: str = "synthetic"
                  ) -> SyntheticCxrConfig:
  """A config whose name encodes its settings, so different settings never share files
  (synthetic.custom_config's naming, with this builder's option names)."""
  if int(image_size) < 64:
    raise ValueError(f"image_size must be >= 64 (ribs, lines and pleural lines are about one "
                     f"pixel wide at 64), got {image_size}")
  if source == "iu_text":
    name = f"iu_text_s{int(image_size)}_seed{int(seed)}"
    return SyntheticCxrConfig(name=name, image_size=int(image_size), num_studies=(0, 0, 0),
                              seed=int(seed), source=source, description=f"Overridden: {name}.")
  try:
    counts = tuple(int(n) for n in num_studies)
  except (TypeError, ValueError):
    counts = ()
  if len(counts) != len(SPLITS) or min(counts) < 0 or counts[0] < 1:
    raise ValueError(f"num_studies needs one count per split {SPLITS}, >= 1 for train (the "
                     f"tokenizer is trained on it) and >= 0 for the others, got "
                     f"{num_studies!r}")
  name = f"s{int(image_size)}_n{'_'.join(map(str, counts))}_seed{int(seed)}"
  return SyntheticCxrConfig(name=name, image_size=int(image_size), num_studies=counts,
                            seed=int(seed), description=f"Overridden: {name}.")


class SyntheticCxr(cxr.ReportBuilder):
  """Generated chest radiographs with reports, finding labels and regions (see the module
  docstring); tag 'iu_text' draws the real IU X-ray reports' tags beside their texts."""

  name = "synthetic_cxr"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticCxrConfig(name="default",
                         description="128x128 PNG, 3000/400/400 studies, seed 0."),
      # 'synthetic_cxr:tiny': the test suite's end-to-end runs (a run check, not a result).
      SyntheticCxrConfig(name="tiny", image_size=64, num_studies=(64, 16, 16),
                         description="64x64 PNG, 64/16/16 studies, seed 0."),
      SyntheticCxrConfig(name="iu_text", num_studies=(0, 0, 0), source="iu_text",
                         description="128x128 PNG rendered from the MeSH tags of the IU X-ray "
                                     "reports, their real texts; splits by a hash of the uid."),
  ]

  def __init__(self, *, tag: str | None = None, image_size: int | None = None,
               num_studies: tuple[int, int, int] | None = None, seed: int | None = None,
               **kwargs):
    """Usual TFDS kwargs, plus a tag ('tiny', 'iu_text'; 'synthetic_cxr:tiny') or overrides
    (image_size, num_studies per split, seed) that select a non-default config derived from
    the tag's (num_studies does not apply to 'iu_text': its studies are the release's)."""
    configs = {c.name: c for c in self.BUILDER_CONFIGS}
    if tag is not None and tag not in configs:
      raise ValueError(f"synthetic_cxr tag {tag!r} is unknown; valid tags: {list(configs)}")
    if tag is not None:
      kwargs["config"] = tag
    if image_size is not None or num_studies is not None or seed is not None:
      base = configs[tag or "default"]
      if base.source == "iu_text" and num_studies is not None:
        raise ValueError("num_studies does not apply to synthetic_cxr:iu_text (one study per "
                         "IU X-ray report with findings and impression)")
      kwargs["config"] = custom_config(
          base.image_size if image_size is None else image_size,
          base.num_studies if num_studies is None else num_studies,
          base.seed if seed is None else seed, base.source)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    info.metadata.update(label_names=list(LABEL_NAMES), image_size=self.builder_config.image_size,
                         source=self.builder_config.source)
    return info

  def _split_generators(self, dl_manager):
    config = self.builder_config
    if config.source == "iu_text":
      return self._iu_splits(self._iu_folder(dl_manager))
    studies = {split: [sample_study(config.seed, split_id, i)
                       for i in range(config.num_studies[split_id])]
               for split_id, split in enumerate(SPLITS)}
    summary = {"splits": {s: label_counts(v) for s, v in studies.items()},
               "seed": config.seed, "design": dataclasses.asdict(DESIGN)}
    self._set_metadata(studies, summary)
    return {split: self._generate_examples(studies[split]) for split in SPLITS}

  def _set_metadata(self, studies: Mapping[str, list[Study]], summary: dict) -> None:
    texts = [t for st in studies[SPLITS[0]] for t in (st.findings_text, st.impression_text)]
    self.set_metadata(train_texts=texts, label_names=LABEL_NAMES, summary=summary,
                      label_groups={g: list(v) for g, v in LABEL_GROUPS.items()},
                      image_size=self.builder_config.image_size,
                      source=self.builder_config.source, orientation=ORIENTATION)

  def _generate_examples(self, studies: Sequence[Study]) -> Iterator[tuple[str, dict]]:
    for st in studies:
      yield study_record(st, self.builder_config.image_size)

  # IU X-ray tags ---------------------------------------------------------------------------
  def _iu_folder(self, dl_manager) -> str:
    """The manual dir when one was given (prepare(manual_dir=...), --manual_dir), else
    `default_iu_folder()`; ManualDirError when it lacks indiana_reports.csv."""
    given = getattr(dl_manager, "_manual_dir", None)
    unset = os.path.join(os.fspath(dl_manager.download_dir), "manual")
    folder = os.fspath(given) if given and os.fspath(given) != unset else default_iu_folder()
    if os.path.isfile(os.path.join(folder, IU_FOLDER, IU_REPORTS_CSV)):
      folder = os.path.join(folder, IU_FOLDER)   # the shared data folder above it
    if not os.path.isfile(os.path.join(folder, IU_REPORTS_CSV)):
      raise builders.ManualDirError(
          f"synthetic_cxr:iu_text draws the tags of the IU X-ray reports and needs "
          f"{IU_REPORTS_CSV}, which is not in {folder}. Give the folder that holds it: "
          f"python -m data_prep.build synthetic_cxr:iu_text --manual_dir=/path/to/{IU_FOLDER} "
          f"(default {default_iu_folder()}: $MEDGUIDE_SHARED_DATA/{IU_FOLDER} if that is set, "
          f"else the project's ../shared/data/{IU_FOLDER} beside the repository).")
    return folder

  def _iu_splits(self, folder: str):
    config = self.builder_config
    sections = cxr.Summary()
    drawn, ignored = {}, {}
    studies: dict[str, list[Study]] = {s: [] for s in SPLITS}
    others: dict[str, tuple[str, str]] = {}
    left_out = 0
    for row in read_iu_reports(folder):
      uid = row["uid"].strip()
      texts = {s: reports.normalise(row.get(s, "")) for s in cxr.SECTIONS}
      lacking = [s for s in ("findings", "impression") if not texts[s]]
      for s in lacking:
        sections.lacks(s, uid)
      if lacking:
        left_out += 1
        continue
      tags = [t.strip() for t in row.get("MeSH", "").split(";") if t.strip()]
      study, d, i = iu_study(uid, tags, texts["findings"], texts["impression"], config.seed)
      for tag in d:
        drawn[tag] = drawn.get(tag, 0) + 1
      for tag in i:
        ignored[tag] = ignored.get(tag, 0) + 1
      split = iu_split(uid)
      studies[split].append(study)
      others[study.name] = (texts["indication"], texts["comparison"])
      for key in ("studies", "images", "records"):
        sections.count(split, key)
    sort = lambda d: dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))
    summary = {**sections.as_dict(), "left_out_lacking_a_section": left_out,
               "labels": {s: label_counts(v) for s, v in studies.items()},
               "tags": {"drawn": sort(drawn), "ignored": sort(ignored),
                        "drawn_total": sum(drawn.values()),
                        "ignored_total": sum(ignored.values())},
               "seed": config.seed, "folder": folder,
               "split_fractions": list(IU_SPLIT_FRACTIONS)}
    self._set_metadata(studies, summary)
    return {split: self._iu_examples(studies[split], others) for split in SPLITS}

  def _iu_examples(self, studies: Sequence[Study], others: Mapping[str, tuple[str, str]]
                   ) -> Iterator[tuple[str, dict]]:
    for st in studies:
      key, record = study_record(st, self.builder_config.image_size)
      record["indication"], record["comparison"] = others[st.name]
      yield key, record

