"""GLAM's output files, as evaluators: the reference's predictions.csv and per-image pictures.

Both run on the final evaluation of the splits they are given (the glam config gives
'test'), on every process (the pictures gather the variables), writing from process 0.
"""
from __future__ import annotations

import csv
import io
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from medguide_jax import metric_writers
from medguide_jax.data import images, mammo
from medguide_jax.evaluation import evaluators


def _ids(source) -> list[str]:
  return [images.text(source[i]["id"]) for i in range(len(source))]


class PredictionsCSV(evaluators.Evaluator):
  """<stage dir>/predictions.csv over the split (the split's name is added for any split
  but 'test'). No metrics."""

  def run(self, ctx: evaluators.EvalContext) -> dict:
    if metric_writers.is_writer():
      name = "predictions.csv" if ctx.split == "test" else f"predictions_{ctx.split}.csv"
      write_predictions(os.path.join(ctx.stage_dir, name), _ids(ctx.source), ctx.outputs)
    return {}


class Pictures(evaluators.Evaluator):
  """<stage dir>/visualization/<id>.png for the split's first `count` images (default 8):
  the input with the mask outlines, the selected patches, the benign and malignant maps.
  Uses the task's `picture_maps(variables, images)`. No metrics."""

  def __init__(self, task, *, count: int = 8, **kw):
    super().__init__(task, **kw)
    if count < 0:
      raise ValueError(f"count={count} must be >= 0")
    self.count = int(count)

  def run(self, ctx: evaluators.EvalContext) -> dict:
    if not self.count:
      return {}
    variables = jax.tree.map(np.asarray, multihost_utils.process_allgather(ctx.variables,
                                                                          tiled=True))
    if not metric_writers.is_writer():
      return {}
    out_dir = os.path.join(ctx.stage_dir, "visualization")
    os.makedirs(out_dir, exist_ok=True)
    ids, n = _ids(ctx.source), min(self.count, len(ctx.source))
    for i in range(n):
      example = mammo.glam_example(ctx.source[i], augment=False)
      saliency, positions = ctx.task.picture_maps(variables, example["image"][None])
      picture = render_example(example["image"][..., 0], example["seg"], example["has_seg"],
                               positions[0], ctx.task.crop_shape, saliency[0])
      Image.fromarray(picture).save(os.path.join(out_dir, f"{ids[i].replace(os.sep, '_')}.png"))
    logging.info("glam: %d pictures in %s", n, out_dir)
    return {}


def write_predictions(path: str, ids: list[str], outputs: dict) -> None:
  """The reference's predictions.csv: image_index, benign_pred, malignant_pred, labels
  (plus the local module's predictions when there are any)."""
  if len(ids) != len(outputs["y_global"]):
    raise ValueError(f"{len(ids)} ids for {len(outputs['y_global'])} predictions")
  header = ["image_index", "benign_pred", "malignant_pred", "benign_label", "malignant_label"]
  local = "y_local" in outputs
  if local:
    header += ["benign_pred_local", "malignant_pred_local"]
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  for i, name in enumerate(ids):
    row = [name, f"{outputs['y_global'][i, 0]:.4f}", f"{outputs['y_global'][i, 1]:.4f}",
           int(outputs["labels"][i, 0]), int(outputs["labels"][i, 1])]
    if local:
      row += [f"{outputs['y_local'][i, 0]:.4f}", f"{outputs['y_local'][i, 1]:.4f}"]
    writer.writerow(row)
  metric_writers.write_text_atomic(path, buf.getvalue())


# -- pictures (numpy + Pillow: no plotting library needed) -----------------------------------

_GREEN, _RED, _BLUE = (np.array(c, np.float32) for c in ((40, 200, 60), (230, 40, 30),
                                                          (40, 120, 255)))


def _grey_rgb(image: np.ndarray) -> np.ndarray:
  lo, hi = np.percentile(image, [0.5, 99.5])
  grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255
  return np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
  """The boundary pixels of a boolean mask, `width` px thick."""
  mask = mask.astype(bool)
  inner = mask.copy()
  for _ in range(width):
    shrunk = inner.copy()
    shrunk[1:] &= inner[:-1]
    shrunk[:-1] &= inner[1:]
    shrunk[:, 1:] &= inner[:, :-1]
    shrunk[:, :-1] &= inner[:, 1:]
    inner = shrunk
  return mask & ~inner


def render_example(image, seg, has_seg, positions, crop_shape, saliency, *,
                   max_height: int = 736) -> np.ndarray:
  """The reference's picture: input with ground-truth outlines | patch map | benign saliency
  | malignant saliency, side by side, as uint8 RGB (downscaled to `max_height`)."""
  h, w = image.shape
  scale = max(1, int(np.ceil(h / max_height)))
  width = max(1, 2 * scale)
  base = _grey_rgb(image)
  panels = []
  outlined = base.copy()
  for c, colour in ((0, _GREEN), (1, _RED)):
    if has_seg[c]:
      outlined[_outline(seg[..., c] > 0, width)] = colour
  panels.append(outlined)
  patch = outlined.copy()
  ch, cw = crop_shape
  for r, col in np.asarray(positions).reshape(-1, 2):
    box = np.zeros((h, w), bool)
    box[max(r, 0):r + ch, max(col, 0):col + cw] = True
    patch[_outline(box, width)] = _BLUE
  panels.append(patch)
  for c, colour in ((0, _GREEN), (1, _RED)):
    alpha = np.clip(saliency[..., c], 0, 1)[..., None] * 0.95
    panels.append(base * (1 - alpha) + colour * alpha)
  gap = np.full((h, max(4, w // 60), 3), 255, np.float32)
  strip = np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1)
  strip = strip[::scale, ::scale] if scale > 1 else strip
  return np.clip(strip, 0, 255).astype(np.uint8)
