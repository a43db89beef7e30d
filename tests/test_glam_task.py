"""GLAM task pieces against hand / numpy values: BCE, Dice sums and means, the relative gain,
predictions.csv, the record decoding (a view without a mask file), pictures, config errors."""
from __future__ import annotations

import csv

import jax.numpy as jnp
import numpy as np
import pytest

from configs import glam as glam_config
from medguide_jax.data import images, mammo
from medguide_jax.evaluation import glam_outputs, segmentation
from medguide_jax.losses import classification
from medguide_jax.tasks import base, glam


def test_bce_matches_numpy_and_ignores_padding():
  p = np.array([[0.9, 0.2], [0.3, 0.6], [0.5, 0.5]], np.float32)
  y = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
  w = np.array([1, 1, 0], np.float32)  # the third row is padding
  expect = np.mean([-(np.log(0.9) + np.log(0.8)) / 2, -(np.log(0.7) + np.log(0.6)) / 2])
  np.testing.assert_allclose(classification.binary_cross_entropy(
      probs=jnp.asarray(p), labels=jnp.asarray(y), weights=jnp.asarray(w)), expect, rtol=1e-6)
  rows = classification.binary_cross_entropy(probs=jnp.asarray(p), labels=jnp.asarray(y),
                                             reduction="none")
  np.testing.assert_allclose(rows[2], -np.log(0.5), rtol=1e-6)  # per example, unweighted


def test_dice_sums_and_means_by_hand():
  s = np.zeros((1, 4, 4, 2), np.float32)
  m = np.zeros((1, 4, 4, 2), np.uint8)
  s[0, :2, :2, 0] = 0.8          # benign prediction: a 2x2 square
  m[0, :2, :4, 0] = 1            # benign truth: the top two rows
  s[0, 3, 3, 1] = 0.4            # malignant: below the threshold
  m[0, 3, 3, 1] = 1
  out = {k: np.asarray(v) for k, v in segmentation.dice_sums(jnp.asarray(s), jnp.asarray(m), 0.5).items()}
  np.testing.assert_allclose(out["inter"][0], [3.2, 0.4], rtol=1e-6)
  np.testing.assert_allclose(out["pred"][0], [3.2, 0.4], rtol=1e-6)
  np.testing.assert_array_equal(out["target"][0], [8, 1])
  np.testing.assert_array_equal(out["hard_inter"][0], [4, 0])
  np.testing.assert_array_equal(out["hard_pred"][0], [4, 0])
  # soft benign Dice 2*3.2/(3.2+8); hard 2*4/(4+8)
  d = segmentation.dice_per_image(out["inter"][0], out["pred"][0], out["target"][0])
  np.testing.assert_allclose(d, [6.4 / 11.2, 0.8 / 1.4], rtol=1e-6)
  np.testing.assert_allclose(segmentation.dice_per_image(4, 4, 8), 8 / 12)


def test_mean_dice_leaves_out_images_without_a_mask_or_a_lesion():
  inter = np.array([1.0, 2.0, 5.0, 0.0])
  pred = np.array([2.0, 2.0, 5.0, 3.0])
  target = np.array([2.0, 4.0, 5.0, 0.0])
  valid = np.array([True, True, False, True])  # image 2 has no mask; image 3 no lesion
  value, n = segmentation.mean_dice(inter, pred, target, valid)
  assert n == 2
  np.testing.assert_allclose(value, np.mean([2 / 4, 4 / 6]))
  assert segmentation.mean_dice(inter, pred, target, np.zeros(4, bool)) == (pytest.approx(np.nan, nan_ok=True), 0)
  np.testing.assert_allclose(segmentation.relative_gain(0.698, 0.5), 0.396)
  assert np.isnan(segmentation.relative_gain(0.5, 0.0))


def test_dice_metrics_per_class_and_gain():
  n = 3
  outputs = {"has_seg": np.array([[1, 1], [1, 0], [0, 1]], np.float32)}
  labels = np.array([[1, 1], [1, 0], [1, 1]])  # benign: images 0, 1; malignant: 0, 2
  for m, scale in (("global", 1.0), ("fused", 2.0)):
    outputs[f"dice_{m}/inter"] = np.full((n, 2), 1.0 * scale)
    outputs[f"dice_{m}/pred"] = np.full((n, 2), 2.0 * scale)
    outputs[f"dice_{m}/target"] = np.full((n, 2), 4.0)
    outputs[f"dice_{m}/hard_inter"] = np.zeros((n, 2))
    outputs[f"dice_{m}/hard_pred"] = np.zeros((n, 2))
  r = segmentation.dice_metrics(outputs, labels, glam.CLASSES)
  np.testing.assert_allclose(r["dice_global/benign"], 2 / 6)
  np.testing.assert_allclose(r["dice_fused/benign"], 4 / 8)
  np.testing.assert_allclose(r["dice_gain/benign"], (0.5 - 1 / 3) / (1 / 3))
  assert r["dice_images/benign"] == 2 and r["dice_images/malignant"] == 2
  assert r["dice_global_hard/malignant"] == 0.0


def test_write_predictions_is_the_reference_layout(tmp_path):
  outputs = {"y_global": np.array([[0.31414, 0.0111], [0.45, 0.1458]]),
             "labels": np.array([[0, 0], [1, 0]], np.float32)}
  path = tmp_path / "predictions.csv"
  glam_outputs.write_predictions(str(path), ["0_L-CC", "0_R-CC"], outputs)
  rows = list(csv.reader(path.open()))
  assert rows[0] == ["image_index", "benign_pred", "malignant_pred", "benign_label",
                     "malignant_label"]
  assert rows[1] == ["0_L-CC", "0.3141", "0.0111", "0", "0"]
  assert rows[2] == ["0_R-CC", "0.4500", "0.1458", "1", "0"]
  with pytest.raises(ValueError, match="3 ids for 2"):
    glam_outputs.write_predictions(str(path), ["a", "b", "c"], outputs)


