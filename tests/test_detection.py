"""Tests of CenterNet detection: targets, decoding, NMS, the loss and COCO mAP.

Golden values are worked by hand or recomputed here with independent numpy code (CenterNet's
radius formula, its focal loss on probabilities); mAP cases are reasoned through COCO's
101-point interpolation.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medguide_jax.evaluation import detection as ed
from medguide_jax.losses import detection as ld
from medguide_jax.models import detection as md


def _radius_reference(h, w, overlap=0.7):
  """CenterNet's gaussian_radius, written out independently (its three quadratics, with the
  reference's '/ 2' roots)."""
  roots = []
  for a, b, c in ((1, h + w, w * h * (1 - overlap) / (1 + overlap)),
                  (4, 2 * (h + w), (1 - overlap) * w * h),
                  (4 * overlap, -2 * overlap * (h + w), (overlap - 1) * w * h)):
    roots.append((b + np.sqrt(b * b - 4 * a * c)) / 2)
  return min(roots)


def _encode(boxes, labels, image_size=(64, 64), stride=4, num_classes=2, max_objects=4):
  return md.encode_targets(np.asarray(boxes, np.float32), np.asarray(labels), stride=stride,
                           image_size=image_size, num_classes=num_classes,
                           max_objects=max_objects)


# ---------------------------------------------------------------------------- targets


def test_gaussian_radius_matches_centernet_formula():
  # By hand for a 4 x 5 box: r3 = (-12.6 + sqrt(12.6^2 + 4 * 2.8 * 6)) / 2 = 1.216.
  assert md.gaussian_radius(4, 5) == pytest.approx(1.2160, abs=1e-4)
  for h, w in [(1, 1), (3, 7), (10, 10), (25, 4), (40, 60)]:
    assert md.gaussian_radius(h, w) == pytest.approx(_radius_reference(h, w), rel=1e-12)


def test_encode_targets_hand_values():
  # Box (10, 6, 30, 22) px at stride 4 -> (2.5, 1.5, 7.5, 5.5) cells: width 5, height 4,
  # center (5.0, 3.5) -> cell (x 5, y 3), offset (0, 0.5), flat index 3 * 16 + 5 = 53.
  t = _encode([[10, 6, 30, 22]], [1])
  assert t["heatmap"].shape == (16, 16, 2) and t["heatmap"].dtype == np.float32
  np.testing.assert_array_equal(t["indices"], [53, 0, 0, 0])
  np.testing.assert_allclose(t["size"][0], [5.0, 4.0])
  np.testing.assert_allclose(t["offset"][0], [0.0, 0.5])
  np.testing.assert_array_equal(t["mask"], [True, False, False, False])
  assert t["heatmap"][3, 5, 1] == 1.0 and t["heatmap"].max() == 1.0
  assert not t["heatmap"][..., 0].any()
  assert (t["clipped"], t["empty"], t["dropped"]) == (0, 0, 0)


@pytest.mark.parametrize("box", [[10, 6, 30, 22], [0, 0, 48, 40], [20, 8, 60, 64]])
def test_heatmap_gaussian_radius_and_values(box):
  t = _encode([box], [0])
  hm = t["heatmap"][..., 0]
  (cy, cx), = np.argwhere(hm == 1.0)
  w_cells, h_cells = (box[2] - box[0]) / 4, (box[3] - box[1]) / 4
  r = max(0, int(_radius_reference(math.ceil(h_cells), math.ceil(w_cells))))
  sigma = (2 * r + 1) / 6
  rows, cols = np.nonzero(hm)
  # The support is the (2r+1)^2 square around the center, cut at the map's border.
  assert rows.min() == max(cy - r, 0) and rows.max() == min(cy + r, 15)
  assert cols.min() == max(cx - r, 0) and cols.max() == min(cx + r, 15)
  for dy, dx in [(0, 1), (1, 1), (-1, 0), (r, 0), (0, -r)]:
    y, x = cy + dy, cx + dx
    if 0 <= y < 16 and 0 <= x < 16 and max(abs(dy), abs(dx)) <= r:
      assert hm[y, x] == pytest.approx(math.exp(-(dx * dx + dy * dy) / (2 * sigma**2)),
                                       rel=1e-6)


