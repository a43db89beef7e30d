"""Tests for the ViT encoders (medguide_jax/models/vit.py) and their registry entries."""
from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medguide_jax.models import resnet
from medguide_jax.models import vit

KEY = jax.random.PRNGKey(0)


def _init(model, x):
  return model.init(KEY, x, train=False)


def _images(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _replace(variables, **leaves):
  """A copy of `variables` with top-level params replaced (name=array)."""
  params = flax.core.unfreeze(variables["params"])
  params.update(jax.tree_util.tree_map(jnp.asarray, leaves))
  return {**variables, "params": params}


def _np_bilinear(table, src, dst):
  """Independent bilinear resize [sh*sw, D] -> [dh*dw, D]: half-pixel centres, clamped."""
  def weights(n_out, n_in):
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
      s = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
      lo = int(np.floor(s))
      hi = min(lo + 1, n_in - 1)
      w[i, lo] += 1 - (s - lo)
      w[i, hi] += s - lo
    return w
  grid = table.reshape(src[0], src[1], -1)
  out = np.einsum("ai,bj,ijd->abd", weights(dst[0], src[0]), weights(dst[1], src[1]), grid)
  return out.reshape(dst[0] * dst[1], -1)


def _np_layernorm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def _hand_param_count(width, depth, mlp, *, grid=14, pool="cls", posemb="learn"):
  embed = 16 * 16 * 3 * width + width                      # patch conv kernel + bias
  pos = grid * grid * width if posemb == "learn" else 0
  cls = width if pool == "cls" else 0
  attn = 3 * (width * width + width) + width * width + width   # q, k, v, out (+ biases)
  mlp_params = width * mlp + mlp + mlp * width + width
  block = 2 * (2 * width) + attn + mlp_params                 # two LayerNorms
  return embed + pos + cls + depth * block + 2 * width        # + final LayerNorm


def _count(model, size=224):
  shapes = jax.eval_shape(functools.partial(model.init, train=False), KEY,
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))


def test_one_parameter_set_serves_224_and_96_crops():
  model = resnet.get_encoder("vit_tiny", width=16, depth=1)
  v224 = _init(model, _images(1, 224, 224, 3))
  v96 = jax.eval_shape(functools.partial(model.init, train=False), KEY,
                       jax.ShapeDtypeStruct((1, 96, 96, 3), jnp.float32))
  shapes = lambda v: jax.tree_util.tree_map(jnp.shape, v)
  assert shapes(v224) == shapes(v96)  # the parameters do not depend on the crop size
  assert v224["params"]["pos_embedding"].shape == (196, 16)
  for hw in [(224, 224), (96, 96), (224, 160)]:
    out = model.apply(v224, _images(2, *hw, 3), train=False)
    assert out.shape == (2, 16) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))


def test_resize_posemb_is_identity_at_the_init_grid():
  table = _images(14 * 14, 8)
  np.testing.assert_array_equal(vit.resize_posemb(jnp.asarray(table), 14, (14, 14)), table)


@pytest.mark.parametrize("src,dst", [((14, 14), (6, 6)), ((3, 3), (5, 5)), ((4, 6), (2, 9))])
def test_resize_posemb_matches_numpy_bilinear(src, dst):
  table = _images(src[0] * src[1], 5, seed=1)
  np.testing.assert_allclose(vit.resize_posemb(jnp.asarray(table), src, dst),
                             _np_bilinear(table, src, dst), rtol=1e-5, atol=1e-6)


def test_96_crops_use_the_bilinearly_resized_table():
  model = vit.ViT(width=16, depth=1, num_heads=2, posemb_grid=14)
  variables = _init(model, _images(1, 224, 224, 3))
  x96 = _images(2, 96, 96, 3, seed=2)
  table6 = _np_bilinear(np.asarray(variables["params"]["pos_embedding"]), (14, 14), (6, 6))
  model6 = model.clone(posemb_grid=6)
  np.testing.assert_allclose(model.apply(variables, x96, train=False),
                             model6.apply(_replace(variables, pos_embedding=table6), x96,
                                          train=False), rtol=1e-5, atol=1e-5)


