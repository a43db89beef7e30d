"""Tests of the host-side metrics against hand examples and brute-force numpy."""
import math

import numpy as np
import pytest

from medguide_jax.evaluation import metrics as mt


def _pairwise_auc(positive, scores):
  """Brute force: P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg)."""
  pos, neg = scores[positive], scores[~positive]
  diff = pos[:, None] - neg[None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _tied_scores(rng, n, c):
  # Coarse rounding makes many exact ties, within and across classes.
  return np.round(rng.uniform(size=(n, c)), 1)


def test_balanced_accuracy_hand_example():
  labels = np.array([0, 0, 0, 0, 1, 1, 2])
  preds = np.array([0, 0, 1, 2, 1, 0, 2])
  # Recalls: class 0 2/4, class 1 1/2, class 2 1/1.
  assert mt.balanced_accuracy(labels, preds) == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_balanced_accuracy_ignores_classes_absent_from_labels():
  labels = np.array([0, 0, 2, 2])
  preds = np.array([0, 1, 2, 2])  # predicts class 1, which never occurs
  assert mt.balanced_accuracy(labels, preds) == pytest.approx((0.5 + 1.0) / 2)
  assert math.isnan(mt.balanced_accuracy(np.array([], int), np.array([], int)))


def test_binary_auc_matches_brute_force_with_ties():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, size=60)
  probs = _tied_scores(rng, 60, 2)
  expected = _pairwise_auc(labels == 1, probs[:, 1])
  assert mt.roc_auc_ovr(labels, probs) == pytest.approx(expected, abs=1e-12)
  assert mt.roc_auc_ovr(labels, probs[:, 1]) == pytest.approx(expected, abs=1e-12)  # 1-D


def test_binary_auc_hand_example():
  labels = np.array([0, 0, 1, 1])
  scores = np.array([0.1, 0.4, 0.35, 0.8])  # pairs: (.35>.1), (.35<.4), (.8>.1), (.8>.4)
  assert mt.roc_auc_ovr(labels, scores) == pytest.approx(0.75)
  all_tied = np.full(4, 0.5)
  assert mt.roc_auc_ovr(labels, all_tied) == pytest.approx(0.5)


def test_multiclass_macro_ovr_matches_brute_force():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, size=80)
  probs = _tied_scores(rng, 80, 3)
  expected = np.mean([_pairwise_auc(labels == c, probs[:, c]) for c in range(3)])
  assert mt.roc_auc_ovr(labels, probs) == pytest.approx(expected, abs=1e-12)


def test_auc_absent_and_degenerate_classes():
  rng = np.random.default_rng(2)
  probs = _tied_scores(rng, 30, 4)
  labels = rng.choice([0, 2], size=30)  # classes 1 and 3 absent: skipped
  expected = np.mean([_pairwise_auc(labels == c, probs[:, c]) for c in (0, 2)])
  assert mt.roc_auc_ovr(labels, probs) == pytest.approx(expected, abs=1e-12)
  assert math.isnan(mt.roc_auc_ovr(np.zeros(30, int), probs))  # one class only
  assert math.isnan(mt.roc_auc_ovr(np.ones(5, int), rng.uniform(size=(5, 2))))
  with pytest.raises(ValueError):
    mt.roc_auc_ovr(np.array([0, 5]), probs[:2])


def test_bootstrap_ci_contains_point_and_narrows():
  rng = np.random.default_rng(3)

  def data(n):
    labels = rng.integers(0, 2, size=n)
    scores = labels + rng.normal(scale=1.5, size=n)  # a weak but real signal
    return labels, scores

  small, large = data(60), data(600)
  lo_s, hi_s = mt.bootstrap_ci(mt.roc_auc_ovr, *small, num_samples=200, seed=0)
  lo_l, hi_l = mt.bootstrap_ci(mt.roc_auc_ovr, *large, num_samples=200, seed=0)
  assert lo_s <= mt.roc_auc_ovr(*small) <= hi_s
  assert lo_l <= mt.roc_auc_ovr(*large) <= hi_l
  assert hi_l - lo_l < hi_s - lo_s
  # Deterministic in the seed.
  assert mt.bootstrap_ci(mt.roc_auc_ovr, *small, num_samples=200, seed=0) == (lo_s, hi_s)


def test_bootstrap_ci_is_nan_safe():
  labels = np.array([0] * 9 + [1])  # many resamples draw no positive: AUC nan
  scores = np.linspace(0, 1, 10)
  lo, hi = mt.bootstrap_ci(mt.roc_auc_ovr, labels, scores, num_samples=100)
  assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
  lo, hi = mt.bootstrap_ci(lambda y: float("nan"), labels, num_samples=10)
  assert math.isnan(lo) and math.isnan(hi)
  with pytest.raises(ValueError):
    mt.bootstrap_ci(mt.roc_auc_ovr, labels, scores[:5])


def test_multitask_metrics():
  rng = np.random.default_rng(4)
  n, widths, names = 50, (5, 3, 2), ("DIAG", "PN", "BWV")
  labels = np.stack([rng.integers(0, c, size=n) for c in widths], axis=1)
  probs = [rng.dirichlet(np.ones(c), size=n) for c in widths]
  out = mt.multitask_classification_metrics(labels, probs, names)
  for t, name in enumerate(names):
    ba = mt.balanced_accuracy(labels[:, t], probs[t].argmax(1))
    assert out[f"{name}/balanced_accuracy"] == pytest.approx(ba)
    assert out[f"{name}/auc"] == pytest.approx(mt.roc_auc_ovr(labels[:, t], probs[t]))
  assert out["mean/auc"] == pytest.approx(np.mean([out[f"{t}/auc"] for t in names]))
  assert out["mean/balanced_accuracy"] == pytest.approx(
      np.mean([out[f"{t}/balanced_accuracy"] for t in names]))
  assert not any(k.endswith("_ci95") for k in out)

  with_ci = mt.multitask_classification_metrics(labels, probs, names, bootstrap=100, seed=1)
  assert set(with_ci) == set(out) | {f"{k}_ci95" for k in out}
  for key, value in out.items():
    lo, hi = with_ci[f"{key}_ci95"]
    assert lo <= hi and with_ci[key] == value
  # The mean-AUC interval resamples cases jointly across tasks: same as bootstrap_ci with
  # all tasks passed together (same seed, so the same index sets).
  joint = mt.bootstrap_ci(
      lambda y, *p: np.mean([mt.roc_auc_ovr(y[:, t], p[t]) for t in range(3)]),
      labels, *probs, num_samples=100, seed=1)
  np.testing.assert_allclose(with_ci["mean/auc_ci95"], joint, rtol=1e-12)


def test_multitask_metrics_bad_shapes():
  with pytest.raises(ValueError):
    mt.multitask_classification_metrics(np.zeros((4, 2), int), [np.ones((4, 2))], ("a", "b"))