def test_overlapping_gaussians_of_one_class_combine_by_max():
  a, b = _encode([[0, 0, 40, 40]], [0]), _encode([[8, 8, 48, 48]], [0])
  both = _encode([[0, 0, 40, 40], [8, 8, 48, 48]], [0, 0])
  np.testing.assert_array_equal(both["heatmap"], np.maximum(a["heatmap"], b["heatmap"]))


def test_clipping_empty_and_dropped_counts():
  boxes = [[4, 4, 20, 20],      # inside
           [50, -6, 70, 10],    # partly outside: clipped to (50, 0, 64, 10)
           [70, 70, 80, 80],    # entirely outside: empty after clipping
           [30, 30, 30, 40]]    # zero width
  t = _encode(boxes, [0, 1, 0, 1], max_objects=4)
  assert (t["clipped"], t["empty"], t["dropped"]) == (1, 2, 0)
  np.testing.assert_array_equal(t["mask"], [True, True, False, False])
  np.testing.assert_allclose(t["size"][1], [14 / 4, 10 / 4])
  np.testing.assert_allclose(t["offset"][1], [57 / 4 - 14, 5 / 4 - 1])
  short = _encode(boxes, [0, 1, 0, 1], max_objects=1)
  assert short["dropped"] == 1 and short["mask"].tolist() == [True]
  assert not short["heatmap"][..., 1].any()  # the dropped box leaves no peak either


def test_encode_targets_bad_input_names_the_field():
  with pytest.raises(ValueError, match="labels must lie in"):
    _encode([[0, 0, 8, 8]], [2])
  with pytest.raises(ValueError, match="1 boxes but 2 labels"):
    _encode([[0, 0, 8, 8]], [0, 1])
  empty = _encode(np.zeros((0, 4)), np.zeros((0,), int))
  assert not empty["mask"].any() and not empty["heatmap"].any()


# ---------------------------------------------------------------------------- decoding


def _perfect_outputs(targets, num_cells_hw):
  """Head outputs that say exactly what the targets say (one image)."""
  h, w = num_cells_hw
  hm = np.clip(targets["heatmap"], 1e-4, 1 - 1e-4)
  size, offset = np.zeros((h * w, 2), np.float32), np.zeros((h * w, 2), np.float32)
  m = targets["mask"]
  size[targets["indices"][m]] = targets["size"][m]
  offset[targets["indices"][m]] = targets["offset"][m]
  return {"heatmap": jnp.asarray(np.log(hm / (1 - hm)))[None],
          "size": jnp.asarray(size.reshape(h, w, 2))[None],
          "offset": jnp.asarray(offset.reshape(h, w, 2))[None]}


def test_decode_round_trip_recovers_boxes():
  image_size, stride = (60, 44), 8  # non-divisible: an 8 x 6 map
  boxes = np.array([[2, 3, 19, 30], [25, 5, 43, 21], [10, 35, 37, 59]], np.float32)
  labels = np.array([0, 1, 0])
  t = md.encode_targets(boxes, labels, image_size=image_size, stride=stride, num_classes=2,
                        max_objects=5)
  assert t["heatmap"].shape == (8, 6, 2)
  decode = jax.jit(md.decode, static_argnames=("stride", "image_size", "top_k"))
  got_boxes, scores, classes = decode(_perfect_outputs(t, (8, 6)), stride=stride,
                                      image_size=image_size, top_k=10)
  assert got_boxes.shape == (1, 10, 4) and scores.shape == classes.shape == (1, 10)
  assert np.all(np.diff(np.asarray(scores[0])) <= 0)
  found = np.asarray(scores[0]) > 0.5
  assert found.sum() == 3
  got, got_classes = np.asarray(got_boxes[0, found]), np.asarray(classes[0, found])
  order, want = np.argsort(got[:, 0]), np.argsort(boxes[:, 0])  # distinct x0s
  np.testing.assert_allclose(got[order], boxes[want], atol=1e-3)
  np.testing.assert_array_equal(got_classes[order], labels[want])


