"""Attention multiple-instance learning over tile bags, with a clinical branch (missing_modality).

Aggregators (`AttentionMIL`, Ilse et al., ICML 2018; METHODS.md 2(a')):
  'ilse'    H = ReLU(W1 x);  a = w^T tanh(V H)                         (attention_dim D)
  'gated'   H = ReLU(W1 x);  a = w^T (tanh(V H) * sigmoid(U H))
  'balnmp'  BALNMP's AttentionAggregator(in, 1), exactly: H = ReLU(Dropout(W1 x)) (dropout
            before the ReLU); a = Dropout(Linear(1->1)(tanh(Dropout(Linear(L->1)(H)))))
            (D = 1, dropout on the attention logits during training)
  alpha = softmax of a over the bag's tiles (padding tiles masked out); m = alpha^T H.

`MissingModalityNet` is the bidirectional-distillation network (Zhang et al. 2023): a tile
encoder (a models/resnet.py encoder by name, e.g. 'vgg16_bn' as BALNMP, or none in feature
mode), a WSI aggregator shared by both branches (or one per branch), a clinical encoder
('mlp', or BALNMP's 'tile': the vector repeated 10 times, `clinical.repeat(1, 10)`), a
learnable prompt p in the clinical embedding's place for the WSI-only branch S, and per
branch a fusion ('concat' of [m, h_c], BALNMP's; or 'attention': one self-attention layer
over the tokens [m; h_c]) and a head Linear(->64)-ReLU-Linear(->C) (BALNMP's classifier).

Called on a batch it returns, for both branches at once,
  logits_m, logits_s [B, C]    M sees the clinical embedding, S the prompt
  fused_m, fused_s   [B, 64]   the heads' hidden layers (S->M feature distillation)
  wsi_m, wsi_s       [B, L]    the bag embeddings (equal when the aggregator is shared)
  attention_m        [B, N]    alpha of M's aggregator
With `clinical_present` [B] (bool) given, the clinical embedding of an example without
clinical data is the prompt in M as well ('M with the prompt' inference). `fills`
{name: clinical [B, C], or None for the prompt} adds M's logits for each other clinical
input as `logits_m/<name>`, from the same pass over the tiles (evaluation's fill policies).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medguide_jax.models import resnet

AGGREGATORS = ("ilse", "gated", "balnmp")
CLINICAL_ENCODERS = ("mlp", "tile")
FUSIONS = ("concat", "attention")


def masked_softmax(logits: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
  """Softmax over the last axis where `mask` is True (zero elsewhere; an all-False row is
  all zeros, not NaN)."""
  logits = logits.astype(jnp.float32)
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  z = jnp.where(mask, logits, -jnp.inf)
  z = z - jax.lax.stop_gradient(jnp.max(jnp.where(mask, z, -1e30), axis=-1, keepdims=True))
  e = jnp.where(mask, jnp.exp(z), 0.0)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)


class AttentionMIL(nn.Module):
  """Instances [B, N, F] (+ mask [B, N]) -> (bag embedding [B, L], attention [B, N])."""
  hidden: int = 256
  attention_dim: int = 128
  kind: str = "ilse"
  dropout: float = 0.0          # 'balnmp': 0.5 in BALNMP

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None, *, train: bool
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
    if self.kind not in AGGREGATORS:
      raise ValueError(f"aggregator {self.kind!r}; valid: {AGGREGATORS}")
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
    h = nn.Dense(self.hidden, name="fc")(x)
    if self.kind == "balnmp":
      h = nn.relu(drop(h))
      a = drop(nn.Dense(1, name="attention_in")(h))
      a = drop(nn.Dense(1, name="attention_out")(jnp.tanh(a)))
    else:
      h = drop(nn.relu(h))
      v = jnp.tanh(nn.Dense(self.attention_dim, name="attention_v")(h))
      if self.kind == "gated":
        v = v * jax.nn.sigmoid(nn.Dense(self.attention_dim, name="attention_u")(h))
      a = nn.Dense(1, name="attention_w")(v)
    alpha = masked_softmax(a[..., 0], mask)
    return jnp.einsum("bn,bnl->bl", alpha, h.astype(jnp.float32)), alpha


class ClinicalEncoder(nn.Module):
  """Clinical vector [B, C] -> embedding [B, E]: 'mlp' (Dense-ReLU-Dense) or 'tile'
  (BALNMP: the whole vector repeated `repeats` times, [c1..cC, c1..cC, ...], no weights)."""
  kind: str = "mlp"
  dim: int = 32
  repeats: int = 10

  @nn.compact
  def __call__(self, c: jnp.ndarray) -> jnp.ndarray:
    if self.kind == "tile":
      return jnp.tile(c.astype(jnp.float32), (1, self.repeats))
    if self.kind == "mlp":
      return nn.Dense(self.dim, name="out")(nn.relu(nn.Dense(self.dim, name="hidden")(c)))
    raise ValueError(f"clinical encoder {self.kind!r}; valid: {CLINICAL_ENCODERS}")

  def out_dim(self, clinical_dim: int) -> int:
    return clinical_dim * self.repeats if self.kind == "tile" else self.dim


class Branch(nn.Module):
  """Fusion of a bag embedding and a clinical embedding (or the prompt), then the head."""
  num_classes: int
  fusion: str = "concat"
  head_hidden: int = 64
  num_heads: int = 1

  @nn.compact
  def __call__(self, m: jnp.ndarray, c: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    if self.fusion == "concat":
      z = jnp.concatenate([m, c], axis=-1)
    elif self.fusion == "attention":
      tokens = jnp.stack([m, nn.Dense(m.shape[-1], name="clinical_token")(c)], axis=1)
      attended = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(
          tokens, tokens)
      z = nn.LayerNorm(name="norm")(tokens + attended)[:, 0]  # the WSI token
    else:
      raise ValueError(f"fusion {self.fusion!r}; valid: {FUSIONS}")
    fused = nn.relu(nn.Dense(self.head_hidden, name="hidden")(z))
    return nn.Dense(self.num_classes, name="out")(fused).astype(jnp.float32), fused


class MissingModalityNet(nn.Module):
  """Both branches of bidirectional distillation (module docstring).

  Batches: end-to-end {'tiles' [B, N, S, S, 3], 'clinical' [B, C]} or feature mode
  {'features' [B, N, F], 'tile_mask' [B, N], 'clinical' [B, C]}.
  """
  num_classes: int
  clinical_dim: int
  encoder: str | None = "tiny_cnn"          # None: feature mode (precomputed features)
  encoder_kwargs: Any = None
  aggregator: Any = None                    # AttentionMIL attributes
  shared_aggregator: bool = True
  clinical_encoder: Any = None              # ClinicalEncoder attributes
  fusion: str = "concat"
  head_hidden: int = 64
  train_encoder: bool = True

  def setup(self):
    if self.encoder:
      self.enc = resnet.get_encoder(self.encoder, **dict(self.encoder_kwargs or {}))
    agg = dict(self.aggregator or {})
    self.mil_m = AttentionMIL(**agg)
    self.mil_s = self.mil_m if self.shared_aggregator else AttentionMIL(**agg)
    self.clinical = ClinicalEncoder(**dict(self.clinical_encoder or {}))
    width = self.clinical.out_dim(self.clinical_dim)
    self.prompt = self.param("prompt", nn.initializers.normal(0.02), (width,))
    self.branch_m = Branch(self.num_classes, self.fusion, self.head_hidden)
    self.branch_s = Branch(self.num_classes, self.fusion, self.head_hidden)

  def instances(self, batch: dict, *, train: bool) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Tile features [B, N, F] and the tile mask [B, N] (None: every tile is real)."""
    if not self.encoder:
      return batch["features"], batch.get("tile_mask")
    tiles = batch["tiles"]
    b, n = tiles.shape[:2]
    h = self.enc(tiles.reshape((b * n,) + tiles.shape[2:]), train=train and self.train_encoder)
    if not self.train_encoder:
      h = jax.lax.stop_gradient(h)
    return h.reshape(b, n, -1), batch.get("tile_mask")

  def __call__(self, batch: dict, *, train: bool = False,
               clinical_present: jnp.ndarray | None = None,
               fills: dict | None = None) -> dict:
    x, mask = self.instances(batch, train=train)
    wsi_m, attention_m = self.mil_m(x, mask, train=train)
    wsi_s, _ = self.mil_s(x, mask, train=train) if not self.shared_aggregator else (
        wsi_m, attention_m)
    h_c = self.clinical(batch["clinical"])
    prompt = jnp.broadcast_to(self.prompt, h_c.shape)
    if clinical_present is not None:
      h_c = jnp.where(clinical_present[:, None], h_c, prompt)
    logits_m, fused_m = self.branch_m(wsi_m, h_c)
    logits_s, fused_s = self.branch_s(wsi_s, prompt)
    out = {"logits_m": logits_m, "logits_s": logits_s, "fused_m": fused_m,
           "fused_s": fused_s, "wsi_m": wsi_m, "wsi_s": wsi_s, "attention_m": attention_m}
    for name, filled in (fills or {}).items():  # the tiles' pass is shared by every fill
      h_f = prompt if filled is None else self.clinical(filled)
      out[f"logits_m/{name}"] = self.branch_m(wsi_m, h_f)[0]
    return out
