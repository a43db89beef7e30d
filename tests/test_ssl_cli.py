"""The ssl configs through the command line: a smoke run, bad input, the mixture source."""
from __future__ import annotations

import json
import os

import pytest

from medguide_jax import train
from medguide_jax.data import builders
from tests import helpers
from tests.test_ssl import tiny_pretrain

SHARED = os.environ.get("MEDGUIDE_SHARED_DATA", str(helpers.ROOT.parent / "shared" / "data"))

_TINY = ["--config.model.encoder_kwargs.width=8", "--config.model.num_prototypes=16",
         "--config.model.proj_hidden=32", "--config.model.proj_dim=16",
         "--config.ssl.global_size=32", "--config.ssl.local_size=16",
         "--config.data.image_size=32"]


def _stage_args(name: str, steps: int) -> list[str]:
  return [f"--config.stages.{name}.{k}={v}" for k, v in (
      ("num_steps", steps), ("batch_size", 16), ("eval_batch_size", 256), ("bootstrap", 20),
      ("log_every", 1), ("checkpoint_every", max(steps, 1)))] + (
          [f"--config.stages.{name}.eval_every={max(steps // 2, 1)}"] if steps else [])


def test_finetune_smoke_runs_every_downstream_kind(tmp_path):
  stages = {"pretrain": 4, "probe_10": 4, "knn_10": 0, "finetune_10": 4, "hybrid_10": 2,
            "scratch_10": 2}
  args = list(_TINY)
  for name, steps in stages.items():
    args += _stage_args(name, steps)
  args += [f"--config.stages.{n}.{k}={v}" for n in stages if n != "pretrain"
           for k, v in (("train_fraction", 0.0), ("train_stratify", ""), ("train_examples", 64))]
  proc = helpers.run_main(tmp_path, args, config_file="configs/ssl_finetune.py",
                          config_arg=f"smoke,stages={'+'.join(stages)}", timeout=helpers.HANG_GUARD_S)
  results = json.loads((tmp_path / "results.json").read_text())
  models = [row["model"] for row in results["table"]]
  assert sorted(models) == ["finetune_10", "hybrid_10", "knn_10", "probe_10", "scratch_10"]
  for row in results["table"]:
    assert 0 <= row["balanced_accuracy"] <= 1 and len(row["balanced_accuracy_ci95"]) == 2
  m = results["stages"]["finetune_10"]["metrics"]
  for kind in ("intensity", "gamma", "contrast", "rotation", "scaling", "noise"):
    assert 0 <= m[f"test/robust/{kind}/balanced_accuracy"] <= 1
  # finetune and hybrid are compared case by case with scratch (which ran before them);
  # probe's twin probe_random was left out, so it has no paired keys.
  ft, sc = m["test/balanced_accuracy"], results["stages"]["scratch_10"]["metrics"]
  assert m["test/paired/scratch_10/balanced_accuracy"] == pytest.approx(
      ft - sc["test/balanced_accuracy"], abs=1e-9)
  lo, hi = m["test/paired/scratch_10/balanced_accuracy_ci95"]
  assert lo <= hi
  assert not any(k.startswith("test/paired/") for k in results["stages"]["probe_10"]["metrics"])
  assert (tmp_path / "scratch_10" / "outputs_test.npz").exists()
  hybrid = helpers.metrics_lines(tmp_path / "hybrid_10" / "metrics.jsonl")
  assert {"train/sup_loss", "train/ssl_loss", "train/swav_loss"} <= set(hybrid[-1])
  assert "| finetune_10 |" in proc.stdout


def test_bad_ssl_override_exits_2_naming_the_key(tmp_path):
  run = lambda *args: helpers.run_main(tmp_path, list(args), config_file="configs/ssl_pretrain.py",
                                       config_arg="smoke", check=False)
  proc = run("--config.ssl.augment.blur_p=2.0")
  assert proc.returncode == 2 and "blur_p" in proc.stdout + proc.stderr
  proc = run("--config.ssl.sinkhorn=ring")
  assert proc.returncode == 2 and "ssl.sinkhorn" in proc.stdout + proc.stderr
  assert not (tmp_path / "pretrain").exists()


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "medmnist_small")),
                    reason=f"the shared real samples are not at {SHARED}")
def test_pretraining_on_a_mixture_of_datasets(tmp_path, data_dir):
  builders.prepare("breastmnist", data_dir=data_dir,
                   manual_dir=os.path.join(SHARED, "medmnist_small"))
  c = tiny_pretrain(steps=3)
  c.data.name, c.data.mixture = "mixture", "synthetic_multimodality:3,breastmnist:1"
  train.train_and_evaluate(c, str(tmp_path))
  run = json.loads((tmp_path / "run.json").read_text())
  assert run["datasets"][0]["name"] == "mixture"
  assert "breastmnist" in run["datasets"][0]["version"]
  result = json.loads((tmp_path / "pretrain" / "results.json").read_text())
  assert 0 <= result["stages"]["pretrain"]["metrics"]["test/knn_accuracy"] <= 1
