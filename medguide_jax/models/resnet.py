"""Image encoders that return pooled feature vectors (no classifier).

All encoders take NHWC images `x` of shape [B, H, W, C] (any float dtype; values are
whatever the input pipeline produced, e.g. ImageNet-normalised pixels) and return
global-average-pooled features of shape [B, D] in float32.

Dense tasks (segmentation decoders, models/unet.py) call them with `features=True` instead
and get a list of float32 feature maps [B, h_i, w_i, C_i], fine to coarse: TinyCNN its three
conv outputs (strides 2, 4, 8); ResNet the stem after its ReLU (stride 2) and each stage's
output (strides 4, 8, 16, 32); ViT its patch tokens on their grid (one map, stride = patch).
A CNN map at stride s is ceil(H / s) x ceil(W / s) ('SAME' padding). `feature_strides` and
`feature_channels` give these without a forward pass. The option only changes what is
returned: the same layers run, so the parameters are those of the pooled encoder.

Parameters are always float32; `dtype` only sets the compute dtype (e.g. jnp.bfloat16 for
mixed precision). BatchNorm statistics live in the `batch_stats` collection and are taken
over the whole batch passed in. The trainer runs the model under `jax.jit` on a globally
sharded array, so the statistics are global without any `axis_name`.

ResNets follow the v1.5 layout (torchvision's): the stride of a downsampling bottleneck
sits in the 3x3 convolution, not in the first 1x1.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medguide_jax.models import conv as conv_lib
from medguide_jax.models import vgg as vgg_lib
from medguide_jax.models import vit as vit_lib

Dtype = Any
ModuleDef = Callable[..., nn.Module]

# Kaiming-normal (fan_out) as in torchvision, since pretrained-style training assumes it.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _make_norm(norm: str, *, train: bool, dtype: Dtype, momentum: float) -> ModuleDef:
  """Returns a norm-layer constructor; call it with `scale_init=` to override the scale.

  Args:
    norm: 'batch' (BatchNorm, stats in `batch_stats`) or 'group' (GroupNorm, no state).
    train: BatchNorm uses batch statistics (and updates running ones) only when True.
    dtype: compute dtype; parameters stay float32.
    momentum: BatchNorm running-average decay (Flax convention: 0.9 == PyTorch's 0.1).
  """
  if norm == "batch":
    return functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=momentum, epsilon=1e-5,
        dtype=dtype, param_dtype=jnp.float32)
  if norm == "group":
    return functools.partial(_GroupNorm, dtype=dtype)
  raise ValueError(f"Unknown norm {norm!r}; expected 'batch' or 'group'.")


class _GroupNorm(nn.Module):
  """GroupNorm with 32 groups, or fewer when the channel count is not a multiple of 32."""
  dtype: Dtype = jnp.float32
  scale_init: Callable[..., Any] = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    # gcd keeps narrow test-sized networks (width 8, 16) valid.
    groups = math.gcd(32, x.shape[-1])
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype,
                        param_dtype=jnp.float32, scale_init=self.scale_init)(x)


def _add_shortcut(block: nn.Module, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """relu(shortcut(x) + y): identity, or a strided 1x1 projection (`proj_conv`, `proj_norm`
  of `block`) where the residual branch changed the shape. Call inside block's __call__."""
  if x.shape != y.shape:
    x = block.conv(y.shape[-1], (1, 1), (block.strides, block.strides), name="proj_conv")(x)
    x = block.norm(name="proj_norm")(x)
  return nn.relu(x + y)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity or 1x1-projection shortcut (ResNet-18/34).

  Output channels: `filters`. Spatial size is divided by `strides`.
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv1")(x)
    y = nn.relu(self.norm(name="norm1")(y))
    y = self.conv(self.filters, (3, 3), name="conv2")(y)
    # Zero-init of the last scale makes each block start as the identity (Goyal et al.).
    y = self.norm(scale_init=nn.initializers.zeros, name="norm2")(y)
    return _add_shortcut(self, x, y)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 (4x expansion) bottleneck block (ResNet-50).

  Output channels: 4 * `filters`. Spatial size is divided by `strides`.
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = self.conv(self.filters, (1, 1), name="conv1")(x)
    y = nn.relu(self.norm(name="norm1")(y))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), name="conv2")(y)
    y = nn.relu(self.norm(name="norm2")(y))
    y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
    y = self.norm(scale_init=nn.initializers.zeros, name="norm3")(y)
    return _add_shortcut(self, x, y)


_BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(nn.Module):
  """ResNet encoder: 7x7/2 stem, 3x3/2 max-pool, residual stages, global average pool.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: 'basic' (feature dim 8 * width) or 'bottleneck' (feature dim 32 * width).
    width: channels of the stem and of the first stage.
    dtype: compute dtype; parameters and the returned features are float32.
    norm: 'batch' or 'group'.
    bn_momentum: BatchNorm running-average decay.
  """
  stage_sizes: Sequence[int]
  block: str = "basic"
  width: int = 64
  dtype: Dtype = jnp.float32
  norm: str = "batch"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool, tokens: bool = False,
               features: bool = False):
    """Maps images [B, H, W, C] to float32 features [B, D]; with `tokens`, also the last
    feature map's positions as tokens [B, h * w, D] (row-major); with `features`, instead
    the list [stem after ReLU (stride 2), stage 1 (stride 4), stage 2 (8), ...] of float32
    maps [B, h_i, w_i, C_i]."""
    _check_outputs(tokens, features)
    if self.block not in _BLOCKS:
      raise ValueError(f"Unknown block {self.block!r}; expected one of {sorted(_BLOCKS)}.")
    block_cls = _BLOCKS[self.block]
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=_conv_init,
                             conv_general_dilated=conv_lib.conv_general_dilated)
    norm = _make_norm(self.norm, train=train, dtype=self.dtype, momentum=self.bn_momentum)

    x = jnp.asarray(x, self.dtype)
    x = conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="stem_conv")(x)
    x = nn.relu(norm(name="stem_norm")(x))
    maps = [x]
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(filters=self.width * 2**i, conv=conv, norm=norm, strides=strides,
                      name=f"stage{i + 1}_block{j + 1}")(x)
      maps.append(x)
    if features:
      return [m.astype(jnp.float32) for m in maps]
    return _pooled(x, tokens)


def _check_outputs(tokens: bool, features: bool) -> None:
  """The two extra outputs are alternatives: tokens of the last map, or all the maps."""
  if tokens and features:
    raise ValueError("Encoder call: tokens=True and features=True are mutually exclusive "
                     "(features=True already holds the last map that tokens flattens).")


def _pooled(x: jnp.ndarray, tokens: bool):
  """Global average pool of a feature map [B, h, w, D] in float32 (a bf16 mean over many
  positions loses precision); with `tokens`, (pooled, the positions as tokens [B, h*w, D])."""
  x = x.astype(jnp.float32)
  pooled = jnp.mean(x, axis=(1, 2))
  if tokens:
    return pooled, x.reshape(x.shape[0], -1, x.shape[-1])
  return pooled


class TinyCNN(nn.Module):
  """Three stride-2 conv+BN+ReLU layers and global average pooling, for CPU smoke runs.

  Feature dim is 4 * width. Same call signature as `ResNet`.
  """
  width: int = 16
  dtype: Dtype = jnp.float32
  norm: str = "batch"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool, tokens: bool = False,
               features: bool = False):
    """Maps images [B, H, W, C] to float32 features [B, 4 * width] (and, with `tokens`, the
    last feature map's positions [B, h * w, 4 * width]); with `features`, instead the list
    of the three conv+norm+ReLU outputs (strides 2, 4, 8; width, 2 and 4 * width channels)
    in float32."""
    _check_outputs(tokens, features)
    norm = _make_norm(self.norm, train=train, dtype=self.dtype, momentum=self.bn_momentum)
    x = jnp.asarray(x, self.dtype)
    maps = []
    for i, mult in enumerate((1, 2, 4)):
      x = nn.Conv(self.width * mult, (3, 3), (2, 2), use_bias=False, dtype=self.dtype,
                  param_dtype=jnp.float32, kernel_init=_conv_init, name=f"conv{i}",
                  conv_general_dilated=conv_lib.conv_general_dilated)(x)
      x = nn.relu(norm(name=f"norm{i}")(x))
      maps.append(x)
    if features:
      return [m.astype(jnp.float32) for m in maps]
    return _pooled(x, tokens)


# name -> (constructor, default attributes).
_ENCODERS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "tiny_cnn": (TinyCNN, {"width": 16}),
    "resnet18": (ResNet, {"stage_sizes": (2, 2, 2, 2), "block": "basic", "width": 64}),
    "resnet34": (ResNet, {"stage_sizes": (3, 4, 6, 3), "block": "basic", "width": 64}),
    "resnet50": (ResNet, {"stage_sizes": (3, 4, 6, 3), "block": "bottleneck", "width": 64}),
    # ViTs (vit.py): feature dim = width. vit_tiny is a test-sized model (MLP 4 * width).
    "vit_tiny": (vit_lib.ViT, {"width": 64, "depth": 2, "num_heads": 2, "mlp_dim": None}),
    "vit_s16": (vit_lib.ViT, {"width": 384, "depth": 12, "num_heads": 6, "mlp_dim": 1536}),
    "vit_b16": (vit_lib.ViT, {"width": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072}),
    # BALNMP's patch encoder (vgg.py): features + adaptive 7x7 pool, flattened (25,088-d).
    "vgg16_bn": (vgg_lib.VGG, {"width": 64}),
}


