"""VGG16-BN as BALNMP uses it: torchvision's `vgg16_bn().features` and its
AdaptiveAvgPool2d(7x7), flattened (25,088-d at full width), no classifier.

Layout (Simonyan & Zisserman 2015, configuration D, with BatchNorm after every conv): blocks
of 2, 2, 3, 3, 3 3x3 convolutions (64, 128, 256, 512, 512 channels at width 64), each conv
followed by BatchNorm and ReLU, each block by a 2x2 max-pool. `width` scales every channel
count (width 8: a CPU-sized network with the same shape). The flatten order is NHWC
(row, column, channel), not torchvision's NCHW: a converted checkpoint's first classifier
layer would need its rows permuted; BALNMP's aggregator learns that layer from scratch.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medguide_jax.models import conv as conv_lib

Dtype = Any
BLOCKS = (2, 2, 3, 3, 3)
CHANNELS = (64, 128, 256, 512, 512)


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
  """torch AdaptiveAvgPool's bins along one axis: [floor(i*size/out), ceil((i+1)*size/out))."""
  return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def adaptive_avg_pool(x: jnp.ndarray, out: Sequence[int]) -> jnp.ndarray:
  """AdaptiveAvgPool2d of NHWC `x` to `out` (h, w), with torch's bins: overlapping when the
  input does not divide evenly, repeated cells when it is smaller than the output."""
  h, w = x.shape[1:3]
  rows = [jnp.mean(x[:, a:b], axis=1) for a, b in adaptive_bins(h, out[0])]  # [B, W, C] each
  x = jnp.stack(rows, axis=1)
  cols = [jnp.mean(x[:, :, a:b], axis=2) for a, b in adaptive_bins(w, out[1])]
  return jnp.stack(cols, axis=2)


class VGG(nn.Module):
  """VGG-BN features + adaptive 7x7 average pool, flattened: [B, H, W, C] -> [B, 49 * C5]."""
  blocks: Sequence[int] = BLOCKS
  width: int = 64
  pool: int = 7
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    x = jnp.asarray(x, self.dtype)
    k = 0
    for b, (n, c) in enumerate(zip(self.blocks, CHANNELS)):
      for _ in range(n):
        x = nn.Conv(c * self.width // 64, (3, 3), padding=1, dtype=self.dtype,
                    param_dtype=jnp.float32, name=f"conv{k}",
                    conv_general_dilated=conv_lib.conv_general_dilated)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                         epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32,
                         name=f"norm{k}")(x)
        x = nn.relu(x)
        k += 1
      if x.shape[1] >= 2 and x.shape[2] >= 2:  # small CPU tiles: a 1x1 map is not pooled
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      del b
    x = adaptive_avg_pool(x.astype(jnp.float32), (self.pool, self.pool))
    return x.reshape(x.shape[0], -1)


def feature_dim(width: int = 64, pool: int = 7) -> int:
  return CHANNELS[-1] * width // 64 * pool * pool

