"""hybridmed part 3's downstream stages (tasks/downstream.py, configs/downstream.py): label
fractions, label policies, config errors, and end-to-end runs on the tiny synthetic sets."""
from __future__ import annotations

import json

import numpy as np
import pytest

from configs import downstream as config_lib
from medguide_jax import checkpointing
from medguide_jax.data import mixture
from medguide_jax.tasks import downstream
from tests import helpers


class _Fake:
  def __init__(self, labels):
    self.labels = np.asarray(labels)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"label": self.labels[i]}


def test_stratified_subsets_keep_every_class_and_are_nested():
  # PneumoniaMNIST's imbalance: 388 normal, 3,494 pneumonia.
  labels = np.r_[np.zeros(388, int), np.ones(3494, int)]
  source = _Fake(labels)
  strata = mixture.label_strata(labels)
  subsets = {f: mixture.Subset(source, max(1, round(f * len(labels))), strata)
             for f in (0.001, 0.01, 0.1, 1.0)}
  for f, sub in subsets.items():
    chosen = labels[sub.indices]
    assert set(chosen) == {0, 1}, f            # every class, even at 0.1% (4 images)
    assert len(np.unique(sub.indices)) == len(sub)
    # The per-class shares follow the split's: round(n * share), at least one.
    n = max(1, round(f * len(labels)))
    assert (chosen == 0).sum() == max(1, round(n * 388 / len(labels)))
  assert len(subsets[1.0]) == len(labels)
  small, mid, large = (set(subsets[f].indices) for f in (0.001, 0.01, 0.1))
  assert small <= mid <= large                   # 0.1% inside 1% inside 10%
  # Fixed: the same subset for another seed / stage (it does not read config.seed).
  again = mixture.Subset(source, round(0.01 * len(labels)), strata)
  np.testing.assert_array_equal(again.indices, subsets[0.01].indices)


def test_label_strata_of_multilabel_rows_is_the_rarest_positive():
  labels = np.asarray([[1, 0, 0], [1, 1, 0], [1, 0, 1], [0, 0, 0], [np.nan, -1, 0],
                       [1, 1, 0]], np.float32)
  # prevalences (value 1): 4, 2, 1 -> rarest positive per row; 3 = none positive.
  np.testing.assert_array_equal(mixture.label_strata(labels), [0, 1, 2, 3, 3, 1])
  np.testing.assert_array_equal(mixture.label_strata(np.asarray([2, 0, -1])), [2, 0, -1])


def test_uncertain_policies_and_groups():
  meta = {"label_names": ["a", "b", "c"], "label_groups": {"ab": ["a", "b"], "c": ["c"]}}
  names, ones = downstream.group_targets(meta, "ones")
  _, zeros = downstream.group_targets(meta, "zeros")
  assert names == ("ab", "c")
  row = np.asarray([-1, np.nan, -1], np.float32)       # uncertain a, b unmentioned
  np.testing.assert_array_equal(ones(row), [1, 1])
  np.testing.assert_array_equal(zeros(row), [0, 0])
  np.testing.assert_array_equal(ones(np.asarray([0, 1, 0], np.float32)), [1, 0])
  np.testing.assert_array_equal(ones(np.asarray([np.nan, 0, 1], np.float32)), [0, 1])
  with pytest.raises(ValueError, match="uncertain='half'"):
    downstream.group_targets(meta, "half")
  with pytest.raises(ValueError, match="label_names"):
    ones(np.zeros(2, np.float32))


def test_region_classes():
  meta = {"label_names": ["opacity_l", "opacity_r", "effusion_l", "heart"],
          "label_groups": {"opacity": ["opacity_l", "opacity_r"], "effusion": ["effusion_l"],
                           "cardio": ["heart"]}}
  names, index = downstream.region_classes(meta, "opacity,effusion")
  assert names == ["opacity", "effusion"] and index == {0: 0, 1: 0, 2: 1}
  with pytest.raises(ValueError, match="lungs"):
    downstream.region_classes(meta, "lungs")
  # A findings layout names its regions apart from its labels.
  names, index = downstream.region_classes({"label_names": ["Pneumonia"],
                                            "region_names": ["pneumonia"]}, "")
  assert names == ["pneumonia"] and index == {0: 0}


@pytest.mark.parametrize("arg, message", [
    ("source=hybridmed", "pretrained"),
    ("source=random,pretrained=/tmp/x/joint", "random none"),
    ("source=swav,pretrained=joint", "a path"),
    ("source=clip,pretrained=/a/b", "source='clip'"),
    ("dataset=mnist", "dataset='mnist'"),
])
def test_config_errors(arg, message):
  with pytest.raises(ValueError, match=message):
    config_lib.get_config(arg)