def test_decode_clips_to_image_and_caps_top_k():
  outputs = {"heatmap": jnp.full((1, 2, 2, 1), -5.0).at[0, 0, 0, 0].set(5.0),
             "size": jnp.full((1, 2, 2, 2), 10.0), "offset": jnp.zeros((1, 2, 2, 2))}
  boxes, scores, classes = md.decode(outputs, stride=4, image_size=(8, 8), top_k=100)
  assert boxes.shape == (1, 4, 4)  # top_k capped at h * w * K = 4
  np.testing.assert_allclose(boxes[0, 0], [0, 0, 8, 8])  # 40 px box around (0, 0), clipped
  assert scores[0, 0] == pytest.approx(1 / (1 + math.exp(-5)), rel=1e-6)


def test_nms_hand_example():
  boxes = np.array([[0, 0, 10, 10],     # 0.9 kept
                    [1, 1, 11, 11],     # 0.8: IoU 81/119 = 0.68 with box 0 -> suppressed
                    [20, 20, 30, 30],   # 0.7 kept
                    [0, 0, 10, 10],     # 0.6, other class: kept (class-wise)
                    [0, 0, 10, 5]],     # 0.5: IoU 0.5 with box 0, not > 0.5 -> kept
                   np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
  classes = np.array([0, 0, 0, 1, 0])
  kept_boxes, kept_scores, kept_classes = md.nms(boxes, scores, classes, iou_threshold=0.5)
  np.testing.assert_allclose(kept_scores, [0.9, 0.7, 0.6, 0.5])
  np.testing.assert_array_equal(kept_classes, [0, 0, 1, 0])
  np.testing.assert_allclose(kept_boxes, boxes[[0, 2, 3, 4]])
  _, loose, _ = md.nms(boxes, scores, classes, iou_threshold=0.7)
  np.testing.assert_allclose(loose, scores)
  _, capped, _ = md.nms(boxes[::-1], scores[::-1], classes[::-1], max_detections=2)
  np.testing.assert_allclose(capped, [0.9, 0.7])
  empty = md.nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))
  assert all(a.shape[0] == 0 for a in empty)


# ---------------------------------------------------------------------------- loss


def _numpy_loss(out, tgt, weights, size_w=0.1, off_w=1.0):
  """CenterNet's _neg_loss on probabilities and RegL1Loss, in float64 numpy."""
  p = 1 / (1 + np.exp(-np.asarray(out["heatmap"], np.float64)))
  y = np.asarray(tgt["heatmap"], np.float64)
  pos = y == 1
  per_cell = np.where(pos, -np.log(p) * (1 - p)**2, -np.log(1 - p) * p**2 * (1 - y)**4)
  num_pos = (weights * pos.sum((1, 2, 3))).sum()
  focal = (weights * per_cell.sum((1, 2, 3))).sum() / max(num_pos, 1)
  def l1(name):
    b, h, w, _ = out[name].shape
    flat = np.asarray(out[name]).reshape(b, h * w, 2)
    pred = np.stack([flat[i, tgt["indices"][i]] for i in range(b)])
    m = tgt["mask"] * weights[:, None]
    return (np.abs(pred - tgt[name]) * m[..., None]).sum() / (2 * m.sum())
  return focal + size_w * l1("size") + off_w * l1("offset"), focal


def _batch_targets(per_image):
  return {k: np.stack([t[k] for t in per_image]) for k in per_image[0]}


