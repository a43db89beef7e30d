"""missing_modality: the missing-rate sweep against hand computations, and the task's losses."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from medguide_jax.evaluation import evaluators, metrics as metrics_lib, missing_rate as mr
from tests import helpers


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
  assert test["zero_fill/missing_0.0/accuracy_at_youden"] == pytest.approx(
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


# --------------------------------------------------------------------------- end to end
TINY = ["--config.data.name=synthetic_bags:tiny", "--config.data.image_size=16",
        "--config.model.encoder_kwargs.width=4"]


def _stage_args(stage: str, steps: int = 6) -> list[str]:
  return [f"--config.stages.{stage}.{k}={v}" for k, v in (
      ("num_steps", steps), ("num_epochs", 0), ("batch_size", 8), ("eval_every", 3), ("log_every", 1),
      ("checkpoint_every", steps), ("bootstrap", 20), ("evals.missing_rate.masks", 2),
      ("stop_when", "eval/train/bag/auc>0.999"))]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """multimodal, wsi_only and bd on the tiny synthetic bags (a run check, not a result)."""
  workdir = tmp_path_factory.mktemp("mm")
  stages = ("multimodal", "wsi_only", "bd")
  args = TINY + [a for s in stages for a in _stage_args(s)]
  proc = helpers.run_main(workdir, args, config_file="configs/missing_modality.py",
                          config_arg=f"smoke,stages={'+'.join(stages)}")
  return workdir, proc


def test_the_method_writes_one_row_per_stage_and_policy_with_every_rate(tiny_run):
  workdir, proc = tiny_run
  results = json.loads((workdir / "results.json").read_text())
  rows = {r["model"]: r for r in results["table"]}
  assert set(rows) == {"multimodal/zero_fill", "multimodal/mean_fill", "wsi_only", "bd"}
  for row in rows.values():
    assert list(row)[1] == "missing_0.8/auc"  # the headline first
    for r in mr.RATES:
      assert 0 <= row[f"{mr.rate_key(r)}/auc"] <= 1
      lo, hi = row[f"{mr.rate_key(r)}/auc_ci95"]
      assert lo <= hi
  # wsi_only never sees clinical data: every rate gives the same patients' probabilities
  assert len({rows["wsi_only"][f"{mr.rate_key(r)}/auc"] for r in mr.RATES}) == 1
  # at rate 0 nobody misses data: the two fill policies are the same model on the same input
  assert (rows["multimodal/zero_fill"]["missing_0.0/auc"]
          == rows["multimodal/mean_fill"]["missing_0.0/auc"])
  assert "| bd |" in proc.stdout and "| multimodal/zero_fill |" in proc.stdout
  lines = helpers.metrics_lines(workdir / "bd" / "metrics.jsonl")
  assert {"train/ce_m", "train/ce_s", "train/kd_m2s", "train/feat_s2m"} <= set(lines[0])
  assert "eval/validation/route/missing_0.0/auc" in lines[-1]
  assert "eval/train/bag/auc" in lines[-1]  # BALNMP's stop_when reads it


def test_predictions_and_the_plot(tiny_run):
  workdir, _ = tiny_run
  with open(workdir / "bd" / "predictions.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 24 and set(rows[0]) == {"patient", "label", "probs", "probs_absent/route"}
  assert len({r["patient"] for r in rows}) == 24
  with Image.open(workdir / "auc_vs_missing_rate.png") as im:
    assert im.size[0] > 300
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"images": 0})
  events.Reload()
  assert "auc_vs_missing_rate" in events.Tags()["images"]


@pytest.mark.parametrize("override,message", [
    ("--config.stages.bd.evals.missing_rate.rates=0,1.5", "rates [1.5] outside [0, 1]"),
    ("--config.data.clinical_names=('age',)", "data.clinical_names=['age'] but dataset"),
    ("--config.mm.inference=both", "mm.inference='both'"),
])
def test_bad_method_settings_exit_2_before_anything_is_written(tmp_path, override, message):
  proc = helpers.run_main(tmp_path / "w", TINY + [override], config_file="configs/missing_modality.py",
                          config_arg="smoke,stages=bd", check=False)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_feature_mode_trains_on_per_slide_features_and_checks_their_encoder(tmp_path):
  data_dir = tmp_path / "data"
  env = {"MEDGUIDE_DATA_DIR": str(data_dir)}
  subprocess.run([sys.executable, "-m", "data_prep.features", "--dataset=synthetic_bags:tiny",
                  "--encoder=random:tiny_cnn", "--tag=tiny_random", "--batch_size=32"],
                 cwd=helpers.ROOT, env={**os.environ, **env}, check=True, capture_output=True,
                 timeout=helpers.HANG_GUARD_S)
  args = ["--config.data.name=bag_features:tiny_random", "--config.data.max_tiles=64",
          *_stage_args("bd")]
  helpers.run_main(tmp_path / "w", args, env=env, config_file="configs/missing_modality.py",
                   config_arg="smoke,features,stages=bd")
  rows = json.loads((tmp_path / "w" / "results.json").read_text())["table"]
  assert [r["model"] for r in rows] == ["bd"] and 0 <= rows[0]["missing_0.8/auc"] <= 1
  proc = helpers.run_main(tmp_path / "w2", args + ["--config.data.encoder=random:resnet18"],
                          env=env, config_file="configs/missing_modality.py",
                          config_arg="smoke,features,stages=bd", check=False)
  assert proc.returncode == 2
  assert "data.encoder='random:resnet18' but the features" in proc.stderr
  assert "made by 'random:tiny_cnn'" in proc.stderr and not (tmp_path / "w2").exists()
