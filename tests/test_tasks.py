"""The task layer: the base class's hooks, the shared supervised task, evaluators named in the
config, metric keys checked before step 0, and init_params mapping between methods."""
from __future__ import annotations

import ast
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medguide_jax import checkpointing, param_sources, train
from medguide_jax.data import decoders
from medguide_jax.evaluation import evaluators
from medguide_jax.evaluation import metrics as metrics_lib
from medguide_jax.tasks import base, supervised
from tests import helpers


# --------------------------------------------------------------------------- the trainer
def test_train_py_has_no_method_names_and_no_getattr_on_tasks():
  tree = ast.parse((helpers.ROOT / "medguide_jax" / "train.py").read_text())
  calls = {n.func.id for n in ast.walk(tree)
           if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
  assert not calls & {"getattr", "hasattr"}
  strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
             and isinstance(n.value, str)}
  for method in ("guidance", "ssl", "glam", "swav", "knn"):
    assert not any(method in s.split() or s == method for s in strings), method


# --------------------------------------------------------------------------- base hooks
class _Info:
  metadata = {"class_names": ["a", "b", "c"]}


class _Source(list):
  dataset_info = _Info()


def _ctx(data_name="synthetic_paired", **stage):
  c = ml_collections.ConfigDict({"data": {"name": data_name, "image_size": 8, "channels": 3}})
  return base.TaskContext(c, ml_collections.ConfigDict({"task": "x", **stage}), _Source())


def test_base_hooks_default_to_doing_nothing_and_required_ones_say_so():
  task = base.Task(_ctx())
  params = {"w": jnp.ones(3)}
  assert task.prepare_params(params) is params
  assert task.on_log(1, {"train/loss": 1.0}) is None
  for name, args in (("init", (None, {})), ("predict", ({}, {})), ("metric_keys", ())):
    with pytest.raises(NotImplementedError):
      getattr(task, name)(*args)


def test_the_default_decoder_is_the_record_layouts():
  from medguide_jax.data import images  # pylint: disable=g-import-not-at-top
  img = np.full((12, 12, 3), 200, np.uint8)
  record = {"case_id": b"7", "image_inferior": images.encode_png(img),
            "image_superior": images.encode_png(img[..., :1].repeat(3, -1) // 2),
            "labels": np.arange(8)}
  ex = base.Task(_ctx()).example_fn(record, None, augment=False)
  assert ex["image_inferior"].shape == (8, 8, 3) and ex["image_superior"][0, 0, 0] == 100
  np.testing.assert_array_equal(ex["labels"], np.arange(8))
  grey = {"image": images.encode_png(np.full((10, 10), 51, np.uint8)), "label": 2,
          "source": b"ct", "id": b"i"}
  ex = base.Task(_ctx("image_folder:x")).example_fn(grey, None, augment=False)
  # 51/255 = 0.2, normalised with the default (0.5, 0.25): -1.2
  np.testing.assert_allclose(ex["image"], -1.2, atol=1e-6)
  assert ex["image"].shape == (8, 8, 3) and ex["label"] == 2


def test_a_layout_without_a_decoder_is_a_clear_error(monkeypatch):
  from medguide_jax.data import sources  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sources.LAYOUTS, "odd_set", "volumes")
  with pytest.raises(ValueError, match="'odd_set' has record layout 'volumes'.*known layouts"):
    decoders.for_dataset(ml_collections.ConfigDict({"name": "odd_set", "image_size": 8}))


# --------------------------------------------------------------------------- supervised
def _logits_model(multi: bool):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):
    @nn.compact
    def __call__(self, batch, *, train):
      del train
      h = nn.Dense(3, use_bias=False)(batch["x"])
      return {"logits": (h, 2 * h) if multi else h, "features": batch["x"]}
  return Net()


def _np_ce(logits, labels):
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -logp[np.arange(len(labels)), labels]


def test_single_task_loss_matches_numpy_and_ignores_unlabelled_rows():
  task = supervised.SupervisedTask(_ctx(), model=_logits_model(False), num_classes=(3,))
  x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  label = np.array([0, 2, -1, 1, 2], np.int32)
  mask = np.array([1, 1, 1, 1, 0], np.float32)  # the last row is padding
  variables = task.init(jax.random.key(0), {"x": x, "label": label})
  state = base.LossState(step=jnp.zeros((), jnp.int32), model_state={}, extra={}, teacher={})
  loss, (metrics, _) = task.loss(variables["params"], state, {"x": x, "label": label,
                                                              "mask": mask}, jax.random.key(1))
  logits = x @ np.asarray(variables["params"]["Dense_0"]["kernel"])
  expect = _np_ce(logits[[0, 1, 3]], label[[0, 1, 3]]).mean()
  np.testing.assert_allclose(loss, expect, rtol=1e-5)
  assert set(metrics) == {"ce", "accuracy"}
  out = jax.tree.map(np.asarray, task.predict(variables, {"x": x, "label": label}))
  np.testing.assert_allclose(out["loss"][[0, 1]], _np_ce(logits[[0, 1]], label[[0, 1]]),
                             rtol=1e-5)
  result = task.evaluate(out, bootstrap=0, seed=0)
  assert set(result) <= task.metric_keys()
  np.testing.assert_allclose(result["loss"], _np_ce(logits[[0, 1, 3, 4]],
                                                    label[[0, 1, 3, 4]]).mean(), rtol=1e-5)


