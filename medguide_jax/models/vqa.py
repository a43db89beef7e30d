"""VqaNet: visual question answering over a pretrained image encoder, as an answer classifier.

The network of hybridmed's VQA downstream task (data/vqa.py records, evaluation/vqa.py
accuracy). Subtrees (paths as medguide_jax/paths.py joins them):
  img       any image encoder of models/resnet.py (`get_encoder(encoder, **encoder_kwargs)`),
            called with tokens=True: its image tokens [B, N, C] (the last feature map's
            positions, or a ViT's patches). The same name as HybridMedNet's image tower, so
            a pretrained one loads with init_params 'img/.*'.
  txt       the question encoder, models/text.py BertEncoder (no pooler, as HybridMedNet's:
            'txt/.*' loads HybridMED's text tower when the questions are tokenised with the
            pretraining tokenizer and `max_len` is its position table's size, 112 by default)
  img_proj, txt_proj  Dense projections of both token sets to `hidden`
  img_pos   a learned position embedding [N, hidden] added to the projected image tokens
            (img_pos/embedding; N fixed by the image size at init): attention is
            blind to the order of its keys, and questions ask 'left' or 'right', 'upper' or
            'lower', so each image token must say where it is
  fusion    `layers` pre-LN blocks over the question tokens: cross-attention to the image
            tokens (queries: the question; keys/values: the image), self-attention among the
            question tokens (padding masked), feed-forward; a final LayerNorm. Pre-LN as
            text.ReportDecoders (trained from scratch: stable without a long warm-up). The
            attention and feed-forward modules are text.py's (`Attention`, `Mlp`).
  head_hidden, head_out  the fused [CLS] token -> Dense(hidden) -> GELU -> dropout ->
            Dense(num_answers)
Initialisation: the attention and feed-forward weights N(0, 0.02) as text.py (BERT's); the
projections and the head flax's default LeCun normal (std 1/sqrt(fan-in)): BERT's 0.02 is
1/sqrt(2500), right for width 768 but far too small at the widths a downstream head has
(16-256), where it left a toy question that needs the image (tests/test_vqa.py) unlearnt in
300 steps; the LeCun scale learns it on every seed tried.

Called as `model.apply(variables, batch, train=...)` with batch {'image' [B, H, W, C],
'question_ids' int [B, L], 'question_mask' bool [B, L]} (L <= max_len) -> {'logits' float32
[B, num_answers], 'features' float32 [B, hidden] (the fused [CLS] token)}; with
`return_attention`, also 'attention' [B, heads, L, N], the last block's cross-attention
(where each question token looks in the image). Batch-norm encoders need
mutable=['batch_stats'] when train=True, as everywhere.

Freezing the image tower: `freeze_image=True` runs `img` in inference mode (batch-norm
running statistics, no update of them) and stops the gradient at its tokens, so the fusion
and the text tower train on fixed image features (a probe of the pretrained encoder). The
optimiser should then also leave img/ alone (config `freeze='img/.*'`), so weight decay does
not move it.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medguide_jax.models import resnet, text

Dtype = Any
BATCH_KEYS = ("image", "question_ids", "question_mask")
_init = nn.initializers.normal(stddev=0.02)   # BERT's, as text.py


class FusionLayer(nn.Module):
  """Pre-LN block: x += CrossAttn(LN(x), image); x += SelfAttn(LN(x)); x += MLP(LN(x))."""
  heads: int
  mlp: int
  dropout: float
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, image: jnp.ndarray, mask: jnp.ndarray, *, train: bool
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x [B, L, D] question tokens, image [B, N, D], mask [B, L] -> (x, cross-attention
    probabilities [B, H, L, N])."""
    norm = functools.partial(nn.LayerNorm, epsilon=self.eps, dtype=self.dtype,
                             param_dtype=jnp.float32)
    attention = functools.partial(text.Attention, self.heads, self.dropout, self.dtype)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    y, probs = attention(name="cross_attention")(norm(name="cross_attention_norm")(x), image,
                                                 train=train)
    x = x + drop(y)
    y, _ = attention(name="self_attention")(norm(name="self_attention_norm")(x),
                                            key_mask=mask, train=train)
    x = x + drop(y)
    x = x + drop(text.Mlp(self.mlp, self.dtype, name="mlp")(norm(name="mlp_norm")(x)))
    return x, probs


