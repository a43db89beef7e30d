"""Tests of dense features (`features=True`), the U-Net decoder, the Dice + BCE loss and the
per-image Dice evaluation (tiny CPU inputs; golden values from numpy by hand)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medguide_jax.evaluation import segmentation as seg_eval
from medguide_jax.losses import segmentation as seg_loss
from medguide_jax.models import resnet, unet

F32 = jnp.dtype(jnp.float32)
_ENCODERS = [("tiny_cnn", {}), ("resnet18", {"width": 8}), ("vit_tiny", {})]


def _key(seed=0):
  # unsafe_rbg: XLA:CPU compiles threefry initialisers slowly (see test_models.py).
  return jax.random.key(seed, impl="unsafe_rbg")


def _rand(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# --- encoders: features=True ------------------------------------------------------------


def _encoder_outputs(name, kw):
  """(abstract variables of init without / with features=True, and of one jit'd run the
  pooled output, the feature maps and the tokens)."""
  enc = resnet.get_encoder(name, **kw)
  x = jnp.asarray(_rand(2, 64, 64, 1))
  init = lambda **opt: jax.eval_shape(lambda x: enc.init(_key(), x, train=False, **opt), x)

  @jax.jit
  def run(key, x):
    variables = enc.init(key, x, train=False)
    return (enc.apply(variables, x, train=False),
            enc.apply(variables, x, train=False, features=True),
            enc.apply(variables, x, train=False, tokens=True)[1])

  return (init(), init(features=True), *run(_key(), x))


@pytest.mark.parametrize("name,kw", _ENCODERS)
def test_features_shapes_strides_and_unchanged_params(name, kw):
  plain, dense, pooled, maps, tokens = _encoder_outputs(name, kw)
  strides, channels = resnet.feature_strides(name, **kw), resnet.feature_channels(name, **kw)
  assert strides == {"tiny_cnn": (2, 4, 8), "resnet18": (2, 4, 8, 16, 32),
                     "vit_tiny": (16,)}[name]
  assert isinstance(maps, list) and len(maps) == len(strides) == len(channels)
  for m, s, c in zip(maps, strides, channels):
    assert m.shape == (2, 64 // s, 64 // s, c) and m.dtype == F32
  assert channels[-1] == resnet.feature_dim(name, **kw)
  # The option builds the same variables (names, shapes, dtypes), and the default output is
  # still the pooled vector.
  assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(dense)
  assert jax.tree_util.tree_leaves(plain) == jax.tree_util.tree_leaves(dense)
  assert pooled.shape == (2, resnet.feature_dim(name, **kw))
  last = np.asarray(maps[-1])
  # tokens=True flattens the same last map row-major.
  np.testing.assert_allclose(tokens, last.reshape(2, -1, last.shape[-1]), rtol=1e-6)
  if name != "vit_tiny":  # CNNs pool the last map; a cls-pool ViT does not
    np.testing.assert_allclose(pooled, last.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_feature_strides_and_channels_match_traced_resnet50_bf16():
  enc = resnet.get_encoder("resnet50", width=8, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 64, 48, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: enc.init(_key(), x, train=False), x)
  maps = jax.eval_shape(lambda v, x: enc.apply(v, x, train=False, features=True), variables, x)
  assert resnet.feature_channels("resnet50", width=8) == (8, 32, 64, 128, 256)
  # 'SAME' padding: a map at stride s is ceil(H / s) x ceil(W / s) (48 / 32 -> 2).
  expected = [(1, -(-64 // s), -(-48 // s), c)
              for s, c in zip(resnet.feature_strides("resnet50"), (8, 32, 64, 128, 256))]
  assert [m.shape for m in maps] == expected
  assert {m.dtype for m in maps} == {F32}  # float32 maps under bf16 compute


def test_features_bad_requests_are_errors():
  with pytest.raises(ValueError, match="vgg16_bn"):
    resnet.feature_strides("vgg16_bn")
  with pytest.raises(ValueError, match="valid names"):
    resnet.feature_channels("resnet99")
  x = jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32)
  for name in ("tiny_cnn", "vit_tiny"):
    enc = resnet.get_encoder(name)
    with pytest.raises(ValueError, match="mutually exclusive"):
      jax.eval_shape(lambda x: enc.init(_key(), x, train=False, tokens=True, features=True), x)


# --- decoder ----------------------------------------------------------------------------


def _decode(decoder, maps, size, other_maps=None):
  """(variables, logits in train mode[, logits of `other_maps` in eval mode]), one jit."""
  @jax.jit
  def run(key, maps, other_maps):
    variables = decoder.init(key, maps, size, train=False)
    out = (variables, decoder.apply(variables, maps, size, train=True))
    if other_maps is None:
      return out
    return out + (decoder.apply(variables, other_maps, size, train=False),)
  return run(_key(), maps, other_maps)


def _kernel_widths(params):
  return [params[f"block{i}"]["conv2"]["kernel"].shape[-1]
          for i in range(len([k for k in params if k.startswith("block")]))]


def test_unet_decoder_multi_map_shape_widths_and_skips():
  maps = [jnp.asarray(_rand(2, 16 // 2**i, 16 // 2**i, c, seed=i))
          for i, c in enumerate((8, 16, 64))]  # tiny_cnn(width 8) at 32 px
  decoder = unet.UNetDecoder(out_channels=3)
  changed = [maps[0] + 1.0] + maps[1:]
  variables, logits, again = _decode(decoder, maps, (32, 30), changed)
  assert logits.shape == (2, 32, 30, 3) and logits.dtype == F32
  assert set(variables) == {"params"}  # GroupNorm: no batch_stats
  params = variables["params"]
  assert _kernel_widths(params) == [32, 16]  # 64 halved per level, at least 16
  assert params["block0"]["conv1"]["kernel"].shape == (3, 3, 64 + 16, 32)  # upsampled + skip
  assert params["head"]["kernel"].shape == (1, 1, 16, 3)
  # The finest map reaches the logits through its skip connection (GroupNorm: train and
  # eval mode compute the same).
  assert not np.allclose(again, logits, atol=1e-3)


def test_unet_decoder_single_map_is_progressive_upsampler():
  # 16 px patches: 4 x2 steps; 14 px patches (56 px, a 4x4 grid) end exactly at 56.
  assert unet.progressive_sizes((4, 4), (64, 64)) == [(8, 8), (16, 16), (32, 32), (64, 64)]
  assert unet.progressive_sizes((4, 4), (56, 56)) == [(7, 7), (14, 14), (28, 28), (56, 56)]
  assert unet.progressive_sizes((4, 2), (8, 8)) == [(4, 4), (8, 8)]
  maps = [jnp.asarray(_rand(1, 4, 4, 64))]  # vit_tiny's one map at 64 px
  variables, logits = _decode(unet.UNetDecoder(out_channels=1, widths=(32, 16, 16, 8)),
                              maps, (64, 64))
  assert logits.shape == (1, 64, 64, 1)
  assert _kernel_widths(variables["params"]) == [32, 16, 16, 8]
  assert unet.default_widths(64, 4) == (32, 16, 16, 16)
  decoder = unet.UNetDecoder(out_channels=2)
  shape = jax.eval_shape(lambda m: decoder.init_with_output(_key(), m, (56, 56), train=False),
                         maps)[0].shape
  assert shape == (1, 56, 56, 2)


def test_unet_decoder_bad_inputs_are_errors():
  maps = [jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 8, 8, 8))]
  run = lambda dec, m, size=(16, 16): jax.eval_shape(
      lambda m: dec.init(_key(), m, size, train=False), m)
  with pytest.raises(ValueError, match="fine to coarse"):
    run(unet.UNetDecoder(1), maps)
  with pytest.raises(ValueError, match="widths"):
    run(unet.UNetDecoder(1, widths=(8, 8)), maps[::-1])
  with pytest.raises(ValueError, match="output_size"):
    run(unet.UNetDecoder(1), maps[::-1], (16,))
  with pytest.raises(ValueError, match="list of maps"):
    run(unet.UNetDecoder(1), maps[0])


# --- losses -----------------------------------------------------------------------------


def _np_dice_loss(logits, masks, w, smooth=1.0):
  p = _sigmoid(logits.astype(np.float64))
  inter, denom = (p * masks).sum((1, 2)), p.sum((1, 2)) + masks.sum((1, 2))
  per_image = (1.0 - (2 * inter + smooth) / (denom + smooth)).mean(-1)  # [B]
  return (w * per_image).sum() / w.sum()


def _np_bce(logits, masks, w):
  x = logits.astype(np.float64)
  ce = np.maximum(x, 0) - x * masks + np.log1p(np.exp(-np.abs(x)))  # stable log-loss
  return (w * ce.mean((1, 2, 3))).sum() / w.sum()


def _loss_inputs():
  logits = 2.0 * _rand(3, 5, 6, 2, seed=1)
  masks = (np.random.default_rng(2).random((3, 5, 6, 2)) < 0.3).astype(np.float32)
  masks[0, ..., 1] = 0.0  # an empty mask
  return logits, masks, np.asarray([1.0, 0.5, 0.0], np.float32)


def test_dice_loss_against_numpy_and_padding_weights():
  logits, masks, w = _loss_inputs()
  loss, metrics = seg_loss.dice_loss(logits=jnp.asarray(logits), masks=jnp.asarray(masks),
                                     weights=jnp.asarray(w))
  np.testing.assert_allclose(loss, _np_dice_loss(logits, masks, w), rtol=1e-5)
  np.testing.assert_allclose(metrics["soft_dice"], 1.0 - loss, rtol=1e-6)
  # The weight-0 (padding) image changes nothing, whatever it holds.
  garbage = logits.copy()
  garbage[2] = 50.0
  again, _ = seg_loss.dice_loss(logits=jnp.asarray(garbage), masks=jnp.asarray(masks),
                                weights=jnp.asarray(w))
  np.testing.assert_allclose(again, loss, rtol=1e-6)
  # A confident, correct prediction has a loss near 0; an all-padding batch gives 0.
  perfect, _ = seg_loss.dice_loss(logits=jnp.asarray(40.0 * (2 * masks - 1)),
                                  masks=jnp.asarray(masks))
  assert float(perfect) < 1e-6
  empty, _ = seg_loss.dice_loss(logits=jnp.asarray(logits), masks=jnp.asarray(masks),
                                weights=jnp.zeros(3))
  assert float(empty) == 0.0


def test_segmentation_loss_combines_dice_and_bce():
  logits, masks, w = _loss_inputs()
  # Positional logits, masks, weights (as the tasks call it); bf16 logits, int masks.
  loss, metrics = seg_loss.segmentation_loss(
      jnp.asarray(logits, jnp.bfloat16), jnp.asarray(masks, jnp.int32), jnp.asarray(w),
      dice_weight=0.7, bce_weight=2.0)
  logits = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  dice, bce = _np_dice_loss(logits, masks, w), _np_bce(logits, masks, w)
  assert set(metrics) == {"dice_loss", "bce", "soft_dice"}
  np.testing.assert_allclose(metrics["bce"], bce, rtol=1e-5)
  np.testing.assert_allclose(metrics["dice_loss"], dice, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.7 * dice + 2.0 * bce, rtol=1e-5)
  assert loss.dtype == F32
  with pytest.raises(AssertionError):  # chex: the shapes must match
    seg_loss.segmentation_loss(logits=jnp.zeros((2, 4, 4, 1)), masks=jnp.zeros((2, 4, 4, 2)))


# --- evaluation ------------------------------------------------------------------------


def _hand_masks():
  """Five 4x4 cases whose Dice is known by hand."""
  pred, true = np.zeros((5, 4, 4), bool), np.zeros((5, 4, 4), bool)
  pred[0, 0, :2], true[0, 0, 1:3] = True, True  # |P|=|T|=2, overlap 1 -> 0.5
  # image 1: both empty -> the convention
  pred[2, 3, 3] = True  # truth empty, a false positive -> 0
  true[3, :3, 0] = True  # a missed lesion -> 0
  pred[4, 1:3, 1:3] = true[4, 1:3, 1:3] = True  # exact -> 1
  return pred, true


def test_dice_scores_by_hand_and_empty_convention():
  pred, true = _hand_masks()
  np.testing.assert_allclose(seg_eval.dice_scores(pred, true), [0.5, 1.0, 0.0, 0.0, 1.0])
  np.testing.assert_allclose(seg_eval.dice_scores(pred.astype(np.uint8), true, empty="nan"),
                             [0.5, np.nan, 0.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="empty"):
    seg_eval.dice_scores(pred, true, empty="zero")
  with pytest.raises(ValueError, match="pred_masks"):
    seg_eval.dice_scores(pred * 0.7, true)
  with pytest.raises(ValueError, match="true_masks"):
    seg_eval.dice_scores(pred, true[..., None])


def test_dice_sums_on_device_give_the_same_scores():
  logits, masks = _rand(6, 8, 8, seed=3), np.random.default_rng(4).random((6, 8, 8)) < 0.2
  masks[0] = False
  logits[0] = -5.0  # an empty-empty image
  sums = jax.jit(seg_eval.dice_sums, static_argnums=2)(
      jax.nn.sigmoid(jnp.asarray(logits))[..., None], jnp.asarray(masks)[..., None], 0.5)
  from_sums = seg_eval.dice_from_sums(sums["hard_inter"][:, 0], sums["hard_pred"][:, 0],
                                      sums["target"][:, 0])
  np.testing.assert_allclose(from_sums, seg_eval.dice_scores(logits > 0, masks), rtol=1e-6)
  assert from_sums[0] == 1.0


def test_dice_summary_means_counts_and_intervals():
  rng = np.random.default_rng(5)
  scores = rng.random(40)
  positive = rng.random(40) < 0.6
  scores[:3] = np.nan  # excluded images (empty='nan')
  out = seg_eval.dice_summary(scores, positive=positive, bootstrap=200, seed=1)
  keep = ~np.isnan(scores)
  assert out["dice_images"] == 37 and out["dice_positive_images"] == int(positive[keep].sum())
  np.testing.assert_allclose(out["dice"], scores[keep].mean())
  np.testing.assert_allclose(out["dice_positive"], scores[keep & positive].mean())
  for key in ("dice", "dice_positive"):
    lo, hi = out[f"{key}_ci95"]
    assert lo < out[key] < hi and hi - lo < 0.5
  assert out == seg_eval.dice_summary(scores, positive=positive, bootstrap=200, seed=1)
  assert "dice_ci95" not in seg_eval.dice_summary(scores, positive=positive, bootstrap=0)
  none = seg_eval.dice_summary(np.full(2, np.nan), positive=np.ones(2, bool), bootstrap=10)
  assert none["dice_images"] == 0 and np.isnan(none["dice"]) and np.isnan(none["dice_ci95"][0])


# --- behaviour: a tiny segmentation network learns ---------------------------------------


class _SegNet(nn.Module):
  """tiny_cnn under `img` (the downstream convention) + a U-Net decoder."""

  @nn.compact
  def __call__(self, x, *, train):
    enc = resnet.get_encoder("tiny_cnn", width=8, norm="group", name="img")
    maps = enc(x, train=train, features=True)
    return unet.UNetDecoder(out_channels=1, name="decoder")(maps, x.shape[1:3], train=train)


def _squares(n=8, size=32, seed=0):
  """Grey images with one bright square each (side 8-13) and its mask, [n, size, size, 1]."""
  rng = np.random.default_rng(seed)
  images = 0.3 * rng.normal(size=(n, size, size, 1))
  masks = np.zeros((n, size, size, 1), np.float32)
  for i in range(n):
    side = rng.integers(8, 14)
    y, x = rng.integers(0, size - side, size=2)
    masks[i, y:y + side, x:x + side] = 1.0
  return jnp.asarray(images + 2.0 * masks, jnp.float32), jnp.asarray(masks)


def test_tiny_training_raises_hard_dice():
  images, masks = _squares()
  model, tx = _SegNet(), optax.adam(1e-2)
  params = jax.jit(lambda k, x: model.init(k, x, train=False))(_key(), images)["params"]
  assert set(params) == {"img", "decoder"}

  def loss_fn(p):
    logits = model.apply({"params": p}, images, train=True)
    return seg_loss.segmentation_loss(logits=logits, masks=masks)[0]

  @jax.jit
  def step(p, opt):
    updates, opt = tx.update(jax.grad(loss_fn)(p), opt, p)
    return optax.apply_updates(p, updates), opt

  def train(p):
    # A Python loop of one compiled step: under the tests' disabled XLA optimisations a
    # lax.scan of the same step runs many times slower on CPU.
    opt = tx.init(p)
    for _ in range(60):
      p, opt = step(p, opt)
    return p

  def hard_dice(p):
    logits = model.apply({"params": p}, images, train=False)
    return seg_eval.dice_scores(np.asarray(logits[..., 0] > 0), np.asarray(masks[..., 0] > 0))

  before, after = hard_dice(params).mean(), hard_dice(train(params)).mean()
  assert after > 0.8 and after > before + 0.4, (before, after)