def test_multi_task_class_balanced_weights_and_per_example_loss():
  rng = np.random.default_rng(1)
  ctx = _ctx()
  source = _Source([{"labels": np.array([0, 1])}, {"labels": np.array([0, 2])},
                    {"labels": np.array([1, 2])}])
  ctx = base.TaskContext(ctx.config, ctx.stage, source)
  task = supervised.SupervisedTask(ctx, model=_logits_model(True), num_classes=(3, 3),
                                   task_names=("a", "b"), class_balanced=True)
  # Keras 'balanced': n / (k n_c) over the classes present.
  np.testing.assert_allclose(task.class_weights[0], [3 / (2 * 2), 3 / (2 * 1), 0])
  np.testing.assert_allclose(task.class_weights[1], [0, 3 / (2 * 1), 3 / (2 * 2)])
  x = rng.normal(size=(3, 4)).astype(np.float32)
  labels = np.array([[0, 1], [1, 2], [0, 2]], np.int32)
  variables = task.init(jax.random.key(0), {"x": x, "labels": labels})
  out = jax.tree.map(np.asarray, task.predict(variables, {"x": x, "labels": labels}))
  h = x @ np.asarray(variables["params"]["Dense_0"]["kernel"])
  expect = (_np_ce(h, labels[:, 0]) + _np_ce(2 * h, labels[:, 1])) / 2
  np.testing.assert_allclose(out["loss"], expect, rtol=1e-5)
  result = task.evaluate(out, bootstrap=0, seed=0)
  assert {"a/auc", "mean/balanced_accuracy"} <= set(result) <= task.metric_keys()


def test_single_task_metrics_equal_the_multitask_path_and_numpy():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 3, 60)
  probs = rng.dirichlet(np.ones(3), 60)
  one = metrics_lib.classification_metrics(labels, probs, bootstrap=50, seed=3)
  multi = metrics_lib.multitask_classification_metrics(labels[:, None], [probs], ("t",),
                                                       bootstrap=50, seed=3)
  for k in ("balanced_accuracy", "auc", "balanced_accuracy_ci95", "auc_ci95"):
    assert one[k] == multi[f"t/{k}"]
  pred = probs.argmax(-1)
  assert one["accuracy"] == pytest.approx(np.mean(pred == labels))
  assert one["balanced_accuracy"] == pytest.approx(
      np.mean([np.mean(pred[labels == c] == c) for c in range(3)]))


# --------------------------------------------------------------------------- evaluators
def test_evaluators_from_config_name_type_prefix_enabled_and_errors():
  task = object()
  evs = evaluators.from_config(ml_collections.ConfigDict({
      "knn": {"k": 5, "prefix": ""}, "loo": {"type": "knn_loo"},
      "off": {"type": "knn", "enabled": False}}), task)
  assert [e.name for e in evs] == ["knn", "loo"]
  assert evs[0].k == 5 and evs[0].prefixed_keys() == {"balanced_accuracy", "auc", "accuracy"}
  assert evs[1].prefixed_keys() == {"knn_accuracy"} and evs[0].splits == ("validation", "test")
  with pytest.raises(ValueError, match="unknown evaluator type 'zeroshot'"):
    evaluators.from_config({"zeroshot": {}}, task)
  with pytest.raises(ValueError, match=r"evals.knn \(knn\).*unexpected keyword.*kk"):
    evaluators.from_config({"knn": {"kk": 3}}, task)
  with pytest.raises(ValueError, match=r"evals.knn \(knn\): k=0"):
    evaluators.from_config({"knn": {"k": 0}}, task)


def _guidance_config(**stage):
  from configs import guidance  # pylint: disable=g-import-not-at-top
  c = guidance.get_config("dataset=synthetic,smoke,stages=inferior")
  for k, v in stage.items():
    c.stages.inferior[k] = v
  return c


