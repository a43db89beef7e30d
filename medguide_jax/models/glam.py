"""GLAM (Liu et al., MIDL 2021): global module, patch selection, local module and fusion.

A flax.linen port of the released inference model `MILSingleImageModel` (nyukat/GLAM,
src/modeling/{glam,modules,common_functions,layers}.py), NHWC throughout:

  x [B,H,W,1] (standardised per image, e.g. 2944x1920)
    -> global_net: pre-activation ResNet-22 (GMIC's) -> h3, h4, BNReLU(h5)
       A1 = sig(conv(h3)), A2 = sig(up(conv(h4))), A3 = sig(up(conv(BNReLU(h5))))
       (1x1 convs to 2 classes, no bias; nearest upsampling to h3's size BEFORE the sigmoid,
       as PostProcessingStandard), all [B,h,w,2] with h,w = H/16,W/16 (184x120)
       S_g = 0.2 A3 + 0.6 A2 + 0.2 A1;  y_global = mean(top_t(A1), top_t(A2), top_t(A3))
    -> select_patches(stop_gradient(S_g)): greedy avg-pool argmax of crop-sized windows
       (RegionProposalNetworkGreedy), mapped to the image (x16) and cropped (crop_pytorch)
    -> local_net: ResNet-34 (all stages stride 1) on each crop copied to 3 channels,
       sig(conv1x1 -> 2): S_l [B,n,128,128,2] for 512x512 crops;
       y_local = top_t over all patches jointly (TopKAggregatorMultiPatch)
    -> fuse: S = (canvas of nearest-upsampled S_l pasted at the crops + up16(S_g)) / 2.

Deviations from the reference, all deliberate:
  * `get_max_window` divides the argmax by the map width with `/`, which is true division
    under any recent PyTorch (every patch at column 0); we use floor division (GMIC PR #24).
  * A saliency channel that is constant over the map has a min-max range of 0; the reference
    divides by it (NaN everywhere, patch at (0, 0)); here that channel contributes 0.
  * top-t pooling keeps at least one value (the reference's k = round(t h w) may be 0).
  * `fuse` drops the part of a pasted local map that falls outside the image, where the
    reference's slice assignment raises (it cannot happen for avg-pool positions at an
    integer CAM stride).

Top-level parameter (and batch_stats) names of `GLAM`:
  'global_net'  the global module: 'backbone' (GlobalNetwork: stem_conv,
                stage{1..5}_block{1,2}/{norm1,conv1,norm2,conv2[,proj_conv]}, final_norm)
                and 'heads' (SaliencyHeads: a1_conv, a2_conv, a3_conv). Everything S_g
                depends on, so the regex `^global_net/` freezes the whole global module.
  'local_net'   the local module (LocalNetwork: stem_conv, stem_norm,
                stage{1..4}_block{j}/{conv1,norm1,conv2,norm2[,proj_conv,proj_norm]},
                head_conv).
Initialise with `local=True` (the default) so that 'local_net' is created.

Parameters are float32; `dtype` is the compute dtype; the saliency maps and predictions
are float32. BatchNorm: eps 1e-5, momentum 0.9 (PyTorch's 0.1), stats in `batch_stats`
over the global batch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from medguide_jax.models import conv as conv_lib

Dtype = Any
ModuleDef = Callable[..., nn.Module]

# ResNetV2.initialize (global backbone): torch xavier_normal_ (an untruncated normal).
_xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
# ResNetlocal: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# The 1x1 heads keep torch's Conv2d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

NUM_CLASSES = 2  # benign, malignant


# -- pooling, selection, cropping, fusion (pure functions) ----------------------------------

def _top_k_count(n: int, percent_t: float, what: str) -> int:
  if not 0.0 < percent_t <= 1.0:
    raise ValueError(f"{what} must be in (0, 1], got {percent_t}")
  # Python round: half to even, as the reference's int(round(...)).
  return max(1, int(round(n * percent_t)))


def _mean_top_k(flat: jnp.ndarray, k: int) -> jnp.ndarray:
  """flat [B, N, C] -> mean of the k largest values per (b, c), float32 [B, C]."""
  values, _ = lax.top_k(jnp.swapaxes(flat.astype(jnp.float32), 1, 2), k)
  return jnp.mean(values, axis=-1)


def top_t_pool(maps: jnp.ndarray, percent_t: float) -> jnp.ndarray:
  """Top-t% pooling (TopKAggregator): maps [B,h,w,C] -> float32 [B,C].

  The mean of the k = round(percent_t * h * w) largest values of each channel (Python
  round, half to even; at least 1).
  """
  if maps.ndim != 4:
    raise ValueError(f"top_t_pool: maps must be [B,h,w,C], got shape {maps.shape}")
  b, h, w, c = maps.shape
  k = _top_k_count(h * w, percent_t, "percent_t")
  return _mean_top_k(maps.reshape(b, h * w, c), k)


def top_t_pool_patches(maps: jnp.ndarray, percent_t: float) -> jnp.ndarray:
  """Top-t% pooling over all patches jointly (TopKAggregatorMultiPatch).

  Args:
    maps: [B, n, h, w, C] local maps of the n patches of each image.
    percent_t: fraction; k = round(percent_t * n * h * w) (half to even, at least 1).

  Returns:
    float32 [B, C].
  """
  if maps.ndim != 5:
    raise ValueError(f"top_t_pool_patches: maps must be [B,n,h,w,C], got shape {maps.shape}")
  b, n, h, w, c = maps.shape
  k = _top_k_count(n * h * w, percent_t, "percent_t")
  return _mean_top_k(maps.reshape(b, n * h * w, c), k)


def cam_window(crop_shape: Sequence[int], image_shape: Sequence[int],
               cam_shape: Sequence[int]) -> tuple[int, int]:
  """The crop's size at CAM resolution: (round(ch*h/H), round(cw*w/W)), half to even.

  512x512 crops of a 2944x1920 image on a 184x120 map -> (32, 32).
  """
  (ch, cw), (big_h, big_w), (h, w) = crop_shape, image_shape, cam_shape
  return int(round(ch * h / big_h)), int(round(cw * w / big_w))


def _normalised_sum(saliency: jnp.ndarray) -> jnp.ndarray:
  """Min-max normalise each channel of [B,h,w,C] per image, then sum: float32 [B,h,w]."""
  s = saliency.astype(jnp.float32)
  lo = jnp.min(s, axis=(1, 2), keepdims=True)
  span = jnp.max(s, axis=(1, 2), keepdims=True) - lo
  # A constant channel would be 0/0 in the reference; it contributes nothing here.
  norm = jnp.where(span > 0, (s - lo) / jnp.where(span > 0, span, 1.0), 0.0)
  return jnp.sum(norm, axis=-1)


def select_patches(saliency: jnp.ndarray, window: Sequence[int],
                   num_patches: int) -> jnp.ndarray:
  """Greedy patch selection on a saliency map (RegionProposalNetworkGreedy).

  Normalises each class channel to [0, 1] (min-max per image), sums the channels, then
  `num_patches` times: averages every `window`-sized window (stride 1, no padding), takes
  the first maximum in row-major order as the upper-left corner (floor division of the
  linear index, GMIC PR #24) and multiplies that window of the map by 0
  (generate_mask_uplft).

  Args:
    saliency: [B, h, w, C] (S_g). No gradient flows through the result.
    window: (wh, ww) window at CAM resolution (see `cam_window`).
    num_patches: number of patches n.

  Returns:
    int32 [B, n, 2] upper-left (row, col) corners at CAM resolution; each is in
    [0, h - wh] x [0, w - ww].
  """
  if saliency.ndim != 4:
    raise ValueError(f"select_patches: saliency must be [B,h,w,C], got {saliency.shape}")
  b, h, w, _ = saliency.shape
  wh, ww = (int(v) for v in window)
  if not (1 <= wh <= h and 1 <= ww <= w):
    raise ValueError(f"select_patches: window {(wh, ww)} must fit in the {h}x{w} saliency "
                     "map (check crop_shape against the image size)")
  if num_patches < 1:
    raise ValueError(f"select_patches: num_patches must be >= 1, got {num_patches}")
  current = _normalised_sum(lax.stop_gradient(saliency))
  pooled_w = w - ww + 1
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  corners = []
  for _ in range(num_patches):
    pooled = lax.reduce_window(current, 0.0, lax.add, (1, wh, ww), (1, 1, 1), "VALID")
    pooled = pooled / (wh * ww)
    idx = jnp.argmax(pooled.reshape(b, -1), axis=1)  # first maximum
    row, col = idx // pooled_w, idx % pooled_w
    corners.append(jnp.stack([row, col], axis=-1))
    inside = ((rows >= row[:, None, None]) & (rows < row[:, None, None] + wh)
              & (cols >= col[:, None, None]) & (cols < col[:, None, None] + ww))
    current = current * (1.0 - inside.astype(current.dtype))
  return lax.stop_gradient(jnp.stack(corners, axis=1).astype(jnp.int32))


def to_image_positions(cam_positions: jnp.ndarray, cam_shape: Sequence[int],
                       image_shape: Sequence[int]) -> jnp.ndarray:
  """CAM corners -> image corners, np.around(p / h * H) in float64 (_convert_crop_position).

  Args:
    cam_positions: int [B, n, 2] (row, col) at CAM resolution, in [0, h] x [0, w].
    cam_shape: (h, w).
    image_shape: (H, W).

  Returns:
    int32 [B, n, 2]; exactly 16 p for a 184x120 map of a 2944x1920 image.
  """
  (h, w), (big_h, big_w) = cam_shape, image_shape
  # A lookup table evaluated in numpy float64 reproduces the reference's rounding bit for bit.
  row_table = jnp.asarray(np.around(np.arange(h + 1) / h * big_h).astype(np.int32))
  col_table = jnp.asarray(np.around(np.arange(w + 1) / w * big_w).astype(np.int32))
  p = cam_positions.astype(jnp.int32)
  rows = row_table[jnp.clip(p[..., 0], 0, h)]
  cols = col_table[jnp.clip(p[..., 1], 0, w)]
  return jnp.stack([rows, cols], axis=-1)


def _axis_source(start: jnp.ndarray, size: int, limit: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """crop_pytorch along one axis: source index of each crop pixel and whether it is image.

  The reference clamps [p, p + size) to [0, limit] and writes the clamped slice into the
  END of the crop (out[size - (hi - lo):] = img[lo:hi]), the rest being background. So
  crop pixel r reads image index hi - size + r, valid where that is >= lo.
  """
  lo = jnp.clip(start, 0, limit)
  hi = jnp.clip(start + size, 0, limit)
  src = hi - size + jnp.arange(size)
  return jnp.clip(src, 0, limit - 1), src >= lo


def crop_patches(x: jnp.ndarray, positions: jnp.ndarray,
                 crop_shape: Sequence[int]) -> jnp.ndarray:
  """Crops at upper-left corners, as the reference's crop_pytorch(method='upper_left').

  Pixels outside the image take the minimum of the whole image. Where a crop runs past the
  bottom (right) edge the reference right-aligns the part inside the image, so those crops
  hold image rows [p, H) at their bottom and background above; mirrored here.

  Args:
    x: [B, H, W, C] images.
    positions: int [B, n, 2] upper-left (row, col) corners in image pixels.
    crop_shape: (ch, cw).

  Returns:
    [B, n, ch, cw, C] crops, dtype of x.
  """
  if x.ndim != 4 or positions.ndim != 3 or positions.shape[-1] != 2:
    raise ValueError(f"crop_patches: x must be [B,H,W,C] and positions [B,n,2], got "
                     f"{x.shape} and {positions.shape}")
  _, big_h, big_w, _ = x.shape
  ch, cw = (int(v) for v in crop_shape)
  background = jnp.min(x, axis=(1, 2, 3))
  positions = positions.astype(jnp.int32)

  def one(image, pos, fill):
    rows, row_ok = _axis_source(pos[0], ch, big_h)
    cols, col_ok = _axis_source(pos[1], cw, big_w)
    patch = jnp.take(jnp.take(image, rows, axis=0), cols, axis=1)
    ok = row_ok[:, None, None] & col_ok[None, :, None]
    return jnp.where(ok, patch, fill)

  per_image = jax.vmap(one, in_axes=(None, 0, None))
  return jax.vmap(per_image)(x, positions, background)


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """Source indices of F.interpolate(mode='nearest'): min(floor(i * (in/out)), in - 1) in
  float32, as PyTorch's CPU kernel computes them."""
  scale = np.float32(size_in) / np.float32(size_out)
  idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, size_in - 1)


