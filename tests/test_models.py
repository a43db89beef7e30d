"""Tests of the encoders, the multi-task head and the guidance MLP (tiny CPU inputs).

Compilation dominates on CPU, so concrete runs use the smallest networks that still
exercise each code path, and full-size networks are only traced (jax.eval_shape).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medguide_jax.models import guidance, heads, resnet

F32 = jnp.dtype(jnp.float32)

# Smallest ResNets that still exercise the stem, a strided stage and both block types.
_SMALL = {
    "basic": resnet.ResNet(stage_sizes=(1, 1), block="basic", width=8),
    "bottleneck": resnet.ResNet(stage_sizes=(1,), block="bottleneck", width=8),
    "tiny_bf16": resnet.get_encoder("tiny_cnn", dtype=jnp.bfloat16, width=8),
}


def _key(seed):
  # unsafe_rbg: XLA:CPU compiles threefry initialisers very slowly (seconds per param
  # shape); the models do not care which PRNG implementation the key uses.
  return jax.random.key(seed, impl="unsafe_rbg")


def _images(batch=4, size=32, seed=0):
  x = np.random.default_rng(seed).normal(size=(batch, size, size, 3))
  return jnp.asarray(x, jnp.float32)


@functools.cache
def _small_variables(name):
  model = _SMALL[name]
  return jax.jit(lambda k, x: model.init(k, x, train=False))(_key(0), _images(2))


def _abstract(model, dtype_in=jnp.float32):
  """(abstract variables, abstract features) of `model` on a [2, 32, 32, 3] input."""
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), dtype_in)
  variables = jax.eval_shape(lambda x: model.init(_key(0), x, train=False), x)
  return variables, jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)


def _dtypes(tree):
  return {leaf.dtype for leaf in jax.tree_util.tree_leaves(tree)}


@pytest.mark.parametrize("name,kw,dim", [
    ("tiny_cnn", {}, 64),
    ("resnet18", {}, 512),
    ("resnet34", {}, 512),
    ("resnet50", {}, 2048),
    ("resnet18", {"width": 8, "dtype": jnp.bfloat16}, 64),
    ("resnet50", {"width": 8, "norm": "group", "dtype": jnp.bfloat16}, 256),
])
def test_encoder_output_shape_and_dtypes(name, kw, dim):
  assert resnet.feature_dim(name, **{k: v for k, v in kw.items() if k != "dtype"}) == dim
  variables, feats = _abstract(resnet.get_encoder(name, **kw))
  assert feats.shape == (2, dim)
  assert feats.dtype == F32  # also under bf16 compute
  assert _dtypes(variables) == {F32}  # parameters and BN stats stay fp32


def test_unknown_encoder_lists_valid_names():
  with pytest.raises(ValueError, match="resnet50"):
    resnet.get_encoder("vgg16")
  with pytest.raises(ValueError, match="tiny_cnn"):
    resnet.feature_dim("vgg16")


def test_resnet50_structure_is_v1_5():
  params = _abstract(resnet.get_encoder("resnet50", width=8))[0]["params"]
  assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 8)
  # v1.5: the first block of stage 2 strides in the 3x3, so conv1 is a plain 1x1.
  block = params["stage2_block1"]
  assert block["conv1"]["kernel"].shape == (1, 1, 32, 16)
  assert block["conv2"]["kernel"].shape == (3, 3, 16, 16)
  assert block["proj_conv"]["kernel"].shape == (1, 1, 32, 64)
  assert len([k for k in params if k.startswith("stage")]) == 16


def test_last_norm_scale_is_zero_init():
  params = _small_variables("basic")["params"]
  np.testing.assert_array_equal(params["stage1_block1"]["norm2"]["scale"], 0.0)
  np.testing.assert_array_equal(params["stage1_block1"]["norm1"]["scale"], 1.0)
  np.testing.assert_array_equal(params["stage2_block1"]["proj_norm"]["scale"], 1.0)
  params = _small_variables("bottleneck")["params"]
  np.testing.assert_array_equal(params["stage1_block1"]["norm3"]["scale"], 0.0)
  np.testing.assert_array_equal(params["stage1_block1"]["norm2"]["scale"], 1.0)


def test_batch_stats_update_only_in_train_mode():
  model, variables = _SMALL["basic"], _small_variables("basic")
  stats0 = variables["batch_stats"]
  x = _images(4, seed=1) * 3.0 + 1.0

  @jax.jit
  def run(v, x):
    feats_train, upd_train = model.apply(v, x, train=True, mutable=["batch_stats"])
    feats_eval, upd_eval = model.apply(v, x, train=False, mutable=["batch_stats"])
    # Eval mode uses the running stats, so one example ignores the rest of the batch.
    feats_single = model.apply(v, x[:1], train=False)
    return feats_train, upd_train, feats_eval, upd_eval, feats_single

  feats_train, upd_train, feats_eval, upd_eval, feats_single = run(variables, x)
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), stats0,
                                   upd_train["batch_stats"])
  assert all(jax.tree_util.tree_leaves(changed))
  jax.tree_util.tree_map(np.testing.assert_array_equal, stats0, upd_eval["batch_stats"])
  np.testing.assert_allclose(feats_single, feats_eval[:1], rtol=1e-5, atol=1e-5)
  assert feats_train.shape == (4, 16) and not np.allclose(feats_train, feats_eval)


def test_bf16_compute_keeps_fp32_params_and_features():
  model, variables = _SMALL["tiny_bf16"], _small_variables("tiny_bf16")
  assert _dtypes(variables) == {F32}
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, _images(2))
  assert out.dtype == F32 and out.shape == (2, 32)
  assert _dtypes(updates) == {F32}
  # The convolutions really run in bf16.
  jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables,
                                                                          _images(2)))
  assert "bf16" in jaxpr


def test_guidance_mlp_shape_and_non_negative():
  model = guidance.GuidanceMLP(hidden=(16, 8), out_dim=12)
  linear = guidance.GuidanceMLP(hidden=(16, 8), out_dim=12, output_relu=False)
  z = jnp.asarray(np.random.default_rng(1).normal(size=(5, 10)), jnp.float32)

  @jax.jit
  def run(key, z):
    variables = model.init(key, z, train=False)
    out = model.apply(variables, z, train=True, rngs={"dropout": key})
    return variables, out, linear.apply(variables, z, train=False)

  variables, out, raw = run(_key(0), z)
  assert set(variables["params"]) == {"dense_0", "dense_1", "out"}
  assert out.shape == (5, 12) and out.dtype == F32
  assert bool(jnp.all(out >= 0))
  assert bool(jnp.any(raw < 0))  # so the ReLU above is doing something


def test_guidance_mlp_default_architecture():
  model = guidance.GuidanceMLP()
  z = jax.ShapeDtypeStruct((2, 2048), jnp.float32)
  params = jax.eval_shape(lambda z: model.init(_key(0), z, train=False), z)["params"]
  widths = [params[f"dense_{i}"]["kernel"].shape[1] for i in range(4)]
  assert widths == [1024, 512, 512, 1024]
  assert params["out"]["kernel"].shape == (1024, 2048)


@pytest.mark.parametrize("hidden", [0, 16])
def test_multitask_head(hidden):
  model = heads.MultiTaskHead(num_classes=(5, 3, 2), hidden=hidden)
  z = jnp.asarray(np.random.default_rng(1).normal(size=(4, 20)), jnp.float32)

  @jax.jit
  def run(key, z):
    variables = model.init(key, z, train=False)
    eval1 = model.apply(variables, z, train=False)
    eval2 = model.apply(variables, z, train=False, rngs={"dropout": key})
    train = model.apply(variables, z, train=True, rngs={"dropout": key})
    return variables, eval1, eval2, train

  variables, logits, again, dropped = run(_key(0), z)
  expected = {"task_0", "task_1", "task_2"} | ({"hidden"} if hidden else set())
  assert set(variables["params"]) == expected
  assert isinstance(logits, tuple) and len(logits) == 3
  assert [l.shape for l in logits] == [(4, 5), (4, 3), (4, 2)]
  # Deterministic without dropout (even when a dropout key is supplied), stochastic with.
  for a, b in zip(logits, again):
    np.testing.assert_array_equal(a, b)
  assert any(bool(jnp.any(a != b)) for a, b in zip(logits, dropped))
  if hidden == 0:  # dropout then a plain linear layer per task
    p = variables["params"]["task_1"]
    np.testing.assert_allclose(logits[1], z @ p["kernel"] + p["bias"], rtol=1e-5, atol=1e-5)
