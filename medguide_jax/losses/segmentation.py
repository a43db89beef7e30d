"""Segmentation losses: soft Dice and per-pixel binary cross-entropy, pure functions.

Conventions (as losses/classification.py):
  * Shapes checked with chex at entry. The options are keyword-only; logits, masks and
    weights may also be passed in that order (the tasks' call, loss(logits, masks, w)).
  * Maps are [B, H, W, C]: C independent binary masks (sigmoid per channel, not a softmax
    over channels), so overlapping regions are allowed. Masks are 0/1 (float or int/bool).
  * `weights` [B] are per-image weights, usually the 0/1 padding mask of a padded batch;
    they set the normaliser, so filler images change nothing. A batch of weight 0 gives 0.
  * Computed in float32 whatever the logits dtype.

Soft Dice (Milletari et al. 2016, V-Net) of image b and channel c, with p = sigmoid(logits):

  D_bc = (2 sum_px p m + smooth) / (sum_px p + sum_px m + smooth)

`smooth` (1 pixel) keeps the gradient finite and makes an empty mask predicted empty score
1, so images without a lesion are not ill-defined. dice_loss = weighted mean over images of
the mean over channels of 1 - D_bc. It is computed per image, not over the batch's pixels
pooled, so a small lesion weighs as much as a large one (the per-image Dice the evaluation
reports, evaluation/segmentation.py).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from medguide_jax.losses.classification import _safe_divide

Metrics = dict[str, jnp.ndarray]


def _check(logits: jnp.ndarray, masks: jnp.ndarray,
           weights: jnp.ndarray | None) -> jnp.ndarray:
  """Asserts the shapes; returns float32 weights [B] (ones when None)."""
  chex.assert_rank(logits, 4)
  chex.assert_equal_shape([logits, masks])
  batch = logits.shape[0]
  if weights is None:
    return jnp.ones((batch,), jnp.float32)
  chex.assert_shape(weights, (batch,))
  return weights.astype(jnp.float32)


def _weighted_mean(per_image: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """sum_b w_b x_b / sum_b w_b of per-image values [B] (0 when the weights sum to 0)."""
  return _safe_divide(jnp.sum(w * per_image), jnp.sum(w))


def dice_loss(
    logits: jnp.ndarray,
    masks: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    *,
    smooth: float = 1.0,
) -> tuple[jnp.ndarray, Metrics]:
  """Soft Dice loss: weighted mean over images of mean_c (1 - D_bc) (module docstring).

  Args:
    logits: [B, H, W, C] per-pixel logits.
    masks: [B, H, W, C] 0/1 targets.
    weights: [B] image weights (padding mask), or None for all ones.
    smooth: additive smoothing of numerator and denominator (pixels).

  Returns:
    (loss scalar in [0, 1], {"dice_loss": loss, "soft_dice": 1 - loss (the weighted mean
    smoothed soft Dice)}).
  """
  w = _check(logits, masks, weights)
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  m = masks.astype(jnp.float32)
  inter = jnp.sum(p * m, axis=(1, 2))  # [B, C]
  denom = jnp.sum(p, axis=(1, 2)) + jnp.sum(m, axis=(1, 2))  # [B, C]
  dice = (2.0 * inter + smooth) / (denom + smooth)  # [B, C]
  loss = _weighted_mean(jnp.mean(1.0 - dice, axis=-1), w)
  # Where all weights are 0, loss is 0 and so soft_dice reads 1: nothing to score.
  return loss, {"dice_loss": loss, "soft_dice": 1.0 - loss}


def segmentation_loss(
    logits: jnp.ndarray,
    masks: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    *,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    smooth: float = 1.0,
) -> tuple[jnp.ndarray, Metrics]:
  """dice_weight * dice_loss + bce_weight * BCE, the usual Dice + cross-entropy mix.

  BCE is optax.sigmoid_binary_cross_entropy (nats) averaged over the pixels and channels of
  each image, then weighted over images (all images have the same pixel count, so this is
  the mean over the pixels of the weighted images).

  Args:
    logits: [B, H, W, C] per-pixel logits.
    masks: [B, H, W, C] 0/1 targets.
    weights: [B] image weights (padding mask), or None.
    dice_weight, bce_weight: the two terms' weights.
    smooth: Dice smoothing (see `dice_loss`).

  Returns:
    (loss scalar, {"dice_loss", "bce", "soft_dice"}).
  """
  w = _check(logits, masks, weights)
  dice, metrics = dice_loss(logits=logits, masks=masks, weights=weights, smooth=smooth)
  ce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                          masks.astype(jnp.float32))  # [B, H, W, C]
  bce = _weighted_mean(jnp.mean(ce, axis=(1, 2, 3)), w)
  loss = dice_weight * dice + bce_weight * bce
  return loss, {**metrics, "bce": bce}
