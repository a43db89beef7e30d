"""Teacher-forced generation losses for hybridmed's two decoder branches: L_Sum and L_Cap.

Both branches generate the IMPRESSION token by token (METHODS.md 3(a)):
  L_Sum = -sum_t log p(y_t | y_<t, findings)      (summarisation: cross-attends to findings)
  L_Cap = -sum_t log p(y_t | y_<t, image tokens)  (captioning: cross-attends to the image)
Each is `token_cross_entropy` on its branch's logits against the same shifted targets
(`shift_for_teacher_forcing`); no separate functions are needed. L_Dis, the token-level
distillation from the summarisation teacher to the captioning student, is
`distillation.token_distillation`, normalised the same way.

Pure, keyword-only, float32 math; plain jnp over the global batch, so under `jax.jit` a batch
sharded over devices gives the single-device value (the sum and the token count are global).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from medguide_jax.losses.classification import _check_reduction, _safe_divide

Metrics = dict[str, jnp.ndarray]


def shift_for_teacher_forcing(ids: jnp.ndarray, mask: jnp.ndarray
                              ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Decoder inputs and next-token targets from tokenised impressions.

  ids are `[CLS] y_1 ... y_n [SEP] [PAD]...`: [CLS] serves as BOS and [SEP] as EOS, so the
  decoder reads [CLS] y_1 ... y_n and must predict y_1 ... y_n [SEP]:
    inputs = ids[:, :-1], targets = ids[:, 1:], target_mask = mask[:, 1:].
  The input at [SEP] (whose target is a pad) is not scored. The decoder's own padding mask
  for `inputs` is mask[:, :-1] (causal attention then never looks past [SEP]).

  Args:
    ids: [B, L] int token ids.
    mask: [B, L] bool (or 0/1), True for real tokens ([CLS] ... [SEP]).

  Returns:
    (inputs [B, L-1], targets [B, L-1], target_mask [B, L-1] bool).
  """
  chex.assert_rank([ids, mask], 2)
  chex.assert_equal_shape([ids, mask])
  if ids.shape[1] < 2:
    raise ValueError(f"need at least 2 tokens ([CLS] and [SEP]) per sequence, got {ids.shape}")
  return ids[:, :-1], ids[:, 1:], jnp.asarray(mask[:, 1:]).astype(bool)


def token_cross_entropy(*, logits: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray,
                        label_smoothing: float = 0.0, reduction: str = "mean"
                        ) -> tuple[jnp.ndarray, Metrics]:
  """Teacher-forced next-token cross-entropy (nats per token): L_Sum and L_Cap.

  ce[b, t] = -sum_v y[b, t, v] log softmax(logits[b, t])_v with y = (1 - eps) onehot(targets)
  + eps / V (optax.smooth_labels' convention; eps = 0 is the plain NLL), and
    loss = sum_{b,t} mask[b,t] ce[b,t] / sum_{b,t} mask[b,t],
  the mean over the real tokens of the whole batch, not a mean of per-sequence means: every
  token weighs the same, so exp(loss) is the batch's per-token perplexity, long reports are
  not under-weighted against short ones, and the value is the same however the batch is
  split over devices. The paper's -sum_t log p is per sequence; the mean divides it by the
  batch's mean length, a factor the weights lambda_Sum / lambda_Cap absorb.

  Args:
    logits: [B, L, V] decoder outputs at the input positions.
    targets: [B, L] int next tokens (`shift_for_teacher_forcing`).
    mask: [B, L] bool (or 0/1), True for the tokens that are scored.
    label_smoothing: eps in [0, 1).
    reduction: 'mean' as above, or 'none' for ce [B, L] with masked positions 0.

  Returns:
    (loss, {"token_ce": loss, "token_accuracy": top-1 accuracy over real tokens,
    "num_tokens": their count}); with reduction='none', (ce [B, L], {"correct": [B, L] 0/1,
    0 at masked positions}).
  """
  chex.assert_rank(logits, 3)
  batch, length, vocab = logits.shape
  chex.assert_shape([targets, mask], (batch, length))
  chex.assert_type(targets, int)
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  _check_reduction(reduction)
  real = jnp.asarray(mask).astype(bool)
  # Junk at unscored positions (inf, or NaN from a pad query that attends to nothing) must not
  # reach the loss or its gradient: select it away before the softmax, not after.
  logits = jnp.where(real[..., None], logits.astype(jnp.float32), 0.0)
  log_p = jax.nn.log_softmax(logits, axis=-1)  # [B, L, V]
  nll = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]  # [B, L]
  if label_smoothing:
    # (1 - eps) * nll + eps * mean_v(-log p_v): the smoothed target without a [B, L, V] one-hot.
    ce = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_p, axis=-1)
  else:
    ce = nll
  m = real.astype(jnp.float32)
  ce = jnp.where(real, ce, 0.0)
  correct = (jnp.argmax(log_p, axis=-1) == targets).astype(jnp.float32) * m
  if reduction == "none":
    return ce, {"correct": correct}
  count = jnp.sum(m)
  loss = _safe_divide(jnp.sum(ce), count)
  return loss, {"token_ce": loss, "token_accuracy": _safe_divide(jnp.sum(correct), count),
                "num_tokens": count}