def test_depth0_cls_and_gap_match_numpy():
  """Without blocks: cls -> LN(cls token); gap -> mean over patches of LN(embed + pos)."""
  rng = np.random.default_rng(3)
  width, patch, grid = 8, 4, (2, 3)
  x = _images(2, 8, 12, 2, seed=4)
  leaves = dict(cls=rng.normal(size=(1, 1, width)),
                pos_embedding=rng.normal(size=(6, width)),
                embedding={"kernel": rng.normal(size=(patch, patch, 2, width)),
                           "bias": rng.normal(size=(width,))},
                encoder_norm={"scale": rng.normal(size=(width,)),
                              "bias": rng.normal(size=(width,))})
  leaves = jax.tree_util.tree_map(lambda a: a.astype(np.float32), leaves)
  ln = leaves["encoder_norm"]
  outs = {}
  for pool in ("cls", "gap"):
    model = vit.ViT(width=width, depth=0, num_heads=2, patch=patch, posemb_grid=grid,
                    pool=pool)
    variables = _init(model, x)
    assert ("cls" in variables["params"]) == (pool == "cls")
    kw = leaves if pool == "cls" else {k: v for k, v in leaves.items() if k != "cls"}
    outs[pool] = model.apply(_replace(variables, **kw), x, train=False)
  cls_want = _np_layernorm(leaves["cls"][0, 0], ln["scale"], ln["bias"])
  np.testing.assert_allclose(outs["cls"], np.stack([cls_want] * 2), rtol=1e-5, atol=1e-5)
  # Patches in row-major grid order, each flattened as (row, col, channel).
  patches = x.reshape(2, 2, patch, 3, patch, 2).transpose(0, 1, 3, 2, 4, 5).reshape(2, 6, -1)
  tokens = (patches @ leaves["embedding"]["kernel"].reshape(-1, width)
            + leaves["embedding"]["bias"] + leaves["pos_embedding"])
  gap_want = _np_layernorm(tokens, ln["scale"], ln["bias"]).mean(axis=1)
  np.testing.assert_allclose(outs["gap"], gap_want, rtol=1e-4, atol=1e-4)


def test_cls_token_feeds_the_cls_output():
  model = vit.ViT(width=16, depth=1, num_heads=2, posemb_grid=4)
  x = _images(2, 64, 64, 3)
  variables = _init(model, x)
  # Not a constant vector: LayerNorm maps any constant vector to its bias.
  other = _replace(variables, cls=_images(1, 1, 16, seed=7))
  diff = np.abs(model.apply(variables, x, train=False) - model.apply(other, x, train=False))
  assert diff.max() > 1e-3


