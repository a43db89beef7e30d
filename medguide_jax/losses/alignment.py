"""Image-report alignment losses for hybridmed (Jiang et al., arXiv 2410.00448): L_CG, L_CL.

Pure, keyword-only functions over the global batch, float32 math, returning (loss, metrics).

  * `global_alignment` is L_CG: CLIP's symmetric InfoNCE between the global image embedding
    and the IMPRESSION embedding, with a learnable logit scale.
  * L_CL aligns token-level visual features with the FINDINGS tokens. The paper's exact form is
    not retrievable (METHODS.md 3(a), [U]), so two exact re-statements of the references are
    given (METHODS.md 3(a')):
      - `mgca_local_alignment`: MGCA's intra-report token loss (HKU-MedAI/MGCA,
        `mgca_module.py`), with `attention_word_weights` / `clipped_attention_weights` for its
        attention-derived token weights;
      - `gloria_local_alignment`: GLoRIA's cross-sample local loss (marshuang80/gloria,
        `gloria_loss.py`, itself AttnGAN's DAMSM).

Sharding: every function is plain jnp over the global batch. MGCA's loss is intra-sample, so a
batch sharded over devices needs only the final sums reduced; GLoRIA's and the global loss pair
every image with every report, and XLA gathers what the [B, B] score matrix needs under
`jax.jit`. The value does not depend on the sharding (tests/test_alignment_losses.py).

Padding of the batch itself: a sample whose report has no real word (an all-False row of
`word_mask`, e.g. the filler rows of a padded last batch) is dropped from the local losses: it
is neither an anchor nor a negative, and the means are over the remaining samples.
"""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from medguide_jax.losses.classification import _safe_divide, softmax_cross_entropy
from medguide_jax.losses.contrastive import l2_normalize

Metrics = dict[str, jnp.ndarray]
_HIGHEST = jax.lax.Precision.HIGHEST
_NEG = -1e30  # stands for -inf in masked reductions; finite, so no inf - inf and no NaN grads

