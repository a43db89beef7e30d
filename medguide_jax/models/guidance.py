"""DeepGuide's networks: the guidance MLP G and the network of every stage (GuidanceNet).

G is a regression MLP from inferior to superior latents. Derm7pt reference (Keras): Dense(1024,relu) -> Drop(.25) -> Dense(512,relu) -> Drop(.25)
-> Dense(512,relu) -> Drop(.25) -> Dense(1024,relu) -> Drop(.25) -> Dense(2048,relu),
trained with MSE against the superior encoder's 2048-d GAP features.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medguide_jax.models import heads, resnet

# Keras' Dense default (glorot_uniform kernel, zero bias), to match the reference model.
_dense_init = nn.initializers.xavier_uniform()


class GuidanceMLP(nn.Module):
  """G: z_I [B, D_I] -> predicted superior latent [B, out_dim].

  Attributes:
    hidden: widths of the hidden layers; each is Dense -> ReLU -> Dropout (`dense_<i>`).
    out_dim: output width (the superior latent dim, 2048 for InceptionV3/ResNet-50 GAP).
    dropout_rate: dropout after each hidden layer ('dropout' PRNG stream when training).
    output_relu: ReLU on the output (`out`), since GAP-after-ReLU targets are non-negative.
  """
  hidden: Sequence[int] = (1024, 512, 512, 1024)
  out_dim: int = 2048
  dropout_rate: float = 0.25
  output_relu: bool = True

  @nn.compact
  def __call__(self, z: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Maps z [B, D_I] to float32 predictions [B, out_dim]."""
    h = z
    for i, width in enumerate(self.hidden):
      h = nn.relu(nn.Dense(width, kernel_init=_dense_init, name=f"dense_{i}")(h))
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    out = nn.Dense(self.out_dim, kernel_init=_dense_init, name="out")(h)
    if self.output_relu:
      out = nn.relu(out)
    return out.astype(jnp.float32)


MODES = ("inferior", "superior", "multimodal", "guidance", "guided", "guided_plus")
_USES_INFERIOR = ("inferior", "multimodal", "guidance", "guided", "guided_plus")
_USES_SUPERIOR = ("superior", "multimodal", "guidance")
_FROZEN_ENCODERS = ("guidance", "guided", "guided_plus")


def to_float(images: jax.Array, dtype) -> jax.Array:
  """uint8 [B,H,W,3] -> [-1, 1], as the reference's Inception preprocessing."""
  return (images.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)


class GuidanceNet(nn.Module):
  """Every guidance stage's network; `mode` picks which parts exist and which train.

  Subtrees keep one name across stages (enc_inferior, enc_superior, guidance, head), so a
  later stage loads an earlier one's by init_from + init_params. Returns
  {'logits': one [B, C_t] per task} in classifier modes, {'prediction', 'target'} [B, D]
  in mode 'guidance' (G's regression onto the frozen superior latent).
  """
  mode: str
  encoder: str
  encoder_kwargs: Any
  num_classes: tuple[int, ...]
  head_hidden: int
  head_dropout: float
  guidance_hidden: tuple[int, ...]
  guidance_dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: dict, *, train: bool) -> dict:
    mode, frozen = self.mode, self.mode in _FROZEN_ENCODERS
    enc = lambda name: resnet.get_encoder(self.encoder, dtype=self.dtype, parent=None,
                                          **dict(self.encoder_kwargs)).clone(parent=self, name=name)
    z = {}
    if mode in _USES_INFERIOR:
      z["inf"] = enc("enc_inferior")(to_float(batch["image_inferior"], self.dtype),
                                     train=train and not frozen)
    if mode in _USES_SUPERIOR:
      z["sup"] = enc("enc_superior")(to_float(batch["image_superior"], self.dtype),
                                     train=train and not frozen)
    if mode in _FROZEN_ENCODERS:
      g = GuidanceMLP(hidden=tuple(self.guidance_hidden),
                      out_dim=resnet.feature_dim(self.encoder, **dict(self.encoder_kwargs)),
                      dropout_rate=self.guidance_dropout, name="guidance")
      z["guided"] = g(z["inf"], train=train and mode == "guidance")
    if mode == "guidance":
      return {"prediction": z["guided"], "target": jax.lax.stop_gradient(z["sup"])}
    features = {"inferior": [z.get("inf")], "superior": [z.get("sup")],
                "multimodal": [z.get("inf"), z.get("sup")], "guided": [z.get("guided")],
                "guided_plus": [z.get("inf"), z.get("guided")]}[mode]
    if mode in ("guided", "guided_plus"):
      features = [jax.lax.stop_gradient(f) for f in features]
    head = heads.MultiTaskHead(num_classes=self.num_classes, hidden=self.head_hidden,
                               dropout_rate=self.head_dropout, name="head")
    return {"logits": head(jnp.concatenate(features, axis=-1), train=train)}