def resize_nearest(x: jnp.ndarray, shape: Sequence[int]) -> jnp.ndarray:
  """Nearest-neighbour resize of [N, h, w, C] to [N, *shape, C] (resize_pytorch_image).

  An integer upsampling factor is a jnp.repeat; other ratios gather PyTorch's indices.
  """
  out = x
  for axis, size_out in zip((1, 2), shape):
    size_in = out.shape[axis]
    if size_in == size_out:
      continue
    idx = _nearest_indices(size_in, size_out)
    factor = size_out // size_in
    if size_out % size_in == 0 and np.array_equal(idx, np.arange(size_out) // factor):
      out = jnp.repeat(out, factor, axis=axis)
    else:
      out = jnp.take(out, jnp.asarray(idx), axis=axis)
  return out


def local_canvas(local_maps: jnp.ndarray, positions: jnp.ndarray,
                 image_shape: Sequence[int], crop_shape: Sequence[int]) -> jnp.ndarray:
  """The local saliency canvas (the reference's `saliency_map_local`).

  Each local map is nearest-upsampled to the crop size and pasted into a zero canvas at
  its upper-left corner, patch 0 first, so later patches overwrite earlier ones where they
  overlap. The reference builds it without gradient (resize under no_grad); so does this.

  Args:
    local_maps: [B, n, lh, lw, C].
    positions: int [B, n, 2] upper-left corners in image pixels.
    image_shape: (H, W).
    crop_shape: (ch, cw).

  Returns:
    [B, H, W, C] canvas, dtype of local_maps.
  """
  b, n, lh, lw, c = local_maps.shape
  (big_h, big_w), (ch, cw) = image_shape, crop_shape
  up = resize_nearest(local_maps.reshape(b * n, lh, lw, c), (ch, cw)).reshape(b, n, ch, cw, c)
  # A margin of one crop keeps dynamic_update_slice from shifting patches at the border.
  canvas = jnp.zeros((b, big_h + ch, big_w + cw, c), local_maps.dtype)
  pos = jnp.clip(positions.astype(jnp.int32), 0, jnp.asarray([big_h, big_w], jnp.int32))
  paste = jax.vmap(lambda cv, patch, p: lax.dynamic_update_slice(cv, patch, (p[0], p[1], 0)))
  for j in range(n):
    canvas = paste(canvas, up[:, j], pos[:, j])
  return lax.stop_gradient(canvas[:, :big_h, :big_w])


def _fuse_with_canvas(saliency_global: jnp.ndarray, canvas: jnp.ndarray) -> jnp.ndarray:
  up = resize_nearest(saliency_global.astype(jnp.float32), canvas.shape[1:3])
  return (canvas.astype(jnp.float32) + up) / 2


def fuse(saliency_global: jnp.ndarray, local_maps: jnp.ndarray, positions: jnp.ndarray,
         image_shape: Sequence[int], crop_shape: Sequence[int]) -> jnp.ndarray:
  """The fused GLAM map S = (local canvas + nearest-up(S_g)) / 2 (_combine_crop_cam).

  Args:
    saliency_global: [B, h, w, C] S_g.
    local_maps: [B, n, lh, lw, C] local maps.
    positions: int [B, n, 2] crop corners in image pixels.
    image_shape: (H, W).
    crop_shape: (ch, cw).

  Returns:
    float32 [B, H, W, C]; equal to up(S_g)/2 outside every crop.
  """
  canvas = local_canvas(local_maps, positions, image_shape, crop_shape)
  return _fuse_with_canvas(saliency_global, canvas)


# -- the global module ---------------------------------------------------------------------

class PreActBlock(nn.Module):
  """BasicBlockV2: BN-ReLU -> conv3x3(stride) -> BN-ReLU -> conv3x3, plus a shortcut.

  With `project`, the shortcut is a strided 1x1 conv (no BN) of the pre-activated input.
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  project: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    s = (self.strides, self.strides)
    out = nn.relu(self.norm(name="norm1")(x))
    shortcut = x
    if self.project:
      shortcut = self.conv(self.filters, (1, 1), s, padding=[(0, 0), (0, 0)],
                           name="proj_conv")(out)
    out = self.conv(self.filters, (3, 3), s, padding=[(1, 1), (1, 1)], name="conv1")(out)
    out = nn.relu(self.norm(name="norm2")(out))
    out = self.conv(self.filters, (3, 3), padding=[(1, 1), (1, 1)], name="conv2")(out)
    return out + shortcut


def _conv_def(dtype: Dtype, init) -> ModuleDef:
  return functools.partial(nn.Conv, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                           kernel_init=init, conv_general_dilated=conv_lib.conv_general_dilated)


def _norm_def(train: bool, dtype: Dtype, momentum: float) -> ModuleDef:
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=momentum,
                           epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32)


class GlobalNetwork(nn.Module):
  """GMIC/GLAM global backbone (DownSampleNetworkResNetV2), a pre-activation ResNet-22.

  conv7x7/2 (pad 3, 1 -> widths[0], no bias) -> maxpool 3/2 (no padding; no BN/ReLU in
  between) -> stages of `blocks` PreActBlocks with `strides`; every stage's first block has
  a 1x1 projection shortcut -> BN-ReLU on the last stage only. 2944x1920 -> stem 1472x960
  -> pool 735x479 -> stages 735x479, 368x240, 184x120, 92x60, 46x30.

  Attributes:
    widths: channels of each stage.
    strides: stride of each stage's first block.
    blocks: blocks per stage.
    dtype: compute dtype.
    remat: rematerialise each block in the backward pass.
    bn_momentum: BatchNorm running-average decay.
  """
  widths: Sequence[int] = (16, 32, 64, 128, 256)
  strides: Sequence[int] = (1, 2, 2, 2, 2)
  blocks: int = 2
  dtype: Dtype = jnp.float32
  remat: bool = False
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool
               ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """x [B,H,W,1] -> (h3, h4, BNReLU(h5)): the raw outputs of the third- and second-last
    stages and the activated last stage, [B, H/16, W/16, widths[-3]] ... at full size."""
    if len(self.widths) != len(self.strides) or len(self.widths) < 3:
      raise ValueError(f"global_widths {tuple(self.widths)} must have one width per stage "
                       f"stride {tuple(self.strides)} (at least 3)")
    conv = _conv_def(self.dtype, _xavier_normal)
    norm = _norm_def(train, self.dtype, self.bn_momentum)
    block = nn.remat(PreActBlock) if self.remat else PreActBlock
    h = conv(self.widths[0], (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
             name="stem_conv")(jnp.asarray(x, self.dtype))
    h = nn.max_pool(h, (3, 3), strides=(2, 2), padding="VALID")
    stages = []
    for i, (width, stride) in enumerate(zip(self.widths, self.strides)):
      for j in range(self.blocks):
        h = block(width, conv, norm, strides=stride if j == 0 else 1, project=j == 0,
                  name=f"stage{i + 1}_block{j + 1}")(h)
      stages.append(h)
    last = nn.relu(norm(name="final_norm")(stages[-1]))
    return stages[-3], stages[-2], last


class SaliencyHeads(nn.Module):
  """PostProcessingStandard: three bias-free 1x1 convs to the classes, then sigmoids.

  A1 = sig(conv(h3)); A2 = sig(up(conv(h4))); A3 = sig(up(conv(h5_act))), the nearest
  upsampling to h3's size applied to the logits, before the sigmoid. (The reference's
  `combine` conv is never used and has no counterpart here.)
  """
  num_classes: int = NUM_CLASSES
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h3: jnp.ndarray, h4: jnp.ndarray, h5: jnp.ndarray
               ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Returns float32 (A1, A2, A3), each [B, h3_h, h3_w, num_classes]."""
    conv = _conv_def(self.dtype, _torch_default)
    size = h3.shape[1:3]
    maps = []
    for name, h in (("a1_conv", h3), ("a2_conv", h4), ("a3_conv", h5)):
      logits = conv(self.num_classes, (1, 1), name=name)(h).astype(jnp.float32)
      maps.append(jax.nn.sigmoid(resize_nearest(logits, size)))
    return tuple(maps)


