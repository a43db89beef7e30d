"""synthetic_multimodality: deterministic, four balanced sources, the class is a local shape."""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from medguide_jax.data import builders
from medguide_jax.data import images
from medguide_jax.data import synthetic_multimodality as smm


def test_example_depends_only_on_seed_split_and_index():
  first = smm.generate_example(0, 1, 7, 48)
  for i in (3, 8, 2):  # other examples in between must not matter
    smm.generate_example(0, 1, i, 48)
  second = smm.generate_example(0, 1, 7, 48)
  np.testing.assert_array_equal(first[0], second[0])
  assert first[1:] == second[1:]
  assert images.encode_png(first[0]) == images.encode_png(second[0])
  for other in ((0, 1, 8), (0, 2, 7), (1, 1, 7)):
    assert not np.array_equal(smm.generate_example(*other, 48)[0], first[0]), other


@pytest.mark.parametrize("source", smm.SOURCES)
def test_every_source_renders_a_grey_image_of_the_asked_size(source):
  for size in (32, 96):
    for label in range(len(smm.CLASS_NAMES)):
      image, (row, col) = smm.render(np.random.default_rng([5, label]), label, source, size)
      assert image.shape == (size, size) and image.dtype == np.uint8
      assert image.std() > 10, (source, size, label)  # anatomy, not a blank frame
      assert 0 <= row < size and 0 <= col < size


def test_source_is_obvious_from_coarse_pixels():
  """Four distinct styles: nearest class-mean on 8x8-pooled images tells the source apart."""
  examples = [smm.generate_example(0, 1, i, 32) for i in range(400)]
  pooled = np.stack([e[0] for e in examples]).astype(np.float64)
  pooled = pooled.reshape(-1, 8, 4, 8, 4).mean((2, 4)).reshape(len(examples), -1)
  source = np.array([smm.SOURCES.index(e[2]) for e in examples])
  means = np.stack([pooled[:200][source[:200] == k].mean(0) for k in range(len(smm.SOURCES))])
  nearest = ((pooled[200:, None] - means[None]) ** 2).sum(-1).argmin(1)
  assert np.mean(nearest == source[200:]) > 0.85  # 0.95 when written; chance 0.25


def test_bad_arguments_name_what_is_wrong():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="source"):
    smm.render(rng, 0, "pet", 32)
  with pytest.raises(ValueError, match="label"):
    smm.render(rng, 4, "ct", 32)
  with pytest.raises(ValueError, match="image_size"):
    smm.render(rng, 0, "ct", 4)
  with pytest.raises(ValueError, match="num_examples"):
    smm.SyntheticMultimodality(data_dir="/nonexistent", num_examples=(4, 4))


def test_labels_and_sources_balanced_and_independent():
  """Source (a nuisance) says nothing about the class: contingency table of 1200 examples."""
  pairs = [smm.generate_example(0, 0, i, 16)[1:] for i in range(1200)]
  table = np.zeros((len(smm.CLASS_NAMES), len(smm.SOURCES)))
  for label, source in pairs:
    table[label, smm.SOURCES.index(source)] += 1
  assert np.all(np.abs(table.sum(1) / 1200 - 0.25) < 0.04), table
  assert np.all(np.abs(table.sum(0) / 1200 - 0.25) < 0.04), table
  expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
  chi2 = ((table - expected) ** 2 / expected).sum()
  assert chi2 < 27.9, table  # 9 degrees of freedom: p = 0.001
  # P(class | source) stays near 1/4 for every source.
  assert np.all(np.abs(table / table.sum(0) - 0.25) < 0.08), table


# --- Where the class information is: a local shape, not global intensity. ---


def _ridge_balanced_accuracy(features, labels, num_train, l2=1.0):
  """One-vs-rest ridge on standardised features; balanced accuracy on the rest."""
  mean, std = features[:num_train].mean(0), features[:num_train].std(0) + 1e-8
  z = (features - mean) / std
  a = np.c_[z[:num_train], np.ones(num_train)]
  b = np.c_[z[num_train:], np.ones(len(z) - num_train)]
  weights = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ np.eye(4)[labels[:num_train]])
  prediction, truth = (b @ weights).argmax(1), labels[num_train:]
  return np.mean([np.mean(prediction[truth == c] == c) for c in range(4)])


def _radial_profile(image, centre, k=9):
  """Rotation-invariant shape descriptor of the (2k+1)^2 crop around `centre`: per ring of
  radius 0..k, the mean, spread and max of |pixel - crop border level| in noise units."""
  x = image.astype(np.float64)
  padded = np.pad(x, k, mode="edge")
  row, col = np.round(centre).astype(int)
  crop = padded[row:row + 2 * k + 1, col:col + 2 * k + 1]
  yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
  ring = np.minimum(np.round(np.hypot(yy, xx)).astype(int), k)
  noise = np.median(np.abs(np.diff(x, axis=1))) + 1.0
  z = (crop - np.median(crop[ring >= k - 2])) / noise
  feats = [f(z[ring == q]) for q in range(k + 1)
           for f in (lambda v: np.abs(v).mean(), np.std, lambda v: np.abs(v).max())]
  return np.log1p(np.asarray(feats))


@pytest.fixture(scope="module")
def probe_data():
  """600 training-split examples at 96x96 with their lesion centres."""
  examples = [smm._example(0, 0, i, 96) for i in range(600)]
  return {"images": np.stack([e[0] for e in examples]),
          "labels": np.array([e[1] for e in examples]),
          "centres": np.array([e[3] for e in examples])}


