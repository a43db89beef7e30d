"""SwAV's network (Caron et al. 2020) as the ssl method uses it: encoder, projection head,
prototypes, and a linear classifier head for the downstream stages.

Subtrees keep one name in every ssl stage (enc, projection, prototypes, head), so a
downstream stage loads the pretrained encoder with init_params='enc/.*'.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medguide_jax.losses import swav
from medguide_jax.models import resnet


class ProjectionHead(nn.Module):
  """SwAV's projection: Linear -> BN -> ReLU -> Linear, then L2 normalisation (hidden=0:
  one Linear)."""
  hidden: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, *, train: bool):
    x = h
    if self.hidden:
      x = nn.Dense(self.hidden, dtype=self.dtype, name="dense1")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                       name="norm")(x)
      x = nn.relu(x)
    x = nn.Dense(self.out_dim, dtype=self.dtype, name="dense2")(x).astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Prototypes(nn.Module):
  """K prototype vectors, stored [K, D] like the reference's Linear(D, K, bias=False).weight.
  Rows are L2-normalised before every step by the task's `prepare_params`."""
  num_prototypes: int
  dim: int

  @nn.compact
  def __call__(self):
    init = lambda key, shape: swav.normalize_prototypes(jax.random.normal(key, shape), axis=1)
    return self.param("weight", init, (self.num_prototypes, self.dim))


def eval_image(batch: dict) -> jax.Array:
  """One image per example: the first global crop of a multi-crop batch, else the image."""
  return batch["crops_0"][:, 0] if "crops_0" in batch else batch["image"]


class SSLNet(nn.Module):
  """Encoder + projection + prototypes (pretraining) and a linear head (downstream).

  Called on a batch, it is a classifier: {'logits' [B, C], 'features' [B, F]}; with
  `train_encoder=False` (the linear probe) the encoder runs in eval mode and no gradient
  reaches it. At init it also builds the projection and prototypes, so every stage's
  parameter tree has the same shape.
  """
  encoder: str
  encoder_kwargs: Any
  proj_hidden: int
  proj_dim: int
  num_prototypes: int
  num_classes: int
  train_encoder: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    self.enc = resnet.get_encoder(self.encoder, dtype=self.dtype, **dict(self.encoder_kwargs))
    self.projection = ProjectionHead(self.proj_hidden, self.proj_dim, self.dtype)
    self.prototypes = Prototypes(self.num_prototypes, self.proj_dim)
    self.head = nn.Dense(max(self.num_classes, 1), dtype=self.dtype)

  def __call__(self, batch: dict, *, train: bool = False) -> dict:
    h = self.enc(eval_image(batch), train=train and self.train_encoder)
    if not self.train_encoder:
      h = jax.lax.stop_gradient(h)
    out = {"logits": self.head(h), "features": h}
    if self.is_initializing():
      out.update(z=self.projection(h, train=train), prototypes=self.prototypes())
    return out

  def embed_crops(self, crops: list[jax.Array], *, train: bool) -> tuple[jax.Array, jax.Array]:
    """Crop groups [B, n_g, S_g, S_g, C] -> (features [V, B, F], z [V, B, d]), crop-major.

    One encoder pass per resolution (the crops of a group go through together); the batch
    axis stays first inside each pass, so a batch-sharded input stays sharded.
    """
    hs, zs = [], []
    for group in crops:
      b, n = group.shape[:2]
      h = self.enc(group.reshape((b * n,) + group.shape[2:]), train=train)
      z = self.projection(h, train=train)
      hs.append(h.reshape(b, n, -1).transpose(1, 0, 2))
      zs.append(z.reshape(b, n, -1).transpose(1, 0, 2))
    return jnp.concatenate(hs), jnp.concatenate(zs)

  def classify_features(self, h: jax.Array) -> jax.Array:
    """The linear head on features [N, F] -> logits [N, C]."""
    return self.head(h)