class GlobalModule(nn.Module):
  """GlobalNetworkGeneric + the aggregation: backbone, heads, S_g and y_global."""
  widths: Sequence[int] = (16, 32, 64, 128, 256)
  percent_t: float = 0.03
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, jnp.ndarray]:
    feats = GlobalNetwork(widths=self.widths, dtype=self.dtype, remat=self.remat,
                          name="backbone")(x, train=train)
    a1, a2, a3 = SaliencyHeads(dtype=self.dtype, name="heads")(*feats)
    y = (top_t_pool(a1, self.percent_t) + top_t_pool(a2, self.percent_t)
         + top_t_pool(a3, self.percent_t)) / 3
    return {"a1": a1, "a2": a2, "a3": a3,
            "saliency_global": 0.2 * a3 + 0.6 * a2 + 0.2 * a1, "y_global": y}


# -- the local module ----------------------------------------------------------------------

class PostActBlock(nn.Module):
  """torchvision BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU.

  With `project`, the shortcut is 1x1 conv + BN (`proj_conv`, `proj_norm`).
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  project: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    pad = [(1, 1), (1, 1)]
    y = nn.relu(self.norm(name="norm1")(self.conv(self.filters, (3, 3), padding=pad,
                                                  name="conv1")(x)))
    y = self.norm(name="norm2")(self.conv(self.filters, (3, 3), padding=pad, name="conv2")(y))
    if self.project:
      x = self.norm(name="proj_norm")(self.conv(self.filters, (1, 1), padding=[(0, 0), (0, 0)],
                                                name="proj_conv")(x))
    return nn.relu(x + y)


LOCAL_STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class LocalNetwork(nn.Module):
  """DetectionNetworkResNetv3: a stride-4 ResNet and a sigmoid 1x1 head.

  conv7x7/2 (3 -> width, pad 3) + BN + ReLU + maxpool 3/2 (pad 1), then four stages of
  BasicBlocks, ALL with stride 1 (localHR), widths width * (1, 2, 4, 8); a 1x1 projection
  (+ BN) where the width changes. The grayscale crop is copied to 3 channels. 512x512
  crops -> [N, 128, 128, 2] maps in [0, 1].

  Attributes:
    depth: 18 or 34.
    width: channels of the stem and first stage.
    dtype: compute dtype.
    remat: rematerialise each block in the backward pass.
    bn_momentum: BatchNorm running-average decay.
  """
  depth: int = 34
  width: int = 64
  num_classes: int = NUM_CLASSES
  dtype: Dtype = jnp.float32
  remat: bool = False
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, crops: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """crops [N, ch, cw, 1] -> float32 local maps [N, ch/4, cw/4, num_classes]."""
    if self.depth not in LOCAL_STAGE_SIZES:
      raise ValueError(f"local_depth must be one of {sorted(LOCAL_STAGE_SIZES)}, got "
                       f"{self.depth}")
    conv = _conv_def(self.dtype, _kaiming_fan_out)
    norm = _norm_def(train, self.dtype, self.bn_momentum)
    block = nn.remat(PostActBlock) if self.remat else PostActBlock
    x = jnp.broadcast_to(jnp.asarray(crops, self.dtype), crops.shape[:3] + (3,))
    x = conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="stem_conv")(x)
    x = nn.relu(norm(name="stem_norm")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    channels = self.width
    for i, num_blocks in enumerate(LOCAL_STAGE_SIZES[self.depth]):
      filters = self.width * 2**i
      for j in range(num_blocks):
        x = block(filters, conv, norm, project=channels != filters,
                  name=f"stage{i + 1}_block{j + 1}")(x)
        channels = filters
    head = _conv_def(self.dtype, _torch_default)
    logits = head(self.num_classes, (1, 1), name="head_conv")(x)
    return jax.nn.sigmoid(logits.astype(jnp.float32))


# -- the whole model -----------------------------------------------------------------------

class GLAM(nn.Module):
  """The GLAM inference/training model (MILSingleImageModel) on NHWC images.

  Attributes:
    global_widths: widths of the global backbone's five stages.
    local_depth: 18 or 34 (ResNet depth of the local module).
    local_width: base width of the local module.
    crop_shape: (ch, cw) patch size in image pixels.
    num_patches: patches per image (top_k_per_class).
    percent_t_global: top-t fraction pooled into y_global.
    percent_t_local: top-t fraction pooled over the patches into y_local.
    dtype: compute dtype (parameters stay float32).
    remat: rematerialise the residual blocks (same numbers, less memory).
  """
  global_widths: Sequence[int] = (16, 32, 64, 128, 256)
  local_depth: int = 34
  local_width: int = 64
  crop_shape: tuple[int, int] = (512, 512)
  num_patches: int = 1
  percent_t_global: float = 0.03
  percent_t_local: float = 0.3
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    self.global_net = GlobalModule(widths=tuple(self.global_widths),
                                   percent_t=self.percent_t_global, dtype=self.dtype,
                                   remat=self.remat)
    self.local_net = LocalNetwork(depth=self.local_depth, width=self.local_width,
                                  dtype=self.dtype, remat=self.remat)

  def __call__(self, x: jnp.ndarray, *, train: bool, train_global: bool | None = None,
               local: bool = True, fuse: bool = False) -> dict[str, jnp.ndarray]:
    """Runs the model.

    Args:
      x: [B, H, W, 1] standardised images.
      train: BatchNorm in training mode (batch statistics, running averages updated).
      train_global: BatchNorm mode of the global module; defaults to `train`. False keeps
        a frozen global module on its running statistics while the local one trains.
      local: also select patches and run the local module.
      fuse: also build the fused map (needs `local`).

    Returns:
      Always: 'a1', 'a2', 'a3', 'saliency_global' float32 [B, h, w, 2] (h, w = the third-
      last stage's size, H/16 x W/16 at full resolution) and 'y_global' float32 [B, 2].
      With local: 'cam_positions' and 'patch_positions' int32 [B, n, 2] (upper-left
      corners at CAM and image resolution), 'patches' [B, n, ch, cw, 1],
      'saliency_local_patches' float32 [B, n, ch/4, cw/4, 2], 'y_local' float32 [B, 2].
      With fuse: 'saliency' (fused) and 'saliency_local' (the canvas), float32 [B,H,W,2].
    """
    if x.ndim != 4 or x.shape[-1] != 1:
      raise ValueError(f"GLAM: x must be [B, H, W, 1] images, got shape {x.shape}")
    if fuse and not local:
      raise ValueError("GLAM: fuse=True needs local=True")
    train_global = train if train_global is None else train_global
    out = dict(self.global_net(x, train=train_global))
    if not local:
      return out
    image_shape, cam_shape = x.shape[1:3], out["saliency_global"].shape[1:3]
    window = cam_window(self.crop_shape, image_shape, cam_shape)
    cam_positions = select_patches(out["saliency_global"], window, self.num_patches)
    positions = to_image_positions(cam_positions, cam_shape, image_shape)
    patches = crop_patches(x, positions, self.crop_shape)
    b, n, ch, cw, _ = patches.shape
    maps = self.local_net(patches.reshape(b * n, ch, cw, 1), train=train)
    maps = maps.reshape((b, n) + maps.shape[1:])
    out.update(cam_positions=cam_positions, patch_positions=positions, patches=patches,
               saliency_local_patches=maps,
               y_local=top_t_pool_patches(maps, self.percent_t_local))
    if fuse:
      canvas = local_canvas(maps, positions, image_shape, self.crop_shape)
      out.update(saliency_local=canvas,
                 saliency=_fuse_with_canvas(out["saliency_global"], canvas))
    return out
