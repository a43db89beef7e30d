"""CenterNet-style anchor-free detection: the head, its targets and the box decoder.

CenterNet ("Objects as Points", Zhou, Wang & Kraehenbuehl 2019) represents each object by the
cell of ONE feature map (stride s) that holds its box center: a per-class heatmap says where
centers are, and two 2-channel maps at that cell give the box size and the sub-cell offset of
the center. We use it for the downstream detection task (RSNA Pneumonia style) because
  * it needs one scale only, so any encoder of this codebase plugs in through its last (or a
    chosen) feature map, with no feature pyramid to build per encoder (models/downstream.py
    `Detector` puts the head on a map of the encoder, kept under `img`);
  * the target encoding has no anchors, no anchor assignment and no IoU matching: a Gaussian
    per object and three scattered vectors, computed in numpy in the data workers;
  * decoding is a 3x3 max-pool and a top-k, cheap and jit-able at CPU size;
  * chest X-ray sets have few, large objects per image (0-4 pneumonia opacities), where one
    coarse map suffices and the peak extraction already removes most duplicates.

Conventions:
  * Boxes are (x0, y0, x1, y1) in pixels of the INPUT image, x1/y1 exclusive (pixel i covers
    [i, i + 1)), so a box's width is x1 - x0 and its center (x0 + x1) / 2.
  * The feature map of an [H, W] input at stride s is [ceil(H / s), ceil(W / s)] (what
    SAME-padded stride-2 convolutions give); cell (i, j) covers input pixels
    [j s, (j + 1) s) x [i s, (i + 1) s).
  * Size and offset are in feature-map cells, as CenterNet's 'wh' and 'reg' maps: size =
    (width, height) / s (raw, not log: CenterNet's L1 on raw sizes with weight 0.1), offset =
    center / s - floor(center / s) in [0, 1)^2, both ordered (x, y).
  * The heatmap output is logits; the loss and the decoder apply the sigmoid.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# CenterNet initialises the heatmap bias to -2.19 = logit(0.1), so that the focal loss of the
# (overwhelmingly negative) background starts small and training is stable.
HEATMAP_BIAS_INIT = -2.19


class CenterNetHead(nn.Module):
  """Three branches (3x3 conv + ReLU + 1x1 conv each) over a feature map [B, h, w, C].

  Attributes:
    num_classes: K, the heatmap channels.
    hidden: channels of each branch's 3x3 conv.

  Returns (from __call__) a dict of float32 maps: 'heatmap' logits [B, h, w, K], 'size'
  [B, h, w, 2] (box width, height in cells) and 'offset' [B, h, w, 2] (center offset x, y).
  """
  num_classes: int
  hidden: int = 64

  @nn.compact
  def __call__(self, features: jnp.ndarray) -> dict[str, jnp.ndarray]:
    if features.ndim != 4:
      raise ValueError(f"CenterNetHead needs a feature map [B, h, w, C], got {features.shape}.")
    outputs = {}
    for name, channels in (("heatmap", self.num_classes), ("size", 2), ("offset", 2)):
      bias = nn.initializers.constant(HEATMAP_BIAS_INIT if name == "heatmap" else 0.0)
      x = nn.relu(nn.Conv(self.hidden, (3, 3), name=f"{name}_conv")(features))
      x = nn.Conv(channels, (1, 1), bias_init=bias, name=f"{name}_out")(x)
      outputs[name] = x.astype(jnp.float32)
    return outputs


def feature_size(image_size: Sequence[int], stride: int) -> tuple[int, int]:
  """(h, w) = (ceil(H / stride), ceil(W / stride)) of an input of image_size (H, W)."""
  if stride < 1:
    raise ValueError(f"stride must be a positive integer, got {stride}.")
  return -(-int(image_size[0]) // stride), -(-int(image_size[1]) // stride)


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
  """CenterNet's heatmap radius (in cells) for a box of height x width cells.

  The smallest of the three corner-shift radii of CornerNet (Law & Deng 2018): the radius r
  such that a box whose corners move by up to r still has IoU >= min_overlap with the true
  one, for (1) both corners moving outward/inward together, (2) both inward, (3) both
  outward. Kept exactly as CenterNet's `gaussian_radius` computes it, including its known
  quirk: each quadratic's root is taken as (b + sqrt(b^2 - 4ac)) / 2 instead of dividing by
  2a, which gives larger radii than the stated overlap implies (CornerNet issue #110);
  CenterNet's published results were trained with this rule.
  """
  a1, b1 = 1.0, height + width
  c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
  r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
  a2, b2 = 4.0, 2 * (height + width)
  c2 = (1 - min_overlap) * width * height
  r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
  a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
  c3 = (min_overlap - 1) * width * height
  r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
  return min(r1, r2, r3)


def _gaussian_patch(radius: int) -> np.ndarray:
  """CenterNet's gaussian2D: [2r+1, 2r+1] with sigma = (2r+1)/6, peak exactly 1 at the
  center, values below eps * max set to 0."""
  sigma = (2 * radius + 1) / 6.0
  d = np.arange(-radius, radius + 1, dtype=np.float64)
  g = np.exp(-(d[:, None]**2 + d[None, :]**2) / (2 * sigma * sigma))
  g[g < np.finfo(g.dtype).eps * g.max()] = 0
  return g


def _draw_gaussian(heatmap: np.ndarray, cx: int, cy: int, radius: int) -> None:
  """Element-wise max of a Gaussian of `radius` centered at cell (cx, cy) into heatmap [h, w]
  (in place; cut at the map's border, as CenterNet's draw_umich_gaussian)."""
  g = _gaussian_patch(radius)
  h, w = heatmap.shape
  left, right = min(cx, radius), min(w - cx, radius + 1)
  top, bottom = min(cy, radius), min(h - cy, radius + 1)
  window = heatmap[cy - top:cy + bottom, cx - left:cx + right]
  np.maximum(window, g[radius - top:radius + bottom, radius - left:radius + right], out=window)


def clean_boxes(boxes: np.ndarray, labels: np.ndarray, image_size: Sequence[int],
                 num_classes: int) -> tuple[np.ndarray, np.ndarray, int, int]:
  """Boxes clipped to the image and empty ones removed: (boxes, labels, clipped, empty).
  The targets' and the evaluation's ground truth (tasks/downstream.py) are both this."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
  labels = np.asarray(labels).reshape(-1)
  if labels.shape[0] != boxes.shape[0]:
    raise ValueError(f"encode_targets: {boxes.shape[0]} boxes but {labels.shape[0]} labels.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"encode_targets: labels must lie in [0, {num_classes}), got "
                     f"[{labels.min()}, {labels.max()}].")
  if not np.all(np.isfinite(boxes)):
    raise ValueError("encode_targets: boxes contain non-finite coordinates.")
  height, width = image_size
  clipped = np.clip(boxes, 0.0, [width, height, width, height])
  nonempty = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  changed = np.any(clipped != boxes, axis=1)
  return (clipped[nonempty], labels[nonempty].astype(np.int64),
          int(np.sum(changed & nonempty)), int(np.sum(~nonempty)))


def encode_targets(boxes: np.ndarray, labels: np.ndarray, *, image_size: Sequence[int],
                   stride: int, num_classes: int, max_objects: int) -> dict[str, np.ndarray]:
  """CenterNet training targets of one image (numpy; runs in the data workers).

  Boxes partly outside the image are clipped to it (counted in 'clipped', whether or not
  later dropped); boxes that are empty after clipping are dropped ('empty'); of the rest, the first `max_objects` in the
  given order are kept and the others dropped entirely, from the heatmap too, as CenterNet
  does ('dropped'; set max_objects above a dataset's largest count so that it stays 0).

  Args:
    boxes: [N, 4] float (x0, y0, x1, y1) in input pixels, x1/y1 exclusive.
    labels: [N] int classes in [0, num_classes).
    image_size: (H, W) of the input image.
    stride: the feature map's stride in input pixels.
    num_classes: K.
    max_objects: M, the length of the per-object arrays.

  Returns:
    {'heatmap': [h, w, K] float32 (a Gaussian per object, exactly 1 at its center cell,
     overlapping Gaussians of a class combined by max), 'indices': [M] int32 (flat center
     cell y * w + x), 'size': [M, 2] float32 (width, height in cells), 'offset': [M, 2]
     float32, 'mask': [M] bool (valid rows), 'clipped', 'empty', 'dropped': int32 counts}.
  """
  h, w = feature_size(image_size, stride)
  boxes, labels, clipped, empty = clean_boxes(boxes, labels, image_size, num_classes)
  dropped = max(0, boxes.shape[0] - max_objects)
  boxes, labels = boxes[:max_objects], labels[:max_objects]
  heatmap = np.zeros((num_classes, h, w), np.float32)
  indices = np.zeros((max_objects,), np.int32)
  size = np.zeros((max_objects, 2), np.float32)
  offset = np.zeros((max_objects, 2), np.float32)
  mask = np.zeros((max_objects,), bool)
  for k, (box, label) in enumerate(zip(boxes / stride, labels)):
    bw, bh = box[2] - box[0], box[3] - box[1]
    center = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    cx, cy = np.floor(center).astype(int)
    radius = max(0, int(gaussian_radius(math.ceil(bh), math.ceil(bw))))
    _draw_gaussian(heatmap[label], cx, cy, radius)
    indices[k], size[k], offset[k], mask[k] = cy * w + cx, (bw, bh), center - (cx, cy), True
  return {"heatmap": np.ascontiguousarray(heatmap.transpose(1, 2, 0)), "indices": indices,
          "size": size, "offset": offset, "mask": mask, "clipped": np.int32(clipped),
          "empty": np.int32(empty), "dropped": np.int32(dropped)}


def gather_at(maps: jnp.ndarray, indices: jnp.ndarray) -> jnp.ndarray:
  """maps [B, h, w, C] at flat cells indices [B, M] (y * w + x) -> [B, M, C]."""
  flat = maps.reshape(maps.shape[0], -1, maps.shape[-1])
  return jnp.take_along_axis(flat, indices[..., None].astype(jnp.int32), axis=1)


def decode(outputs: dict[str, jnp.ndarray], *, stride: int, image_size: Sequence[int],
           top_k: int = 100) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """The top_k heatmap peaks of each image as boxes (jit-able; stride, image_size, top_k
  static).

  A peak is a cell whose sigmoid score is the maximum of its 3x3 neighbourhood in its class
  channel (CenterNet's max-pool "NMS"); the top_k peaks are taken over all cells and classes
  together. Boxes are center (cell + offset) * stride +- size * stride / 2, clipped to the
  image; negative predicted sizes count as 0.

  Args:
    outputs: the head's dict ('heatmap' logits [B, h, w, K], 'size', 'offset' [B, h, w, 2]).
    stride: the feature map's stride in input pixels.
    image_size: (H, W) of the input image (for clipping).
    top_k: detections per image (at most h * w * K).

  Returns:
    (boxes [B, k, 4] float32 x0y0x1y1 input pixels, scores [B, k] float32 in (0, 1), classes
    [B, k] int32), sorted by descending score.
  """
  scores = jax.nn.sigmoid(outputs["heatmap"].astype(jnp.float32))  # [B, h, w, K]
  batch, h, w, num_classes = scores.shape
  pooled = nn.max_pool(scores, (3, 3), strides=(1, 1), padding="SAME")
  peaks = jnp.where(scores == pooled, scores, 0.0)
  top_scores, flat = jax.lax.top_k(peaks.reshape(batch, -1), min(top_k, h * w * num_classes))
  cells, classes = flat // num_classes, flat % num_classes  # [B, k]
  size = jnp.maximum(gather_at(outputs["size"], cells), 0.0) * stride  # [B, k, 2]
  offset = gather_at(outputs["offset"], cells)
  grid = jnp.stack([cells % w, cells // w], axis=-1).astype(jnp.float32)  # (x, y) [B, k, 2]
  center = (grid + offset) * stride
  boxes = jnp.concatenate([center - size / 2, center + size / 2], axis=-1)
  height, width = image_size
  boxes = jnp.clip(boxes, 0.0, jnp.array([width, height, width, height], jnp.float32))
  return boxes, top_scores, classes.astype(jnp.int32)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one box [4] with boxes [n, 4] (x0y0x1y1, exclusive: area (x1-x0)(y1-y0))."""
  x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
  x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
  inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
  area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0,
                                                                      None)
  union = area(box) + area(boxes) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float = 0.5,
        max_detections: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Class-wise greedy non-maximum suppression of one image's detections (host, numpy).

  Standard greedy NMS: visit boxes by descending score; keep one unless it overlaps an
  already kept box OF THE SAME CLASS with IoU > iou_threshold. Written in numpy because it
  runs on host over the few hundred decoded boxes of an image, and the maintained
  implementations (torchvision.ops.nms, tf.image.non_max_suppression) would pull in a whole
  framework; the O(n * kept) loop is instant at that size.

  Args:
    boxes: [n, 4] x0y0x1y1. scores: [n]. classes: [n] int.
    iou_threshold: suppress above this IoU. max_detections: keep at most this many.

  Returns:
    (boxes [m, 4], scores [m], classes [m]) of the kept detections, by descending score.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  scores, classes = np.asarray(scores).reshape(-1), np.asarray(classes).reshape(-1)
  if not boxes.shape[0] == scores.shape[0] == classes.shape[0]:
    raise ValueError(f"nms: {boxes.shape[0]} boxes, {scores.shape[0]} scores and "
                     f"{classes.shape[0]} classes.")
  order = np.argsort(-scores, kind="stable")
  keep: list[int] = []
  for i in order:
    if len(keep) >= max_detections:
      break
    same = [j for j in keep if classes[j] == classes[i]]
    if same and np.any(box_iou(boxes[i], boxes[same]) > iou_threshold):
      continue
    keep.append(int(i))
  keep_idx = np.asarray(keep, np.int64)
  return boxes[keep_idx].astype(np.float32), scores[keep_idx], classes[keep_idx]
