"""U-Net-style segmentation decoder over an image encoder's multi-scale features.

The decoder takes the list that `encoder(x, train=..., features=True)` returns (models/
resnet.py: float32 maps [B, h_i, w_i, C_i], fine to coarse) and maps it to per-pixel logits
[B, H, W, out_channels] at a requested output size (usually the image's).

Several maps (TinyCNN, ResNet): a U-Net decoder (Ronneberger et al. 2015, with the
encoder of a classification network as in segmentation_models_pytorch's `Unet`). From the
coarsest map, repeatedly: upsample bilinearly to the next finer map's size (x2), concatenate
that map (the skip connection), then two 3x3 conv + norm + ReLU. After the finest map
(stride 2), a bilinear resize to the output size and a 1x1 conv give the logits.

One map (ViT): no skips exist, so the decoder is a progressive upsampler in the manner of
SETR-PUP (Zheng et al. 2021): conv block, x2 bilinear upsampling, repeated until the patch
stride is undone (4 blocks for 16 px patches), then the 1x1 conv. Step sizes are
ceil(H / 2^k), so a stride that is not a power of two (14 px patches) ends exactly at H.

Norm: GroupNorm by default (`norm='group'`, the encoders' rule: 32 groups or the gcd with
the width), not BatchNorm. The usual downstream set-up trains the decoder on a frozen
encoder run with `train=False`; BatchNorm layers in the decoder would need their own running
statistics, updated in a train mode the encoder is not in, from the small batches of large
images that segmentation affords, and polluted by a padded batch's filler rows. GroupNorm
normalises each example alone: no state, the same in training and evaluation, whatever the
batch. `norm='batch'` is there for comparison (its statistics go to `batch_stats`).

Resizing is jax.image.resize 'bilinear' without antialiasing: half-pixel centres, edge values
held, i.e. torch's `interpolate(mode='bilinear', align_corners=False)`.

Parameters are float32; `dtype` sets the compute dtype; the logits are float32.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medguide_jax.models import conv as conv_lib
# The encoders' conv initialiser and norm factory, so decoder layers are built the same way.
from medguide_jax.models.resnet import _conv_init, _make_norm

Dtype = Any
MIN_WIDTH = 16


def default_widths(coarsest_channels: int, num_blocks: int) -> tuple[int, ...]:
  """Block widths coarse to fine: the coarsest map's channels halved per level, at least 16,
  e.g. (256, 128, 64, 32) for resnet18's 512 channels and four blocks."""
  return tuple(max(MIN_WIDTH, coarsest_channels // 2**(i + 1)) for i in range(num_blocks))


def progressive_sizes(map_size: Sequence[int],
                      output_size: Sequence[int]) -> list[tuple[int, int]]:
  """Sizes after each x2 step of the single-map upsampler, the last one `output_size`.

  k = the fewest doublings that take `map_size` (h, w) to at least `output_size` (H, W)
  (at least 1); step i of k ends at (ceil(H / 2^(k-i)), ceil(W / 2^(k-i))).
  """
  (h, w), (big_h, big_w) = map_size, output_size
  k = max(1, math.ceil(math.log2(max(big_h / h, big_w / w))))
  return [(-(-big_h // 2**(k - i)), -(-big_w // 2**(k - i))) for i in range(1, k + 1)]


def _resize(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
  """Bilinear resize of [B, h, w, C] to [B, size[0], size[1], C] (identity when equal)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method="bilinear",
                          antialias=False)


def _check_inputs(features: Sequence[jnp.ndarray],
                  output_size: Sequence[int]) -> tuple[list[jnp.ndarray], tuple[int, int]]:
  """Validates the decoder's inputs; returns (the maps as a list, output (H, W))."""
  if hasattr(features, "shape") or not features:  # one array is not a list of maps
    raise ValueError("UNetDecoder features must be a non-empty list of maps [B, h, w, C] "
                     "(what an encoder returns with features=True).")
  maps = list(features)
  shapes = [tuple(m.shape) for m in maps]
  if any(len(s) != 4 for s in shapes) or len({s[0] for s in shapes}) != 1:
    raise ValueError(f"UNetDecoder features must be maps [B, h, w, C] sharing B; got "
                     f"shapes {shapes}.")
  if any(f[1] < c[1] or f[2] < c[2] for f, c in zip(shapes, shapes[1:])):
    raise ValueError(f"UNetDecoder features must be ordered fine to coarse; got spatial "
                     f"sizes {[s[1:3] for s in shapes]}.")
  size = tuple(int(v) for v in output_size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"UNetDecoder output_size must be a positive (H, W); got "
                     f"{output_size!r}.")
  return maps, size


class ConvBlock(nn.Module):
  """Two (3x3 conv, norm, ReLU) layers: [B, h, w, C] -> [B, h, w, width]."""
  width: int
  norm: str = "group"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    norm = _make_norm(self.norm, train=train, dtype=self.dtype, momentum=0.9)
    for i in (1, 2):
      x = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype,
                  param_dtype=jnp.float32, kernel_init=_conv_init, name=f"conv{i}",
                  conv_general_dilated=conv_lib.conv_general_dilated)(x)
      x = nn.relu(norm(name=f"norm{i}")(x))
    return x


class UNetDecoder(nn.Module):
  """Multi-scale features (fine to coarse) -> per-pixel logits; see the module docstring.

  Attributes:
    out_channels: logit channels C (one per mask; sigmoid, not softmax, in
      losses/segmentation.py).
    widths: conv-block widths, coarse to fine, one per block (several maps: one fewer than
      the maps; one map: one per x2 step, see `progressive_sizes`); None for
      `default_widths`.
    dtype: compute dtype; parameters and logits are float32.
    norm: 'group' (default, no state) or 'batch'.
  """
  out_channels: int
  widths: Optional[Sequence[int]] = None
  dtype: Dtype = jnp.float32
  norm: str = "group"

  def _widths(self, coarsest_channels: int, num_blocks: int) -> tuple[int, ...]:
    if self.widths is None:
      return default_widths(coarsest_channels, num_blocks)
    widths = tuple(int(w) for w in self.widths)
    if len(widths) != num_blocks or min(widths) < 1:
      raise ValueError(f"UNetDecoder widths={tuple(self.widths)}: these features need "
                       f"{num_blocks} positive widths (coarse to fine), or None.")
    return widths

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], output_size: Sequence[int], *,
               train: bool) -> jnp.ndarray:
    """features: maps [B, h_i, w_i, C_i] fine to coarse; output_size: (H, W).

    Returns float32 logits [B, H, W, out_channels].
    """
    maps, size = _check_inputs(features, output_size)
    block = lambda width, i: ConvBlock(width, norm=self.norm, dtype=self.dtype,
                                       name=f"block{i}")
    x = maps[-1].astype(self.dtype)
    if len(maps) > 1:
      skips = maps[-2::-1]
      for i, (width, skip) in enumerate(zip(self._widths(x.shape[-1], len(skips)), skips)):
        x = _resize(x, skip.shape[1:3])
        x = jnp.concatenate([x, skip.astype(self.dtype)], axis=-1)
        x = block(width, i)(x, train=train)
    else:
      steps = progressive_sizes(x.shape[1:3], size)
      for i, (width, step) in enumerate(zip(self._widths(x.shape[-1], len(steps)), steps)):
        x = _resize(block(width, i)(x, train=train), step)
    x = _resize(x, size)
    logits = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                     name="head")(x)
    return logits.astype(jnp.float32)
