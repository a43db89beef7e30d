"""Vision Transformer (ViT) encoders that return pooled feature vectors (no classifier).

Same interface as the ResNet encoders in `resnet.py`: NHWC images [B, H, W, C] in, float32
features [B, width] out, parameters float32, compute in `dtype`. A ViT has no batch
statistics, so its variables hold only `params`. With `features=True` it returns, for dense
decoders, one map: the patch tokens (after the final LayerNorm) on their grid,
[B, H / patch, W / patch, width] in float32 (stride = patch).

Architecture, following Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words") as built
in big_vision's `models/vit.py`:
  * patch embedding: a `patch x patch` convolution with stride `patch` (VALID padding);
  * position embedding added to the patch tokens only (the class token carries none),
    learned (init N(0, 1/width)) or fixed 2-D sin-cos ('sincos2d', Chen et al. 2021, MoCo v3);
  * pre-LN transformer blocks: x + MHSA(LN(x)), then x + MLP(LN(x)) with GELU (MLP width
    usually 4x width); optional dropout and stochastic depth (Huang et al. 2016; drop rate
    rising linearly from 0 at the first block to `drop_path_rate` at the last, as DeiT);
  * a final LayerNorm over all tokens, then pooling: the class token ('cls') or the mean
    of the patch tokens ('gap', no class token).
ViT-S/16: width 384, depth 12, 6 heads, MLP 1536 (~21.7M parameters without a head).
ViT-B/16: width 768, depth 12, 12 heads, MLP 3072 (~85.8M parameters without a head).

Resolution. The position table is defined on a fixed `posemb_grid` (14x14 for 224 px with
16 px patches). An input of another size, e.g. SwAV's 96 px multi-crops (a 6x6 grid), uses
the table resized bilinearly (half-pixel centres, no antialiasing: torch's
`interpolate(mode='bilinear', align_corners=False)`) to its own grid, so one set of
parameters serves every crop size; at the init grid the resize is the identity.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Grid = Union[int, Sequence[int]]

POOLS = ("cls", "gap")
POSEMBS = ("learn", "sincos2d")

# big_vision's choices: Xavier-uniform weights, near-zero biases in the MLP.
_xavier = nn.initializers.xavier_uniform()
_tiny_normal = nn.initializers.normal(stddev=1e-6)


def _as_grid(grid: Grid, field: str) -> tuple[int, int]:
  """An int n or an (h, w) pair -> (h, w), each positive."""
  hw = (grid, grid) if isinstance(grid, int) else tuple(int(g) for g in grid)
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f"ViT {field} must be a positive int or an (h, w) pair; got {grid!r}.")
  return hw


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.) -> jnp.ndarray:
  """Fixed 2-D sin-cos position table [h * w, width] (rows in row-major (y, x) order).

  Row (y, x) is [sin(x * o), cos(x * o), sin(y * o), cos(y * o)] with the width/4
  frequencies o_k = temperature ** (-k / (width/4 - 1)).
  """
  if width % 4:
    raise ValueError(f"ViT width must be a multiple of 4 for posemb='sincos2d'; got {width}.")
  quarter = width // 4
  omega = 1.0 / temperature**(jnp.arange(quarter, dtype=jnp.float32) / max(quarter - 1, 1))
  y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                      indexing="ij")
  x = x.reshape(-1, 1) * omega[None]
  y = y.reshape(-1, 1) * omega[None]
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


def resize_posemb(table: jnp.ndarray, src_grid: Grid, dst_grid: Grid) -> jnp.ndarray:
  """Bilinearly resizes a position table [h*w, D] on `src_grid` to [h'*w', D] on `dst_grid`.

  Half-pixel centres, edge values held, no antialiasing; the identity when the grids match.
  """
  (sh, sw), (dh, dw) = _as_grid(src_grid, "posemb_grid"), _as_grid(dst_grid, "grid")
  if table.shape[0] != sh * sw:
    raise ValueError(f"Position table has {table.shape[0]} rows; posemb_grid {sh}x{sw} "
                     f"needs {sh * sw}.")
  grid = table.reshape(sh, sw, -1).astype(jnp.float32)
  out = jax.image.resize(grid, (dh, dw, grid.shape[-1]), method="bilinear", antialias=False)
  return out.reshape(dh * dw, -1)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> dropout -> Dense(input width)."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=_xavier, bias_init=_tiny_normal)
    width = x.shape[-1]
    x = nn.gelu(dense(self.mlp_dim, name="fc1")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return dense(width, name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)); [B, N, D] -> [B, N, D].

  Dropout follows each branch; stochastic depth drops a whole branch per example
  (`drop_path` rate, kept branches scaled by 1 / (1 - rate)).
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype,
                             param_dtype=jnp.float32)
    # One mask value per example, shared over tokens and channels: a dropped residual branch.
    drop_path = functools.partial(nn.Dropout, self.drop_path, broadcast_dims=(1, 2),
                                  deterministic=not train)
    y = norm(name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=_xavier, dropout_rate=self.attention_dropout, deterministic=not train,
        force_fp32_for_softmax=True, name="attn")(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    x = x + drop_path()(y)
    y = norm(name="norm2")(x)
    y = MlpBlock(self.mlp_dim, dropout=self.dropout, dtype=self.dtype, name="mlp")(y, train)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return x + drop_path()(y)


class ViT(nn.Module):
  """Vision Transformer encoder: patch embedding, transformer blocks, LayerNorm, pooling.

  Attributes:
    width: token width D, which is also the feature dim.
    depth: number of transformer blocks.
    num_heads: attention heads (must divide width).
    mlp_dim: hidden width of the block MLPs; None means 4 * width.
    patch: patch size in pixels (the image sides must be multiples of it).
    posemb: 'learn' (a parameter) or 'sincos2d' (fixed).
    posemb_grid: grid (int or (h, w)) on which the position table is defined; other
      input grids use it resized bilinearly.
    pool: 'cls' (class token) or 'gap' (mean of the patch tokens; no class token).
    dropout: dropout rate after the embedding, inside the MLP and after each branch.
    attention_dropout: dropout rate on the attention weights.
    drop_path_rate: stochastic-depth rate of the last block (linear from 0 at the first).
    remat: rematerialise each block in the backward pass (saves activation memory).
    dtype: compute dtype; parameters and the returned features are float32.
  """
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: Optional[int] = None
  patch: int = 16
  posemb: str = "learn"
  posemb_grid: Grid = 14
  pool: str = "cls"
  dropout: float = 0.0
  attention_dropout: float = 0.0
  drop_path_rate: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32

  def _check(self, x: jnp.ndarray) -> tuple[int, int]:
    """Validates the attributes and the input; returns the input's patch grid (h, w)."""
    if self.pool not in POOLS:
      raise ValueError(f"Unknown ViT pool {self.pool!r}; expected one of {POOLS}.")
    if self.posemb not in POSEMBS:
      raise ValueError(f"Unknown ViT posemb {self.posemb!r}; expected one of {POSEMBS}.")
    if self.width % self.num_heads:
      raise ValueError(f"ViT width {self.width} is not a multiple of num_heads "
                       f"{self.num_heads}.")
    _as_grid(self.posemb_grid, "posemb_grid")
    if x.ndim != 4 or x.shape[1] % self.patch or x.shape[2] % self.patch:
      raise ValueError(f"ViT input must be [B, H, W, C] with H and W multiples of patch "
                       f"{self.patch}; got shape {tuple(x.shape)}.")
    return x.shape[1] // self.patch, x.shape[2] // self.patch

  def _position_table(self, grid: tuple[int, int]) -> jnp.ndarray:
    """Float32 position table [grid_h * grid_w, width] for the input's patch grid."""
    gh, gw = _as_grid(self.posemb_grid, "posemb_grid")
    if self.posemb == "learn":
      table = self.param("pos_embedding", nn.initializers.normal(stddev=self.width**-0.5),
                         (gh * gw, self.width), jnp.float32)
    else:
      table = posemb_sincos_2d(gh, gw, self.width)
    return resize_posemb(table, (gh, gw), grid)

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool, tokens: bool = False,
               features: bool = False):
    """Maps images [B, H, W, C] to float32 features [B, width]; with `tokens`, also the
    patch tokens [B, N, width] (after the final LayerNorm; the class token left out); with
    `features`, instead [those tokens as a map [B, H / patch, W / patch, width]] (a list
    of one map, like the CNN encoders' multi-scale lists)."""
    if tokens and features:
      raise ValueError("ViT call: tokens=True and features=True are mutually exclusive "
                       "(features=True already holds the patch tokens, on their grid).")
    grid = self._check(x)
    x = nn.Conv(self.width, (self.patch, self.patch), (self.patch, self.patch),
                padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                name="embedding")(jnp.asarray(x, self.dtype))
    x = x.reshape(x.shape[0], grid[0] * grid[1], self.width)
    x = x + self._position_table(grid).astype(self.dtype)[None]
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width)),
                           x], axis=1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)

    # `train` is argument 2 of the block call (self, x, train): static under remat.
    block_cls = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block_cls(num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.width,
                    dropout=self.dropout, attention_dropout=self.attention_dropout,
                    drop_path=self.drop_path_rate * i / max(self.depth - 1, 1),
                    dtype=self.dtype, name=f"block{i}")(x, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32,
                     name="encoder_norm")(x)
    # Pool in float32: a bf16 mean over many tokens loses precision.
    x = x.astype(jnp.float32)
    pooled = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
    patches = x[:, 1:] if self.pool == "cls" else x
    if features:
      return [patches.reshape(x.shape[0], grid[0], grid[1], self.width)]
    if tokens:
      return pooled, patches
    return pooled