def _random_case(rng, batch=3, image=32, stride=4, num_classes=3):
  targets = []
  for _ in range(batch):
    n = rng.integers(1, 4)
    xy = rng.uniform(0, image - 10, size=(n, 2))
    wh = rng.uniform(4, 10, size=(n, 2))
    labels = rng.integers(0, num_classes, n)
    targets.append(md.encode_targets(np.concatenate([xy, xy + wh], 1), labels,
                                     image_size=(image, image), stride=stride,
                                     num_classes=num_classes, max_objects=4))
  tgt = _batch_targets(targets)
  h = image // stride
  out = {"heatmap": rng.normal(0, 3, (batch, h, h, num_classes)).astype(np.float32),
         "size": rng.normal(2, 1, (batch, h, h, 2)).astype(np.float32),
         "offset": rng.uniform(0, 1, (batch, h, h, 2)).astype(np.float32)}
  return out, tgt


def test_centernet_loss_matches_numpy_on_random_inputs():
  rng = np.random.default_rng(0)
  out, tgt = _random_case(rng)
  weights = np.array([1.0, 0.5, 1.0], np.float32)
  loss, metrics = jax.jit(ld.centernet_loss)(out, tgt, weights=jnp.asarray(weights))
  expected, focal = _numpy_loss(out, tgt, weights)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["heatmap"]) == pytest.approx(focal, rel=1e-5)
  assert float(metrics["objects"]) == pytest.approx((tgt["mask"] * weights[:, None]).sum())


def test_padding_examples_do_not_change_the_loss():
  rng = np.random.default_rng(1)
  out, tgt = _random_case(rng, batch=2)
  pad_out, pad_tgt = _random_case(rng, batch=1)
  cat = lambda a, b: {k: np.concatenate([a[k], b[k]]) for k in a}
  loss, _ = ld.centernet_loss(out, tgt)
  padded, _ = ld.centernet_loss(cat(out, pad_out), cat(tgt, pad_tgt),
                                weights=jnp.array([1.0, 1.0, 0.0]))
  assert float(padded) == pytest.approx(float(loss), rel=1e-6)
  nothing, _ = ld.centernet_loss(out, tgt, weights=jnp.zeros(2))
  assert float(nothing) == 0.0


def test_loss_is_minimal_at_perfect_outputs():
  rng = np.random.default_rng(2)
  _, tgt = _random_case(rng, batch=2)
  b, h, w, _ = tgt["heatmap"].shape
  size, offset = np.zeros((b, h * w, 2), np.float32), np.zeros((b, h * w, 2), np.float32)
  for i in range(b):
    m = tgt["mask"][i]
    size[i, tgt["indices"][i][m]] = tgt["size"][i][m]
    offset[i, tgt["indices"][i][m]] = tgt["offset"][i][m]
  perfect = {"heatmap": np.where(tgt["heatmap"] == 1, 20.0, -20.0).astype(np.float32),
             "size": size.reshape(b, h, w, 2), "offset": offset.reshape(b, h, w, 2)}
  loss, metrics = ld.centernet_loss(perfect, tgt)
  assert float(loss) < 1e-6 and float(metrics["size"]) == 0.0
  worse = dict(perfect, size=perfect["size"] + 0.5)
  assert float(ld.centernet_loss(worse, tgt)[0]) == pytest.approx(0.05, abs=1e-5)


def test_loss_rejects_mismatched_shapes():
  rng = np.random.default_rng(3)
  out, tgt = _random_case(rng, batch=2)
  with pytest.raises(AssertionError):
    ld.centernet_loss(dict(out, heatmap=out["heatmap"][..., :2]), tgt)


# ---------------------------------------------------------------------------- model


def test_head_shapes_and_bias_init():
  head = md.CenterNetHead(num_classes=3, hidden=8)
  variables = head.init(jax.random.PRNGKey(0), jnp.zeros((2, 4, 5, 6)))
  out = head.apply(variables, jnp.zeros((2, 4, 5, 6)))
  assert {k: v.shape for k, v in out.items()} == {
      "heatmap": (2, 4, 5, 3), "size": (2, 4, 5, 2), "offset": (2, 4, 5, 2)}
  np.testing.assert_allclose(variables["params"]["heatmap_out"]["bias"], -2.19)
  np.testing.assert_allclose(out["heatmap"], -2.19, rtol=1e-6)  # zero input: the bias