# CLIP's initial temperature 0.07 and its cap on the logit scale (logits at most 100x cos).
INIT_LOGIT_SCALE = math.log(1.0 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


# ----------------------------------------------------------------------------- masked helpers
def _masked_logsumexp(x: jnp.ndarray, mask: jnp.ndarray, axis: int) -> jnp.ndarray:
  """log sum_{mask} exp(x) along `axis`; 0 where the mask selects nothing (finite grads)."""
  x = jnp.where(mask, x, _NEG)
  m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  s = jnp.sum(jnp.exp(x - m) * mask, axis=axis, keepdims=True)
  out = jnp.where(s > 0, jnp.log(jnp.where(s > 0, s, 1.0)) + m, 0.0)
  return jnp.squeeze(out, axis=axis)


def _masked_softmax(x: jnp.ndarray, mask: jnp.ndarray, axis: int) -> jnp.ndarray:
  """softmax of x over the entries `mask` selects along `axis`; 0 elsewhere (all-0 if none)."""
  x = jnp.where(mask, x, _NEG)
  m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  e = jnp.exp(x - m) * mask
  return _safe_divide(e, jnp.sum(e, axis=axis, keepdims=True))


def _unit(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """`contrastive.l2_normalize`'s value, x / max(||x||, eps), with a finite gradient at x = 0.

  l2_normalize differentiates sqrt at 0 for an all-zero vector and gives NaN gradients, and pad
  tokens are often all zero: written as x * rsqrt(max(||x||^2, eps^2)) the same value has a
  zero gradient there.
  """
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _bool(mask: jnp.ndarray) -> jnp.ndarray:
  return jnp.asarray(mask).astype(bool)


def _row_weights(weights: jnp.ndarray | None, mask: jnp.ndarray) -> jnp.ndarray:
  """Per-token weights [B, T] under stop_gradient, 0 off the mask, each row summing to 1
  (uniform 1/count without `weights`; a row with no token stays all 0)."""
  w = mask.astype(jnp.float32)
  if weights is not None:
    chex.assert_equal_shape([weights, mask])
    w = jax.lax.stop_gradient(weights.astype(jnp.float32)) * w
  return _safe_divide(w, jnp.sum(w, axis=-1, keepdims=True))


def _diagonal_ce(logits: jnp.ndarray, candidates: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
  """Cross-entropies of the diagonal of square score matrices [..., T, T], both ways.

  row[..., i] = CE(logits[..., i, :], target i) over the columns k with candidates[..., k];
  col[..., i] = CE(logits[..., :, i], target i) over the rows k with candidates[..., k].
  """
  diag = jnp.diagonal(logits, axis1=-2, axis2=-1)
  row = _masked_logsumexp(logits, candidates[..., None, :], axis=-1) - diag
  col = _masked_logsumexp(logits, candidates[..., :, None], axis=-2) - diag
  return row, col


# ----------------------------------------------------------------------------- L_CG
def global_alignment(*, image: jnp.ndarray, text: jnp.ndarray, logit_scale: jnp.ndarray | float,
                     max_logit_scale: float | None = MAX_LOGIT_SCALE
                     ) -> tuple[jnp.ndarray, Metrics]:
  """L_CG: CLIP's symmetric InfoNCE between image and IMPRESSION embeddings (nats).

  logits[k, l] = exp(s) * cos(image_k, text_l) with s = min(logit_scale, max_logit_scale);
  loss = (CE(logits[k, :], k) + CE(logits[:, l], l)) / 2, each CE a mean over the batch.
  MGCA (`loss_ita`) and GLoRIA (`L_g0 + L_g1`) SUM the two directions: the same loss times 2,
  which the weight lambda_CG absorbs.

  `logit_scale` is the learnable log inverse temperature the model holds (CLIP initialises it
  at log(1/0.07) = `INIT_LOGIT_SCALE`; pass a constant for a fixed temperature, e.g.
  log(1/0.07) for MGCA's tau = 0.07, log(10) for GLoRIA's tau3 = 10). CLIP caps the scale at
  100: here the cap is applied to the value used (`max_logit_scale`, default log(100); None
  turns it off), which bounds the logits whatever the parameter does. Above the cap the
  parameter gets no gradient, so the trainer should also clamp the parameter itself after
  each update (what OpenCLIP does: `logit_scale.clamp_(0, log 100)`); then the cap here is a
  no-op that only guards the value.

  `contrastive.info_nce` is not reused: its temperature is a Python float checked at trace
  time, and pre-scaling its inputs is undone by its L2 normalisation; its pieces
  (`l2_normalize`, `softmax_cross_entropy`) are.

  Args:
    image: [B, D] global image embeddings (L2-normalised here).
    text: [B, D] impression embeddings; row b is image b's positive (normalised here).
    logit_scale: scalar, traced or not.
    max_logit_scale: cap on logit_scale, or None.

  Returns:
    (loss, {"global_alignment": loss, "image_to_text": CE over texts, "text_to_image": CE
    over images, "contrastive_accuracy": mean top-1 accuracy of both directions,
    "logit_scale": the exp(s) used}).
  """
  chex.assert_rank([image, text], 2)
  chex.assert_equal_shape([image, text])
  s = jnp.asarray(logit_scale, jnp.float32)
  chex.assert_rank(s, 0)
  if max_logit_scale is not None:
    s = jnp.minimum(s, max_logit_scale)
  scale = jnp.exp(s)
  v, t = l2_normalize(image), l2_normalize(text)
  logits = scale * jnp.einsum("kd,ld->kl", v, t, precision=_HIGHEST)  # [B, B]
  labels = jnp.arange(image.shape[0])
  i2t, m_i2t = softmax_cross_entropy(logits=logits, labels=labels)
  t2i, m_t2i = softmax_cross_entropy(logits=logits.T, labels=labels)
  loss = 0.5 * (i2t + t2i)
  return loss, {"global_alignment": loss, "image_to_text": i2t, "text_to_image": t2i,
                "contrastive_accuracy": 0.5 * (m_i2t["accuracy"] + m_t2i["accuracy"]),
                "logit_scale": scale}


# ----------------------------------------------------------------------------- MGCA token weights
def clipped_attention_weights(*, scores: jnp.ndarray, mask: jnp.ndarray | None = None,
                              low: float = 0.1, high: float = 0.9) -> jnp.ndarray:
  """MGCA's token weights from attention scores: clip, then normalise (no gradient).

  Per row b: the scores of the tokens `mask` selects are clipped to [q_low, q_high], their
  `low` and `high` quantiles over those tokens (linear interpolation, torch.quantile's and
  numpy's default), set to 0 elsewhere, and divided by their sum.

  Used as is for ViT patch weights (MGCA: the last block's CLS-row attention to the patches,
  mean over heads: `scores=attn[:, :, 0, 1:].mean(1)`, all patches); `attention_word_weights`
  applies it to the text encoder's attention.

  Args:
    scores: [B, T] non-negative scores.
    mask: [B, T] bool, True for the tokens that get a weight; None for all.
    low, high: the quantiles, 0 <= low <= high <= 1.

  Returns:
    [B, T] float32 weights under stop_gradient, each row summing to 1 (all 0 for a row with no
    token).
  """
  chex.assert_rank(scores, 2)
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
  x = jax.lax.stop_gradient(scores.astype(jnp.float32))
  m = jnp.ones(x.shape, bool) if mask is None else _bool(mask)
  chex.assert_equal_shape([x, m])
  count = jnp.sum(m, axis=-1, keepdims=True)  # [B, 1]
  ordered = jnp.sort(jnp.where(m, x, jnp.inf), axis=-1)  # the n real values first

  def quantile(q):
    pos = q * jnp.maximum(count - 1, 0).astype(jnp.float32)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(count - 1, 0))
    v_lo = jnp.take_along_axis(ordered, lo, axis=-1)
    v_hi = jnp.take_along_axis(ordered, hi, axis=-1)
    v = v_lo + (pos - lo) * jnp.where(hi > lo, v_hi - v_lo, 0.0)
    return jnp.where(count > 0, v, 0.0)  # [B, 1]

  clipped = jnp.clip(x, quantile(low), quantile(high))
  return _row_weights(clipped, m)


def attention_word_weights(attention: jnp.ndarray, mask: jnp.ndarray, *, low: float = 0.1,
                           high: float = 0.9) -> jnp.ndarray:
  """MGCA's word weights omega from the text encoder's last-layer self-attention.

  omega[b, i] is the [CLS] row's attention to token i, mean over heads, clipped to its 10th-
  90th percentile over the words and normalised to sum 1 over them (`clipped_attention_weights`).

  Which tokens are words: those `mask` selects, except position 0 ([CLS], the query row, whose
  attention to itself is no word's weight; MGCA drops it too). Pass the same mask as the
  `word_mask` of `mgca_local_alignment`. The recommended mask is the attention mask without
  [CLS] and [SEP]: [SEP] carries no finding, and BERT's last layers park much attention on it
  (Clark et al. 2019), so it would take a large weight. MGCA keeps [SEP] as a word (its
  pad mask marks only "[PAD]"); to mirror it, leave [SEP] in the mask. If the words are
  word-piece aggregates (MGCA sums a word's pieces), aggregate the attention row the same way
  and call `clipped_attention_weights` on it.

  Args:
    attention: [B, H, T, T] post-softmax attention probabilities of the last layer (rows are
      queries), over the same token axis as the words.
    mask: [B, T] bool, True for the tokens that are words.
    low, high: the clipping quantiles.

  Returns:
    [B, T] float32, under stop_gradient, 0 at [CLS] and off the mask, rows summing to 1.
  """
  chex.assert_rank(attention, 4)
  batch, _, tokens, _ = attention.shape
  chex.assert_shape(attention, (batch, None, tokens, tokens))
  chex.assert_shape(mask, (batch, tokens))
  cls_row = jnp.mean(attention[:, :, 0, :].astype(jnp.float32), axis=1)  # [B, T]
  words = _bool(mask) & (jnp.arange(tokens) > 0)[None, :]
  return clipped_attention_weights(scores=cls_row, mask=words, low=low, high=high)


# ----------------------------------------------------------------------------- L_CL, MGCA
def mgca_local_alignment(*, patches: jnp.ndarray, words: jnp.ndarray, word_mask: jnp.ndarray,
                         patch_mask: jnp.ndarray | None = None,
                         word_weights: jnp.ndarray | None = None,
                         patch_weights: jnp.ndarray | None = None, temperature: float = 0.1,
                         pads_as_negatives: bool = False) -> tuple[jnp.ndarray, Metrics]:
  """MGCA's token-level (cross-attention) alignment, within each image-report pair (nats).

  With v_j the patches and w_i the words of sample b, both L2-normalised, tau = temperature:
    word -> patch:  alpha_ij = softmax_j(w_i . v_j / tau)       (over the image's patches)
                    o_i = normalize(sum_j alpha_ij v_j),   S_ik = w_i . o_k / tau
                    L_word = 1/2 sum_b sum_i omega_bi [CE(S_b[i, :], i) + CE(S_b[:, i], i)] / B
    patch -> word:  beta_jl = softmax_l(v_j . w_l / tau)        (over the report's words only)
                    u_j = normalize(sum_l beta_jl w_l),    P_jm = v_j . u_m / tau
                    L_patch = 1/2 sum_b sum_j pi_bj [CE(P_b[j, :], j) + CE(P_b[:, j], j)] / B
    loss = L_word + L_patch (MGCA's `loss_local`; MGCA's lambda_2 multiplies it).
  omega (pi) are the word (patch) weights, summing to 1 per sample, so each sum over tokens is
  a weighted mean and the division by B a mean over samples (B counts the samples with at
  least one word: MGCA's `/ bz` when none is filler).

  Choices where the reference is ambiguous or quirky:
    * Pad words. MGCA masks pads to -inf in the patch -> word attention only; its mask in the
      word -> patch direction is commented out, so pad words there (weight 0 as anchors) still
      enter both CEs of L_word as negatives, and their content changes the loss. Default here
      (`pads_as_negatives=False`): pads are excluded from L_word's CEs too, so pad content is
      irrelevant. `pads_as_negatives=True` mirrors MGCA.
    * Embeddings are L2-normalised here (MGCA normalises them right after its local heads), so
      the loss is invariant to their scale. All-zero (pad) vectors are allowed: their
      gradients are finite.
    * u_j is normalised in every case; MGCA skips that normalisation on its ViT path (only the
      ResNet path calls F.normalize on the patch context), a quirk not mirrored.
    * Weights. None gives uniform weights over the real tokens (MGCA's ResNet patch weights;
      for words, a departure: MGCA always uses attention weights, see
      `attention_word_weights`). Given weights are taken under stop_gradient (MGCA computes
      them under no_grad), zeroed off the masks and renormalised to sum 1 per sample.
    * `patch_mask` (None: all patches real) removes patches from the word -> patch attention,
      from L_patch's CEs and from its weights; MGCA has no patch padding.
    * [CLS] and [SEP]: the loss uses exactly the words `word_mask` selects. MGCA's words drop
      [CLS] and keep [SEP]; see `attention_word_weights` for the recommended mask.

  Args:
    patches: [B, N, D] local image features (ViT patch tokens or CNN grid cells).
    words: [B, W, D] local findings features.
    word_mask: [B, W] bool, True for real words.
    patch_mask: [B, N] bool or None.
    word_weights: [B, W] omega or None (uniform).
    patch_weights: [B, N] pi or None (uniform, MGCA's ResNet case).
    temperature: tau_l > 0 (MGCA: 0.1).
    pads_as_negatives: mirror MGCA's unmasked pads in L_word (see above).

  Returns:
    (loss, {"mgca_local": loss, "mgca_word": L_word, "mgca_patch": L_patch}).
  """
  chex.assert_rank([patches, words], 3)
  batch, num_patches, dim = patches.shape
  num_words = words.shape[1]
  chex.assert_shape(words, (batch, num_words, dim))
  chex.assert_shape(word_mask, (batch, num_words))
  if patch_mask is not None:
    chex.assert_shape(patch_mask, (batch, num_patches))
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  tau = jnp.float32(temperature)
  wm = _bool(word_mask)
  pm = jnp.ones((batch, num_patches), bool) if patch_mask is None else _bool(patch_mask)
  valid = jnp.any(wm, axis=-1) & jnp.any(pm, axis=-1)  # [B]
  num_valid = jnp.sum(valid.astype(jnp.float32))
  omega = _row_weights(word_weights, wm) * valid[:, None]   # [B, W]
  pi = _row_weights(patch_weights, pm) * valid[:, None]     # [B, N]
  v, w = _unit(patches), _unit(words)

  # word -> patch
  sim = jnp.einsum("bwd,bnd->bwn", w, v, precision=_HIGHEST) / tau
  alpha = _masked_softmax(sim, pm[:, None, :], axis=-1)
  o = _unit(jnp.einsum("bwn,bnd->bwd", alpha, v, precision=_HIGHEST))
  s_word = jnp.einsum("bid,bkd->bik", w, o, precision=_HIGHEST) / tau  # [B, W, W]
  word_candidates = jnp.ones_like(wm) if pads_as_negatives else wm
  row, col = _diagonal_ce(s_word, word_candidates)
  loss_word = _safe_divide(0.5 * jnp.sum(omega * (row + col)), num_valid)

  # patch -> word
  sim = jnp.einsum("bnd,bwd->bnw", v, w, precision=_HIGHEST) / tau
  beta = _masked_softmax(sim, wm[:, None, :], axis=-1)
  u = _unit(jnp.einsum("bnw,bwd->bnd", beta, w, precision=_HIGHEST))
  s_patch = jnp.einsum("bjd,bmd->bjm", v, u, precision=_HIGHEST) / tau  # [B, N, N]
  row, col = _diagonal_ce(s_patch, pm)
  loss_patch = _safe_divide(0.5 * jnp.sum(pi * (row + col)), num_valid)

  loss = loss_word + loss_patch
  return loss, {"mgca_local": loss, "mgca_word": loss_word, "mgca_patch": loss_patch}


# ----------------------------------------------------------------------------- L_CL, GLoRIA
def gloria_local_alignment(*, regions: jnp.ndarray, words: jnp.ndarray, word_mask: jnp.ndarray,
                           tau1: float = 4.0, tau2: float = 5.0, tau3: float = 10.0
                           ) -> tuple[jnp.ndarray, Metrics]:
  """GLoRIA's local loss: attention-weighted region contexts scored against every report (nats).

  For image k with regions v_j and report l with words e_i (raw, not normalised):
    s_ij = e_i . v_j,   a_ij = softmax_j(tau1 * softmax_i(s_ij))
      (the inner softmax over the report's real words, the outer over the image's regions)
    c_i = sum_j a_ij v_j,   Z(k, l) = log sum_i exp(tau2 * cos(c_i, e_i))   (real words i)
    loss = (CE(tau3 Z[k, :], k) + CE(tau3 Z[:, l], l)) / 2, means over the batch.
  GLoRIA returns the two CEs and sums them (`L_l0 + L_l1`): the same loss times 2, which the
  weight lambda_CL absorbs. cos uses GLoRIA's floor: c . e / max(|c| |e|, 1e-8).

  Pads: excluded from the softmax over words and from the sum over words (GLoRIA slices each
  report to its length). Which tokens are words is the caller's: GLoRIA's training slice
  `[:cap_len]` includes [CLS] (and so drops the report's last token), its inference slice
  `[1:cap_len + 1]` does not; pass the real words without [CLS] (and without [SEP], which
  GLoRIA's own TODO wants removed), or set [CLS] True in `word_mask` to mirror its training.
  A sample with no real word is dropped (module docstring).

  Cost: every image is attended by every report, O(B^2 W (N + D)) memory, as in GLoRIA (which
  loops over the reports).

  Args:
    regions: [B, N, D] local image features (GLoRIA: 19 x 19 = 361 layer-3 regions, D = 768).
    words: [B, W, D] word features.
    word_mask: [B, W] bool, True for real words.
    tau1, tau2, tau3: GLoRIA's temperatures 4, 5, 10.

  Returns:
    (loss, {"gloria_local": loss, "image_to_text": CE over reports, "text_to_image": CE over
    images}).
  """
  chex.assert_rank([regions, words], 3)
  batch, _, dim = regions.shape
  num_words = words.shape[1]
  chex.assert_shape(words, (batch, num_words, dim))
  chex.assert_shape(word_mask, (batch, num_words))
  v = regions.astype(jnp.float32)
  e = words.astype(jnp.float32)
  wm = _bool(word_mask)
  valid = jnp.any(wm, axis=-1)  # [B]
  mask = wm[None, :, None, :]  # broadcast over [K images, L reports, N regions, W words]

  s = jnp.einsum("lwd,knd->klnw", e, v, precision=_HIGHEST)
  over_words = _masked_softmax(s, mask, axis=-1)
  a = jax.nn.softmax(tau1 * over_words, axis=2)  # over regions
  c = jnp.einsum("klnw,knd->klwd", a, v, precision=_HIGHEST)  # [K, L, W, D]
  dot = jnp.einsum("klwd,lwd->klw", c, e, precision=_HIGHEST)
  sq_norms = jnp.sum(c * c, axis=-1) * jnp.sum(e * e, axis=-1)[None]
  cos = dot * jax.lax.rsqrt(jnp.maximum(sq_norms, 1e-16))  # dot / max(|c| |e|, 1e-8)
  z = _masked_logsumexp(tau2 * cos, wm[None], axis=-1)  # [K, L]

  logits = tau3 * z
  diag = jnp.diagonal(logits)
  i2t = _masked_logsumexp(logits, valid[None, :], axis=1) - diag
  t2i = _masked_logsumexp(logits, valid[:, None], axis=0) - diag
  n = jnp.sum(valid.astype(jnp.float32))
  i2t = _safe_divide(jnp.sum(jnp.where(valid, i2t, 0.0)), n)
  t2i = _safe_divide(jnp.sum(jnp.where(valid, t2i, 0.0)), n)
  loss = 0.5 * (i2t + t2i)
  return loss, {"gloria_local": loss, "image_to_text": i2t, "text_to_image": t2i}
