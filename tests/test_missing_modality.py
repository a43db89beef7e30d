"""missing_modality: the missing-rate sweep against hand computations, and the task's losses."""
from __future__ import annotations

import types

import numpy as np
import pytest

from medguide_jax.evaluation import evaluators, metrics as metrics_lib, missing_rate as mr


def test_masks_take_round_r_p_patients_and_depend_on_seed_mask_and_rate_only():
  m = mr.missing_masks(10, 0.4, 3, seed=7)
  assert m.shape == (3, 10) and (m.sum(1) == 4).all()
  np.testing.assert_array_equal(m, mr.missing_masks(10, 0.4, 3, seed=7))
  assert not np.array_equal(m[0], m[1])
  assert not mr.missing_masks(10, 0.0, 2, 0).any() and mr.missing_masks(10, 1.0, 2, 0).all()
  with pytest.raises(ValueError, match="outside"):
    mr.missing_masks(10, 1.5, 1, 0)


def test_threshold_metrics_and_youden_by_hand():
  y = np.array([0, 0, 0, 1, 1, 1])
  s = np.array([0.1, 0.4, 0.6, 0.35, 0.7, 0.9])
  m = mr.threshold_metrics(y, s, 0.5)  # predicted 1: 0.6, 0.7, 0.9 -> tp 2, fp 1, fn 1, tn 2
  assert m == {"accuracy": 4 / 6, "f1": 4 / 6, "sensitivity": 2 / 3, "specificity": 2 / 3}
  # J at 0.35: sens 1, spec 2/3 -> 2/3 (the best); at 0.7: 2/3, 1 -> 2/3 too: ties keep the
  # highest threshold, scanned first.
  assert mr.youden_threshold(y, s) == 0.7
  assert mr.youden_threshold(np.array([0, 1]), np.array([0.2, 0.8])) == 0.8


def _sweep(outputs, patients, policies=("zero_fill",), stage_dir="/nonexistent", **kw):
  task = types.SimpleNamespace(policies=policies, class_names=["N0", "N+"])
  ev = mr.MissingRate(task, name="missing_rate", **kw)
  source = [{"patient": p} for p in patients]
  def ctx(split):
    return evaluators.EvalContext(task=task, split=split, outputs=outputs, variables={},
                                  predict=None, source=source, stage_dir=str(stage_dir),
                                  bootstrap=0, seed=3)
  return ev, ctx


def test_patients_average_their_bags_and_rates_switch_to_the_absent_prediction(tmp_path):
  rng = np.random.default_rng(0)
  patients = [f"p{i // 3}" for i in range(30)]          # 10 patients, 3 bags each
  labels = np.repeat(rng.permutation([0] * 5 + [1] * 5), 3)
  present = rng.random(30)
  absent = rng.random(30)
  two = lambda p: np.stack([1 - p, p], 1)
  outputs = {"label": labels, "probs": two(present), "probs_absent/zero_fill": two(absent)}
  ev, ctx = _sweep(outputs, patients, rates="0,0.5,1", masks=4, stage_dir=tmp_path)
  out = ev.run(ctx("validation"))
  y = labels[::3]
  mean = lambda x: x.reshape(10, 3).mean(1)
  assert out["zero_fill/missing_0.0/auc"] == pytest.approx(metrics_lib.roc_auc_ovr(y, mean(present)))
  assert out["zero_fill/missing_1.0/auc"] == pytest.approx(metrics_lib.roc_auc_ovr(y, mean(absent)))
  masks = mr.missing_masks(10, 0.5, 4, seed=3)
  want = np.mean([metrics_lib.roc_auc_ovr(y, np.where(k, mean(absent), mean(present)))
                  for k in masks])
  assert out["zero_fill/missing_0.5/auc"] == pytest.approx(want)
  # the Youden threshold found on validation (complete data) is used on test
  threshold = mr.youden_threshold(y, mean(present))
  test = ev.run(ctx("test"))
  assert test["zero_fill/missing_0.0/accuracy@youden"] == pytest.approx(
      mr.threshold_metrics(y, mean(present), threshold)["accuracy"])
  assert set(out) == ev.keys()
  rows = (tmp_path / "predictions.csv").read_text().splitlines()
  assert rows[0] == "patient,label,probs,probs_absent/zero_fill" and len(rows) == 11
  assert rows[1].split(",")[:2] == ["p0", str(y[0])]


def test_bags_of_one_patient_must_share_a_label_and_bad_options_are_named():
  outputs = {"label": np.array([0, 1]), "probs": np.full((2, 2), 0.5),
             "probs_absent/zero_fill": np.full((2, 2), 0.5)}
  ev, ctx = _sweep(outputs, ["a", "a"])
  with pytest.raises(ValueError, match="patient 'a' has bags labelled 0 and 1"):
    ev.run(ctx("test"))
  task = types.SimpleNamespace(policies=("zero_fill",), class_names=["a", "b"])
  with pytest.raises(ValueError, match=r"rates \[1.2\] outside \[0, 1\]"):
    mr.MissingRate(task, name="m", rates="0,1.2")
  with pytest.raises(ValueError, match="aggregate='median'"):
    mr.MissingRate(task, name="m", aggregate="median")
