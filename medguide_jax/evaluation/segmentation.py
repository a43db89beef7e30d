"""Dice for weakly supervised segmentation (GLAM), from per-image sums.

The model's predict step reduces each full-resolution map to a few sums per image and class
(so no map ever leaves the device):

  inter = sum(S * M)      pred = sum(S)      target = sum(M)

for the soft map S in [0, 1], and the same with S replaced by (S > threshold) for the hard
Dice. The Dice of one image and class is 2 inter / (pred + target). GLAM's paper reports Dice
per lesion class; we average it over the images that have a ground-truth mask for that class
and a lesion in it (an image without a mask file, or with an empty mask, has no Dice).

A fixed threshold of 0.5 says little about maps whose values stay low (the global map's
sigmoid outputs, pulled down by the sparsity term, rarely pass 0.5, so its hard Dice there is
0). The evaluator `ValThresholdDice` (evals type 'dice_val_threshold') therefore also scores
each map at a threshold chosen on the validation split, per map and class:

  grid        t_k = k / steps, k = 1 .. steps - 1 (steps = 100: 0.01, 0.02, .. 0.99; the
              maps are convex combinations of sigmoids, so they lie in [0, 1])
  validation  the t_k maximising that map's mean hard Dice (S > t_k) for that class over the
              validation images with that class's mask and a lesion (the images the Dice
              above averages); ties go to the smallest such t_k
  test        the Dice at the validation split's t_k, never test's own best

  dice_<map>_val_threshold/<class>    the chosen t_k (the same on both splits)
  dice_<map>_at_val_threshold/<class> the mean Dice at it (on validation: its maximum)
  dice_gain_at_val_threshold/<class>  (fused - global) / global of the line above, as
                                      dice_gain (soft) and dice_gain_hard (at 0.5) are

A relative gain is nan when the global Dice is 0 or undefined, and so is a threshold (and its
Dice) for a class without any validation image to choose it on.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medguide_jax.data import mammo
from medguide_jax.evaluation import evaluators
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


# GLAM: hard Dice at a threshold chosen on the validation split (the module docstring).

def threshold_grid(steps: int) -> np.ndarray:
  """The thresholds k / steps, k = 1 .. steps - 1, ascending (float64)."""
  return np.arange(1, steps) / steps


def grid_sums(saliency: jax.Array, seg: jax.Array, steps: int) -> dict[str, jax.Array]:
  """On device, for maps [B,H,W,C] and every t_k of `threshold_grid(steps)` at once:
  'inter' sum((S > t_k) * M) and 'pred' sum(S > t_k), [B, C, steps - 1], and 'target'
  sum(M) [B, C].

  One comparison pass per threshold would cost `steps` passes over the map; instead each
  pixel's count of thresholds below it, #{k : t_k < S}, is binned per image and class. The
  pixel is in the hard mask of threshold k (0-based) iff its count exceeds k, so the sums at
  t_k are the histograms' tails from bin k + 1. (jnp.searchsorted gives the same count, but
  is slower here on CPU and XLA constant-folds its first probe into a map-sized array.)
  """
  s, m = saliency.astype(jnp.float32), seg.astype(jnp.float32)
  b, _, _, c = s.shape
  # floor(S * steps) is the count up to one either way where S lies within rounding of a
  # threshold; comparing S with the thresholds on both sides of it makes the count exact
  # (-inf and +inf close the ends, so counts stay in 0 .. steps - 1).
  bounds = np.concatenate([[-np.inf], threshold_grid(steps), [np.inf]]).astype(np.float32)
  bounds = jnp.asarray(bounds)
  guess = jnp.clip(jnp.floor(s * steps).astype(jnp.int32), 0, steps - 1)
  count = (guess - (bounds[guess] >= s).astype(jnp.int32)
           + (bounds[guess + 1] < s).astype(jnp.int32))
  bins = (jnp.arange(b)[:, None, None, None] * c + jnp.arange(c)) * steps + count
  hist = lambda w: jax.ops.segment_sum(w.reshape(-1), bins.reshape(-1),
                                       num_segments=b * c * steps).reshape(b, c, steps)
  tail = lambda h: jnp.flip(jnp.cumsum(jnp.flip(h, -1), -1), -1)[..., 1:]
  return {"inter": tail(hist(m)), "pred": tail(hist(jnp.ones_like(s))),
          "target": m.sum(axis=(1, 2))}


def dice_curve(inter: np.ndarray, pred: np.ndarray, target: np.ndarray,
               valid: np.ndarray) -> tuple[np.ndarray, int]:
  """Mean per-image Dice at every threshold, [T], of sums inter, pred [N, T] and target [N],
  over the `valid` images with a lesion (as `mean_dice`); (all nan, 0) when none qualifies."""
  inter, pred = np.asarray(inter, np.float64), np.asarray(pred, np.float64)
  keep = np.asarray(valid, bool) & (np.asarray(target) > 0)
  if not keep.any():
    return np.full(inter.shape[1], np.nan), 0
  target = np.asarray(target, np.float64)[keep, None]
  return dice_per_image(inter[keep], pred[keep], target).mean(axis=0), int(keep.sum())


def best_threshold_index(curve: np.ndarray) -> int | None:
  """The index of the highest mean Dice (the first, i.e. the smallest threshold, on ties);
  None when the curve is undefined (no image)."""
  curve = np.asarray(curve, np.float64)
  if np.isnan(curve).all():
    return None
  return int(np.nanargmax(curve))


class ValThresholdDice(evaluators.Evaluator):
  """GLAM's hard Dice per map and class at the threshold chosen on the validation split
  (keys and rules in the module docstring).

  Option `steps` (default 100): the grid k / steps. Splits are evaluated validation first
  (train.finish_stage, evaluate.py), as missing_rate's Youden threshold relies on too: the
  validation evaluation keeps its choice on this evaluator, which every later split uses. A
  split evaluated before any validation one (Colab's `run.evaluate('test')`) makes the choice
  on the validation split first, with the same variables. Costs one forward pass per split
  it runs on (the task's `dice_maps`), with the grid's sums on device.
  """

  def __init__(self, task, *, steps: int = 100, **kw):
    super().__init__(task, **kw)
    if not hasattr(task, "dice_maps"):
      raise ValueError(f"needs a GLAM task (tasks/glam.py, with dice_maps); this stage's task "
                       f"is {type(task).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 1000:
      raise ValueError(f"steps={steps!r} must be an integer in [2, 1000] (thresholds k/steps)")
    self.steps, self.thresholds = steps, threshold_grid(steps)
    self.maps = ("global", "fused") if task.uses_local else ("global",)
    self.classes = mammo.GLAM_CLASSES
    self._chosen: dict[tuple[str, str], int | None] | None = None  # (map, class) -> index
    self._sums_fn = self._grid_outputs  # one object: the trainer jits it once per stage

  def keys(self) -> set[str]:
    keys = {f"dice_{m}{s}/{c}" for m in self.maps for c in self.classes
            for s in ("_val_threshold", "_at_val_threshold")}
    if "fused" in self.maps:
      keys |= {f"dice_gain_at_val_threshold/{c}" for c in self.classes}
    return keys

  def _grid_outputs(self, variables, batch: dict) -> dict[str, jax.Array]:
    _, maps = self.task.dice_maps(variables, batch["image"])
    out = {"labels": batch["labels"], "has_seg": batch["has_seg"]}
    for name, s in maps.items():
      out.update({f"{name}/{k}": v for k, v in grid_sums(s, batch["seg"], self.steps).items()})
    return out

  def _curves(self, sums: dict) -> dict[tuple[str, str], tuple[np.ndarray, int]]:
    curves = {}
    for c, name in enumerate(self.classes):
      valid = (sums["has_seg"][:, c] > 0) & (sums["labels"][:, c] == 1)
      for m in self.maps:
        curves[m, name] = dice_curve(sums[f"{m}/inter"][:, c], sums[f"{m}/pred"][:, c],
                                     sums[f"{m}/target"][:, c], valid)
    return curves

  def choose(self, validation_sums: dict) -> None:
    """Keeps, per map and class, the grid index maximising the validation split's Dice."""
    self._chosen = {key: best_threshold_index(curve) if n else None
                    for key, (curve, n) in self._curves(validation_sums).items()}

  def metrics(self, sums: dict) -> dict[str, Any]:
    """The keys above for one split's grid sums, at the kept (validation) thresholds."""
    result = {}
    for (m, name), (curve, n) in self._curves(sums).items():
      k = self._chosen[m, name]
      result[f"dice_{m}_val_threshold/{name}"] = (
          float(self.thresholds[k]) if k is not None else float("nan"))
      result[f"dice_{m}_at_val_threshold/{name}"] = (
          float(curve[k]) if k is not None and n else float("nan"))
    if "fused" in self.maps:
      for name in self.classes:
        result[f"dice_gain_at_val_threshold/{name}"] = relative_gain(
            result[f"dice_fused_at_val_threshold/{name}"],
            result[f"dice_global_at_val_threshold/{name}"])
    return result

  def run(self, ctx: evaluators.EvalContext) -> dict[str, Any]:
    if "has_seg" not in ctx.outputs:  # a split without masks has no Dice
      return {}
    sums = ctx.predict(ctx.split, fn=self._sums_fn)
    if ctx.split == "validation":
      self.choose(sums)
    elif self._chosen is None:
      self.choose(ctx.predict("validation", fn=self._sums_fn))
    return self.metrics(sums)


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
