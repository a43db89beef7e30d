"""GLAM through the command line: every stage on tiny synthetic mammograms, evaluation-only
runs from a finished stage, the real NYU sample through the whole pipeline, bad input."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests import helpers

SHARED = os.environ.get("MEDGUIDE_SHARED_DATA", str(helpers.ROOT.parent / "shared" / "data"))
GLAM_SAMPLE = os.path.join(SHARED, "mammo_nyu_glam_sample")

# configs/glam.py:smoke cut to 192x128 images, tiny widths and a 32 px patch.
_TINY = ["--config.data.name=synthetic_mammo:tiny", "--config.model.global_widths=(4,4,8,8,8)",
         "--config.model.local_width=4", "--config.model.crop_shape=(32,32)"]
_PICTURES = [f"--config.stages.{s}.evals.pictures.count=2" for s in ("global_net", "local_net",
                                                                      "joint")]


def _stage_args(name: str, steps: int) -> list[str]:
  return [f"--config.stages.{name}.{k}={v}" for k, v in (
      ("num_steps", steps), ("batch_size", 16), ("eval_batch_size", 32), ("bootstrap", 20),
      ("log_every", 2), ("eval_every", max(steps // 2, 1)), ("checkpoint_every", steps))]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("glam")
  args = _TINY + _PICTURES
  for name in ("global_net", "local_net", "joint"):
    args += _stage_args(name, 4)
  proc = helpers.run_main(workdir, args, config_file="configs/glam.py", config_arg="smoke",
                          timeout=helpers.HANG_GUARD_S)
  return workdir, proc


def test_smoke_run_of_every_stage(smoke_run):
  workdir, proc = smoke_run
  results = json.loads((workdir / "results.json").read_text())
  assert [row["model"] for row in results["table"]] == ["global_net", "local_net", "joint"]
  for stage in ("global_net", "local_net", "joint"):
    m = results["stages"][stage]["metrics"]
    assert 0 <= m["test/auc/mean"] <= 1 and len(m["test/auc/mean_ci95"]) == 2
    for cls in ("benign", "malignant"):
      assert 0 <= m[f"test/dice_global/{cls}"] <= 1
      assert m[f"test/dice_images/{cls}"] > 0
  local = results["stages"]["local_net"]["metrics"]
  assert "test/dice_fused/benign" in local and "test/dice_gain/malignant" in local
  assert 0 <= local["test/auc_local/mean"] <= 1
  assert "test/dice_fused/benign" not in results["stages"]["global_net"]["metrics"]
  assert "| joint |" in proc.stdout
  # the local stage trains only the local module: the global module's parameters are global's
  lines = helpers.metrics_lines(workdir / "local_net" / "metrics.jsonl")
  assert "train/bce_local" in lines[-1] and "train/bce_global" not in lines[-1]
  joint = helpers.metrics_lines(workdir / "joint" / "metrics.jsonl")[-1]
  assert {"train/bce_local", "train/bce_global", "train/l1_global"} <= set(joint)


def test_local_stage_keeps_the_global_module_frozen(smoke_run):
  from medguide_jax import checkpointing  # pylint: disable=g-import-not-at-top
  workdir, _ = smoke_run
  glob = checkpointing.load_variables(workdir / "global_net" / "variables")
  local = checkpointing.load_variables(workdir / "local_net" / "variables")
  helpers.assert_trees_equal(glob["params"]["global_net"], local["params"]["global_net"])
  helpers.assert_trees_equal(glob["batch_stats"]["global_net"], local["batch_stats"]["global_net"])
  joint = checkpointing.load_variables(workdir / "joint" / "variables")
  moved = [not np.array_equal(a, b) for a, b in zip(
      jax_leaves(local["params"]["global_net"]), jax_leaves(joint["params"]["global_net"]))]
  assert any(moved)  # the joint stage trains it again


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


def test_predictions_csv_and_pictures(smoke_run):
  workdir, _ = smoke_run
  rows = list(csv.DictReader((workdir / "joint" / "predictions.csv").open()))
  assert len(rows) == 32
  assert list(rows[0])[:5] == ["image_index", "benign_pred", "malignant_pred", "benign_label",
                               "malignant_label"]
  assert all(0 <= float(r["benign_pred"]) <= 1 for r in rows)
  pictures = sorted((workdir / "joint" / "visualization").glob("*.png"))
  assert len(pictures) == 2
  with Image.open(pictures[0]) as im:
    assert im.mode == "RGB" and im.size[1] == 192 and im.size[0] > 4 * 128


def test_evaluation_only_run_from_a_finished_stage(smoke_run, tmp_path):
  workdir, _ = smoke_run
  args = _TINY + ["--config.stages.inference.eval_batch_size=32"]
  helpers.run_main(tmp_path, args, config_file="configs/glam.py",
                   config_arg=f"smoke,pretrained={workdir / 'joint'}")
  ours = json.loads((tmp_path / "results.json").read_text())["stages"]["inference"]["metrics"]
  theirs = json.loads((workdir / "results.json").read_text())["stages"]["joint"]["metrics"]
  for key in ("test/auc/mean", "test/dice_fused/benign", "test/dice_global/malignant"):
    np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, err_msg=key)


def test_bad_input_exits_2_naming_it(tmp_path):
  tiny = [a for a in _TINY if "crop_shape" not in a]
  run = lambda arg, *extra: helpers.run_main(tmp_path, tiny + list(extra), check=False,
                                             config_file="configs/glam.py", config_arg=arg)
  proc = run("smoke", "--config.model.crop_shape=(30,30)")
  assert proc.returncode == 2 and "crop_shape" in proc.stdout + proc.stderr
  proc = run("smoke,dataset=mnist")
  assert proc.returncode != 0 and "dataset='mnist'" in proc.stdout + proc.stderr
  assert not (tmp_path / "global_net").exists()


@pytest.mark.skipif(not os.path.isdir(GLAM_SAMPLE), reason="../shared/data is not present")
def test_the_real_nyu_sample_goes_through_the_whole_pipeline(smoke_run, tmp_path):
  """Preprocessing (x8 = 368x240), inference, Dice on the two views with benign masks, and
  pictures; the model is the tiny one trained on synthetic data (a pipeline check)."""
  workdir, _ = smoke_run
  args = [a for a in _TINY[1:] if "crop_shape" not in a] + ["--config.model.crop_shape=(64,64)",
                      f"--config.data.manual_dir={GLAM_SAMPLE}",
                      "--config.stages.inference.eval_batch_size=8",
                      "--config.stages.inference.evals.pictures.count=2"]
  helpers.run_main(tmp_path, args, config_file="configs/glam.py",
                   config_arg=f"smoke,dataset=nyu_glam_sample,pretrained={workdir / 'joint'}")
  m = json.loads((tmp_path / "results.json").read_text())["stages"]["inference"]["metrics"]
  assert m["test/dice_images/benign"] == 2 and m["test/dice_images/malignant"] == 0
  assert 0 <= m["test/dice_fused/benign"] <= 1 and np.isnan(m["test/dice_fused/malignant"])
  rows = list(csv.DictReader((tmp_path / "inference" / "predictions.csv").open()))
  assert sorted(r["image_index"] for r in rows) == ["0_L-CC", "0_L-MLO", "0_R-CC", "0_R-MLO"]
  labels = {r["image_index"]: r["benign_label"] for r in rows}
  assert labels == {"0_L-CC": "0", "0_L-MLO": "0", "0_R-CC": "1", "0_R-MLO": "1"}
  assert len(list((tmp_path / "inference" / "visualization").glob("*.png"))) == 2


def test_evaluation_only_run_from_a_weights_file(smoke_run, tmp_path):
  """weights=<.npz> (what glam_convert writes from the official checkpoints) loads every
  variable into the model and gives the stage's own metrics."""
  from medguide_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from medguide_jax.models import glam_convert  # pylint: disable=g-import-not-at-top
  workdir, _ = smoke_run
  weights = tmp_path / "joint.npz"
  glam_convert.save_variables(str(weights), checkpointing.load_variables(workdir / "joint" / "variables"))
  run_dir = tmp_path / "run"
  helpers.run_main(run_dir, _TINY + ["--config.stages.inference.eval_batch_size=32"],
                   config_file="configs/glam.py", config_arg=f"smoke,weights={weights}")
  ours = json.loads((run_dir / "results.json").read_text())["stages"]["inference"]["metrics"]
  theirs = json.loads((workdir / "results.json").read_text())["stages"]["joint"]["metrics"]
  for key in ("test/auc/mean", "test/dice_fused/benign", "test/dice_global/malignant"):
    np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, err_msg=key)
