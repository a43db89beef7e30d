"""synthetic_cxr: deterministic 'cxr_reports' records, the report grammar, the designed effect.

The probes here are independent of the generator: they see only what a model sees (the
records' PNG pixels and report texts; the text-side targets come from the report grammar
`parse_labels`, whose round trip is tested below), never the latent anatomy. Run as a script
to re-measure the module docstring's figures:

    python tests/test_synthetic_cxr.py --seeds 0-4
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Mapping, Sequence

import numpy as np
from PIL import Image
import pytest
from scipy import optimize

from medguide_jax.data import builders
from medguide_jax.data import images
from medguide_jax.data import synthetic_cxr as sc
from medguide_jax.evaluation import metrics

# A small config that still shows the designed effect (records generated in memory).
PROBE_STUDIES = (900, 0, 600)
PROBE_SIZE = 64
LABELS = sc.LABEL_NAMES


# --------------------------------------------------------------------------- reading records
def decode_png(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)))


def read_records(records: Sequence[Mapping]) -> dict:
  """Pixels (float [N, S, S] in 0..1), texts, the impression's labels by the grammar, region
  labels and masks of records."""
  out = {"image": [], "findings": [], "impression": [], "target": [], "patient": []}
  for r in records:
    out["image"].append(decode_png(r["image"]).astype(np.float64) / 255)
    out["findings"].append(images.text(r["findings"]))
    out["impression"].append(images.text(r["impression"]))
    out["target"].append(sc.label_vector(sc.parse_labels(out["impression"][-1])))
    out["patient"].append(images.text(r["patient"]))
  out["image"] = np.stack(out["image"])
  out["target"] = np.stack(out["target"])
  return out


def generated_records(seed: int, num_studies: Sequence[int], size: int) -> dict:
  """{split: records} of a config, generated in memory exactly as the builder writes them."""
  return {split: [sc.study_record(sc.sample_study(seed, split_id, i), size)[1]
                  for i in range(n)]
          for split_id, (split, n) in enumerate(zip(sc.SPLITS, num_studies))}


# --------------------------------------------------------------------------- linear probes
def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0):
  """L2-penalised logistic regression (L-BFGS) on standardised features, one independent
  probe per column of y ([N] or [N, L] 0/1, fitted jointly: the loss is their sum):
  returns predict(x) -> P(y = 1), shaped like y."""
  y = np.asarray(y, np.float64)
  cols = y.reshape(len(y), -1)
  mean, std = x.mean(0), x.std(0) + 1e-8
  a = np.c_[(x - mean) / std, np.ones(len(x))]
  penalty = np.r_[np.full(x.shape[1], l2), 0.0][:, None]
  shape = (a.shape[1], cols.shape[1])

  def loss(flat):
    w = flat.reshape(shape)
    z = a @ w
    value = np.sum(np.logaddexp(0, z) - cols * z) + 0.5 * np.sum(penalty * w * w)
    grad = a.T @ (1 / (1 + np.exp(-z)) - cols) + penalty * w
    return value, grad.reshape(-1)

  w = optimize.minimize(loss, np.zeros(shape).reshape(-1), jac=True, method="L-BFGS-B",
                        options={"maxiter": 500}).x.reshape(shape)
  squeeze = y.ndim == 1
  def predict(z):
    p = 1 / (1 + np.exp(-(np.c_[(z - mean) / std, np.ones(len(z))] @ w)))
    return p[:, 0] if squeeze else p
  return predict


def bag_of_words(texts: Sequence[str], vocabulary: Sequence[str] | None = None):
  """Binary unigram + bigram features (vocabulary: those seen twice in `texts` if None)."""
  grams = []
  for t in texts:
    words = re.findall(r"[a-z]+", t.lower())
    grams.append(set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])})
  if vocabulary is None:
    counts: dict[str, int] = {}
    for g in grams:
      for w in g:
        counts[w] = counts.get(w, 0) + 1
    vocabulary = sorted(w for w, c in counts.items() if c >= 2)
  index = {w: i for i, w in enumerate(vocabulary)}
  x = np.zeros((len(texts), len(vocabulary)))
  for row, g in enumerate(grams):
    for w in g:
      if w in index:
        x[row, index[w]] = 1
  return x, vocabulary


def pixel_features(image: np.ndarray, grid: int = 16) -> np.ndarray:
  """Block means on a grid x grid lattice, plus each block's mirror difference (left minus
  right half of the image): float [N, 2 grid^2]."""
  n, s, _ = image.shape
  b = s // grid
  blocks = image[:, :b * grid, :b * grid].reshape(n, grid, b, grid, b).mean((2, 4))
  return np.c_[blocks.reshape(n, -1), (blocks - blocks[:, :, ::-1]).reshape(n, -1)]


def per_label_auc(target: np.ndarray, score: np.ndarray) -> np.ndarray:
  out = np.full(target.shape[1], np.nan)
  for j in range(target.shape[1]):
    if 0 < target[:, j].sum() < len(target):
      out[j] = metrics.roc_auc_ovr(target[:, j].astype(np.int64), score[:, j])
  return out


def impression_probes(train: Mapping, test: Mapping, l2_text: float = 1.0,
                      l2_image: float = 30.0) -> dict:
  """(a): the impression's labels predicted from the findings text (bag of words) and from
  the pixels (block means and mirror differences), one logistic probe per label; test
  per-label AUC, macro-AUC and exact match of the label set."""
  xt_train, vocab = bag_of_words(train["findings"])
  xt_test, _ = bag_of_words(test["findings"], vocab)
  xi_train, xi_test = pixel_features(train["image"]), pixel_features(test["image"])
  out = {}
  for name, (a, b, l2) in {"text": (xt_train, xt_test, l2_text),
                           "image": (xi_train, xi_test, l2_image)}.items():
    score = fit_logistic(a, train["target"], l2)(b)
    auc = per_label_auc(test["target"], score)
    out[name] = {"macro_auc": float(np.nanmean(auc)), "auc": auc,
                 "exact": float(np.mean(((score > 0.5) == (test["target"] > 0.5)).all(1)))}
  return out


# --------------------------------------------------------------------------- (b) localisation
# Six fixed cells of the image (relative units), the patient's right lung on the image's left:
# upper / middle / lower thirds of a typical lung field, for each side.
CELL_X = {"right": (0.14, 0.44), "left": (0.56, 0.86)}
CELL_Y = {"upper": (0.12, 0.31), "middle": (0.31, 0.50), "lower": (0.50, 0.70)}
CELLS = [(s, z) for s in sc.SIDES for z in sc.ZONES]


def cell_statistics(image: np.ndarray) -> np.ndarray:
  """float [N, 6, 4]: mean, 75th and 90th percentile and sd of each cell's pixels."""
  n, s, _ = image.shape
  out = np.zeros((n, len(CELLS), 4))
  for c, (side, zone) in enumerate(CELLS):
    (x0, x1), (y0, y1) = CELL_X[side], CELL_Y[zone]
    px = image[:, int(y0 * s):int(y1 * s), int(x0 * s):int(x1 * s)].reshape(n, -1)
    out[:, c] = np.c_[px.mean(1), np.percentile(px, 75, 1), np.percentile(px, 90, 1),
                      px.std(1)]
  return out