def test_a_select_metric_that_no_evaluation_gives_is_exit_2_before_anything_is_written(tmp_path):
  c = _guidance_config(select="max:val/mean/balanced_acc")
  with pytest.raises(train.ConfigError, match="select='max:val/mean/balanced_acc'.*they have"):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_evaluator_keys_that_clash_with_the_tasks_and_a_training_knn_are_errors(tmp_path):
  from configs import ssl_finetune  # pylint: disable=g-import-not-at-top
  c = ssl_finetune.get_config("smoke,stages=scratch_10")
  c.stages.scratch_10.evals.knn = {"prefix": ""}  # its balanced_accuracy is the task's too
  with pytest.raises(train.ConfigError, match=r"evals.knn: its metrics \['accuracy', 'auc', "
                                              r"'balanced_accuracy'\] clash"):
    train.StageSetup(c, "scratch_10", tmp_path, None)
  c.stages.scratch_10.evals.knn.prefix = "knn/"
  c.stages.scratch_10.select = "max:val/knn/auc"  # only at the end, unless every_eval
  with pytest.raises(train.ConfigError, match="without every_eval=True"):
    train.StageSetup(c, "scratch_10", tmp_path, None)
  c.stages.scratch_10.evals.knn.every_eval = True
  assert "knn/auc" in train.StageSetup(c, "scratch_10", tmp_path, None).metric_keys
  c = ssl_finetune.get_config("smoke,stages=knn_10")
  c.stages.knn_10.num_steps = 3
  with pytest.raises(train.ConfigError, match="trains nothing"):
    train.StageSetup(c, "knn_10", tmp_path, None)


# --------------------------------------------------------------------------- init_params
def _finished_stage(path, variables):
  path.mkdir(parents=True)
  checkpointing.save_variables(path / "variables", variables)
  (path / "results.json").write_text(json.dumps({"stages": {}, "table": []}))
  return str(path)


def _target():
  return {"params": {"img": {"conv": {"kernel": np.zeros((2, 2), np.float32)}},
                     "head": {"bias": np.zeros(3, np.float32)}},
          "batch_stats": {"img": {"bn": {"mean": np.zeros(2, np.float32)}}}}


def test_init_params_maps_a_tower_from_another_methods_encoder(tmp_path):
  src = _finished_stage(tmp_path / "src", {
      "params": {"encoder": {"conv": {"kernel": np.full((2, 2), 3.0, np.float32)}},
                 "head": {"bias": np.ones(3, np.float32)}},
      "batch_stats": {"encoder": {"bn": {"mean": np.full(2, 5.0, np.float32)}}}})
  stage = ml_collections.ConfigDict({"init_from": src, "init_params": r"img/(.*)=encoder/\1"})
  out = param_sources.load_init(_target(), stage, tmp_path)
  np.testing.assert_array_equal(out["params"]["img"]["conv"]["kernel"], 3.0)
  np.testing.assert_array_equal(out["batch_stats"]["img"]["bn"]["mean"], 5.0)
  np.testing.assert_array_equal(out["params"]["head"]["bias"], 0.0)  # not selected
  # Two rules: the map and a plain filter (same path).
  stage.init_params = r"img/(.*)=encoder/\1; head/.*"
  out = param_sources.load_init(_target(), stage, tmp_path)
  np.testing.assert_array_equal(out["params"]["head"]["bias"], 1.0)


def test_an_init_params_rule_that_loads_nothing_lists_the_source_modules(tmp_path):
  src = _finished_stage(tmp_path / "src", {
      "params": {"encoder": {"conv": {"kernel": np.ones((2, 2), np.float32)}}}})
  stage = ml_collections.ConfigDict({"init_from": src, "init_params": r"img/(.*)=enc/\1"})
  with pytest.raises(train.ConfigError, match=r"rule\(s\) \['img/\(\.\*\)=enc/\\\\1'\].*"
                                              r"encoder/conv"):
    param_sources.load_init(_target(), stage, tmp_path)
  stage.init_params = r"img/(.*)=encoder/\1"
  bad = {"params": {"img": {"conv": {"kernel": np.zeros((3, 3), np.float32)}}}}
  with pytest.raises(train.ConfigError, match="encoder/conv/kernel has shape"):
    param_sources.load_init(bad, stage, tmp_path)


def test_init_rules_split_at_the_first_equals_that_leaves_a_regex():
  rules = param_sources.init_rules(r"a(?=b)\w+=x/\g<0>; enc/.*")
  assert rules[0][1].pattern == r"a(?=b)\w+" and rules[0][2] == r"x/\g<0>"
  assert rules[1][1].pattern == "enc/.*" and rules[1][2] is None
  assert [r[1].pattern for r in param_sources.init_rules("")] == [".*"]
  with pytest.raises(train.ConfigError, match="not a valid regex"):
    param_sources.init_rules("enc/(")
