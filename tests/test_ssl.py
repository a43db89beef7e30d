"""The SSL method on the trainer: prototypes, queue, restore, sharding, errors, reports."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from medguide_jax import checkpointing, ssl_report, train
from medguide_jax.data import mixture
from medguide_jax.evaluation import knn, robustness
from medguide_jax.tasks import base
from medguide_jax.tasks import ssl as ssl_lib
from tests import helpers


def tiny_pretrain(steps: int = 4, batch: int = 16, **ssl):
  from configs import ssl_pretrain  # pylint: disable=g-import-not-at-top
  c = ssl_pretrain.get_config("smoke")
  c.model.encoder_kwargs.width = 8
  c.model.num_prototypes, c.model.proj_hidden, c.model.proj_dim = 16, 32, 16
  c.ssl.global_size, c.ssl.local_size = 32, 16
  for k, v in ssl.items():
    c.ssl[k] = v
  s = c.stages.pretrain
  s.num_steps, s.batch_size, s.eval_batch_size = steps, batch, 256
  s.log_every, s.checkpoint_every = 1, steps
  s.opt.freeze_steps = 2
  return c


def test_prototypes_stay_normalised_and_are_held_then_train(tmp_path):
  c = tiny_pretrain(steps=4)
  train.train_and_evaluate(c, str(tmp_path))
  stored = checkpointing.load_variables(tmp_path / "pretrain" / "variables")
  w = np.asarray(stored["params"]["prototypes"]["weight"])
  np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-5)
  lines = helpers.metrics_lines(tmp_path / "pretrain" / "metrics.jsonl")
  assert all(abs(l["train/loss"] - l["train/swav_loss"]) < 1e-6 for l in lines)
  assert 0 < lines[-1]["train/code_entropy"] <= math.log(16) + 1e-4
  assert 0 < lines[-1]["train/prototype_usage"] <= 1


def test_queue_fills_from_its_start_step_and_is_used_once_full(tmp_path):
  # batch 16, queue 32 (two batches), started at step 2: filled after steps 2 and 3
  # (0-based), so the first step that uses it is 4 (logged as step 5).
  c = tiny_pretrain(steps=6, queue_length=40, queue_start=2)
  train.train_and_evaluate(c, str(tmp_path))
  lines = helpers.metrics_lines(tmp_path / "pretrain" / "metrics.jsonl")
  assert [l["train/queue_in_use"] for l in lines] == [0, 0, 0, 0, 1, 1]
  stored = checkpointing.load_variables(tmp_path / "pretrain" / "variables")
  assert stored["queue"]["z"].shape == (2, 32, 16)  # 40 rounded down to whole batches
  np.testing.assert_allclose(np.linalg.norm(stored["queue"]["z"], axis=-1), 1.0, atol=1e-5)


def test_queue_shorter_than_a_batch_is_an_error(tmp_path):
  c = tiny_pretrain(queue_length=8)
  with pytest.raises(train.ConfigError, match="queue_length=8"):
    train.train_and_evaluate(c, str(tmp_path))


def test_downstream_encoder_restored_from_pretraining_gives_the_same_features(tmp_path):
  from configs import ssl_finetune  # pylint: disable=g-import-not-at-top
  pre = tiny_pretrain(steps=3)
  train.train_and_evaluate(pre, str(tmp_path / "pre"))
  c = ssl_finetune.get_config(f"smoke,pretrained={tmp_path / 'pre' / 'pretrain'},stages=knn_10")
  c.model, c.ssl, c.data.image_size = pre.model, pre.ssl, 32
  c.stages.knn_10.bootstrap = 0
  train.train_and_evaluate(c, str(tmp_path / "ft"))
  a = checkpointing.load_variables(tmp_path / "pre" / "pretrain" / "variables")
  b = checkpointing.load_variables(tmp_path / "ft" / "knn_10" / "variables")
  helpers.assert_trees_equal(a["params"]["enc"], b["params"]["enc"])
  helpers.assert_trees_equal(a["batch_stats"]["enc"], b["batch_stats"]["enc"])
  from medguide_jax import evaluate  # pylint: disable=g-import-not-at-top
  run_pre = evaluate.load_run(tmp_path / "pre", "pretrain")
  run_ft = evaluate.load_run(tmp_path / "ft", "knn_10")
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  f = lambda run: run.task.model.apply(run.variables, {"image": x}, train=False)["features"]
  np.testing.assert_array_equal(np.asarray(f(run_pre)), np.asarray(f(run_ft)))
  result = json.loads((tmp_path / "ft" / "knn_10" / "results.json").read_text())
  assert 0 <= result["stages"]["knn_10"]["metrics"]["test/balanced_accuracy"] <= 1


_SHARDED = """
import os, sys, json
sys.path.insert(0, {root!r})
from tests import test_ssl
from medguide_jax import train
c = test_ssl.tiny_pretrain(steps=3, sinkhorn={sinkhorn!r})
train.train_and_evaluate(c, {workdir!r})
"""


@pytest.mark.parametrize("sinkhorn", ["global", "shard_map"])
def test_pretraining_on_8_devices_equals_1_device(tmp_path, sinkhorn):
  """SyncBN-like global batch statistics and global Sinkhorn: the device count is invisible."""
  losses = {}
  for devices in (1, 8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    wd = str(tmp_path / f"d{devices}")
    code = _SHARDED.format(root=str(helpers.ROOT), sinkhorn=sinkhorn, workdir=wd)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=helpers.ROOT,
                   capture_output=True, timeout=helpers.HANG_GUARD_S)
    losses[devices] = [(l["train/swav_loss"], l["train/code_entropy"])
                       for l in helpers.metrics_lines(tmp_path / f"d{devices}" / "pretrain" / "metrics.jsonl")]
  np.testing.assert_allclose(losses[1], losses[8], rtol=2e-5)


def test_collapse_warning_fires_once_after_the_freeze(caplog):
  c = tiny_pretrain()
  task = ssl_lib.PretrainTask.__new__(ssl_lib.PretrainTask)
  base.Task.__init__(task, base.TaskContext(c, c.stages.pretrain, None))
  task._warned_collapse, task._near_ln_k = False, 0  # pylint: disable=protected-access
  ln_k = math.log(task.config.model.num_prototypes)
  with caplog.at_level(logging.WARNING):
    task.on_log(1, {"train/swav_loss": ln_k})  # still frozen: no warning
    task.on_log(10, {"train/swav_loss": ln_k - 1.0})  # learning: no warning
    assert not caplog.records
    task.on_log(11, {"train/swav_loss": ln_k + 1e-3})  # passing through ln K once: no warning
    task.on_log(12, {"train/swav_loss": ln_k - 0.5})
    assert not caplog.records
    for step in (13, 14, 15, 16):  # sitting there
      task.on_log(step, {"train/swav_loss": ln_k})
  assert len(caplog.records) == 1 and "collapsed" in caplog.records[0].getMessage()


def test_probe_on_an_unlabelled_dataset_is_an_error():
  from configs import ssl_finetune  # pylint: disable=g-import-not-at-top

  class Info:
    metadata = {"class_names": []}

  class Source(list):
    dataset_info = Info()

  c = ssl_finetune.get_config("smoke")
  with pytest.raises(ValueError, match="needs labels"):
    ssl_lib.make_task(base.TaskContext(c, c.stages.probe_10, Source()))


# --------------------------------------------------------------------------- host pieces
class _Fake:
  def __init__(self, name, n, label=0):
    self.name, self.n, self.label = name, n, label

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    assert 0 <= i < self.n
    return {"id": f"{self.name}{i}", "label": np.int64(self.label), "source": self.name}


def test_mixture_follows_weights_deterministically_and_relabels():
  a, b = _Fake("a", 100, label=1), _Fake("b", 10, label=-1)
  mix = mixture.MixedSource([a, b], [3.0, 1.0], offsets=[0, 2], seed=5, length=4000)
  ids = [mix[i]["id"] for i in range(len(mix))]
  frac_b = np.mean([x.startswith("b") for x in ids])
  assert abs(frac_b - 0.25) < 0.03
  again = mixture.MixedSource([a, b], [3.0, 1.0], offsets=[0, 2], seed=5, length=4000)
  assert ids == [again[i]["id"] for i in range(len(again))]
  # b repeats: every one of its 10 records is drawn before any is drawn again.
  b_ids = [x for x in ids if x.startswith("b")]
  assert sorted(b_ids[:10]) == sorted(f"b{i}" for i in range(10))
  assert {mix[i]["label"] for i in range(50)} <= {1, -1}
  concat = mixture.ConcatSource([a, _Fake("c", 5, label=2)], offsets=[0, 3])
  assert len(concat) == 105 and concat[104]["id"] == "c4" and concat[104]["label"] == 5
  assert mixture.parse("x:2, image_folder:mine ,y") == [("x", 2.0), ("image_folder:mine", 1.0),
                                                        ("y", 1.0)]
  with pytest.raises(ValueError, match="weight"):
    mixture.parse("x:0")


def test_subset_is_fixed_and_checked():
  s1, s2 = mixture.Subset(_Fake("a", 50), 10), mixture.Subset(_Fake("a", 50), 10)
  assert [s1[i]["id"] for i in range(10)] == [s2[i]["id"] for i in range(10)]
  assert len({s1[i]["id"] for i in range(10)}) == 10
  with pytest.raises(ValueError, match="train_examples=60"):
    mixture.Subset(_Fake("a", 50), 60)


def test_knn_probs_and_loo_accuracy_by_hand():
  bank = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
  labels = np.array([0, 0, 1, 1])
  probs = knn.knn_probs(bank, labels, np.array([[1, 0.05]], np.float32), k=2,
                            num_classes=2)
  np.testing.assert_allclose(probs, [[1.0, 0.0]])
  assert knn.knn_loo_accuracy(bank, labels, k=1) == 1.0


def test_perturbations_by_hand():
  x = np.linspace(0, 1, 2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
  np.testing.assert_allclose(robustness.perturb(x, "gamma", 2.0), x**2, atol=1e-6)
  np.testing.assert_allclose(robustness.perturb(x, "intensity", 0.1), np.clip(x + 0.1, 0, 1),
                             atol=1e-6)
  np.testing.assert_allclose(robustness.perturb(x, "rotation", 0.0), x, atol=1e-6)
  np.testing.assert_allclose(robustness.perturb(x, "scaling", 1.0), x, atol=1e-6)
  # 90 degrees about the centre is an exact index rotation.
  np.testing.assert_allclose(robustness.perturb(x, "rotation", 90.0)[..., 0],
                             np.rot90(x[..., 0], k=-1, axes=(1, 2)), atol=1e-5)
  with pytest.raises(ValueError, match="unknown perturbation"):
    robustness.perturb(x, "warp", 1.0)


def test_report_steps_to_target_and_seed_summary(tmp_path):
  assert ssl_report.steps_to_target([(10, 0.5), (20, 0.8), (30, 0.9)], 0.8) == 20
  assert ssl_report.steps_to_target([(10, 0.5)], 0.8) is None
  s = ssl_report.summarise([0.7, 0.8, 0.9])
  assert s["mean"] == pytest.approx(0.8) and s["sd"] == pytest.approx(0.1)
  from scipy import stats  # pylint: disable=g-import-not-at-top
  assert s["ci95"][1] - 0.8 == pytest.approx(stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3))
  assert stats.t.ppf(0.975, 2) == pytest.approx(4.303, abs=5e-4)  # the table value
  # One seed's workdir, written by hand: at 10% labels scratch reaches 0.8 at step 40,
  # finetune at 10, hybrid never; at 1% only a scratch twin without SSL stages.
  for name, curve in (("scratch_10", [(10, 0.5), (20, 0.6), (40, 0.8)]),
                      ("finetune_10", [(10, 0.8), (20, 0.85)]),
                      ("hybrid_10", [(10, 0.3), (20, 0.4)]),
                      ("scratch_1", [(10, 0.4)])):
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": st, "eval/validation/balanced_accuracy": v}) for st, v in curve))
  (tmp_path / "results.json").write_text(json.dumps({"stages": {
      "finetune_10": {"metrics": {"test/balanced_accuracy": 0.8, "test/auc": 0.9,
                                  "test/robust/gamma/balanced_accuracy": 0.7}},
      "hybrid_10": {"metrics": {"test/balanced_accuracy": 0.5, "test/auc": 0.6}},
      "scratch_10": {"metrics": {"test/balanced_accuracy": 0.7, "test/auc": 0.8}},
      "scratch_1": {"metrics": {"test/balanced_accuracy": 0.4, "test/auc": 0.5}}}}))
  summary = ssl_report.report([str(tmp_path)], target_fraction=1.0)
  ft = summary["convergence"]["finetune_10"]
  assert ft["scratch"] == "scratch_10"
  assert ft["steps"]["mean"] == 10 and ft["scratch_steps"]["mean"] == 40
  assert ft["saving"]["mean"] == pytest.approx(0.75)
  hy = summary["convergence"]["hybrid_10"]
  assert hy["steps"]["n"] == 0 and hy["steps"]["never_reached"] == 1
  assert hy["saving"]["never_reached"] == 1
  assert set(summary["convergence"]) == {"finetune_10", "hybrid_10"}  # scratch_1: no twin
  assert summary["robust"]["finetune_10"]["gamma"]["mean"] == 0.7
  text = ssl_report.markdown(summary)
  assert "| finetune_10 | 10.000 |" in text and "| hybrid_10 | - (never: 1) |" in text


def test_finetune_config_has_stages_per_labelled_fraction_each_after_its_twin():
  from configs import ssl_finetune  # pylint: disable=g-import-not-at-top
  c = ssl_finetune.get_config("fractions=1+10")
  kinds = ("probe", "probe_random", "knn", "knn_random", "finetune", "scratch", "hybrid")
  assert set(c.stages) == {"pretrain"} | {f"{k}_{f}" for k in kinds for f in (1, 10)}
  assert c.stages.finetune_1.train_fraction == 0.01 and c.stages.scratch_10.train_fraction == 0.1
  assert c.stages.finetune_1.train_stratify == "label"
  assert c.stages.finetune_1.evals.paired.against == "scratch_1"
  assert c.stages.hybrid_10.evals.paired.against == "scratch_10"
  assert c.stages.probe_1.evals.paired.against == "probe_random_1"
  order = train.stage_order(c)
  for ssl_stage, twin in (("finetune_1", "scratch_1"), ("hybrid_10", "scratch_10"),
                          ("probe_10", "probe_random_10")):
    assert order.index(twin) < order.index(ssl_stage)  # its outputs exist when compared
  full = ssl_finetune.get_config("fractions=100")
  assert full.stages.finetune_100.train_fraction == 0.0  # all labels: no subset
  assert ssl_finetune.get_config("stages=finetune_10").stages.finetune_10.evals.paired.against == ""
  for bad in ("0", "1+1", "150", "x"):
    with pytest.raises(ValueError, match="fractions="):
      ssl_finetune.get_config(f"fractions={bad}")