def _cell_inputs(stats: np.ndarray, whole: bool = False) -> np.ndarray:
  """[N * 6, F] features of each (image, cell): the cell's statistics and their difference
  from the mirror cell (same zone, other side), plus the cell's one-hot; `whole`: the
  whole-image statistics (the same for every cell) instead of the cell's own."""
  n = len(stats)
  mirror = stats[:, [(c + 3) % 6 for c in range(6)]]
  own = np.c_[stats.reshape(n * 6, -1), (stats - mirror).reshape(n * 6, -1)]
  if whole:
    own = np.repeat(np.c_[stats.mean(1), stats.std(1)], 6, axis=0)
  return np.c_[own, np.tile(np.eye(6), (n, 1))]


def named_cells(texts: Sequence[str]) -> np.ndarray:
  """[N, 6] 0/1: the opacity cells (side x zone) the FINDINGS words name."""
  return np.stack([[sc.opacity_label(s, z) in sc.parse_labels(t) for s, z in CELLS]
                   for t in texts]).astype(np.float64)


def localisation_probes(train: Mapping, test: Mapping, seed: int = 0) -> dict:
  """(b): do the location words of the findings point at local image signal? On studies
  whose findings name an opacity, a (cell, image) probe trained with the NAMED cells as
  targets; top-1 localisation accuracy (argmax cell == the one named) on test studies naming
  exactly one, and the AUC of named vs other cells. Controls: the same probe on whole-image
  statistics (only the cell prior), and trained on shuffled words (each study given another
  study's location words)."""
  named_train, named_test = named_cells(train["findings"]), named_cells(test["findings"])
  keep_train = named_train.sum(1) > 0
  keep_test = named_test.sum(1) == 1
  st_train = cell_statistics(train["image"][keep_train])
  st_test = cell_statistics(test["image"][keep_test])
  y_train, y_test = named_train[keep_train], named_test[keep_test]
  truth = y_test.argmax(1)
  shuffled = y_train[np.random.default_rng(seed).permutation(len(y_train))]
  out = {"studies_train": int(keep_train.sum()), "studies_test": int(keep_test.sum()),
         "chance": 1 / 6}
  for name, whole, target in (("named", False, y_train), ("whole_image", True, y_train),
                              ("shuffled_words", False, shuffled)):
    predict = fit_logistic(_cell_inputs(st_train, whole), target.reshape(-1), 1.0)
    score = predict(_cell_inputs(st_test, whole)).reshape(-1, 6)
    out[name] = float(np.mean(score.argmax(1) == truth))
    out[f"{name}_auc"] = metrics.roc_auc_ovr(y_test.reshape(-1).astype(np.int64),
                                             score.reshape(-1))
  return out


