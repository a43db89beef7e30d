"""synthetic_paired: deterministic, Derm7pt-shaped, and the superior modality says more."""
import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from tests import helpers
import tensorflow_datasets as tfds

from medguide_jax.data import builders, images
from medguide_jax.data import paired
from medguide_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_same_case_gives_same_pixels_and_bytes():
  first = synthetic.generate_case(0, 1, 7)
  second = synthetic.generate_case(0, 1, 7)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(first[1:], second[1:]):
    assert images.encode_png(a) == images.encode_png(b)
  other = synthetic.generate_case(0, 1, 8)
  assert not np.array_equal(first[2], other[2])


def test_render_case_shapes():
  rng = np.random.default_rng(3)
  inferior, superior = synthetic.render_case(rng, synthetic.sample_labels(rng), size=64)
  for image in (inferior, superior):
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image.std() > 5  # not blank


@pytest.fixture(scope="module")
def many_labels():
  rng = np.random.default_rng(0)
  return np.stack([synthetic.sample_labels(rng) for _ in range(4000)])


def test_labels_shape_and_range(many_labels):
  assert many_labels.shape == (4000, len(paired.TASKS))
  assert many_labels.dtype == np.int32
  assert (many_labels >= 0).all()
  assert (many_labels < np.array(paired.NUM_CLASSES)).all()
  for t, k in enumerate(paired.NUM_CLASSES):  # every class of every task occurs
    assert len(np.unique(many_labels[:, t])) == k, paired.TASKS[t]


def test_diagnosis_prior_is_derm7pt_like(many_labels):
  freq = np.bincount(many_labels[:, 0], minlength=5) / len(many_labels)
  expected = dict(BCC=0.04, NEV=0.57, MEL=0.25, MISC=0.10, SK=0.04)
  for name, p in expected.items():
    assert abs(freq[paired.CLASS_NAMES["DIAG"].index(name)] - p) < 0.025, name


def test_melanoma_has_more_atypical_criteria(many_labels):
  diag = many_labels[:, 0]
  mel, nev = diag == 2, diag == 1
  for task, atypical in (("PN", 2), ("BWV", 1), ("STR", 2), ("DaG", 2), ("PIG", 2), ("RS", 1)):
    column = many_labels[:, paired.TASKS.index(task)]
    assert np.mean(column[mel] == atypical) > np.mean(column[nev] == atypical) + 0.1, task


# --- The information claim, measured with a probe that knows nothing of the renderer. ---


