"""Classification and regression losses: pure functions returning (scalar, metrics).

Conventions:
  * All arguments are keyword-only. Shapes are checked with chex at entry, so a mismatch
    fails at trace time, not silently through broadcasting.
  * `weights` / `mask` are per-example weights, usually a 0/1 padding mask that drops the
    filler rows of the last, padded batch. They set the normaliser of the mean.
  * `class_weights` follow Keras `class_weight`: a per-sample multiplier cw[y_i] on the loss
    that does NOT enter the normaliser. So with no padding the loss is
    mean_i(cw[y_i] * ce_i), exactly Keras' `sum_over_batch_size` reduction.
  * Losses and metrics are computed in float32 whatever the logits dtype.
"""
from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jnp.ndarray]


def _safe_divide(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  """num / den, or 0 where den == 0 (a batch that is all padding contributes nothing)."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def softmax_cross_entropy(
    *,
    logits: jnp.ndarray,
    labels: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    class_weights: jnp.ndarray | None = None,
    reduction: str = "mean",
) -> tuple[jnp.ndarray, Metrics]:
  """Weighted mean softmax cross-entropy (nats) of integer labels.

  loss = sum_i w_i * cw[y_i] * ce_i / sum_i w_i, with ce_i = logsumexp(logits_i) - logits_i[y_i].
  The normaliser is sum_i w_i only (Keras class_weight semantics, see module docstring).
  Returns 0 when sum_i w_i == 0.

  Args:
    logits: [B, C] unnormalised scores.
    labels: [B] int class indices in [0, C) (not checked: traced values cannot be).
    weights: [B] float example weights (padding mask), or None for all ones.
    class_weights: [C] float per-class multipliers, or None for all ones.
    reduction: 'mean' as above, or 'none' for the per-example values w_i * cw[y_i] * ce_i [B]
      (evaluation outputs; big_vision's losses offer the same choice).

  Returns:
    (loss scalar, {"ce": loss, "accuracy": w-weighted top-1 accuracy}); with
    reduction='none', (loss [B], {"correct": [B] 0/1}).
  """
  chex.assert_rank(logits, 2)
  chex.assert_rank(labels, 1)
  chex.assert_type(labels, int)
  batch, num_classes = logits.shape
  chex.assert_shape(labels, (batch,))
  if weights is not None:
    chex.assert_shape(weights, (batch,))
  if class_weights is not None:
    chex.assert_shape(class_weights, (num_classes,))

  logits = logits.astype(jnp.float32)
  w = jnp.ones((batch,), jnp.float32) if weights is None else weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B]
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]  # [B]
  ce = log_z - true_logit  # [B]
  sample_w = w if class_weights is None else w * class_weights.astype(jnp.float32)[labels]
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)  # [B]
  _check_reduction(reduction)
  if reduction == "none":
    return sample_w * ce, {"correct": correct}
  denom = jnp.sum(w)
  loss = _safe_divide(jnp.sum(sample_w * ce), denom)
  accuracy = _safe_divide(jnp.sum(w * correct), denom)
  return loss, {"ce": loss, "accuracy": accuracy}


def _check_reduction(reduction: str) -> None:
  if reduction not in ("mean", "none"):
    raise ValueError(f"reduction={reduction!r}; valid: 'mean', 'none'")


def binary_cross_entropy(
    *,
    probs: jnp.ndarray,
    labels: jnp.ndarray,
    weights: jnp.ndarray | None = None,
    reduction: str = "mean",
    eps: float = 1e-6,
) -> jnp.ndarray:
  """Binary cross-entropy (nats) of probabilities, mean over the C labels of an example.

  For models whose outputs already are probabilities (GLAM's pooled sigmoid maps):
  ce_i = -mean_c [y_ic log p_ic + (1 - y_ic) log(1 - p_ic)], with p clipped to
  [eps, 1 - eps] as the reference clips before its log.

  Args:
    probs: [B, C] in [0, 1].
    labels: [B, C] 0/1 (float or int).
    weights: [B] example weights (padding mask), or None.
    reduction: 'mean' (sum_i w_i ce_i / max(sum_i w_i, 1)) or 'none' (ce_i [B], unweighted).

  Returns:
    The scalar mean, or [B] with reduction='none'.
  """
  chex.assert_rank(probs, 2)
  chex.assert_equal_shape([probs, labels])
  _check_reduction(reduction)
  p = jnp.clip(probs.astype(jnp.float32), eps, 1.0 - eps)
  y = labels.astype(jnp.float32)
  ce = -(y * jnp.log(p) + (1.0 - y) * jnp.log1p(-p)).mean(-1)  # [B]
  if reduction == "none":
    return ce
  w = jnp.ones(ce.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def multitask_cross_entropy(
    *,
    logits: Sequence[jnp.ndarray],
    labels: jnp.ndarray,
    mask: jnp.ndarray | None = None,
    class_weights: Sequence[jnp.ndarray | None] | None = None,
    task_names: Sequence[str] | None = None,
    reduction: str = "mean",
) -> tuple[jnp.ndarray, Metrics]:
  """Unweighted mean over tasks of the per-task `softmax_cross_entropy`.

  Args:
    logits: T arrays, task t of shape [B, C_t].
    labels: [B, T] int labels; column t indexes task t's classes.
    mask: [B] example weights (padding mask) shared by all tasks, or None.
    class_weights: None, or T entries each [C_t] (or None for that task).
    task_names: T names used in the metric keys; defaults to 'task_<t>'.
    reduction: 'mean', or 'none' for the per-example mean over tasks [B].

  Returns:
    (mean loss scalar, {"ce/<task>": ..., "accuracy/<task>": ...}); with reduction='none',
    (loss [B], {}).
  """
  num_tasks = len(logits)
  chex.assert_shape(labels, (None, num_tasks))
  names = tuple(task_names) if task_names is not None else tuple(
      f"task_{t}" for t in range(num_tasks))
  if len(names) != num_tasks:
    raise ValueError(f"{len(names)} task names for {num_tasks} logits arrays.")
  if class_weights is not None and len(class_weights) != num_tasks:
    raise ValueError(f"{len(class_weights)} class-weight arrays for {num_tasks} tasks.")

  losses, metrics = [], {}
  for t, name in enumerate(names):
    loss_t, m_t = softmax_cross_entropy(
        logits=logits[t], labels=labels[:, t], weights=mask,
        class_weights=None if class_weights is None else class_weights[t], reduction=reduction)
    losses.append(loss_t)
    if reduction == "none":
      continue
    metrics[f"ce/{name}"] = m_t["ce"]
    metrics[f"accuracy/{name}"] = m_t["accuracy"]
  return jnp.mean(jnp.stack(losses), axis=0), metrics


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """sklearn 'balanced' class weights n / (k * n_c), host side.

  k is the number of classes that occur in `labels` (sklearn computes over the classes it
  is given, which in DeepGuide is np.unique(y_train)), so the weights of present classes
  average to 1 over samples. Classes absent from `labels` get weight 0; they never occur as
  a target, so the value only matters for a never-seen class at evaluation time.

  Args:
    labels: [N] int labels in [0, num_classes).
    num_classes: C.

  Returns:
    [C] float32 weights.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}.")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), got "
                     f"[{labels.min()}, {labels.max()}].")
  counts = np.bincount(labels.astype(np.int64), minlength=num_classes)  # [C]
  present = counts > 0
  k = int(present.sum())
  weights = np.zeros(num_classes, np.float64)
  weights[present] = labels.size / (k * counts[present])
  return weights.astype(np.float32)


def mse(
    *,
    predictions: jnp.ndarray,
    targets: jnp.ndarray,
    mask: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, Metrics]:
  """Masked mean squared error: mean over features, then mask-weighted mean over samples.

  With no mask (or an all-ones mask) this is the global mean of (predictions - targets)^2,
  i.e. DeepGuide's guidance loss L_G = (1/N) sum_n (1/d) ||G(z_I^n) - z_S^n||^2.
  Returns 0 when sum(mask) == 0.

  Args:
    predictions: [B, D].
    targets: [B, D].
    mask: [B] example weights (padding mask), or None.

  Returns:
    (loss scalar, {"mse": loss}).
  """
  chex.assert_rank(predictions, 2)
  chex.assert_equal_shape([predictions, targets])
  batch = predictions.shape[0]
  if mask is not None:
    chex.assert_shape(mask, (batch,))
  diff = predictions.astype(jnp.float32) - targets.astype(jnp.float32)  # [B, D]
  per_sample = jnp.mean(jnp.square(diff), axis=-1)  # [B]
  w = jnp.ones((batch,), jnp.float32) if mask is None else mask.astype(jnp.float32)
  loss = _safe_divide(jnp.sum(w * per_sample), jnp.sum(w))
  return loss, {"mse": loss}