def test_config_maps_each_source_onto_the_tower():
  c = config_lib.get_config("source=swav,pretrained=/w/pretrain")
  s = c.stages.linear_1
  assert (s.init_from, s.init_params, s.freeze) == ("/w/pretrain", "img/(.*)=enc/\\1", "img/.*")
  assert (s.train_fraction, s.train_stratify) == (0.01, "labels")
  assert c.stages.finetune_100.freeze == "" and c.stages.finetune_100.train_fraction == 1.0
  c = config_lib.get_config("source=hybridmed,pretrained=/w/joint")
  assert c.stages.segment.init_params == "img/.*"
  assert config_lib.get_config("").stages.detect.init_from == ""
  assert set(config_lib.get_config("dataset=synthetic_cxr_vqa").stages) == {"vqa", "vqa_frozen"}


# ----------------------------------------------------------------------------- end to end
def _args(stages, steps=3):
  return [f"--config.stages.{s}.{k}={v}" for s in stages for k, v in (
      ("num_steps", steps), ("batch_size", 8), ("eval_batch_size", 16), ("bootstrap", 20))] + [
      "--config.model.encoder_kwargs.width=8"]


SOURCE_STAGES = ("finetune_10", "segment", "detect")


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
  """Random init: a fine-tuned classifier (10%, stratified), a fine-tuned segmenter, a
  fine-tuned detector on synthetic_cxr:tiny; its finetune_10 tower then serves as a
  'pretrained' source below."""
  workdir = tmp_path_factory.mktemp("down")
  helpers.run_main(workdir, _args(SOURCE_STAGES), config_file="configs/downstream.py",
                   config_arg=f"smoke,dataset=synthetic_cxr:tiny,stages={'+'.join(SOURCE_STAGES)}")
  return workdir


def test_every_downstream_task_runs_and_reports_its_metric(random_run):
  rows = {r["model"]: r for r in json.loads((random_run / "results.json").read_text())["table"]}
  assert set(rows) == set(SOURCE_STAGES)
  assert 0 <= rows["finetune_10"]["mean/auc"] <= 1 and "opacity/auc" in rows["finetune_10"]
  for key in ("dice", "dice_all", "opacity/dice", "effusion/dice_all", "pneumothorax/images"):
    assert key in rows["segment"], key
  assert 0 <= rows["segment"]["dice"] <= 1 and len(rows["segment"]["dice_ci95"]) == 2
  for key in ("map", "map50", "map/opacity", "images", "objects"):
    assert key in rows["detect"], key
  # 10% of the 64 tiny training studies, stratified by rarest finding: about 6, each
  # stratum kept; the size is logged in the stage's results.
  info = json.loads((random_run / "run.json").read_text())
  assert info  # run.json written
  first = helpers.metrics_lines(random_run / "finetune_10" / "metrics.jsonl")[0]
  assert first["step"] >= 1


def test_a_pretrained_tower_is_loaded_and_a_linear_stage_keeps_it(random_run, tmp_path):
  source = random_run / "finetune_10"
  helpers.run_main(tmp_path / "w", _args(("linear_1",)), config_file="configs/downstream.py",
                   config_arg=f"smoke,dataset=synthetic_cxr:tiny,stages=linear_1,"
                              f"source=hybridmed,pretrained={source}")
  before = checkpointing.load_variables(source / "variables")
  after = checkpointing.load_variables(tmp_path / "w" / "linear_1" / "variables")
  # The tower (img/) is the source's, unchanged by linear evaluation (batch stats too);
  # the head is new.
  helpers.assert_trees_equal(before["params"]["img"], after["params"]["img"])
  helpers.assert_trees_equal(before["batch_stats"]["img"], after["batch_stats"]["img"])


def test_an_encoder_of_another_architecture_is_exit_2_naming_both(random_run, tmp_path):
  source = random_run / "finetune_10"
  proc = helpers.run_main(
      tmp_path / "w", _args(("linear_1",))[:-1] + ["--config.model.encoder_kwargs.width=16"],
      config_file="configs/downstream.py", check=False,
      config_arg=f"smoke,dataset=synthetic_cxr:tiny,stages=linear_1,source=hybridmed,"
                 f"pretrained={source}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "'width': 8" in proc.stderr and "'width': 16" in proc.stderr
  assert not (tmp_path / "w" / "linear_1").exists()


def test_vqa_runs_on_the_synthetic_questions(tmp_path):
  small = ["--config.model.text.hidden=32", "--config.model.text.layers=1",
           "--config.model.text.heads=2", "--config.model.text.mlp=64",
           "--config.model.fusion.hidden=32", "--config.model.fusion.layers=1",
           "--config.model.fusion.heads=2"]
  helpers.run_main(tmp_path / "w", _args(("vqa",), steps=2) + small,
                   config_file="configs/downstream.py",
                   config_arg="smoke,dataset=synthetic_cxr_vqa:tiny,stages=vqa")
  row = json.loads((tmp_path / "w" / "results.json").read_text())["table"][0]
  for key in ("accuracy", "closed/accuracy", "open/accuracy", "open/out_of_vocabulary"):
    assert key in row, key