def test_lesion_centred_shape_predicts_the_class(probe_data):
  features = np.stack([_radial_profile(im, c)
                       for im, c in zip(probe_data["images"], probe_data["centres"])])
  accuracy = _ridge_balanced_accuracy(features, probe_data["labels"], 400)
  assert accuracy > 0.55, accuracy  # chance 0.25; 0.70 when written


def test_global_intensity_statistics_do_not_predict_the_class(probe_data):
  flat = probe_data["images"].reshape(len(probe_data["images"]), -1).astype(np.float64)
  features = np.c_[flat.mean(1), flat.std(1), np.percentile(flat, [1, 10, 50, 90, 99, 100], 1).T]
  accuracy = _ridge_balanced_accuracy(features, probe_data["labels"], 400)
  assert accuracy < 0.36, accuracy  # chance 0.25


def test_lesion_centre_matches_the_example(probe_data):
  assert smm.lesion_centre(0, 0, 5, 96) == tuple(probe_data["centres"][5])


# --- The TFDS builder. ---


def test_default_config_is_the_documented_one(tmp_path):
  builder = smm.SyntheticMultimodality(data_dir=os.fspath(tmp_path))
  config = builder.builder_config
  assert builder.name == "synthetic_multimodality" and str(builder.version) == "1.0.0"
  assert (config.name, config.image_size, config.num_examples, config.seed) == (
      "default", 96, (4000, 500, 1000), 0)
  assert builders.DATASETS["synthetic_multimodality"] is smm.SyntheticMultimodality


def test_prepare_and_read_back_through_data_source(tmp_path):
  counts = (40, 8, 16)
  builder = builders.prepare("synthetic_multimodality", data_dir=tmp_path,
                             num_examples=counts, image_size=32)
  assert builder.builder_config.name == "s32_n40_8_16_seed0"
  name = f"{builder.name}/{builder.builder_config.name}:{builder.version}"
  for split_id, (split, count) in enumerate(zip(smm.SPLITS, counts)):
    source = tfds.data_source(name, split=split, data_dir=os.fspath(tmp_path))
    assert len(source) == count
    assert images.class_names(source) == list(smm.CLASS_NAMES)
    sources, ids = set(), set()
    for record in source:
      example_id = record["id"].decode()
      index = int(example_id.rsplit("-", 1)[1])
      assert example_id == f"synthetic-{split}-{index:05d}"
      png = Image.open(io.BytesIO(record["image"]))
      assert png.format == "PNG" and png.mode == "L" and png.size == (32, 32)
      expected, label, source_name = smm.generate_example(0, split_id, index, 32)
      np.testing.assert_array_equal(np.asarray(png), expected)
      assert record["image"] == images.encode_png(expected)
      assert int(record["label"]) == label and 0 <= label < len(smm.CLASS_NAMES)
      assert record["source"].decode() == source_name
      sources.add(source_name)
      ids.add(example_id)
    assert len(ids) == count
    if split == "train":
      assert sources == set(smm.SOURCES)


# --- The 'scattered' config (the ssl method's default). ---


def _lesion_mask(seed, split, index, size, evidence):
  """The class evidence alone: the same image rendered with and without it differs there."""
  rng = np.random.default_rng([seed, split, index])
  label = int(rng.integers(len(smm.CLASS_NAMES)))
  source = smm.SOURCES[int(rng.integers(len(smm.SOURCES)))]
  canvas = dataclasses.replace(smm._canvas(size), evidence=evidence)
  mask, _ = smm._lesion(np.random.default_rng(1), label, canvas, np.ones((size, size)))
  return label, source, mask


def test_scattered_draws_several_lesions_of_the_class_each_image():
  """4-10x the evidence of the default: many separate lesions, not one, so that most crops of
  an image (SwAV's views) hold some of it; 'normal' still has none."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  areas = {"single": [], "scattered": []}
  for i in range(60):
    for name, evidence in (("single", smm.SINGLE), ("scattered", smm.SCATTERED)):
      label, _, mask = _lesion_mask(0, 0, i, 96, evidence)
      if label == smm.NORMAL:
        assert mask.max() == 0
        continue
      areas[name].append(mask.sum())
      if name == "scattered" and label == smm.ROUND:
        count = ndimage.label(mask > 0.5)[1]
        assert 2 <= count <= smm.SCATTERED.count[1], count  # overlaps may merge a few
  assert np.mean(areas["scattered"]) > 4 * np.mean(areas["single"])


def test_scattered_is_its_own_config_and_leaves_the_default_unchanged(tmp_path):
  default = smm.generate_example(0, 2, 11, 48)
  again = smm.generate_example(0, 2, 11, 48, smm.SINGLE)
  np.testing.assert_array_equal(default[0], again[0])
  scattered = smm.generate_example(0, 2, 11, 48, smm.SCATTERED)
  assert scattered[1:] == default[1:]  # same label and source: only the evidence differs
  assert not np.array_equal(scattered[0], default[0])
  builder = builders.prepare("synthetic_multimodality:scattered", data_dir=tmp_path,
                             num_examples=(4, 2, 2), image_size=32)
  assert builder.builder_config.name == "scattered_s32_n4_2_2_seed0"
  assert builder.builder_config.evidence == smm.SCATTERED
  name = f"{builder.name}/{builder.builder_config.name}:{builder.version}"
  record = tfds.data_source(name, split="test", data_dir=os.fspath(tmp_path))[1]
  expected = smm.generate_example(0, 2, 1, 32, smm.SCATTERED)[0]
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(record["image"]))), expected)
  with pytest.raises(ValueError, match="tag 'dense' is unknown.*scattered"):
    smm.SyntheticMultimodality(data_dir=os.fspath(tmp_path), tag="dense")
