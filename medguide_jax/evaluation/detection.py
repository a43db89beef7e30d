"""COCO-style detection mAP through pycocotools, with bootstrap intervals over images.

Inputs are per-image lists on host: ground truth (boxes [n, 4], labels [n]) and predictions
(boxes [m, 4], scores [m], labels [m]), boxes (x0, y0, x1, y1) in pixels, x1/y1 exclusive,
labels in [0, len(class_names)). They are converted in memory to COCO's json layout (boxes
as x, y, width, height; 1-based image, category and annotation ids, because COCOeval marks
unmatched detections with id 0) and scored by pycocotools' COCOeval (iouType 'bbox',
area range 'all', up to 100 detections per image and class), whose prints are silenced.

AP of one class at one IoU threshold is COCO's 101-point interpolated precision; 'map'
averages it over thresholds and over the classes that have ground truth (pycocotools leaves
a class without ground truth out, so its false positives count nowhere). Every image is
registered with COCO, so the detections on an image without ground truth are false
positives of their class.

RSNA_IOU_THRESHOLDS are the RSNA Pneumonia Detection challenge's IoU range 0.40:0.05:0.75.
`coco_map(..., iou_thresholds=RSNA_IOU_THRESHOLDS)` is COCO AP averaged over those
thresholds, NOT the challenge's own score (a per-image TP / (TP + FP + FN) averaged over
thresholds and images), which is not computed here.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from medguide_jax.evaluation.metrics import with_intervals

RSNA_IOU_THRESHOLDS = np.round(np.arange(0.40, 0.76, 0.05), 2)  # 0.40, 0.45, ..., 0.75
COCO_IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)  # pycocotools' default

GroundTruth = Sequence[tuple[np.ndarray, np.ndarray]]
Predictions = Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]


def _boxes(boxes: Any, n: int, what: str) -> np.ndarray:
  boxes = np.asarray(boxes, np.float64)
  if boxes.size == 0:
    return np.zeros((0, 4))
  if boxes.ndim != 2 or boxes.shape != (n, 4):
    raise ValueError(f"{what}: boxes must be [{n}, 4] (x0, y0, x1, y1), got {boxes.shape}.")
  return boxes


def _labels(labels: Any, num_classes: int, what: str) -> np.ndarray:
  labels = np.asarray(labels).reshape(-1)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{what}: labels must lie in [0, {num_classes}) (one per class name), "
                     f"got [{labels.min()}, {labels.max()}].")
  return labels.astype(np.int64)


def _annotation(ann_id: int, image_id: int, box: np.ndarray, label: int) -> dict:
  w, h = float(box[2] - box[0]), float(box[3] - box[1])
  return {"id": ann_id, "image_id": image_id, "category_id": int(label) + 1, "iscrowd": 0,
          "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h}


def _coco_datasets(gt: GroundTruth, preds: Predictions,
                   num_classes: int) -> tuple[dict, dict]:
  """(ground-truth dataset, detections dataset) in COCO json layout, all images listed."""
  if len(gt) != len(preds):
    raise ValueError(f"coco_map: {len(gt)} ground-truth images but {len(preds)} predictions.")
  images = [{"id": i + 1} for i in range(len(gt))]
  categories = [{"id": c + 1} for c in range(num_classes)]
  gt_anns, dt_anns = [], []
  for i, ((g_boxes, g_labels), (p_boxes, p_scores, p_labels)) in enumerate(zip(gt, preds)):
    g_labels = _labels(g_labels, num_classes, f"gt[{i}]")
    for box, label in zip(_boxes(g_boxes, g_labels.size, f"gt[{i}]"), g_labels):
      gt_anns.append(_annotation(len(gt_anns) + 1, i + 1, box, label))
    p_labels = _labels(p_labels, num_classes, f"preds[{i}]")
    p_scores = np.asarray(p_scores, np.float64).reshape(-1)
    if p_scores.size != p_labels.size:
      raise ValueError(f"preds[{i}]: {p_scores.size} scores for {p_labels.size} labels.")
    for box, score, label in zip(_boxes(p_boxes, p_labels.size, f"preds[{i}]"), p_scores,
                                 p_labels):
      dt_anns.append({**_annotation(len(dt_anns) + 1, i + 1, box, label), "score": float(score)})
  base = {"images": images, "categories": categories}
  return {**base, "annotations": gt_anns}, {**base, "annotations": dt_anns}


def _coco(dataset: dict) -> COCO:
  coco = COCO()
  coco.dataset = dataset
  coco.createIndex()
  return coco


def _precision(gt: GroundTruth, preds: Predictions, num_classes: int,
               iou_thresholds: np.ndarray) -> np.ndarray:
  """COCOeval's interpolated precision [T, R=101, K] (area 'all', maxDets 100); -1 for a
  class without ground truth."""
  gt_set, dt_set = _coco_datasets(gt, preds, num_classes)
  with contextlib.redirect_stdout(io.StringIO()):
    evaluator = COCOeval(_coco(gt_set), _coco(dt_set), iouType="bbox")
    evaluator.params.iouThrs = np.asarray(iou_thresholds, np.float64)
    evaluator.evaluate()
    evaluator.accumulate()
  return evaluator.eval["precision"][:, :, :, 0, -1]


def _mean_valid(values: np.ndarray) -> float:
  valid = values[values > -1]
  return float(np.mean(valid)) if valid.size else float("nan")


def _map_values(gt: GroundTruth, preds: Predictions, class_names: Sequence[str],
                thresholds: np.ndarray) -> tuple[list[str], np.ndarray]:
  """(keys, values): 'map', 'map50' when 0.5 is a threshold, and 'map/<class>'."""
  precision = _precision(gt, preds, len(class_names), thresholds)  # [T, R, K]
  keys, values = ["map"], [_mean_valid(precision)]
  at50 = np.flatnonzero(np.isclose(thresholds, 0.5))
  if at50.size:
    keys.append("map50")
    values.append(_mean_valid(precision[at50[0]]))
  for k, name in enumerate(class_names):
    keys.append(f"map/{name}")
    values.append(_mean_valid(precision[:, :, k]))
  return keys, np.asarray(values, np.float64)


def _thresholds(iou_thresholds: Sequence[float] | None) -> np.ndarray:
  if iou_thresholds is None:
    return COCO_IOU_THRESHOLDS
  thresholds = np.asarray(iou_thresholds, np.float64).reshape(-1)
  if thresholds.size == 0 or np.any((thresholds <= 0) | (thresholds > 1)):
    raise ValueError(f"iou_thresholds must be a non-empty list in (0, 1], got {thresholds}.")
  return thresholds


def _counts(gt: GroundTruth) -> dict[str, int]:
  return {"images": len(gt), "objects": int(sum(np.asarray(g[1]).size for g in gt))}


def coco_map(gt: GroundTruth, preds: Predictions, *,
             iou_thresholds: Sequence[float] | None = None,
             class_names: Sequence[str]) -> dict[str, Any]:
  """COCO mAP of per-image predictions.

  Args:
    gt: one (boxes [n, 4], labels [n]) per image (n may be 0).
    preds: one (boxes [m, 4], scores [m], labels [m]) per image, in the same order.
    iou_thresholds: IoU thresholds to average AP over; None for COCO's 0.50:0.05:0.95
      (RSNA_IOU_THRESHOLDS for the RSNA range).
    class_names: K names; labels index them.

  Returns:
    {'map': AP over thresholds and classes with ground truth, 'map50': AP at IoU 0.5 (only
    if 0.5 is a threshold), 'map/<class>': the class's AP over the thresholds (nan if it has
    no ground truth), 'images', 'objects': counts}. 'map' is nan with no ground truth at all.
  """
  keys, values = _map_values(gt, preds, class_names, _thresholds(iou_thresholds))
  return {**{k: float(v) for k, v in zip(keys, values)}, **_counts(gt)}


class _Matches:
  """COCOeval's per-image, per-class matching, computed once, and COCO's `accumulate` over
  any multiset of those images: the bootstrap's resamples repeat images, which COCOeval
  cannot express (its image ids are a set), and re-running its matching per resample costs
  a full evaluation each. Written by hand after pycocotools 2.0's COCOeval.accumulate
  (area 'all', the last maxDets), and checked against COCOeval on resampled copies
  (tests/test_detection.py)."""

  def __init__(self, gt: GroundTruth, preds: Predictions, num_classes: int,
               thresholds: np.ndarray):
    gt_set, dt_set = _coco_datasets(gt, preds, num_classes)
    with contextlib.redirect_stdout(io.StringIO()):
      evaluator = COCOeval(_coco(gt_set), _coco(dt_set), iouType="bbox")
      p = evaluator.params
      p.iouThrs = np.asarray(thresholds, np.float64)
      p.areaRng, p.areaRngLbl = [p.areaRng[0]], ["all"]
      evaluator.evaluate()
    self.images, self.classes, self.max_det = len(gt), num_classes, p.maxDets[-1]
    self.thresholds, self.recall = len(thresholds), p.recThrs
    self.table = evaluator.evalImgs   # [class][image] (one area range), None if empty

  def precision(self, images: np.ndarray) -> np.ndarray:
    """Interpolated precision [T, R, K] over the images `images` (repeats count), -1 for a
    class without ground truth among them."""
    out = -np.ones((self.thresholds, len(self.recall), self.classes))
    for k in range(self.classes):
      cells = [self.table[k * self.images + int(i)] for i in images]
      cells = [e for e in cells if e is not None]
      if not cells:
        continue
      scores = np.concatenate([e["dtScores"][:self.max_det] for e in cells])
      order = np.argsort(-scores, kind="mergesort")
      matched = np.concatenate([e["dtMatches"][:, :self.max_det] for e in cells], 1)[:, order]
      ignored = np.concatenate([e["dtIgnore"][:, :self.max_det] for e in cells], 1)[:, order]
      gt_ignored = np.concatenate([e["gtIgnore"] for e in cells])
      positives = np.count_nonzero(gt_ignored == 0)
      if positives == 0:
        continue
      tp = np.cumsum(np.logical_and(matched, ~ignored), 1).astype(np.float64)
      fp = np.cumsum(np.logical_and(~matched.astype(bool), ~ignored), 1).astype(np.float64)
      for t in range(self.thresholds):
        recall = tp[t] / positives
        precision = tp[t] / (fp[t] + tp[t] + np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]   # COCO's envelope
        q = np.zeros(len(self.recall))
        at = np.searchsorted(recall, self.recall, side="left")
        valid = at < len(precision)
        q[valid] = precision[at[valid]]
        out[t, :, k] = q
    return out


def _values(precision: np.ndarray, class_names: Sequence[str],
            thresholds: np.ndarray) -> np.ndarray:
  """_map_values' numbers from a precision array [T, R, K]."""
  values = [_mean_valid(precision)]
  at50 = np.flatnonzero(np.isclose(thresholds, 0.5))
  if at50.size:
    values.append(_mean_valid(precision[at50[0]]))
  values += [_mean_valid(precision[:, :, k]) for k in range(len(class_names))]
  return np.asarray(values, np.float64)


def map_with_interval(gt: GroundTruth, preds: Predictions, *,
                      iou_thresholds: Sequence[float] | None = None,
                      class_names: Sequence[str], bootstrap: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
  """`coco_map` and, when bootstrap > 0, a 95% percentile bootstrap interval '<key>_ci95'
  for each AP key, from resampling images with replacement (a drawn image keeps all its
  boxes; a repeated image counts as that many images). Resamples where a value is nan (no
  ground truth of a class drawn) are left out of that key's interval (metrics.py convention).
  The matching is COCOeval's, done once (`_Matches`); each resample only re-accumulates.
  """
  thresholds = _thresholds(iou_thresholds)
  keys, point = _map_values(gt, preds, class_names, thresholds)
  matches = _Matches(gt, preds, len(class_names), thresholds) if bootstrap > 0 else None

  def resampled(idx: np.ndarray) -> np.ndarray:
    return _values(matches.precision(idx), class_names, thresholds)

  index = np.arange(len(gt))
  return {**with_intervals(keys, point, resampled, [index], bootstrap, seed), **_counts(gt)}
