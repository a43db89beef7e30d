"""GLAM model (models/glam.py) and weight conversion (models/glam_convert.py).

Golden values come from independent numpy loops written from the reference's
common_functions (crop_pytorch, get_max_window with floor division, generate_mask_uplft)
and from hand-made examples.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medguide_jax.models import glam
from medguide_jax.models import glam_convert

TINY = dict(global_widths=(2, 2, 2, 2, 2), local_depth=18, local_width=2)


@pytest.fixture(scope="module")
def tiny_variables():
  """Variables of a TINY GLAM; they do not depend on the image size, crops or patches."""
  model = glam.GLAM(**TINY, crop_shape=(32, 32))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 128, 128, 1))
  return jax.jit(functools.partial(model.init, train=False, local=True))(
      jax.random.PRNGKey(0), x)


# -- whole model -----------------------------------------------------------------------------

def test_full_resolution_shapes_and_fusion(tiny_variables):
  model = glam.GLAM(**TINY)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 2944, 1920, 1))
  variables = tiny_variables
  out = jax.jit(lambda v, x: model.apply(v, x, train=False, local=True, fuse=True))(variables, x)
  for k in ("a1", "a2", "a3", "saliency_global"):
    assert out[k].shape == (1, 184, 120, 2), k
  assert out["y_global"].shape == out["y_local"].shape == (1, 2)
  assert out["cam_positions"].dtype == out["patch_positions"].dtype == jnp.int32
  assert out["patches"].shape == (1, 1, 512, 512, 1)
  assert out["saliency_local_patches"].shape == (1, 1, 128, 128, 2)
  assert out["saliency"].shape == out["saliency_local"].shape == (1, 2944, 1920, 2)
  r, c = np.asarray(out["cam_positions"])[0, 0]
  assert 0 <= r <= 184 - 32 and 0 <= c <= 120 - 32  # a 32x32 window on the CAM
  np.testing.assert_array_equal(out["patch_positions"], 16 * out["cam_positions"])
  pr, pc = 16 * r, 16 * c
  np.testing.assert_array_equal(out["patches"][0, 0], x[0, pr:pr + 512, pc:pc + 512])
  sg_up = np.repeat(np.repeat(np.asarray(out["saliency_global"])[0], 16, 0), 16, 1)
  local_up = np.repeat(np.repeat(np.asarray(out["saliency_local_patches"])[0, 0], 4, 0), 4, 1)
  expected = sg_up / 2
  expected[pr:pr + 512, pc:pc + 512] += local_up / 2
  np.testing.assert_allclose(out["saliency"][0], expected, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["saliency_global"]),
                             0.2 * out["a3"] + 0.6 * out["a2"] + 0.2 * out["a1"], rtol=1e-6)


def test_global_network_sizes_follow_the_methods_table():
  net = glam.GlobalNetwork()
  x = jax.ShapeDtypeStruct((1, 2944, 1920, 1), jnp.float32)
  (h3, h4, h5), _ = jax.eval_shape(
      lambda x: net.init_with_output(jax.random.PRNGKey(0), x, train=False), x)
  assert h3.shape == (1, 184, 120, 64)
  assert h4.shape == (1, 92, 60, 128)
  assert h5.shape == (1, 46, 30, 256)


def test_global_parameter_count_matches_hand_formula():
  w = (16, 32, 64, 128, 256)
  module = glam.GlobalModule(widths=w)
  x = jax.ShapeDtypeStruct((1, 256, 256, 1), jnp.float32)
  variables = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), x)
  count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
  expected, bn_channels, c_in = 49 * w[0], 0, w[0]
  for width in w:
    # block 1: BN(c_in), 3x3 c_in->w, BN(w), 3x3 w->w, 1x1 projection; block 2: all at w.
    expected += 2 * c_in + 9 * c_in * width + 2 * width + 9 * width**2 + c_in * width
    expected += 2 * width + 9 * width**2 + 2 * width + 9 * width**2
    bn_channels += c_in + 3 * width
    c_in = width
  expected += 2 * w[-1] + 2 * (w[-3] + w[-2] + w[-1])  # final BN, three heads to 2 classes
  assert count(variables["params"]) == expected
  assert count(variables["batch_stats"]) == 2 * (bn_channels + w[-1])


def test_remat_bf16_and_input_errors(tiny_variables):
  model = glam.GLAM(**TINY, crop_shape=(32, 32))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 128, 128, 1))
  variables = tiny_variables

  def loss(m, params):
    out, _ = m.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return out["y_global"].sum() + out["y_local"].sum(), out

  (l0, out0), g0 = jax.jit(jax.value_and_grad(functools.partial(loss, model), has_aux=True))(
      variables["params"])
  remat = model.clone(remat=True)
  (l1, out1), g1 = jax.jit(jax.value_and_grad(functools.partial(loss, remat), has_aux=True))(
      variables["params"])
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  np.testing.assert_array_equal(out0["patch_positions"], out1["patch_positions"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)
  assert any(np.abs(a).sum() > 0 for a in jax.tree.leaves(g0["local_net"]))

  bf16 = model.clone(dtype=jnp.bfloat16)
  out, _ = jax.jit(lambda v, x: bf16.apply(v, x, train=True, local=False,
                                           mutable=["batch_stats"]))(variables, x)
  assert out["y_global"].dtype == out["saliency_global"].dtype == jnp.float32
  np.testing.assert_allclose(out["y_global"], out0["y_global"], atol=0.05)

  with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
    model.apply(variables, jnp.zeros((1, 128, 128, 3)), train=False)
  with pytest.raises(ValueError, match="fuse=True needs local=True"):
    model.apply(variables, x, train=False, local=False, fuse=True)


def test_sharded_batch_equals_single_device(tiny_variables):
  model = glam.GLAM(**TINY, crop_shape=(32, 32), num_patches=2)
  x = jax.random.normal(jax.random.PRNGKey(2), (8, 128, 128, 1))
  variables = tiny_variables
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, fuse=True, mutable=["batch_stats"]))
  ref, ref_stats = step(variables, x)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  out, stats = step(variables, xs)
  assert len(out["saliency"].sharding.device_set) == 8
  np.testing.assert_array_equal(out["patch_positions"], ref["patch_positions"])
  for k in ("y_global", "y_local", "saliency"):
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               stats, ref_stats)


def test_train_global_false_freezes_global_statistics(tiny_variables):
  model = glam.GLAM(**TINY, crop_shape=(32, 32))
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 128, 128, 1))
  _, state = jax.jit(lambda v, x: model.apply(v, x, train=True, train_global=False,
                                              mutable=["batch_stats"]))(tiny_variables, x)
  old = tiny_variables["batch_stats"]
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"]["global_net"],
               old["global_net"])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state["batch_stats"]["local_net"],
                       old["local_net"])
  assert max(jax.tree.leaves(moved)) > 0


# -- pooling ---------------------------------------------------------------------------------

def _np_top_mean(values: np.ndarray, k: int) -> np.ndarray:
  """values [B, N, C] -> mean of the k largest per (b, c)."""
  return np.sort(values, axis=1)[:, ::-1][:, :k].mean(axis=1)


@pytest.mark.parametrize("h,w,t,k", [(2, 5, 0.25, 2),   # 2.5 -> 2 (half to even)
                                     (2, 7, 0.25, 4),   # 3.5 -> 4
                                     (3, 3, 0.01, 1),   # 0.09 -> at least 1
                                     (4, 4, 1.0, 16)])
def test_top_t_pool(h, w, t, k):
  maps = np.random.default_rng(0).random((2, h, w, 3)).astype(np.float32)
  got = glam.top_t_pool(jnp.asarray(maps), t)
  np.testing.assert_allclose(got, _np_top_mean(maps.reshape(2, h * w, 3), k), rtol=1e-6)


def test_top_t_pool_patches_pools_jointly():
  maps = np.random.default_rng(1).random((2, 2, 2, 5, 2)).astype(np.float32)
  maps[0, 1] += 1.0  # image 0's top values all sit in its second patch
  got = glam.top_t_pool_patches(jnp.asarray(maps), 0.125)  # 20 * 0.125 = 2.5 -> k = 2
  np.testing.assert_allclose(got, _np_top_mean(maps.reshape(2, 20, 2), 2), rtol=1e-6)
  assert glam.top_t_pool_patches(jnp.asarray(maps), 0.3).shape == (2, 2)
  with pytest.raises(ValueError, match="percent_t"):
    glam.top_t_pool(jnp.asarray(maps[:, 0]), 0.0)


# -- patch selection and positions -------------------------------------------------------------

def _np_select(saliency: np.ndarray, window, n: int) -> np.ndarray:
  """RegionProposalNetworkGreedy as loops: min-max, sum, n x (window means, first max, zero)."""
  wh, ww = window
  result = []
  for s in saliency.astype(np.float64):
    m = sum((s[..., c] - s[..., c].min()) / (s[..., c].max() - s[..., c].min())
            for c in range(s.shape[-1]))
    corners = []
    for _ in range(n):
      best, corner = -np.inf, None
      for r in range(m.shape[0] - wh + 1):
        for c in range(m.shape[1] - ww + 1):
          v = m[r:r + wh, c:c + ww].mean()
          if v > best:
            best, corner = v, (r, c)
      corners.append(corner)
      m[corner[0]:corner[0] + wh, corner[1]:corner[1] + ww] = 0
    result.append(corners)
  return np.array(result)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_select_patches_matches_numpy_loops(n):
  saliency = np.random.default_rng(n).random((3, 12, 10, 2)).astype(np.float32)
  got = glam.select_patches(jnp.asarray(saliency), (3, 4), n)
  assert got.dtype == jnp.int32 and got.shape == (3, n, 2)
  np.testing.assert_array_equal(got, _np_select(saliency, (3, 4), n))


def test_select_patches_ties_zeroing_and_floor_division():
  s = np.zeros((1, 6, 9, 1), np.float32)
  s[0, 3:5, 6:8] = 1.0  # two equal blobs: the one first in row-major order wins,
  s[0, 3:5, 1:3] = 1.0  # then its window is zeroed and the other one is taken
  got = np.asarray(glam.select_patches(jnp.asarray(s), (2, 2), 2))
  np.testing.assert_array_equal(got[0], [[3, 1], [3, 6]])  # column 6: floor division
  # A constant channel adds nothing (the reference would divide by zero).
  both = np.concatenate([s, np.full_like(s, 0.7)], axis=-1)
  np.testing.assert_array_equal(glam.select_patches(jnp.asarray(both), (2, 2), 2), got)
  with pytest.raises(ValueError, match="window"):
    glam.select_patches(jnp.asarray(s), (7, 2), 1)


def test_cam_window_and_image_positions():
  assert glam.cam_window((512, 512), (2944, 1920), (184, 120)) == (32, 32)
  assert glam.cam_window((5, 3), (10, 6), (4, 4)) == (2, 2)  # 2.0, 2.0
  assert glam.cam_window((5, 9), (20, 12), (2, 2)) == (0, 2)  # 0.5 -> 0, 1.5 -> 2
  p = jnp.asarray([[[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]]], jnp.int32)
  got = np.asarray(glam.to_image_positions(p, (4, 4), (10, 6)))
  # rows p/4*10: 0, 2.5->2, 5, 7.5->8, 10; cols p/4*6: 0, 1.5->2, 3, 4.5->4, 6.
  np.testing.assert_array_equal(got[0], [[0, 0], [2, 2], [5, 3], [8, 4], [10, 6]])
  p = jnp.asarray([[[0, 0], [152, 88], [17, 3]]], jnp.int32)
  np.testing.assert_array_equal(glam.to_image_positions(p, (184, 120), (2944, 1920)), 16 * p)


# -- cropping and fusion ---------------------------------------------------------------------

def _np_crop(image: np.ndarray, pos, shape) -> np.ndarray:
  """common_functions.crop_pytorch(method='upper_left', background_val='min')."""
  big_h, big_w = image.shape
  lo_x, hi_x = np.clip([pos[0], pos[0] + shape[0]], 0, big_h)
  lo_y, hi_y = np.clip([pos[1], pos[1] + shape[1]], 0, big_w)
  out = np.full(shape, image.min(), image.dtype)
  out[shape[0] - (hi_x - lo_x):, shape[1] - (hi_y - lo_y):] = image[lo_x:hi_x, lo_y:hi_y]
  return out


def test_crop_patches_matches_reference_slicing():
  x = np.random.default_rng(3).normal(size=(2, 9, 11, 1)).astype(np.float32)
  pos = np.array([[[2, 3], [0, 0], [7, 9], [-2, 1]],       # inside, corner, over the
                  [[5, 7], [8, 2], [9, 11], [3, -4]]])     # bottom-right, over the top
  got = np.asarray(glam.crop_patches(jnp.asarray(x), jnp.asarray(pos), (4, 5)))
  assert got.shape == (2, 4, 4, 5, 1)
  for b in range(2):
    for j in range(4):
      np.testing.assert_array_equal(got[b, j, ..., 0], _np_crop(x[b, ..., 0], pos[b, j], (4, 5)),
                                    err_msg=f"image {b} patch {j} at {pos[b, j]}")
  # Over the bottom edge the reference right-aligns: rows [7, 9) land at the crop's bottom.
  np.testing.assert_array_equal(got[0, 2, 2:, 3:, 0], x[0, 7:9, 9:11, 0])
  assert (got[0, 2, :2, :, 0] == x[0].min()).all()


def test_resize_nearest_uses_torch_indices():
  x = jnp.arange(3.0).reshape(1, 3, 1, 1)
  got = glam.resize_nearest(x, (7, 2))[0, :, 0, 0]
  np.testing.assert_array_equal(got, [0, 0, 0, 1, 1, 2, 2])  # floor(i * 3/7)
  np.testing.assert_array_equal(glam.resize_nearest(x, (6, 1))[0, :, 0, 0], [0, 0, 1, 1, 2, 2])


def test_fuse_pastes_in_order_over_upsampled_global_map():
  s_g = np.array([[1., 2., 3.], [4., 5., 6.]], np.float32)[None, :, :, None]  # [1,2,3,1]
  local = np.array([10., 20.], np.float32).reshape(1, 2, 1, 1, 1)  # 1x1 maps -> 2x2 crops
  positions = np.array([[[0, 0], [1, 1]]], np.int32)
  args = (jnp.asarray(s_g), jnp.asarray(local), jnp.asarray(positions), (4, 6), (2, 2))
  up = np.array([[1, 1, 2, 2, 3, 3],
                 [1, 1, 2, 2, 3, 3],
                 [4, 4, 5, 5, 6, 6],
                 [4, 4, 5, 5, 6, 6]], np.float32)
  canvas = np.array([[10, 10, 0, 0, 0, 0],
                     [10, 20, 20, 0, 0, 0],  # the second patch overwrites the first
                     [0, 20, 20, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(glam.local_canvas(*args[1:])[0, ..., 0], canvas)
  np.testing.assert_array_equal(glam.fuse(*args)[0, ..., 0], (canvas + up) / 2)
  # At the border the part outside the image is dropped, not shifted inside.
  edge = glam.local_canvas(jnp.asarray(local[:, :1]), jnp.asarray([[[3, 5]]]), (4, 6), (2, 2))
  expected = np.zeros((4, 6), np.float32)
  expected[3, 5] = 10
  np.testing.assert_array_equal(edge[0, ..., 0], expected)


# -- weight conversion -----------------------------------------------------------------------

CONVERT_ARCH = dict(global_widths=(2, 3, 4, 5, 6), local_width=2)


def _fake_state_dict(local_depth=18, seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in glam_convert.reference_state_dict_keys(local_depth, **CONVERT_ARCH):
    if name.endswith("num_batches_tracked"):
      sd[name] = np.array(7, np.int64)
    else:
      sd[name] = rng.random(shape).astype(np.float32) + 0.1
  return sd


def test_reference_state_dict_keys_order_and_count():
  keys = [k for k, _ in glam_convert.reference_state_dict_keys()]
  assert keys[0] == "global_network.downsampling_branch.first_conv.weight"
  assert keys[1:6] == [f"global_network.downsampling_branch.layer_list.0.0.bn1.{s}" for s in
                       ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
  heads = keys.index("global_network.postprocess_module.gn_conv_1.weight")
  assert keys[heads - 1].endswith("final_bn.num_batches_tracked")
  assert keys[heads + 3] == "global_network.postprocess_module.combine.weight"
  assert keys[heads + 4] == "detection_network.dn_resnet.conv1.weight"
  assert keys[-1] == "detection_network.gn_conv_last.weight"
  # Global: stem + 5 x (13 + 12) + final BN (5) + 3 heads + combine; local ResNet-34:
  # stem conv + BN (6) + 16 blocks x 12 + 3 projections x 6 + head.
  assert len(keys) == (1 + 125 + 5 + 4) + (6 + 192 + 18 + 1)
  shapes = dict(glam_convert.reference_state_dict_keys())
  assert shapes["detection_network.dn_resnet.layer4.0.downsample.0.weight"] == (512, 256, 1, 1)
  assert shapes["global_network.postprocess_module.gn_conv_1.weight"] == (2, 64, 1, 1)
  assert len(glam_convert.reference_state_dict_keys(18)) == len(keys) - 8 * 12


def test_convert_state_dict_round_trip():
  sd = _fake_state_dict()
  sd.update({"mil.mil_attn_V.weight": np.ones((3, 4)), "fusion_dnn.bias": np.ones(2),
             "shared_rep_filter.weight": np.ones((2, 2))})
  variables = glam_convert.convert_state_dict(sd, local_depth=18, **CONVERT_ARCH)
  model = glam.GLAM(local_depth=18, crop_shape=(32, 32), **CONVERT_ARCH)
  x = jnp.zeros((1, 128, 128, 1))
  like = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  assert jax.tree.structure(variables) == jax.tree.structure(dict(like))
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), variables, dict(like))
  p, s = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(
      p["global_net"]["backbone"]["stem_conv"]["kernel"],
      sd["global_network.downsampling_branch.first_conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      p["global_net"]["backbone"]["stage2_block1"]["proj_conv"]["kernel"][0, 0],
      sd["global_network.downsampling_branch.layer_list.1.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(
      p["global_net"]["heads"]["a2_conv"]["kernel"][0, 0],
      sd["global_network.postprocess_module.gn_conv_2.weight"][..., 0, 0].T)
  np.testing.assert_array_equal(p["global_net"]["backbone"]["stage1_block2"]["norm2"]["scale"],
                                sd["global_network.downsampling_branch.layer_list.0.1.bn2.weight"])
  np.testing.assert_array_equal(s["local_net"]["stage3_block1"]["proj_norm"]["var"],
                                sd["detection_network.dn_resnet.layer3.0.downsample.1.running_var"])
  np.testing.assert_array_equal(s["global_net"]["backbone"]["final_norm"]["mean"],
                                sd["global_network.downsampling_branch.final_bn.running_mean"])
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, jax.random.normal(jax.random.PRNGKey(0), x.shape))
  assert np.isfinite(np.asarray(out["y_local"])).all()


def test_convert_state_dict_errors_name_the_key():
  kw = dict(local_depth=18, **CONVERT_ARCH)
  sd = _fake_state_dict()
  missing = dict(sd)
  del missing["detection_network.dn_resnet.layer2.0.bn2.running_var"]
  with pytest.raises(ValueError, match=r"lacks 1 key.*layer2\.0\.bn2\.running_var"):
    glam_convert.convert_state_dict(missing, **kw)
  # Optional entries may be absent: num_batches_tracked and the unused combine conv.
  optional = {k: v for k, v in sd.items()
              if not k.endswith("num_batches_tracked") and "combine" not in k}
  glam_convert.convert_state_dict(optional, **kw)
  with pytest.raises(ValueError, match=r"unexpected key.*module\.fc\.weight"):
    glam_convert.convert_state_dict({**sd, "module.fc.weight": np.ones(2)}, **kw)
  bad = dict(sd)
  bad["global_network.downsampling_branch.layer_list.2.0.conv1.weight"] = np.ones((4, 3, 3, 1))
  with pytest.raises(ValueError, match=r"layer_list\.2\.0\.conv1\.weight.*expects \(4, 3, 3, 3\)"):
    glam_convert.convert_state_dict(bad, **kw)


def test_npz_round_trip_and_load_errors(tmp_path):
  kw = dict(local_depth=18, **CONVERT_ARCH)
  variables = glam_convert.convert_state_dict(_fake_state_dict(), **kw)
  path = str(tmp_path / "w.npz")
  glam_convert.save_variables(path, variables)
  loaded = glam_convert.load_variables(path, like=variables)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  other = jax.tree.map(np.copy, variables)  # a model with a wider last head
  other["params"]["global_net"]["heads"]["a3_conv"]["kernel"] = np.zeros((1, 1, 7, 2))
  with pytest.raises(ValueError, match="a3_conv/kernel has shape"):
    glam_convert.load_variables(path, like=other)
  with pytest.raises(FileNotFoundError, match="nope.ckpt"):
    glam_convert.load_torch_checkpoint(str(tmp_path / "nope.ckpt"))
  lfs = tmp_path / "model.ckpt"
  lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
  with pytest.raises(ValueError, match="Git LFS pointer"):
    glam_convert.load_torch_checkpoint(str(lfs))


def test_load_torch_checkpoint_without_torch_says_what_to_install(tmp_path):
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("torch is installed")
  except ImportError:
    pass
  path = tmp_path / "model.ckpt"
  path.write_bytes(b"PK\x03\x04 not really a checkpoint")
  with pytest.raises(ImportError, match=r'pip install -e "\.\[torch\]"'):
    glam_convert.load_torch_checkpoint(str(path))