def _config(name: str, kw: dict[str, Any]) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
  if name not in _ENCODERS:
    raise ValueError(f"Unknown encoder {name!r}; valid names: {sorted(_ENCODERS)}.")
  ctor, defaults = _ENCODERS[name]
  return ctor, {**defaults, **kw}


def get_encoder(name: str, /, *, dtype: Dtype = jnp.float32, **kw: Any) -> nn.Module:
  """Builds an encoder by name ('tiny_cnn', 'resnet18/34/50', 'vit_*', 'vgg16_bn').

  Args:
    name: encoder name (positional-only, so that `name=` in `kw` is the flax module name,
      e.g. get_encoder('resnet18', name='img') inside a parent module).
    dtype: compute dtype (parameters stay float32).
    **kw: overrides of the module attributes, e.g. width=32, norm='group'.

  Returns:
    A module called as `module.apply(variables, x [B,H,W,C], train=...) -> [B, D]`
    (with `features=True`, the list of feature maps described in the module docstring).

  Raises:
    ValueError: for an unknown name.
  """
  ctor, attrs = _config(name, kw)
  return ctor(**attrs, dtype=dtype)


def feature_dim(name: str, **kw: Any) -> int:
  """Feature dim D of `get_encoder(name, **kw)`, e.g. 512 for resnet18, 2048 for resnet50.

  Raises:
    ValueError: for an unknown name.
  """
  ctor, attrs = _config(name, kw)
  if ctor is TinyCNN:
    return 4 * attrs["width"]
  if ctor is vit_lib.ViT:
    return attrs["width"]
  if ctor is vgg_lib.VGG:
    return vgg_lib.feature_dim(attrs["width"], attrs.get("pool", 7))
  expansion = 4 if attrs["block"] == "bottleneck" else 1
  return attrs["width"] * 2**(len(attrs["stage_sizes"]) - 1) * expansion


def _dense_encoder(name: str, kw: dict[str, Any]) -> nn.Module:
  """The (unbound) encoder `name` built with `kw`, if it has a `features=True` output."""
  ctor, attrs = _config(name, kw)
  if ctor not in (TinyCNN, ResNet, vit_lib.ViT):
    raise ValueError(f"Encoder {name!r} has no features=True output; multi-scale features "
                     f"exist for tiny_cnn, resnet* and vit_*.")
  return ctor(**attrs)


def feature_strides(name: str, **kw: Any) -> tuple[int, ...]:
  """Strides (input pixels per map pixel) of the maps that `get_encoder(name, **kw)` returns
  with `features=True`, fine to coarse: (2, 4, 8) for tiny_cnn, (2, 4, 8, 16, 32) for a
  four-stage ResNet, (patch,) for a ViT.

  Raises:
    ValueError: for an unknown name, or an encoder without multi-scale features (vgg16_bn).
  """
  enc = _dense_encoder(name, kw)
  if isinstance(enc, TinyCNN):
    return (2, 4, 8)
  if isinstance(enc, vit_lib.ViT):
    return (enc.patch,)
  return (2,) + tuple(4 * 2**i for i in range(len(enc.stage_sizes)))


def feature_channels(name: str, **kw: Any) -> tuple[int, ...]:
  """Channels of the maps that `get_encoder(name, **kw)` returns with `features=True`, fine
  to coarse, e.g. (64, 64, 128, 256, 512) for resnet18, (64, 256, 512, 1024, 2048) for
  resnet50, (width,) for a ViT. The last entry equals `feature_dim(name, **kw)`.

  Raises:
    ValueError: as `feature_strides`.
  """
  enc = _dense_encoder(name, kw)
  if isinstance(enc, TinyCNN):
    return (enc.width, 2 * enc.width, 4 * enc.width)
  if isinstance(enc, vit_lib.ViT):
    return (enc.width,)
  expansion = 4 if enc.block == "bottleneck" else 1
  return (enc.width,) + tuple(enc.width * 2**i * expansion
                              for i in range(len(enc.stage_sizes)))