def test_bf16_compute_keeps_float32_params_and_output():
  x = _images(2, 64, 64, 3)
  model32 = resnet.get_encoder("vit_tiny", width=16, posemb_grid=4)
  model16 = resnet.get_encoder("vit_tiny", width=16, posemb_grid=4, dtype=jnp.bfloat16)
  variables = _init(model16, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  out16 = model16.apply(variables, x, train=False)
  out32 = model32.apply(variables, x, train=False)
  assert out16.dtype == jnp.float32 and out16.shape == (2, 16)
  assert np.linalg.norm(out16 - out32) / np.linalg.norm(out32) < 5e-2


def test_registry_and_feature_dim():
  s16, b16 = resnet.get_encoder("vit_s16"), resnet.get_encoder("vit_b16")
  assert isinstance(s16, vit.ViT) and isinstance(b16, vit.ViT)
  assert (s16.width, s16.depth, s16.num_heads, s16.mlp_dim, s16.patch) == (384, 12, 6, 1536, 16)
  assert (b16.width, b16.depth, b16.num_heads, b16.mlp_dim, b16.patch) == (768, 12, 12, 3072, 16)
  assert resnet.feature_dim("vit_s16") == 384
  assert resnet.feature_dim("vit_b16") == 768
  assert resnet.feature_dim("vit_tiny") == 64
  assert resnet.feature_dim("vit_tiny", width=32) == 32
  assert resnet.feature_dim("resnet50") == 2048


@pytest.mark.parametrize("fn", [resnet.get_encoder, resnet.feature_dim])
def test_unknown_encoder_error_unchanged(fn):
  names = ["resnet18", "resnet34", "resnet50", "tiny_cnn", "vgg16_bn", "vit_b16", "vit_s16",
           "vit_tiny"]
  with pytest.raises(ValueError) as err:
    fn("vit_l16")
  assert str(err.value) == f"Unknown encoder 'vit_l16'; valid names: {names}."


def test_parameter_counts_match_the_hand_formula():
  n_s = _count(resnet.get_encoder("vit_s16"))
  n_b = _count(resnet.get_encoder("vit_b16"))
  assert n_s == _hand_param_count(384, 12, 1536) == 21_665_280
  assert n_b == _hand_param_count(768, 12, 3072)
  assert round(n_s / 1e6, 1) == 21.7 and round(n_b / 1e6, 1) == 85.8
  # The 96-px init makes the same parameters; gap drops the cls token, sincos2d the table.
  assert _count(resnet.get_encoder("vit_s16"), size=96) == n_s
  n_gap = _count(resnet.get_encoder("vit_s16", pool="gap", posemb="sincos2d"))
  assert n_gap == _hand_param_count(384, 12, 1536, pool="gap", posemb="sincos2d")


def test_gap_without_posemb_is_invariant_to_patch_permutation():
  model = vit.ViT(width=16, depth=2, num_heads=2, posemb_grid=4, pool="gap")
  x = _images(2, 64, 64, 3, seed=5)
  variables = _init(model, x)
  perm = np.random.default_rng(6).permutation(16)
  patches = x.reshape(2, 4, 16, 4, 16, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 16, 16, 3)
  x_perm = (patches[:, perm].reshape(2, 4, 4, 16, 16, 3).transpose(0, 1, 3, 2, 4, 5)
            .reshape(2, 64, 64, 3))
  assert not np.allclose(x, x_perm)
  no_pos = _replace(variables, pos_embedding=np.zeros((16, 16), np.float32))
  np.testing.assert_allclose(model.apply(no_pos, x, train=False),
                             model.apply(no_pos, x_perm, train=False), rtol=1e-5, atol=1e-5)
  # Control: with position embeddings the permutation is seen.
  diff = model.apply(variables, x, train=False) - model.apply(variables, x_perm, train=False)
  assert np.abs(diff).max() > 1e-3


def test_sincos2d_table_matches_numpy_and_is_not_a_parameter():
  width, h, w = 8, 3, 5
  omega = 1.0 / 10_000**(np.arange(2) / 1)
  want = np.array([np.concatenate([np.sin(x * omega), np.cos(x * omega),
                                   np.sin(y * omega), np.cos(y * omega)])
                   for y in range(h) for x in range(w)])
  np.testing.assert_allclose(vit.posemb_sincos_2d(h, w, width), want, rtol=1e-5, atol=1e-6)
  model = vit.ViT(width=8, depth=0, num_heads=2, posemb="sincos2d", posemb_grid=4)
  assert "pos_embedding" not in _init(model, _images(1, 64, 64, 3))["params"]


def test_remat_keeps_parameters_outputs_and_gradients():
  x = _images(2, 32, 32, 3)
  plain = vit.ViT(width=16, depth=1, num_heads=2, posemb_grid=2)
  remat = plain.clone(remat=True)
  variables = _init(plain, x)
  shapes = lambda v: jax.tree_util.tree_map(jnp.shape, v)
  assert shapes(jax.eval_shape(functools.partial(remat.init, train=False), KEY, x)) == (
      shapes(variables))
  def loss_and_grad(model):
    loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=True)**2)
    return jax.jit(jax.value_and_grad(loss))(variables["params"])
  jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                         loss_and_grad(plain), loss_and_grad(remat))


def test_stochastic_depth_drops_whole_residual_branches():
  """drop_path_rate=1 at depth 2: block 0 has rate 0, block 1 rate 1 (always dropped)."""
  x = _images(2, 32, 32, 3)
  deep = vit.ViT(width=16, depth=2, num_heads=2, posemb_grid=2, drop_path_rate=1.0)
  shallow = deep.clone(depth=1, drop_path_rate=0.0)
  variables = _init(deep, x)
  params = flax.core.unfreeze(variables["params"])
  del params["block1"]
  train_out = deep.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  want = shallow.apply({"params": params}, x, train=False)
  np.testing.assert_allclose(train_out, want, rtol=1e-5, atol=1e-5)
  # Control: at eval time block 1 runs.
  assert np.abs(deep.apply(variables, x, train=False) - want).max() > 1e-3


@pytest.mark.parametrize("kw,shape,match", [
    (dict(pool="max"), (1, 32, 32, 3), "pool"),
    (dict(posemb="rope"), (1, 32, 32, 3), "posemb"),
    (dict(width=30), (1, 32, 32, 3), "num_heads"),
    (dict(), (1, 40, 32, 3), "multiples of patch 16"),
    (dict(posemb_grid=(2, 2, 2)), (1, 32, 32, 3), "posemb_grid"),
])
def test_bad_settings_raise_value_errors(kw, shape, match):
  model = vit.ViT(**{**dict(width=16, depth=1, num_heads=4, posemb_grid=2), **kw})
  with pytest.raises(ValueError, match=match):
    _init(model, _images(*shape))
