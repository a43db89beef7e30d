"""CenterNet's detection loss: penalty-reduced focal loss on the heatmap, L1 on size/offset.

Follows "Objects as Points" (Zhou et al. 2019) and its reference code (CornerNet's focal
loss `_neg_loss`, `RegL1Loss`), over the outputs of models/detection.py `CenterNetHead` and
the targets of `encode_targets` stacked into a batch.

Conventions (as losses/classification.py):
  * Keyword-only arguments after the two pytrees; shapes checked with chex at entry.
  * `weights` [B] are per-example weights, usually the 0/1 padding mask: a weight-0 example
    adds nothing to any numerator or normaliser, so padding never changes the loss.
  * Computed in float32. The focal loss works on logits through log-sigmoid, which is exact
    where CenterNet clamps sigmoid outputs to [1e-4, 1 - 1e-4] to keep log() finite.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from medguide_jax.losses.classification import Metrics, _safe_divide
from medguide_jax.models.detection import gather_at


def focal_terms(*, logits: jnp.ndarray, heatmap: jnp.ndarray, alpha: float = 2.0,
                beta: float = 4.0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Per-example penalty-reduced focal loss sums and positive counts.

  With p = sigmoid(logits) and Gaussian targets y: at y == 1, -(1-p)^alpha log p; elsewhere
  -(1-y)^beta p^alpha log(1-p), the (1-y)^beta factor forgiving near-misses around a center.

  Args:
    logits: [B, h, w, K] heatmap logits. heatmap: [B, h, w, K] targets in [0, 1].

  Returns:
    (loss summed over cells and classes [B], number of y == 1 cells [B]).
  """
  x = logits.astype(jnp.float32)
  y = heatmap.astype(jnp.float32)
  p = jax.nn.sigmoid(x)
  pos = (y == 1.0).astype(jnp.float32)
  pos_loss = -jnp.power(1 - p, alpha) * jax.nn.log_sigmoid(x) * pos
  neg_loss = -jnp.power(1 - y, beta) * jnp.power(p, alpha) * jax.nn.log_sigmoid(-x) * (1 - pos)
  axes = (1, 2, 3)
  return jnp.sum(pos_loss + neg_loss, axis=axes), jnp.sum(pos, axis=axes)


def _masked_l1(pred: jnp.ndarray, target: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Mean |pred - target| over the masked objects and both coordinates (CenterNet's
  RegL1Loss, whose mask is expanded to the 2 channels); 0 when nothing is masked in.

  pred, target: [B, M, 2]; mask: [B, M] float (object mask times example weight)."""
  err = jnp.abs(pred - target.astype(jnp.float32)) * mask[..., None]
  return _safe_divide(jnp.sum(err), 2.0 * jnp.sum(mask))


def centernet_loss(
    outputs: dict[str, jnp.ndarray],
    targets: dict[str, jnp.ndarray],
    *,
    size_weight: float = 0.1,
    offset_weight: float = 1.0,
    weights: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, Metrics]:
  """CenterNet's L = L_heatmap + size_weight L_size + offset_weight L_offset.

  L_heatmap is the focal loss (alpha 2, beta 4) summed over the batch's cells and classes and
  divided by max(number of heatmap peaks, 1), i.e. by the number of objects (objects sharing
  a center cell and class count once, as in CenterNet). L_size and L_offset are the L1 errors
  of the size and offset maps read at the objects' center cells (see `_masked_l1`).

  Args:
    outputs: 'heatmap' logits [B, h, w, K], 'size' and 'offset' [B, h, w, 2].
    targets: `encode_targets` outputs stacked over the batch: 'heatmap' [B, h, w, K],
      'indices' [B, M] int, 'size' and 'offset' [B, M, 2], 'mask' [B, M].
    size_weight, offset_weight: the loss weights (CenterNet: 0.1 and 1).
    weights: [B] example weights (padding mask), or None for all ones.

  Returns:
    (loss, {'loss', 'heatmap', 'size', 'offset': the terms, 'objects': weighted count}).
  """
  chex.assert_rank(outputs["heatmap"], 4)
  chex.assert_equal_shape([outputs["heatmap"], targets["heatmap"]])
  batch, h, w, _ = outputs["heatmap"].shape
  chex.assert_shape([outputs["size"], outputs["offset"]], (batch, h, w, 2))
  chex.assert_rank(targets["indices"], 2)
  num_objects = targets["indices"].shape[1]
  chex.assert_shape([targets["mask"]], (batch, num_objects))
  chex.assert_shape([targets["size"], targets["offset"]], (batch, num_objects, 2))
  if weights is not None:
    chex.assert_shape(weights, (batch,))

  w_b = jnp.ones((batch,), jnp.float32) if weights is None else weights.astype(jnp.float32)
  focal_sum, positives = focal_terms(logits=outputs["heatmap"], heatmap=targets["heatmap"])
  heatmap_loss = jnp.sum(w_b * focal_sum) / jnp.maximum(jnp.sum(w_b * positives), 1.0)
  mask = targets["mask"].astype(jnp.float32) * w_b[:, None]  # [B, M]
  idx = targets["indices"]
  size_loss = _masked_l1(gather_at(outputs["size"], idx), targets["size"], mask)
  offset_loss = _masked_l1(gather_at(outputs["offset"], idx), targets["offset"], mask)
  loss = heatmap_loss + size_weight * size_loss + offset_weight * offset_loss
  return loss, {"loss": loss, "heatmap": heatmap_loss, "size": size_loss,
                "offset": offset_loss, "objects": jnp.sum(mask)}