def _image_features(image: np.ndarray) -> np.ndarray:
  """Colour statistics, a coarse colour histogram and multi-scale edge energy."""
  x = image.astype(np.float64) / 255.0
  q = np.minimum((x * 4).astype(int), 3)
  histogram = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64)
  features = [x.mean((0, 1)), x.std((0, 1)), np.sqrt(histogram / q[..., 0].size)]
  grey = x.mean(-1)
  for step in (1, 2, 4):
    g = grey.reshape(grey.shape[0] // step, step, -1, step).mean((1, 3))
    laplacian = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
    features.append(np.percentile(laplacian, [50, 90, 99]))
  return np.concatenate(features)


def _ridge_predict(x_train, y_train, x_test, num_classes, l2=10.0):
  """One-vs-rest ridge regression with class-balanced sample weights; returns test argmax."""
  mean, std = x_train.mean(0), x_train.std(0) + 1e-8
  a = np.c_[(x_train - mean) / std, np.ones(len(x_train))]
  b = np.c_[(x_test - mean) / std, np.ones(len(x_test))]
  counts = np.bincount(y_train, minlength=num_classes)
  w = (len(y_train) / (num_classes * np.maximum(counts, 1)))[y_train][:, None]
  targets = np.eye(num_classes)[y_train]
  weights = np.linalg.solve(a.T @ (a * w) + l2 * np.eye(a.shape[1]), a.T @ (targets * w))
  return (b @ weights).argmax(1)


def _balanced_accuracy(y, prediction, num_classes):
  return np.mean([np.mean(prediction[y == c] == c) for c in range(num_classes) if (y == c).any()])


@pytest.fixture(scope="module")
def probe_accuracies():
  """Balanced accuracy per task and modality: 400 training cases, 300 held-out cases."""
  cases = [synthetic.generate_case(0, 0, i) for i in range(700)]
  labels = np.stack([c[0] for c in cases])
  accuracies = {}
  for m, modality in enumerate(paired.MODALITIES, start=1):
    x = np.stack([_image_features(c[m]) for c in cases])
    accuracies[modality] = np.array([
        _balanced_accuracy(labels[400:, t], _ridge_predict(x[:400], labels[:400, t], x[400:], k), k)
        for t, k in enumerate(paired.NUM_CLASSES)])
    print(modality, dict(zip(paired.TASKS, accuracies[modality].round(3))),
          "mean", accuracies[modality].mean().round(3))
  return accuracies


def test_superior_carries_more_label_information(probe_accuracies):
  inferior, superior = probe_accuracies["inferior"], probe_accuracies["superior"]
  assert superior.mean() > inferior.mean() + 0.1
  assert superior[0] > inferior[0] + 0.05  # DIAG
  # The fine criteria (network, streaks, dots) are where the clinical view loses most.
  for task in ("PN", "STR", "DaG"):
    t = paired.TASKS.index(task)
    assert superior[t] > inferior[t] + 0.1, task


def test_inferior_is_better_than_chance(probe_accuracies):
  chance = np.mean([1 / k for k in paired.NUM_CLASSES])
  assert probe_accuracies["inferior"].mean() > chance + 0.1
  assert probe_accuracies["inferior"][0] > 0.2 + 0.1  # DIAG: 5 classes


# --- The TFDS builder. ---


def test_default_config_is_what_the_trainer_prepares(tmp_path):
  builder = synthetic.SyntheticPaired(data_dir=os.fspath(tmp_path))
  assert builder.name == "synthetic_paired" and str(builder.version) == "1.0.0"
  config = builder.builder_config
  assert (config.name, config.image_size, config.num_examples) == ("default", 96, (800, 200, 400))
  assert builders.DATASETS["synthetic_paired"] is synthetic.SyntheticPaired


def test_prepare_and_read_back_through_data_source(tmp_path):
  builder = builders.prepare("synthetic_paired", data_dir=tmp_path,
                             num_examples=(6, 2, 3), image_size=32)
  name = f"{builder.name}/{builder.builder_config.name}:{builder.version}"
  seen = set()
  for split_id, (split, size) in enumerate(zip(synthetic.SPLITS, (6, 2, 3))):
    source = tfds.data_source(name, split=split, data_dir=os.fspath(tmp_path))
    assert len(source) == size
    for record in source:
      case_id = record["case_id"].decode()
      index = int(case_id.rsplit("-", 1)[1])
      labels, inferior, superior = synthetic.generate_case(0, split_id, index, 32)
      np.testing.assert_array_equal(record["labels"], labels)
      for key, expected in (("image_inferior", inferior), ("image_superior", superior)):
        image = np.asarray(Image.open(io.BytesIO(record[key])))
        assert image.shape == (32, 32, 3)
        np.testing.assert_array_equal(image, expected)
      seen.add(case_id)
  assert len(seen) == 11


def test_parallel_prepare_generates_once(tmp_path):
  """Two processes ask for the same dataset at once: both succeed, one generates it."""
  code = ("from medguide_jax.data import builders; import sys; "
          "b = builders.prepare('synthetic_paired', data_dir=sys.argv[1], num_examples=(30, 2, 2),"
          " image_size=32); print(b.info.splits['train'].num_examples)")
  runs = [subprocess.Popen([sys.executable, "-c", code, os.fspath(tmp_path)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for _ in range(2)]
  outputs = [run.communicate(timeout=helpers.HANG_GUARD_S) for run in runs]
  for run, (out, err) in zip(runs, outputs):
    assert run.returncode == 0, err
    assert out.strip().endswith("30")
  # TFDS announces each generation with this line; the waiting process must reuse the files.
  generated = sum("Downloading and preparing" in out + err for out, err in outputs)
  assert generated == 1, outputs