def test_tiny_training_reduces_the_loss():
  rng = np.random.default_rng(4)
  _, tgt = _random_case(rng, batch=2, image=32, stride=4, num_classes=2)
  features = jnp.asarray(rng.normal(size=(2, 8, 8, 8)), jnp.float32)
  head = md.CenterNetHead(num_classes=2, hidden=16)
  params = head.init(jax.random.PRNGKey(0), features)["params"]
  opt = optax.adam(1e-2)

  @jax.jit
  def step(params, state):
    loss_fn = lambda p: ld.centernet_loss(head.apply({"params": p}, features), tgt)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = opt.init(params)
  params, state, first = step(params, state)
  for _ in range(100):
    params, state, last = step(params, state)
  assert float(last) < 0.3 * float(first)


# ---------------------------------------------------------------------------- mAP


NO_PREDS = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))


def _gt_set():
  return [(np.array([[0, 0, 10, 10], [20, 20, 40, 40]]), np.array([0, 1])),
          (np.zeros((0, 4)), np.zeros(0, int)),   # an image without findings
          (np.array([[5, 5, 30, 25]]), np.array([0]))]


def test_map_is_one_for_perfect_and_zero_for_no_predictions():
  gt = _gt_set()
  perfect = [(b, np.ones(len(l)), l) for b, l in gt]
  result = ed.coco_map(gt, perfect, class_names=["opacity", "nodule"])
  assert result["map"] == pytest.approx(1.0) and result["map50"] == pytest.approx(1.0)
  assert result["map/opacity"] == pytest.approx(1.0)
  assert result["map/nodule"] == pytest.approx(1.0)
  assert (result["images"], result["objects"]) == (3, 3)
  none = ed.coco_map(gt, [NO_PREDS] * 3, class_names=["opacity", "nodule"])
  assert none["map"] == 0.0 and none["map/nodule"] == 0.0


def test_map_hand_case_one_of_two_found():
  # Recall reaches 1/2 at precision 1: COCO's 101-point interpolation gives precision 1 at
  # recall thresholds 0.00..0.50 (51 points) and 0 above, so AP = 51 / 101.
  gt = [(np.array([[0, 0, 10, 10], [20, 20, 40, 40]]), np.array([0, 0]))]
  preds = [(np.array([[0, 0, 10, 10]]), np.array([0.9]), np.array([0]))]
  assert ed.coco_map(gt, preds, class_names=["a"])["map"] == pytest.approx(51 / 101)


def test_false_positive_on_an_image_without_ground_truth_counts():
  gt = [(np.array([[0, 0, 10, 10]]), np.array([0])), (np.zeros((0, 4)), np.zeros(0, int))]
  hit = (np.array([[0, 0, 10, 10]]), np.array([0.5]), np.array([0]))
  fp_first = (np.array([[3, 3, 9, 9]]), np.array([0.9]), np.array([0]))
  fp_last = (np.array([[3, 3, 9, 9]]), np.array([0.1]), np.array([0]))
  # Ranked FP then TP: precision 1/2 at recall 1, which interpolates to 1/2 everywhere.
  assert ed.coco_map(gt, [hit, fp_first], class_names=["a"])["map"] == pytest.approx(0.5)
  assert ed.coco_map(gt, [hit, fp_last], class_names=["a"])["map"] == pytest.approx(1.0)


def test_rsna_thresholds_count_a_loose_box_at_low_iou_only():
  np.testing.assert_allclose(ed.RSNA_IOU_THRESHOLDS,
                             [0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75])
  gt = [(np.array([[0, 0, 100, 100]]), np.array([0]))]
  preds = [(np.array([[0, 0, 100, 47]]), np.array([0.8]), np.array([0]))]  # IoU 0.47
  rsna = ed.coco_map(gt, preds, iou_thresholds=ed.RSNA_IOU_THRESHOLDS, class_names=["a"])
  assert rsna["map"] == pytest.approx(2 / 8)  # a hit at 0.40 and 0.45 of 8 thresholds
  assert rsna["map50"] == 0.0
  assert ed.coco_map(gt, preds, class_names=["a"])["map"] == 0.0
  only_low = ed.coco_map(gt, preds, iou_thresholds=[0.4], class_names=["a"])
  assert only_low["map"] == pytest.approx(1.0) and "map50" not in only_low