# --------------------------------------------------------------------------- fixtures
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("MEDGUIDE_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")
IU_DIR = os.path.join(SHARED, sc.IU_FOLDER)
needs_iu = pytest.mark.skipif(
    not os.path.isfile(os.path.join(IU_DIR, sc.IU_REPORTS_CSV)),
    reason=f"shared IU X-ray reports not found at {IU_DIR} (set MEDGUIDE_SHARED_DATA)")


@pytest.fixture(scope="module")
def probe_data():
  records = generated_records(0, PROBE_STUDIES, PROBE_SIZE)
  return read_records(records["train"]), read_records(records["test"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("synthetic_cxr")
  builder = builders.prepare("synthetic_cxr:tiny", data_dir=data_dir)
  return builder, {s: list(builder.as_data_source(split=s)) for s in sc.SPLITS}


# --------------------------------------------------------------------------- generator
def test_a_study_depends_only_on_seed_split_and_index():
  first = sc.sample_study(0, 1, 7)
  for i in (3, 8, 2):  # other studies in between must not matter
    sc.sample_study(0, 1, i)
  second = sc.sample_study(0, 1, 7)
  assert first == second
  key_a, a = sc.study_record(first, 64)
  key_b, b = sc.study_record(second, 64)
  assert key_a == key_b == f"{first.name}/pa"
  for field in ("image", "findings", "impression", "id", "patient"):
    assert a[field] == b[field], field
  assert list(a["region_masks"]) == list(b["region_masks"])
  np.testing.assert_array_equal(a["region_boxes"], b["region_boxes"])
  for other in ((0, 1, 8), (0, 2, 7), (1, 1, 7)):
    assert sc.sample_study(*other).anatomy != first.anatomy, other


def test_prevalences_and_normal_fraction():
  studies = [sc.sample_study(0, 0, i) for i in range(3000)]
  counts = sc.label_counts(studies)
  assert 0.3 < counts["normal"] / 3000 < 0.42           # 'about 30-40% normal'
  for name in sc.LABEL_NAMES:
    assert counts[name] >= 0.01 * 3000, name            # every label is learnable
  for s in studies[:200]:
    assert s.normal == (not s.labels) and len(s.findings) == len(
        [f for f in s.findings if f.label in s.labels])


def test_images_look_like_radiographs():
  """Dark lung fields, a bright mediastinum and abdomen; any size >= 64 draws the same chest."""
  study = sc.sample_study(0, 0, 0)
  big, _ = sc.render(study, 128)
  small, _ = sc.render(study, 64)
  assert big.dtype == np.uint8 and big.shape == (128, 128) and small.shape == (64, 64)
  lungs = np.r_[big[40:70, 25:50].ravel(), big[40:70, 80:105].ravel()].mean()
  mediastinum = big[20:50, 60:68].mean()
  abdomen = big[115:125, 40:90].mean()
  assert lungs + 40 < mediastinum and lungs + 40 < abdomen, (lungs, mediastinum, abdomen)
  down = np.asarray(Image.fromarray(big).resize((64, 64), Image.BOX), np.float64)
  assert np.corrcoef(down.ravel(), small.astype(np.float64).ravel())[0, 1] > 0.9
  with pytest.raises(ValueError, match="image_size"):
    sc.render(study, 32)


def test_masks_boxes_and_words_agree():
  """Every finding has a non-empty mask whose box is its bounding box, on the side and in
  the zone its label and the report's words name (the patient's right = image LEFT)."""
  seen = set()
  for index in range(400):
    study = sc.sample_study(0, 0, index)
    _, record = sc.study_record(study, 64)
    labels = sc.label_set(record["labels"])
    assert labels == sc.parse_labels(images.text(record["findings"])) == study.labels
    assert {LABELS[i] for i in record["region_labels"]} == labels
    assert len(record["region_masks"]) == len(study.findings)
    for finding, label, box, png in zip(study.findings, record["region_labels"],
                                        record["region_boxes"], record["region_masks"]):
      mask = decode_png(png)
      assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
      rows, cols = np.nonzero(mask)
      assert len(rows), (study.name, finding.kind)
      np.testing.assert_array_equal(box, [cols.min(), rows.min(), cols.max() + 1,
                                          rows.max() + 1])
      name = LABELS[label]
      seen.add(name)
      if "_right" in name:
        assert cols.max() < 32, (study.name, name)      # image left half
      if "_left" in name:
        assert cols.min() >= 32, (study.name, name)
      y = rows.mean() / 64
      an = study.anatomy
      if name.startswith("opacity_"):
        k = sc.SIDES.index(finding.side)
        bounds = (-1.0,) + an.zone_bounds(k) + (2.0,)
        z = sc.ZONES.index(finding.zone)
        inside = (rows + 0.5) / 64
        assert np.all((inside > bounds[z] - 1.5 / 64) & (inside < bounds[z + 1] + 1.5 / 64))
        assert {"upper": y < 0.4, "middle": 0.25 < y < 0.6, "lower": y > 0.42}[finding.zone]
      if name.startswith("effusion_"):
        assert y > 0.55
      if name.startswith("pneumothorax_"):
        assert y < 0.6
      if name == "cardiomegaly":
        assert (box[2] - box[0]) / 64 > 0.5 * (an.width[0] + an.width[1]) - 2 / 64
  assert seen == set(LABELS)


def test_bad_options_name_what_is_wrong(tmp_path):
  with pytest.raises(ValueError, match="num_studies"):
    sc.SyntheticCxr(data_dir=os.fspath(tmp_path), num_studies=(4, 4))
  with pytest.raises(ValueError, match="num_studies"):
    sc.SyntheticCxr(data_dir=os.fspath(tmp_path), num_studies=(0, 4, 4))
  with pytest.raises(ValueError, match="image_size"):
    sc.SyntheticCxr(data_dir=os.fspath(tmp_path), image_size=32)
  with pytest.raises(ValueError, match="num_studies does not apply"):
    sc.SyntheticCxr(data_dir=os.fspath(tmp_path), tag="iu_text", num_studies=(4, 4, 4))
  with pytest.raises(ValueError, match="unknown"):
    sc.SyntheticCxr(data_dir=os.fspath(tmp_path), tag="huge")


# --------------------------------------------------------------------------- the grammar
def test_grammar_recovers_every_generated_report_exactly():
  for seed in (0, 1):
    for split_id in range(3):
      for index in range(1000):
        study = sc.sample_study(seed, split_id, index)
        for text in (study.findings_text, study.impression_text):
          assert sc.parse_labels(text) == study.labels, (sorted(study.labels), text)
        if study.normal:
          assert sc.parse_labels(study.impression_text) == sc.NORMAL


@pytest.mark.parametrize("text, labels", [
    ("No acute cardiopulmonary process.", set()),
    ("The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.", set()),
    ("No focal consolidation, pleural effusion, or pneumothorax.", set()),
    ("The heart is not enlarged. No lines or tubes.", set()),
    ("Right lower lobe opacity, concerning for pneumonia.", {"opacity_right_lower"}),
    ("Bibasilar opacities.", {"opacity_right_lower", "opacity_left_lower"}),
    ("Opacities in the right upper and left lower lobes.",
     {"opacity_right_upper", "opacity_left_lower"}),
    ("Patchy opacity in the lingula without effusion.", {"opacity_left_middle"}),
    ("Right lower lobe opacity and small left pleural effusion.",
     {"opacity_right_lower", "effusion_left"}),
    ("There is no pneumothorax, but a small right effusion is seen.", {"effusion_right"}),
    ("A pleural line at the left apex without lung markings beyond it, consistent with a "
     "pneumothorax.", {"pneumothorax_left"}),
    ("Blunting of both costophrenic angles.", {"effusion_right", "effusion_left"}),
    ("Moderate cardiomegaly. Right IJ central line in the SVC.",
     {"cardiomegaly", "support_devices"}),
    ("Opacity in the lung.", set()),  # no side or zone: not a label
])
def test_grammar_on_handwritten_sentences(text, labels):
  assert sc.parse_labels(text) == frozenset(labels)


def test_grammar_scores_generated_impressions_with_clinical_accuracy():
  """Part 2's use: labels parsed from an impression, scored against the study's labels."""
  from medguide_jax.evaluation import text_metrics
  studies = [sc.sample_study(0, 2, i) for i in range(300)]
  truth = [s.labels for s in studies]
  perfect = text_metrics.clinical_accuracy([sc.parse_labels(s.impression_text)
                                            for s in studies], truth, LABELS)
  assert perfect["macro/f1"] == 1.0
  normal = text_metrics.clinical_accuracy([sc.parse_labels("No acute cardiopulmonary "
                                                           "process.")] * 300, truth, LABELS)
  assert normal["macro/f1"] == 0.0


def test_label_vectors_round_trip():
  labels = {"opacity_left_middle", "cardiomegaly"}
  v = sc.label_vector(labels)
  assert v.dtype == np.float32 and v.shape == (len(LABELS),)
  assert sc.label_set(v) == labels
  with pytest.raises(ValueError, match="unknown labels"):
    sc.label_vector({"edema"})


# --------------------------------------------------------------------------- the design
def test_findings_predict_the_impression_better_than_pixels(probe_data):
  """(a): a bag-of-words probe on FINDINGS recovers the impression's labels near perfectly;
  a pixel probe clearly worse, but well above chance."""
  train, test = probe_data
  a = impression_probes(train, test)
  # When written (seed 0): text macro-AUC 0.999, exact 0.962; image 0.885, exact 0.552.
  # Over seeds 0-9 of this config: text macro-AUC >= 0.997, exact >= 0.937; image macro-AUC
  # in [0.875, 0.903]; text - image >= 0.097 (macro-AUC) and >= 0.33 (exact match).
  assert a["text"]["macro_auc"] > 0.98 and a["text"]["exact"] > 0.85, a
  assert 0.75 < a["image"]["macro_auc"] < a["text"]["macro_auc"] - 0.05, a
  assert a["image"]["exact"] < a["text"]["exact"] - 0.2, a


def test_location_words_point_at_local_image_signal(probe_data):
  """(b): a cell probe trained with the cells the findings' words name localises test
  opacities to the named cell; the same probe on whole-image statistics, or trained on
  shuffled words, stays near the cell prior."""
  train, test = probe_data
  b = localisation_probes(train, test)
  # When written (seed 0; 158 test studies): named 0.557 vs whole-image 0.234, shuffled
  # words 0.323 (chance 1/6); AUC 0.81 vs 0.60 / 0.65. Over seeds 0-9 of this config: named
  # >= 0.504, named - max(controls) >= 0.234, AUC margin >= 0.159, >= 119 test studies.
  assert b["studies_test"] >= 80, b
  assert b["named"] > 0.45, b
  assert b["named"] > max(b["whole_image"], b["shuffled_words"]) + 0.12, b
  assert b["named_auc"] > max(b["whole_image_auc"], b["shuffled_words_auc"]) + 0.1, b


# --------------------------------------------------------------------------- the builder
def test_default_config_is_the_documented_one(tmp_path):
  builder = sc.SyntheticCxr(data_dir=os.fspath(tmp_path))
  config = builder.builder_config
  assert builder.name == "synthetic_cxr" and str(builder.version) == "1.0.0"
  assert (config.name, config.image_size, config.num_studies, config.seed, config.source) == (
      "default", 128, (3000, 400, 400), 0, "synthetic")
  assert builders.DATASETS["synthetic_cxr"] is sc.SyntheticCxr
  other = sc.SyntheticCxr(data_dir=os.fspath(tmp_path), image_size=96, seed=3)
  assert other.builder_config.name == "s96_n3000_400_400_seed3"
  assert other.data_path != builder.data_path
  tiny_big = sc.SyntheticCxr(data_dir=os.fspath(tmp_path), tag="tiny", image_size=96)
  assert tiny_big.builder_config.name == "s96_n64_16_16_seed0"
  iu = sc.SyntheticCxr(data_dir=os.fspath(tmp_path), tag="iu_text", image_size=64)
  assert (iu.builder_config.name, iu.builder_config.source) == ("iu_text_s64_seed0", "iu_text")
  assert set(builders.builder_options(sc.SyntheticCxr)) == {"image_size", "num_studies", "seed"}


def test_tiny_builder_writes_valid_records_and_a_tokenizer(tiny):
  from medguide_jax.data import cxr
  from medguide_jax.data import tokenizer as tokenizer_lib
  builder, records = tiny
  meta = builder.info.metadata
  assert meta["label_names"] == list(LABELS) and meta["text_only"] is False
  assert meta["image_size"] == 64 and meta["source"] == "synthetic"
  tok = tokenizer_lib.ReportTokenizer.from_json(meta["tokenizer"])
  assert tok.sha256 == meta["tokenizer_sha256"]
  assert tok.tokens("right lower lobe opacity") == ["right", "lower", "lobe", "opacity"]
  splits = meta["summary"]["splits"]
  for split, n in zip(sc.SPLITS, (64, 16, 16)):
    assert builder.info.splits[split].num_examples == n == splits[split]["studies"]
    assert splits[split]["normal"] == sum(not r["labels"].any() for r in records[split])
  for r in records["train"][:20]:
    image = decode_png(r["image"])
    assert image.shape == (64, 64) and image.dtype == np.uint8
    assert images.text(r["view"]) == "PA"
    assert images.text(r["id"]) == images.text(r["study"]) + "/pa"
    assert r["labels"].shape == (len(LABELS),)
    assert sc.label_set(r["labels"]) == sc.parse_labels(images.text(r["impression"]))
    assert len(r["region_labels"]) == len(r["region_masks"]) == len(r["region_boxes"])
    example = cxr.report_example(r, None, image_size=32, tokenizer=tok)
    assert example["image"].shape == (32, 32, 1) and example["findings_mask"].any()


def test_splits_are_patient_level(tiny):
  _, records = tiny
  patients = {s: {images.text(r["patient"]) for r in records[s]} for s in sc.SPLITS}
  for s, n in zip(sc.SPLITS, (64, 16, 16)):
    assert len(patients[s]) == n, s
  for i, a in enumerate(sc.SPLITS):
    for b in sc.SPLITS[i + 1:]:
      assert not patients[a] & patients[b], (a, b)
  ids = [images.text(r["id"]) for s in sc.SPLITS for r in records[s]]
  assert len(set(ids)) == len(ids)


def test_a_written_study_regenerates_alone(tiny):
  _, records = tiny
  written = {images.text(r["id"]): r for r in records["validation"]}
  for index in (0, 5):
    key, record = sc.study_record(sc.sample_study(0, 1, index), 64)
    stored = written[key]
    assert stored["image"] == record["image"]   # identical PNG bytes
    assert list(stored["region_masks"]) == list(record["region_masks"])
    np.testing.assert_array_equal(stored["labels"], record["labels"])


# --------------------------------------------------------------------------- iu_text
def test_iu_tags_are_interpreted():
  assert sc.interpret_tag("normal") == []
  assert sc.interpret_tag("Opacity/lung/base/left") == [("opacity", "left", "lower", None)]
  assert sc.interpret_tag("Airspace Disease/lung/base/bilateral") == [
      ("opacity", "left", "lower", None), ("opacity", "right", "lower", None)]
  assert sc.interpret_tag("Opacity/lung/lingula") == [("opacity", "left", "middle", None)]
  assert sc.interpret_tag("Pneumonia/middle lobe/right") == [("opacity", "right", "middle",
                                                              None)]
  assert sc.interpret_tag("Pleural Effusion/right/small") == [("effusion", "right", "", "small")]
  assert sc.interpret_tag("Costophrenic Angle/left/blunted") == [("effusion", "left", "",
                                                                   "small")]
  assert sc.interpret_tag("Cardiomegaly/mild") == [("cardiomegaly", "", "", "mild")]
  assert sc.interpret_tag("Pneumothorax/apex/right/small") == [("pneumothorax", "right", "",
                                                                "small")]
  assert sc.interpret_tag("Catheters, Indwelling/left") == [("central_line", "left", "", None)]
  assert sc.interpret_tag("Tube, Inserted/trachea") == [("endotracheal_tube", "", "", None)]
  for ignored in ("Calcified Granuloma/lung/upper lobe/right", "Spine/degenerative",
                  "Opacity/lung/bilateral/interstitial/diffuse", "Opacity/ribs/left",
                  "Pleural Effusion", "No Indexing", "Pneumothorax"):
    assert sc.interpret_tag(ignored) is None, ignored


def test_iu_split_is_a_hash_of_the_uid():
  splits = [sc.iu_split(str(uid)) for uid in range(1, 4001)]
  assert splits == [sc.iu_split(str(uid)) for uid in range(1, 4001)]
  fractions = [splits.count(s) / len(splits) for s in sc.SPLITS]
  np.testing.assert_allclose(fractions, sc.IU_SPLIT_FRACTIONS, atol=0.03)


@needs_iu
def test_iu_text_builds_from_the_shared_folder(tmp_path):
  from medguide_jax.data import tokenizer as tokenizer_lib
  builder = builders.prepare("synthetic_cxr:iu_text", data_dir=tmp_path, image_size=64)
  meta = builder.info.metadata
  summary = meta["summary"]
  total = sum(builder.info.splits[s].num_examples for s in sc.SPLITS)
  assert total == sum(summary["splits"][s]["studies"] for s in sc.SPLITS) > 3000
  assert summary["left_out_lacking_a_section"] > 0
  tags = summary["tags"]
  assert tags["ignored_total"] == sum(tags["ignored"].values()) > 0
  assert tags["ignored"]["Spine/degenerative"] > 0 and "normal" in tags["drawn"]
  assert "Calcified Granuloma" in tags["ignored"]
  counts = summary["labels"]["train"]
  assert counts["cardiomegaly"] > 100 and counts["opacity_left_lower"] > 50
  tok = tokenizer_lib.ReportTokenizer.from_json(meta["tokenizer"])
  assert "[DEID]" in tok.tokens("Normal chest x- [DEID] .")
  by_uid = {}
  for r in builder.as_data_source(split="train"):
    by_uid[images.text(r["study"])] = r
    if len(by_uid) == 300:
      break
  rows = {f"iu_xray-{row['uid']}": row for row in sc.read_iu_reports(IU_DIR)}
  for study, r in by_uid.items():
    row = rows[study]
    assert images.text(r["findings"]) == " ".join(
        row["findings"].replace("XXXX", " [DEID] ").split())
    tags_here = [t.strip() for t in row["MeSH"].split(";") if t.strip()]
    expected = sc.iu_study(row["uid"], tags_here, "", "")[0].labels
    assert sc.label_set(r["labels"]) == expected
    if tags_here == ["normal"]:
      assert not r["labels"].any() and not len(r["region_labels"])


def test_iu_text_without_its_folder_is_a_usage_error(tmp_path, monkeypatch, capsys):
  from data_prep import build
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(builders.ManualDirError, match="indiana_reports.csv"):
    builders.prepare("synthetic_cxr:iu_text", data_dir=tmp_path / "data", manual_dir=empty)
  assert not (tmp_path / "data" / "synthetic_cxr" / "iu_text").exists()
  monkeypatch.setenv("MEDGUIDE_SHARED_DATA", os.fspath(tmp_path / "nowhere"))
  assert build.main(["synthetic_cxr:iu_text", f"--data_dir={tmp_path / 'data'}"]) == 2
  err = capsys.readouterr().err
  assert "indiana_reports.csv" in err and "--manual_dir" in err
  assert os.fspath(tmp_path / "nowhere") in err


# --------------------------------------------------------------------------- re-measuring
def _seeds(text: str) -> list[int]:
  if "-" in text:
    lo, hi = text.split("-")
    return list(range(int(lo), int(hi) + 1))
  return [int(s) for s in text.split(",")]


def _print_summary(rows: list[dict]) -> None:
  print(f"\n{len(rows)} seeds: mean, sd [min, max]")
  for key in rows[0]:
    v = np.array([r[key] for r in rows])
    print(f"  {key:24s} {v.mean():.3f} {v.std():.3f} [{v.min():.3f}, {v.max():.3f}]")


def main(argv: Sequence[str] | None = None) -> None:
  """Builds a config for each seed (default: the 'default' one, through the builder) and
  prints the probe figures over seeds; --config test uses this file's in-memory probe config
  (the one the tests assert on)."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,3,5")
  parser.add_argument("--config", default="default", choices=("default", "test"))
  parser.add_argument("--data_dir", default=None,
                      help="where to build (kept); default: a temporary folder, removed")
  args = parser.parse_args(argv)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="synthetic_cxr_probe_")
  rows, times = [], []
  for seed in _seeds(args.seeds):
    start = time.process_time()
    if args.config == "test":
      records = generated_records(seed, PROBE_STUDIES, PROBE_SIZE)
      train, test = read_records(records["train"]), read_records(records["test"])
    else:
      builder = builders.prepare("synthetic_cxr", data_dir=data_dir, seed=seed)
      times.append(time.process_time() - start)
      train = read_records(list(builder.as_data_source(split="train")))
      test = read_records(list(builder.as_data_source(split="test")))
    a, b = impression_probes(train, test), localisation_probes(train, test)
    row = {"text_macro_auc": a["text"]["macro_auc"], "text_exact": a["text"]["exact"],
           "image_macro_auc": a["image"]["macro_auc"], "image_exact": a["image"]["exact"],
           "gap_macro_auc": a["text"]["macro_auc"] - a["image"]["macro_auc"],
           "gap_exact": a["text"]["exact"] - a["image"]["exact"],
           **{f"image_auc_{n}": v for n, v in zip(LABELS, a["image"]["auc"])},
           **{f"loc_{k}": v for k, v in b.items() if k != "chance"}}
    row["loc_margin"] = b["named"] - max(b["whole_image"], b["shuffled_words"])
    rows.append(row)
    build = f" (build {times[-1]:.1f} s CPU)" if times else ""
    print(f"seed {seed}: " + " ".join(f"{k}={v:.3f}" for k, v in row.items()
                                      if not k.startswith("image_auc_")) + build, flush=True)
  _print_summary(rows)
  if times:
    print(f"build CPU time per seed: {np.mean(times):.1f} s")
  if not args.data_dir:
    shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
  main(sys.argv[1:])