def _record(mask_benign: bool):
  img = (np.arange(32 * 16, dtype=np.uint16).reshape(32, 16) * 7) % 4096
  mask = np.zeros((32, 16), np.uint8)
  mask[4:8, 2:6] = 255
  return {"image": images.encode_png(img), "benign": 1, "malignant": 0,
          "benign_mask": images.encode_png(mask) if mask_benign else b"",
          "malignant_mask": b"", "has_benign_mask": int(mask_benign),
          "has_malignant_mask": 0, "id": b"0_R-CC", "view": b"R-CC", "source": b"mammo"}, img


def test_example_standardises_and_decodes_masks():
  record, img = _record(True)
  ex = mammo.glam_example(record, augment=False)
  x = ex["image"][..., 0]
  assert ex["image"].shape == (32, 16, 1)
  np.testing.assert_allclose(x.mean(), 0, atol=1e-5)
  np.testing.assert_allclose(x.std(), 1, rtol=1e-4)
  # standardising is affine: it keeps the order of the raw 16-bit values
  np.testing.assert_allclose(x, (img - img.mean()) / img.std(), atol=1e-4)
  assert ex["seg"].shape == (32, 16, 2) and ex["seg"][..., 0].sum() == 16
  np.testing.assert_array_equal(ex["has_seg"], [1, 0])
  np.testing.assert_array_equal(ex["labels"], [1, 0])
  train = mammo.glam_example(record, augment=True)
  assert "seg" not in train  # masks never reach training


def test_a_view_without_a_mask_file_has_an_empty_mask():
  record, _ = _record(False)
  ex = mammo.glam_example(record, augment=False)
  assert ex["seg"].sum() == 0 and ex["has_seg"].sum() == 0


def test_a_mask_of_the_wrong_shape_names_it():
  record, _ = _record(True)
  record["benign_mask"] = images.encode_png(np.zeros((8, 8), np.uint8))
  with pytest.raises(ValueError, match="benign_mask of 0_R-CC"):
    mammo.glam_example(record, augment=False)


def test_render_example_draws_outlines_patches_and_maps():
  h, w = 64, 32
  image = np.random.default_rng(0).normal(size=(h, w)).astype(np.float32)
  seg = np.zeros((h, w, 2), np.uint8)
  seg[10:20, 5:15, 0] = 1
  saliency = np.zeros((h, w, 2), np.float32)
  saliency[40:50, 10:20, 1] = 1.0
  pic = glam_outputs.render_example(image, seg, np.array([1, 0]), np.array([[30, 8]]), (16, 16),
                            saliency, max_height=64)
  gap = max(4, w // 60)
  assert pic.shape == (h, 4 * w + 3 * gap, 3) and pic.dtype == np.uint8
  assert tuple(pic[10, 10]) == (40, 200, 60)          # benign outline, panel 1
  assert tuple(pic[30, w + gap + 12]) == (40, 120, 255)  # patch box top edge, panel 2
  red = pic[45, 3 * (w + gap) + 15]
  assert red[0] > 200 and red[1] < 60                 # malignant map, panel 4
  assert tuple(pic[45, 2 * (w + gap) + 15]) == tuple(pic[45, 15])  # benign map empty there


def test_config_arguments():
  c = glam_config.get_config("smoke")
  assert set(c.stages) == {"global_net", "local_net", "joint"}
  assert c.stages.local_net.init_from == "global_net" and c.stages.joint.init_from == "local_net"
  assert c.stages.local_net.freeze == "global_net/.*"
  # the frozen global prediction cannot pick the local stage's best step: the local one does
  assert c.stages.local_net.select == "max:val/auc_local/mean"
  assert c.stages.global_net.select == c.stages.joint.select == "max:val/auc/mean"
  assert c.data.name == "synthetic_mammo"
  full = glam_config.get_config("size=full,bf16,remat,accumulate=2")
  assert full.data.name == "synthetic_mammo:full" and full.compute_dtype == "bfloat16"
  assert full.model.crop_shape == (512, 512) and full.model.remat
  assert full.stages.global_net.opt.accumulate_steps == 2
  inf = glam_config.get_config("dataset=nyu_glam_sample,pretrained=/w/joint")
  assert list(inf.stages) == ["inference"] and inf.stages.inference.num_steps == 0
  assert inf.data.name == "nyu_glam_sample:x8"
  with pytest.raises(ValueError, match="dataset='mnist'"):
    glam_config.get_config("dataset=mnist")
  with pytest.raises(ValueError, match="not both"):
    glam_config.get_config("pretrained=a,weights=b")


class _FakeSource:
  def __init__(self, **metadata):
    self.dataset_info = type("Info", (), {"metadata": metadata})()


def test_an_evaluation_only_dataset_cannot_be_trained_on():
  c = glam_config.get_config("smoke,dataset=nyu_glam_sample")
  source = _FakeSource(image_shape=[368, 240], class_names=["benign", "malignant"],
                       evaluation_only=True)
  with pytest.raises(ValueError, match="evaluation-only.*pretrained="):
    glam.GlamTask(base.TaskContext(c, c.stages.global_net, source))
  inference = glam_config.get_config("smoke,dataset=nyu_glam_sample,pretrained=/w/joint")
  task = glam.GlamTask(base.TaskContext(inference, inference.stages.inference, source))
  assert task.image_shape == (368, 240)
  with pytest.raises(ValueError, match="no 'image_shape'"):
    glam.GlamTask(base.TaskContext(c, c.stages.global_net, _FakeSource(class_names=[])))
