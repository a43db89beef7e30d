"""HybridMedNet: the towers of HybridMED (arXiv 2410.00448) under one parameter tree.

  img          an image encoder (models/resnet.py: tiny_cnn, resnet*, vit_*) giving a pooled
               vector and its tokens (the last feature map's positions, or a ViT's patches)
  txt          the BERT-style text encoder (models/text.py BertEncoder), for the findings,
               the impression and zero-shot prompts
  dec          the report decoders (models/text.py ReportDecoders): the summariser
               (findings tokens -> impression) and the captioner (image tokens ->
               impression), sharing self-attention, feed-forward and embeddings
  img_global, txt_global   Dense projections of the pooled vectors to `embed_dim` (L_CG)
  img_local,  txt_local    Dense projections of the tokens to `embed_dim` (L_CL)
  logit_scale  the global alignment's learnable log inverse temperature (init log 1/0.07)

The text's global vector is its [CLS] token (MGCA's report feature; BERT's pooler is not
used). Embeddings are returned unnormalised: the losses normalise (losses/alignment.py).
`text.TOWER_REGEXES` address img/, txt/ and dec/ for init_params, freeze and decay masks;
the projections are named apart so a downstream stage can take `img/.*` alone.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medguide_jax.losses import alignment
from medguide_jax.models import resnet, text

BRANCHES = ("summariser", "captioner")
# What a forward pass computes: 'summariser' (findings -> impression: the text-only stage and
# the teacher), 'alignment' (image, impression and findings embeddings), 'captioner'.
PARTS = ("summariser", "alignment", "captioner")


def _decoders(net: "HybridMedNet") -> text.ReportDecoders:
  img_dim = resnet.feature_dim(net.encoder, **dict(net.encoder_kwargs or {}))
  hidden = dict(net.text_kwargs or {}).get("hidden", text.BertEncoder.hidden)
  return text.ReportDecoders(
      vocab_size=net.vocab_size, max_len=net.max_len, branches=BRANCHES,
      memory_dims=(hidden, img_dim), share_cross_attention=net.share_cross_attention,
      dtype=net.dtype, **dict(net.decoder_kwargs or {}))


def decoders(net: "HybridMedNet") -> text.ReportDecoders:
  """A stand-alone copy of `net`'s decoders (for text.greedy_decode / beam_search with the
  params under 'dec')."""
  return _decoders(net)


class HybridMedNet(nn.Module):
  """The image tower, text tower and decoders with their alignment heads (module docstring)."""
  vocab_size: int
  max_len: int
  encoder: str = "tiny_cnn"
  encoder_kwargs: dict | None = None
  text_kwargs: dict | None = None       # BertEncoder fields (hidden, layers, heads, mlp, ...)
  decoder_kwargs: dict | None = None    # ReportDecoders fields (hidden, layers, ...)
  embed_dim: int = 128
  share_cross_attention: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.img = resnet.get_encoder(self.encoder, dtype=self.dtype, **dict(self.encoder_kwargs or {}))
    self.txt = text.BertEncoder(vocab_size=self.vocab_size, max_len=self.max_len, pooler=False,
                                dtype=self.dtype, **dict(self.text_kwargs or {}))
    self.dec = _decoders(self)
    dense = lambda name: nn.Dense(self.embed_dim, dtype=self.dtype, name=name)
    self.img_global, self.img_local = dense("img_global"), dense("img_local")
    self.txt_global, self.txt_local = dense("txt_global"), dense("txt_local")
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(
        alignment.INIT_LOGIT_SCALE), ())

  def encode_image(self, images: jnp.ndarray, *, train: bool = False) -> dict:
    """images [B, H, W, C] -> {'global' [B, E], 'tokens' [B, N, E] (projected), 'memory'
    [B, N, C] (the encoder's tokens: the captioner's memory)}."""
    pooled, tokens = self.img(images, train=train, tokens=True)
    return {"global": self.img_global(pooled), "tokens": self.img_local(tokens),
            "memory": tokens}

  def encode_text(self, ids: jnp.ndarray, mask: jnp.ndarray, *, train: bool = False,
                  return_attention: bool = False) -> dict:
    """ids, mask [B, L] -> {'global' [B, E] (of [CLS]), 'tokens' [B, L, E] (projected),
    'memory' [B, L, H] (the encoder's tokens: the summariser's memory), 'attention'?}."""
    out = self.txt(ids, mask, train=train, return_attention=return_attention)
    result = {"global": self.txt_global(out["tokens"][:, 0]),
              "tokens": self.txt_local(out["tokens"]), "memory": out["tokens"]}
    if return_attention:
      result["attention"] = out["attention"]
    return result

  def decode(self, ids: jnp.ndarray, memory: jnp.ndarray, memory_mask: jnp.ndarray | None, *,
             branch: str, train: bool = False) -> jnp.ndarray:
    """Teacher-forced logits [B, L, V] of `branch` (ids start with [CLS])."""
    return self.dec(ids, memory, memory_mask, branch=branch, train=train)

  def __call__(self, batch: dict, *, train: bool = False, parts=PARTS,
               concat: bool = False) -> dict:
    """The `parts` of a forward pass: 'summariser' gives the findings' encoding and the
    summariser's teacher-forced logits; 'alignment' the image, impression and findings
    encodings (the findings with their last-layer attention; with `concat`, also 'report':
    findings and impression as one text); 'captioner' the captioner's logits."""
    unknown = set(parts) - set(PARTS)
    if unknown:
      raise ValueError(f"parts {sorted(unknown)}; valid: {PARTS}")
    out = {}
    ids = batch["impression_ids"][:, :-1]   # teacher forcing: predict ids[:, 1:]
    if "summariser" in parts or "alignment" in parts:
      out["findings"] = self.encode_text(batch["findings_ids"], batch["findings_mask"],
                                         train=train, return_attention="alignment" in parts)
    if "summariser" in parts:
      out["summariser"] = self.decode(ids, out["findings"]["memory"], batch["findings_mask"],
                                      branch="summariser", train=train)
    if "alignment" in parts or "captioner" in parts:
      out["image"] = self.encode_image(batch["image"], train=train)
    if "alignment" in parts:
      out["impression"] = self.encode_text(batch["impression_ids"], batch["impression_mask"],
                                           train=train)
      if concat:
        out["report"] = self.encode_text(batch["report_ids"], batch["report_mask"],
                                         train=train, return_attention=True)
    if "captioner" in parts:
      out["captioner"] = self.decode(ids, out["image"]["memory"], None, branch="captioner",
                                     train=train)
    return out
