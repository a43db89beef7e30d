"""Dice for weakly supervised segmentation (GLAM), from per-image sums.

The model's predict step reduces each full-resolution map to a few sums per image and class
(so no map ever leaves the device):

  inter = sum(S * M)      pred = sum(S)      target = sum(M)

for the soft map S in [0, 1], and the same with S replaced by (S > threshold) for the hard
Dice. The Dice of one image and class is 2 inter / (pred + target). GLAM's paper reports Dice
per lesion class; we average it over the images that have a ground-truth mask for that class
and a lesion in it (an image without a mask file, or with an empty mask, has no Dice).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def dice_sums(saliency: jax.Array, seg: jax.Array, threshold: float) -> dict[str, jax.Array]:
  """On device, per image and class [B,C] of maps [B,H,W,C]: sum(S*M), sum(S), sum(M), and
  the same for S > threshold (hard_inter, hard_pred)."""
  s, m = saliency.astype(jnp.float32), seg.astype(jnp.float32)
  hard = (s > threshold).astype(jnp.float32)
  total = lambda a: a.sum(axis=(1, 2))
  return {"inter": total(s * m), "pred": total(s), "target": total(m),
          "hard_inter": total(hard * m), "hard_pred": total(hard)}


def dice_per_image(inter: np.ndarray, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """2 inter / (pred + target), elementwise; nan where pred + target == 0."""
  inter, pred, target = (np.asarray(a, np.float64) for a in (inter, pred, target))
  denom = pred + target
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, 2.0 * inter / np.where(denom > 0, denom, 1.0), np.nan)


def mean_dice(inter: np.ndarray, pred: np.ndarray, target: np.ndarray,
              valid: np.ndarray) -> tuple[float, int]:
  """Mean per-image Dice over `valid` images that have a lesion (target > 0).

  Returns (mean Dice, number of images it averages); (nan, 0) when none qualifies.
  """
  keep = np.asarray(valid, bool) & (np.asarray(target) > 0)
  if not keep.any():
    return float("nan"), 0
  return float(np.mean(dice_per_image(inter, pred, target)[keep])), int(keep.sum())


def relative_gain(new: float, base: float) -> float:
  """(new - base) / base: the paper's 'relatively improving by 39.6%' (nan if base is 0)."""
  if not np.isfinite(new) or not np.isfinite(base) or base == 0:
    return float("nan")
  return float((new - base) / base)


def dice_metrics(outputs: dict, labels: np.ndarray, classes: Sequence[str]) -> dict:
  """Mean per-image Dice per class and map, over images with a mask and that lesion class,
  and the relative gain of the fused map over the global one.

  `outputs` holds `dice_<map>/<sum>` [N, C] (the `dice_sums` of each map: 'global' and,
  when present, 'fused') and `has_seg` [N, C]; labels are [N, C] 0/1.
  """
  result = {}
  maps = [m for m in ("global", "fused") if f"dice_{m}/inter" in outputs]
  for c, name in enumerate(classes):
    valid = (outputs["has_seg"][:, c] > 0) & (labels[:, c] == 1)
    for m in maps:
      get = lambda k: outputs[f"dice_{m}/{k}"][:, c]
      result[f"dice_{m}/{name}"], n = mean_dice(get("inter"), get("pred"), get("target"), valid)
      result[f"dice_{m}_hard/{name}"], _ = mean_dice(get("hard_inter"), get("hard_pred"),
                                                     get("target"), valid)
      result[f"dice_images/{name}"] = n
    if "fused" in maps:
      for suffix in ("", "_hard"):
        result[f"dice_gain{suffix}/{name}"] = relative_gain(
            result[f"dice_fused{suffix}/{name}"], result[f"dice_global{suffix}/{name}"])
  return result
