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

from medguide_jax.evaluation import metrics as metrics_lib


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


# Supervised segmentation (downstream tasks): per-image Dice of hard masks over every image,
# with a convention for images whose truth and prediction are both empty, and its bootstrap
# interval. On device, reduce predictions with `dice_sums(sigmoid(logits), masks, 0.5)`:
# its hard_inter, hard_pred and target [B, C] are exactly the sums `dice_from_sums` needs,
# so no mask leaves the device.

EMPTY = ("one", "nan")


def dice_from_sums(inter: np.ndarray, pred: np.ndarray, target: np.ndarray, *,
                   empty: str = "one") -> np.ndarray:
  """Per-image Dice 2 inter / (pred + target) from hard-mask pixel counts (any shape).

  Args:
    inter, pred, target: |P & T|, |P| and |T| per image (e.g. `dice_sums`'s hard_inter,
      hard_pred and target).
    empty: the score of an image whose prediction and truth are both empty: 'one' (1.0, a
      correct "no lesion", as the SIIM-ACR pneumothorax challenge scores it) or 'nan' (no
      score, so `dice_summary` leaves the image out).
  """
  if empty not in EMPTY:
    raise ValueError(f"dice empty={empty!r}; expected one of {EMPTY}.")
  dice = dice_per_image(inter, pred, target)  # nan exactly where pred + target == 0
  return np.where(np.isnan(dice), 1.0, dice) if empty == "one" else dice


def _as_masks(masks: np.ndarray, field: str) -> np.ndarray:
  """Boolean masks [N, H, W] from bool or 0/1 input; an error naming `field` otherwise."""
  masks = np.asarray(masks)
  if masks.ndim != 3:
    raise ValueError(f"{field} must be masks [N, H, W]; got shape {masks.shape}.")
  if masks.dtype != bool and not np.isin(masks, (0, 1)).all():
    raise ValueError(f"{field} must be boolean or 0/1 (threshold probabilities first); got "
                     f"values in [{masks.min()}, {masks.max()}].")
  return masks.astype(bool)


def dice_scores(pred_masks: np.ndarray, true_masks: np.ndarray, *,
                empty: str = "one") -> np.ndarray:
  """Per-image Dice [N] of predicted vs true masks [N, H, W] (bool or 0/1), host side.

  An image with an empty truth and a non-empty prediction scores 0; one with both empty
  scores by `empty` (see `dice_from_sums`: 1.0 by default, or nan to exclude it).
  """
  pred, true = _as_masks(pred_masks, "pred_masks"), _as_masks(true_masks, "true_masks")
  if pred.shape != true.shape:
    raise ValueError(f"pred_masks {pred.shape} and true_masks {true.shape} differ in shape.")
  count = lambda m: m.sum(axis=(1, 2))
  return dice_from_sums(count(pred & true), count(pred), count(true), empty=empty)


def _dice_means(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
  """[mean Dice, mean Dice over images with a non-empty truth] (nan when none)."""
  mean = lambda a: float(np.mean(a)) if a.size else float("nan")
  return np.asarray([mean(scores), mean(scores[positive])])


def dice_summary(scores: np.ndarray, *, positive: np.ndarray, bootstrap: int = 1000,
                 seed: int = 0) -> dict:
  """Mean per-image Dice, and over the images with a lesion, with bootstrap 95% intervals.

  Images scored nan (`empty='nan'`) are left out before anything is computed, so n and the
  resampling are over the scored images only.

  Args:
    scores: [N] per-image Dice (`dice_scores`, `dice_from_sums`).
    positive: [N] bool, True where the truth is non-empty (`true_masks.any((1, 2))`, or
      `target > 0` from the sums).
    bootstrap: resamples of images for the intervals (metrics.with_intervals, percentile
      bootstrap, images resampled jointly for both means); 0 for none.
    seed: bootstrap seed.

  Returns:
    {"dice", "dice_images" (n), "dice_positive", "dice_positive_images"} and, when
    bootstrap > 0, "dice_ci95" and "dice_positive_ci95" as [lo, hi]. Means (and intervals)
    over no image are nan.
  """
  scores = np.asarray(scores, np.float64).ravel()
  positive = np.asarray(positive, bool).ravel()
  if scores.shape != positive.shape:
    raise ValueError(f"dice_summary: scores {scores.shape} and positive {positive.shape} "
                     f"differ in shape.")
  keep = ~np.isnan(scores)
  scores, positive = scores[keep], positive[keep]
  keys = ["dice", "dice_positive"]
  point = _dice_means(scores, positive)
  if scores.size:
    result = metrics_lib.with_intervals(keys, point, _dice_means, [scores, positive],
                                        bootstrap, seed)
  else:  # nothing to resample: the same keys, undefined
    result = {k: float("nan") for k in keys}
    result.update({f"{k}_ci95": [float("nan")] * 2 for k in keys if bootstrap > 0})
  result["dice_images"] = int(scores.size)
  result["dice_positive_images"] = int(positive.sum())
  return result