def test_map_class_without_ground_truth_is_nan_and_left_out():
  gt = [(np.array([[0, 0, 10, 10]]), np.array([0]))]
  preds = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([0.9, 0.8]),
            np.array([0, 1]))]
  result = ed.coco_map(gt, preds, class_names=["a", "b"])
  assert math.isnan(result["map/b"]) and result["map"] == pytest.approx(1.0)


def test_map_with_interval_resamples_images():
  gt = _gt_set() * 2
  preds = [(b, np.ones(len(l)), l) for b, l in gt]
  preds[0] = NO_PREDS  # miss one image's two boxes
  result = ed.map_with_interval(gt, preds, class_names=["opacity", "nodule"], bootstrap=30,
                                seed=0)
  lo, hi = result["map_ci95"]
  assert lo <= result["map"] <= hi and lo < hi
  assert result["map"] == ed.coco_map(gt, preds, class_names=["opacity", "nodule"])["map"]
  again = ed.map_with_interval(gt, preds, class_names=["opacity", "nodule"], bootstrap=30,
                               seed=0)
  assert again == result
  assert "map/nodule_ci95" in result and "map50_ci95" in result
  plain = ed.map_with_interval(gt, preds, class_names=["opacity", "nodule"], bootstrap=0)
  assert "map_ci95" not in plain


def test_map_bad_input_names_the_image():
  gt = [(np.array([[0, 0, 10, 10]]), np.array([3]))]
  with pytest.raises(ValueError, match=r"gt\[0\].*labels must lie in \[0, 1\)"):
    ed.coco_map(gt, [NO_PREDS], class_names=["a"])
  with pytest.raises(ValueError, match="1 ground-truth images but 2 predictions"):
    ed.coco_map(gt[:1], [NO_PREDS] * 2, class_names=["a", "b", "c", "d"])
  bad = [(np.array([[0, 0, 10]]), np.array([0]), np.array([0]))]
  with pytest.raises(ValueError, match=r"preds\[0\]: boxes must be \[1, 4\]"):
    ed.coco_map([(np.zeros((0, 4)), np.zeros(0, int))], bad, class_names=["a"])


def test_the_bootstrap_accumulation_is_cocoeval_on_the_resampled_images():
  """_Matches re-accumulates COCOeval's matching over a multiset of images: the same
  precision as COCOeval run on that many distinct copies of the drawn images."""
  rng = np.random.default_rng(3)
  gt, preds = [], []
  for i in range(12):
    n, m = int(rng.integers(0, 4)), int(rng.integers(0, 6))
    xy = rng.uniform(0, 40, (n, 2))
    g = np.concatenate([xy, xy + rng.uniform(5, 20, (n, 2))], 1)
    jitter = rng.normal(0, 3, (m, 4))
    base = g[rng.integers(0, n, m)] if n else np.tile([[5, 5, 15, 15]], (m, 1))
    p = np.concatenate([np.minimum(base[:, :2], base[:, 2:]), np.maximum(base[:, :2],
                        base[:, 2:]) + 1], 1)[:, :4] + jitter
    p[:, 2:] = np.maximum(p[:, 2:], p[:, :2] + 1)
    gt.append((g, rng.integers(0, 2, n)))
    preds.append((p, rng.uniform(0, 1, m), rng.integers(0, 2, m)))
  thresholds = ed.COCO_IOU_THRESHOLDS
  matches = ed._Matches(gt, preds, 2, thresholds)
  np.testing.assert_allclose(matches.precision(np.arange(12)),
                             ed._precision(gt, preds, 2, thresholds))
  idx = rng.integers(0, 12, 12)   # with repeats
  expected = ed._precision([gt[i] for i in idx], [preds[i] for i in idx], 2,
                                       thresholds)
  np.testing.assert_allclose(matches.precision(idx), expected)