class Fusion(nn.Module):
  """`layers` FusionLayers and a final LayerNorm."""
  layers: int
  heads: int
  mlp: int
  dropout: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, image, mask, *, train: bool):
    probs = None
    for i in range(self.layers):
      x, probs = FusionLayer(self.heads, self.mlp, self.dropout, dtype=self.dtype,
                             name=f"layer_{i}")(x, image, mask, train=train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32, name="norm")(x)
    return x, probs


class PositionEmbedding(nn.Module):
  """x [B, N, D] + a learned embedding [N, D] (N and D from the first call), N(0, 0.02)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    pos = self.param("embedding", _init, x.shape[1:], jnp.float32)
    return x + pos[None].astype(x.dtype)


class VqaNet(nn.Module):
  """Image encoder + question encoder + cross-attention fusion -> answer logits (module
  docstring).

  Attributes:
    vocab_size: the question tokenizer's vocabulary size.
    max_len: the text encoder's position table (the longest question; 112 to load
      HybridMED's text tower).
    num_answers: classes: the training answer vocabulary's size.
    encoder, encoder_kwargs: the image encoder (resnet.get_encoder).
    text_kwargs: BertEncoder fields (hidden, layers, heads, mlp, dropout, ...).
    hidden: the fusion's width; layers, heads: its depth and attention heads; mlp: its
      feed-forward width (None: 4 * hidden).
    dropout: the fusion's and the head's dropout.
    freeze_image: fixed image features (module docstring).
    dtype: compute dtype; parameters and outputs float32.
  """
  vocab_size: int
  max_len: int
  num_answers: int
  encoder: str = "tiny_cnn"
  encoder_kwargs: dict | None = None
  text_kwargs: dict | None = None
  hidden: int = 128
  layers: int = 2
  heads: int = 4
  mlp: int | None = None
  dropout: float = 0.1
  freeze_image: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    dense = functools.partial(nn.Dense, self.hidden, dtype=self.dtype, param_dtype=jnp.float32)
    self.img = resnet.get_encoder(self.encoder, dtype=self.dtype, **dict(self.encoder_kwargs or {}))
    self.txt = text.BertEncoder(vocab_size=self.vocab_size, max_len=self.max_len, pooler=False,
                                dtype=self.dtype, **dict(self.text_kwargs or {}))
    self.img_proj, self.txt_proj = dense(), dense()
    self.img_pos = PositionEmbedding()
    self.fusion = Fusion(self.layers, self.heads, self.mlp or 4 * self.hidden, self.dropout,
                         self.dtype)
    self.head_hidden = dense()
    self.head_out = nn.Dense(self.num_answers, dtype=self.dtype, param_dtype=jnp.float32)
    self.head_dropout = nn.Dropout(self.dropout)

  def encode_image(self, images: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """images [B, H, W, C] -> the projected image tokens with their positions [B, N, hidden]
    (fixed features when `freeze_image`)."""
    _, tokens = self.img(images, train=train and not self.freeze_image, tokens=True)
    if self.freeze_image:
      tokens = jax.lax.stop_gradient(tokens)
    return self.img_pos(self.img_proj(tokens))

  def __call__(self, batch: dict, *, train: bool = False, return_attention: bool = False
               ) -> dict[str, jnp.ndarray]:
    """batch {'image', 'question_ids', 'question_mask'} -> {'logits' [B, A], 'features'
    [B, hidden]} (+ 'attention' [B, H, L, N]); see the module docstring."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
      raise KeyError(f"VqaNet batch lacks {missing}; it needs {list(BATCH_KEYS)}")
    ids, mask = batch["question_ids"], jnp.asarray(batch["question_mask"]).astype(bool)
    image = self.encode_image(batch["image"], train=train)
    words = self.txt(ids, mask, train=train)["tokens"]
    x, probs = self.fusion(self.txt_proj(words), image, mask, train=train)
    features = x[:, 0]
    h = nn.gelu(self.head_hidden(features), approximate=False)
    logits = self.head_out(self.head_dropout(h, deterministic=not train))
    out = {"logits": logits.astype(jnp.float32), "features": features.astype(jnp.float32)}
    if return_attention:
      out["attention"] = probs
    return out
