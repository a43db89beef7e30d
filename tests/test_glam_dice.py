"""GLAM's hard Dice at the threshold chosen on validation (evaluation/segmentation.py's
ValThresholdDice): the grid sums against numpy, the choice by hand (argmax on validation,
ties to the smallest threshold, images without that class's mask left out), test scored at
validation's threshold and not at its own best, the fused-over-global gain, nan cases, the
task's own maps (the grid's 0.5 equals the task's own hard Dice), bad options."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import glam as glam_config
from medguide_jax.evaluation import evaluators, segmentation
from medguide_jax.tasks import base, glam

NAN = pytest.approx(np.nan, nan_ok=True)


def test_grid_sums_match_a_comparison_per_threshold():
  rng = np.random.default_rng(0)
  for steps in (100, 7):
    t = segmentation.threshold_grid(steps).astype(np.float32)
    # values exactly at, just above and just below every threshold, outside [0, 1], random
    vals = np.concatenate([t, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-1)),
                           [0.0, 1.0, -0.1, 1.5], rng.random(300)]).astype(np.float32)
    s = np.resize(rng.permutation(vals), (3, 8, 24, 2)).astype(np.float32)
    m = (rng.random(s.shape) < 0.3).astype(np.float32)
    out = {k: np.asarray(v) for k, v in
           segmentation.grid_sums(jnp.asarray(s), jnp.asarray(m), steps).items()}
    hard = s[..., None] > t                                    # [B, H, W, C, T]
    np.testing.assert_array_equal(out["pred"], hard.sum((1, 2)))
    np.testing.assert_array_equal(out["inter"], (hard * m[..., None]).sum((1, 2)))
    np.testing.assert_array_equal(out["target"], m.sum((1, 2)))
  np.testing.assert_allclose(segmentation.threshold_grid(20)[[0, 9, -1]], [0.05, 0.5, 0.95])


def test_dice_curve_and_best_index_by_hand():
  inter = np.array([[4, 2, 0], [2, 2, 1], [0, 0, 5], [9, 9, 9]], float)
  pred = np.array([[8, 2, 0], [10, 2, 1], [0, 0, 5], [9, 9, 9]], float)
  target = np.array([4, 2, 5, 0])
  valid = np.array([True, True, False, True])  # image 2 has no mask, image 3 no lesion
  curve, n = segmentation.dice_curve(inter, pred, target, valid)
  assert n == 2
  np.testing.assert_allclose(curve, [(8 / 12 + 4 / 12) / 2, (4 / 6 + 1) / 2, (0 + 2 / 3) / 2])
  assert segmentation.best_threshold_index(curve) == 1
  assert segmentation.best_threshold_index(np.array([0.2, 0.5, 0.5, 0.1])) == 1  # tie: first
  assert segmentation.best_threshold_index(np.full(3, np.nan)) is None
  curve, n = segmentation.dice_curve(inter, pred, target, np.zeros(4, bool))
  assert n == 0 and np.isnan(curve).all()


# -- the evaluator on hand-made sums: steps=4, thresholds 0.25, 0.5, 0.75 --------------------

class _FakeGlamTask:
  uses_local = True

  def dice_maps(self, variables, pixels):
    raise AssertionError("the fake predict never calls the model")


def _sums(labels, has_seg, **per_map):
  out = {"labels": np.asarray(labels), "has_seg": np.asarray(has_seg, np.float32)}
  for m, (inter, pred, target) in per_map.items():
    out.update({f"{m}/inter": np.asarray(inter, float), f"{m}/pred": np.asarray(pred, float),
                f"{m}/target": np.asarray(target, float)})
  return out


# Validation, 5 images [N, C=2 (benign, malignant), T=3]. Benign counts v0, v1 (v4 has an
# empty mask); v2 has no mask file and v3 no benign label: both would favour t=0.75 if they
# were counted. Malignant counts v0 only.
_VAL = _sums(
    labels=[[1, 1], [1, 0], [1, 0], [0, 0], [1, 0]],
    has_seg=[[1, 1], [1, 1], [0, 0], [1, 1], [1, 1]],
    # global, benign Dice: v0 [2/3, 2/3, 0], v1 [1/3, 1, 2/3] -> mean [.5, .833, .333]: t=0.5
    # (with v2 and v3, [0, 0, 1] each, the mean would be [.25, .417, .667]: t=0.75)
    # global, malignant: v0 [0, 0, 0]: a three-way tie -> the smallest, t=0.25
    **{"global": ([[[4, 2, 0], [0, 0, 0]], [[2, 2, 1], [0, 0, 0]], [[0, 0, 5], [0, 0, 5]],
                   [[0, 0, 5], [0, 0, 5]], [[0, 0, 0], [0, 0, 0]]],
                  [[[8, 2, 0], [3, 1, 0]], [[10, 2, 1], [0, 0, 0]], [[0, 0, 5], [0, 0, 5]],
                   [[0, 0, 5], [0, 0, 5]], [[5, 5, 5], [0, 0, 0]]],
                  [[4, 2], [2, 0], [5, 5], [5, 5], [0, 0]]),
       # fused, benign: v0 [1, .4, 0], v1 [1, 0, 0] -> mean [1, .2, 0]: t=0.25
       # fused, malignant: v0 [2/3, 2/3, 0]: a tie between 0.25 and 0.5 -> t=0.25
       "fused": ([[[4, 1, 0], [1, 1, 0]], [[2, 0, 0], [0, 0, 0]], [[0, 0, 5], [0, 0, 5]],
                  [[0, 0, 5], [0, 0, 5]], [[0, 0, 0], [0, 0, 0]]],
                 [[[4, 1, 0], [1, 1, 0]], [[2, 0, 0], [0, 0, 0]], [[0, 0, 5], [0, 0, 5]],
                  [[0, 0, 5], [0, 0, 5]], [[5, 5, 5], [0, 0, 0]]],
                 [[4, 2], [2, 0], [5, 5], [5, 5], [0, 0]])})

# Test, one image with both lesions. Its own best benign global threshold is 0.25 (Dice 1.0),
# but validation chose 0.5, where its Dice is 0.6.
_TEST = _sums(
    labels=[[1, 1]], has_seg=[[1, 1]],
    **{"global": ([[[4, 3, 3], [0, 2, 2]]], [[[4, 6, 3], [1, 2, 2]]], [[4, 2]]),
       "fused": ([[[3, 0, 0], [1, 0, 0]]], [[[5, 0, 0], [2, 0, 0]]], [[4, 2]])})

_EXPECTED = {
    "validation": {
        "dice_global_val_threshold/benign": 0.5, "dice_global_at_val_threshold/benign": 5 / 6,
        "dice_fused_val_threshold/benign": 0.25, "dice_fused_at_val_threshold/benign": 1.0,
        "dice_global_val_threshold/malignant": 0.25,
        "dice_global_at_val_threshold/malignant": 0.0,
        "dice_fused_val_threshold/malignant": 0.25,
        "dice_fused_at_val_threshold/malignant": 2 / 3,
        "dice_gain_at_val_threshold/benign": (1.0 - 5 / 6) / (5 / 6),
        "dice_gain_at_val_threshold/malignant": NAN},     # global Dice 0: no relative gain
    "test": {
        "dice_global_val_threshold/benign": 0.5, "dice_global_at_val_threshold/benign": 0.6,
        "dice_fused_val_threshold/benign": 0.25, "dice_fused_at_val_threshold/benign": 2 / 3,
        "dice_global_val_threshold/malignant": 0.25,
        "dice_global_at_val_threshold/malignant": 0.0,
        "dice_fused_val_threshold/malignant": 0.25,
        "dice_fused_at_val_threshold/malignant": 0.5,
        "dice_gain_at_val_threshold/benign": (2 / 3 - 0.6) / 0.6,
        "dice_gain_at_val_threshold/malignant": NAN},
}


def _context(evaluator, split: str, sums: dict, calls: list):
  def predict(name, fn=None):
    assert fn is evaluator._sums_fn  # pylint: disable=protected-access
    calls.append(name)
    return sums[name]
  return evaluators.EvalContext(
      task=evaluator.task, split=split, outputs={"has_seg": sums[split]["has_seg"]},
      variables={}, predict=predict, source=None, stage_dir="", bootstrap=0, seed=0)


def _check(result: dict, expected: dict):
  assert set(result) == set(expected)
  for key, value in expected.items():
    assert result[key] == (value if value is NAN else pytest.approx(value)), key


def test_test_is_scored_at_the_validation_threshold():
  expected = _EXPECTED
  ev = segmentation.ValThresholdDice(_FakeGlamTask(), name="dice_val_threshold", steps=4)
  sums, calls = {"validation": _VAL, "test": _TEST}, []
  _check(ev(_context(ev, "validation", sums, calls)), expected["validation"])
  _check(ev(_context(ev, "test", sums, calls)), expected["test"])
  assert calls == ["validation", "test"]  # test reused validation's choice
  assert ev.keys() == set(expected["test"])


def test_test_alone_chooses_on_validation_first():
  ev = segmentation.ValThresholdDice(_FakeGlamTask(), name="dice_val_threshold", steps=4)
  calls = []
  result = ev(_context(ev, "test", {"validation": _VAL, "test": _TEST}, calls))
  assert calls == ["test", "validation"]
  _check(result, _EXPECTED["test"])


def test_the_latest_validation_evaluation_sets_the_threshold():
  ev = segmentation.ValThresholdDice(_FakeGlamTask(), name="dice_val_threshold", steps=4)
  # a validation split on which t=0.75 is best for the global benign map
  other = {k: v.copy() for k, v in _VAL.items()}
  other["global/inter"][:2, 0] = [[0, 0, 4], [0, 0, 2]]
  other["global/pred"][:2, 0] = [[9, 9, 4], [9, 9, 2]]
  calls = []
  ev(_context(ev, "validation", {"validation": other}, calls))
  assert ev(_context(ev, "test", {"test": _TEST}, calls))[
      "dice_global_val_threshold/benign"] == 0.75
  ev(_context(ev, "validation", {"validation": _VAL}, calls))
  result = ev(_context(ev, "test", {"test": _TEST}, calls))
  assert result["dice_global_val_threshold/benign"] == 0.5
  assert result["dice_global_at_val_threshold/benign"] == pytest.approx(0.6)


def test_a_class_without_validation_images_has_no_threshold():
  val = _sums(labels=[[1, 0]], has_seg=[[1, 1]],  # no malignant image on validation
              **{"global": ([[[1, 1, 1], [1, 1, 1]]], [[[2, 2, 2], [2, 2, 2]]], [[2, 2]])})
  test = _sums(labels=[[1, 1]], has_seg=[[1, 1]],
               **{"global": ([[[1, 1, 1], [1, 1, 1]]], [[[2, 2, 2], [2, 2, 2]]], [[2, 2]])})
  task = _FakeGlamTask()
  task.uses_local = False  # a global-only stage: no fused map, no gain
  ev = segmentation.ValThresholdDice(task, name="d", steps=4)
  assert ev.keys() == {f"dice_global_{k}/{c}" for k in ("val_threshold", "at_val_threshold")
                       for c in ("benign", "malignant")}
  sums, calls = {"validation": val, "test": test}, []
  ev(_context(ev, "validation", sums, calls))
  result = ev(_context(ev, "test", sums, calls))
  assert result["dice_global_val_threshold/benign"] == 0.25
  assert result["dice_global_at_val_threshold/benign"] == pytest.approx(2 / 4)
  assert np.isnan(result["dice_global_val_threshold/malignant"])
  assert np.isnan(result["dice_global_at_val_threshold/malignant"])


def test_a_split_without_masks_gives_nothing():
  ev = segmentation.ValThresholdDice(_FakeGlamTask(), name="d", steps=4)
  ctx = evaluators.EvalContext(task=ev.task, split="test", outputs={"labels": np.zeros((1, 2))},
                               variables={}, predict=None, source=None, stage_dir="",
                               bootstrap=0, seed=0)
  assert ev(ctx) == {}


def test_bad_options_name_them():
  for steps in (1, 2.5, True, 5000):
    with pytest.raises(ValueError, match=f"steps={steps!r}"):
      segmentation.ValThresholdDice(_FakeGlamTask(), name="d", steps=steps)
  with pytest.raises(ValueError, match="needs a GLAM task.*object"):
    segmentation.ValThresholdDice(object(), name="d")


# -- the task's own maps ----------------------------------------------------------------------

class _FakeSource:
  def __init__(self, **metadata):
    self.dataset_info = type("Info", (), {"metadata": metadata})()


class _StubGLAM(nn.Module):
  """GLAM's outputs in [0, 1] at GLAM's shapes, from a network that compiles at once (the
  test is about the maps' path through the task and the evaluator, not the network)."""

  @nn.compact
  def __call__(self, x, *, train, local=False, fuse=False, train_global=None):
    del train, train_global
    w = self.param("w", nn.initializers.ones, (2,))
    small = jax.nn.sigmoid(w * x[:, ::16, ::16, :])                      # [B, h/16, w/16, 2]
    out = {"saliency_global": small, "y_global": small.mean((1, 2))}
    if local:
      out["y_local"] = out["y_global"]
      out["patch_positions"] = jnp.zeros((x.shape[0], 1, 2), jnp.int32)
    if fuse:
      out["saliency"] = jax.nn.sigmoid(-w * x)                          # [B, H, W, 2]
    return out


def test_the_task_grid_at_one_half_is_its_own_hard_dice():
  c = glam_config.get_config("smoke")
  task = glam.GlamTask(base.TaskContext(c, c.stages.local_net, _FakeSource(
      image_shape=[64, 64], class_names=["benign", "malignant"])))
  task.model = _StubGLAM()
  rng = np.random.default_rng(0)
  seg = np.zeros((2, 64, 64, 2), np.float32)
  seg[0, 10:30, 20:40, 0] = seg[1, 30:50, 5:25, 1] = 1
  batch = {"image": jnp.asarray(rng.normal(size=(2, 64, 64, 1)), jnp.float32),
           "labels": jnp.asarray([[1, 0], [0, 1]], jnp.float32), "seg": jnp.asarray(seg),
           "has_seg": jnp.ones((2, 2), jnp.float32)}
  variables = task.init(jax.random.PRNGKey(0), batch)
  ev = segmentation.ValThresholdDice(task, name="d", steps=100)
  own, grid = jax.jit(lambda v, b: (task.predict(v, b), ev._sums_fn(v, b)))(  # pylint: disable=protected-access
      variables, batch)
  half = int(np.flatnonzero(ev.thresholds == 0.5)[0])
  for m in ("global", "fused"):
    assert 0 < own[f"dice_{m}/hard_inter"].sum() < own[f"dice_{m}/target"].sum()
    np.testing.assert_array_equal(grid[f"{m}/pred"][..., half], own[f"dice_{m}/hard_pred"])
    np.testing.assert_array_equal(grid[f"{m}/inter"][..., half], own[f"dice_{m}/hard_inter"])
    np.testing.assert_array_equal(grid[f"{m}/target"], own[f"dice_{m}/target"])
  sums = {k: np.asarray(v) for k, v in grid.items()}
  calls = []
  on_validation = ev(_context(ev, "validation", {"validation": sums}, calls))
  result = ev(_context(ev, "test", {"test": sums}, calls))
  assert set(result) == ev.keys()
  np.testing.assert_equal(result, on_validation)  # the same images: the same choice and Dice
  for m in ("global", "fused"):
    for c, cls in enumerate(("benign", "malignant")):
      assert result[f"dice_{m}_val_threshold/{cls}"] in set(ev.thresholds.tolist())
      # the chosen threshold's Dice is at least the one at 0.5 (the grid holds 0.5)
      get = lambda k: np.asarray(own[f"dice_{m}/{k}"])[:, c]  # pylint: disable=cell-var-from-loop
      at_half, n = segmentation.mean_dice(get("hard_inter"), get("hard_pred"), get("target"),
                                          np.asarray(batch["labels"])[:, c] == 1)
      assert n == 1 and result[f"dice_{m}_at_val_threshold/{cls}"] >= at_half
