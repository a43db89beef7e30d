"""The downstream networks of hybridmed part 3: any pretrained image tower plus a task head.

Every network keeps its image tower under `img` (models/resnet.py get_encoder), as
HybridMedNet does, so a stage loads hybridmed's tower with init_params 'img/.*', SwAV's with
'img/(.*)=enc/\\1', and random init loads nothing. `frozen` runs the tower in eval mode
behind a stop_gradient (its batch statistics are those it was pretrained with; the stage's
`freeze='img/.*'` keeps its parameters fixed too): the linear-evaluation and frozen-encoder
modes. Otherwise the tower trains with the head (fine-tuning).

  Classifier   pooled features -> one linear layer per task (models/heads.py); linear
               evaluation when frozen, fine-tuning otherwise
  Segmenter    the tower's multi-scale maps (features=True) -> models/unet.py UNetDecoder
               -> per-class mask logits at the input's size
  Detector     one of the tower's maps (`level`, default the coarsest) -> the CenterNet head
               (models/detection.py)
VQA is models/vqa.py's VqaNet (image tokens + question tokens, cross-attention).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from medguide_jax.models import detection, heads, resnet, unet


class _Tower(nn.Module):
  """Shared by the networks below: the `img` tower, frozen or trained."""
  encoder: str
  encoder_kwargs: dict
  frozen: bool

  def tower(self):
    return resnet.get_encoder(self.encoder, **dict(self.encoder_kwargs), name="img")

  def run(self, img, images, *, train: bool, **kw):
    out = img(images, train=train and not self.frozen, **kw)
    return jax.lax.stop_gradient(out) if self.frozen else out


class Classifier(_Tower):
  """Image -> one logits vector per task ({'logits': tuple, 'features'}); `num_classes`
  (C,) with `single=True` gives one task's logits [B, C] (the single-task layout)."""
  num_classes: Sequence[int] = (2,)
  single: bool = False

  @nn.compact
  def __call__(self, batch, *, train: bool = False):
    features = self.run(self.tower(), batch["image"], train=train)
    logits = heads.MultiTaskHead(tuple(self.num_classes), dropout_rate=0.0, name="head")(
        features, train=train)
    return {"logits": logits[0] if self.single else logits, "features": features}


class Segmenter(_Tower):
  """Image [B, H, W, C] -> {'logits' [B, H, W, num_classes]} through a U-Net decoder over
  the tower's multi-scale maps (a progressive upsampler over a ViT's one map)."""
  num_classes: int = 1

  @nn.compact
  def __call__(self, batch, *, train: bool = False):
    images = batch["image"]
    maps = self.run(self.tower(), images, train=train, features=True)
    logits = unet.UNetDecoder(self.num_classes, name="decoder")(
        list(maps), images.shape[1:3], train=train)
    return {"logits": logits}


class Detector(_Tower):
  """Image -> the CenterNet outputs (heatmap, size, offset) over the tower's map `level`
  (an index into its multi-scale maps; -1 the coarsest)."""
  num_classes: int = 1
  level: int = -1

  @nn.compact
  def __call__(self, batch, *, train: bool = False):
    maps = self.run(self.tower(), batch["image"], train=train, features=True)
    return detection.CenterNetHead(self.num_classes, name="head")(maps[self.level])


def stride(encoder: str, encoder_kwargs: dict, level: int) -> int:
  """The input pixels per cell of the tower's map `level` (the detector's output stride)."""
  return int(resnet.feature_strides(encoder, **dict(encoder_kwargs))[level])
