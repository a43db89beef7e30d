"""synthetic_mammo: deterministic GLAM-style mammograms whose 'small' is the 'full' / 8."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image
import pytest

from medguide_jax.data import builders
from medguide_jax.data import images
from medguide_jax.data import synthetic_mammo as sm

SMALL = (368, 240)


def _isoperimetric_ratio(mask: np.ndarray) -> float:
  """perimeter^2 / (4 pi area), perimeter counted as pixel edges (a digital disc: ~4/pi)."""
  padded = np.pad(mask.astype(bool), 1)
  perimeter = (np.sum(padded[1:] != padded[:-1]) + np.sum(padded[:, 1:] != padded[:, :-1]))
  return float(perimeter ** 2 / (4 * np.pi * padded.sum()))


def _block_mean(a: np.ndarray, k: int = 8) -> np.ndarray:
  h, w = a.shape
  return a.astype(np.float64).reshape(h // k, k, w // k, k).mean((1, 3))


def test_case_depends_only_on_seed_split_and_index():
  first = sm.render_case(0, 1, 7, SMALL)
  for i in (3, 8, 2):  # other cases in between must not matter
    sm.render_case(0, 1, i, SMALL)
  second = sm.render_case(0, 1, 7, SMALL)
  np.testing.assert_array_equal(first[0], second[0])
  assert first[1] == second[1]
  for name in sm.CLASS_NAMES:
    np.testing.assert_array_equal(first[2][name], second[2][name])
  assert images.encode_png(first[0]) == images.encode_png(second[0])
  for other in ((0, 1, 8), (0, 2, 7), (1, 1, 7)):
    assert not np.array_equal(sm.render_case(*other, SMALL)[0], first[0]), other


def test_views_face_right_with_the_chest_wall_at_column_zero():
  """GLAM's preprocessed views (right views flipped) all have the chest wall on the left."""
  for index in range(12):
    image, _, _ = sm.render_case(0, 0, index, SMALL)
    assert image.dtype == np.uint16 and image.shape == SMALL
    assert 0 < image.max() <= sm.MAX_VALUE
    assert np.mean(image[:, 0] > 0) > 0.6, index  # the breast is cut by the left edge
    assert not image[:, -1].any(), index  # the nipple never reaches the right edge
    height, width = SMALL
    assert image[:, : width // 4].mean() > 3 * image[:, -width // 4:].mean(), index
    # Background is exactly 0, not noise.
    assert image[0, -1] == 0 and image[-1, -1] == 0


def test_labels_and_masks_agree_and_lesions_lie_inside_the_breast():
  labels = []
  for index in range(200):
    image, (benign, malignant), masks = sm.render_case(0, 0, index, SMALL)
    labels.append((benign, malignant))
    for name, label in zip(sm.CLASS_NAMES, (benign, malignant)):
      mask = masks[name]
      assert mask.dtype == np.uint8 and mask.shape == SMALL
      assert set(np.unique(mask)) <= {0, 1}
      assert mask.any() == bool(label), (index, name)
      if label:
        assert np.all(image[mask > 0] > 0), (index, name)  # inside the breast
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    assert not (masks["benign"] & masks["malignant"]).any(), index  # lesions never overlap
  labels = np.asarray(labels)
  rates = labels.mean(0)
  assert np.all(np.abs(rates - 0.35) < 0.1), rates
  both = np.mean(labels[:, 0] & labels[:, 1])
  assert abs(both - rates[0] * rates[1]) < 0.06, (both, rates)  # drawn independently


def test_lesion_sizes_and_counts_follow_the_description():
  for index in range(100):
    case = sm.describe_case(0, 2, index)
    kinds = [lesion.kind for lesion in case.lesions]
    assert case.labels == (int("benign" in kinds), int("malignant" in kinds))
    assert kinds.count("malignant") <= 1 and kinds.count("benign") <= 2
    assert case.view in sm.VIEWS
    for lesion in case.lesions:
      assert 50.0 <= lesion.radius <= 150.0, lesion
      if lesion.kind == "malignant":
        lengths = [length / lesion.radius for _, length, _, _ in lesion.spicules]
        assert 1.4 <= min(lengths) and max(lengths) <= 2.1 + 1e-9


def test_small_is_the_block_mean_of_full_and_masks_agree():
  """Same case at 2944x1920 and 368x240; the full masks have the described lesion areas."""
  # Case 2 of split 0 (seed 0) has a malignant and two benign lesions.
  case = sm.describe_case(0, 0, 2)
  assert case.labels == (1, 1)
  full, labels_full, masks_full = sm.render_case(0, 0, 2, sm.REFERENCE_SHAPE)
  small, labels_small, masks_small = sm.render_case(0, 0, 2, SMALL)
  assert full.shape == (2944, 1920) and full.dtype == np.uint16
  assert labels_full == labels_small == case.labels
  pooled = _block_mean(full)
  assert np.corrcoef(pooled.ravel(), small.ravel())[0, 1] > 0.98  # 0.998 when written
  breast = (pooled > 0) & (small > 0)
  assert np.corrcoef(pooled[breast], small[breast])[0, 1] > 0.95  # 0.996 when written
  assert np.abs(pooled - small).mean() < 60  # of 0..4095; 24 when written
  for name in sm.CLASS_NAMES:
    down = _block_mean(masks_full[name]) > 0.5
    mine = masks_small[name] > 0
    dice = 2 * np.sum(down & mine) / (down.sum() + mine.sum())
    assert dice > 0.95, (name, dice)
  # An oval of equal-area radius R covers pi R^2 full-resolution pixels.
  benign_area = sum(np.pi * l.radius ** 2 for l in case.lesions if l.kind == "benign")
  assert abs(masks_full["benign"].sum() / benign_area - 1) < 0.01
  # The malignant mask is the irregular core plus the thick parts of its spicules.
  (malignant,) = [l for l in case.lesions if l.kind == "malignant"]
  assert masks_full["malignant"].sum() > 0.7 * np.pi * malignant.radius ** 2
  assert (masks_full["malignant"].sum()
          < np.pi * (malignant.radius * (1 + sum(a for a, _ in malignant.harmonics))) ** 2
          + sum(length * width for _, length, width, _ in malignant.spicules))


def test_malignant_masks_are_more_irregular_than_benign():
  benign, malignant = [], []
  for index in range(120):
    case = sm.describe_case(0, 0, index)
    kinds = [lesion.kind for lesion in case.lesions]
    if not case.lesions:
      continue
    _, _, masks = sm.render_case(0, 0, index, SMALL)
    if kinds.count("benign") == 1:  # one oval, not the union of two
      benign.append(_isoperimetric_ratio(masks["benign"]))
    if "malignant" in kinds:
      malignant.append(_isoperimetric_ratio(masks["malignant"]))
  assert len(benign) > 15 and len(malignant) > 15
  # Digital ovals are near 4/pi (1.27) to 1.9; spiculated masks much higher (7 typical).
  assert max(benign) < 2.2, benign
  assert np.median(malignant) > 2 * np.median(benign), (benign, malignant)
  assert np.mean(np.asarray(malignant) > max(benign)) > 0.9


def test_lesions_are_denser_than_their_surroundings():
  """Lesion centre vs the ring beyond its spicules, in ring standard deviations."""
  rows, cols = np.mgrid[0:SMALL[0], 0:SMALL[1]]
  y, x = (rows + 0.5) * 8, (cols + 0.5) * 8
  scores = {name: [] for name in sm.CLASS_NAMES}
  for index in range(60):
    case = sm.describe_case(0, 0, index)
    if not case.lesions:
      continue
    image = sm.render_case(0, 0, index, SMALL)[0].astype(np.float64)
    for lesion in case.lesions:
      distance = np.hypot(y - lesion.centre[0], x - lesion.centre[1])
      centre = image[distance < 0.6 * lesion.radius].mean()
      ring = image[(distance > 2.3 * lesion.radius) & (distance < 3 * lesion.radius)
                   & (image > 0)]
      scores[lesion.kind].append((centre - np.median(ring)) / (ring.std() + 1))
  for name, values in scores.items():
    assert len(values) > 10 and np.median(values) > 1.0, (name, values)  # ~2 when written


def test_prepare_and_read_back_through_data_source(tmp_path):
  counts = (3, 1, 2)
  builder = builders.prepare("synthetic_mammo", data_dir=tmp_path, num_examples=counts)
  assert builder.builder_config.name == "small_368x240_n3_1_2_seed0"
  assert builder.info.metadata["class_names"] == ["benign", "malignant"]
  assert list(builder.info.metadata["image_shape"]) == [368, 240]
  for split_id, (split, count) in enumerate(zip(sm.SPLITS, counts)):
    source = builder.as_data_source(split=split)
    assert len(source) == count
    assert images.class_names(source) == list(sm.CLASS_NAMES)
    for record in source:
      assert set(record) == set(sm.features().keys())
      example_id = record["id"].decode()
      index = int(example_id.rsplit("-", 1)[1])
      assert example_id == f"synthetic_mammo-{split}-{index:05d}"
      png = Image.open(io.BytesIO(record["image"]))
      assert png.format == "PNG" and png.mode == "I;16" and png.size == (240, 368)
      image = np.asarray(png)
      expected, labels, masks = sm.render_case(0, split_id, index, SMALL)
      np.testing.assert_array_equal(image.astype(np.uint16), expected)
      assert record["view"].decode() == sm.describe_case(0, split_id, index).view
      assert record["source"].decode() == "mammo"
      for name, label in zip(sm.CLASS_NAMES, labels):
        assert int(record[name]) == label and int(record[f"has_{name}_mask"]) == 1
        mask = Image.open(io.BytesIO(record[f"{name}_mask"]))
        assert mask.mode == "L" and mask.size == (240, 368)
        np.testing.assert_array_equal(np.asarray(mask), masks[name] * 255)


def test_configs_tags_and_bad_arguments(tmp_path):
  data_dir = os.fspath(tmp_path)
  assert builders.DATASETS["synthetic_mammo"] is sm.SyntheticMammo
  small = sm.SyntheticMammo(data_dir=data_dir).builder_config
  assert (small.name, small.image_shape, small.num_examples, small.seed) == (
      "small", (368, 240), (1600, 200, 400), 0)
  full = sm.SyntheticMammo(data_dir=data_dir, tag="full").builder_config
  assert (full.name, tuple(full.image_shape), full.num_examples) == (
      "full", (2944, 1920), (16, 8, 16))
  # prepare('synthetic_mammo:full', ...) passes the tag on (tiny override to keep it fast).
  built = builders.prepare("synthetic_mammo:full", data_dir=tmp_path, num_examples=(1, 1, 1),
                           image_shape=(46, 30))
  assert built.builder_config.name == "full_46x30_n1_1_1_seed0"
  record = built.as_data_source(split="test")[0]
  assert np.asarray(Image.open(io.BytesIO(record["image"]))).shape == (46, 30)
  with pytest.raises(ValueError, match=r"tag 'huge'.*\['small', 'full', 'tiny'\]"):
    builders.prepare("synthetic_mammo:huge", data_dir=tmp_path)
  with pytest.raises(ValueError, match="tag or a config"):
    sm.SyntheticMammo(data_dir=data_dir, tag="full", config="small")
  with pytest.raises(ValueError, match="num_examples"):
    sm.SyntheticMammo(data_dir=data_dir, num_examples=(4, 4))
  with pytest.raises(ValueError, match="num_examples"):
    sm.SyntheticMammo(data_dir=data_dir, num_examples=5)
  with pytest.raises(ValueError, match="image_shape"):
    sm.SyntheticMammo(data_dir=data_dir, image_shape=(4, 300))
  with pytest.raises(ValueError, match="shape"):
    sm.render_case(0, 0, 0, (368,))
