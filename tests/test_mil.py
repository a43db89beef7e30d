"""Attention-MIL, the clinical branch and VGG16-BN against numpy, and their invariances."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medguide_jax.models import mil, resnet, vgg


def _np_softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", ["ilse", "gated", "balnmp"])
def test_attention_mil_matches_numpy(kind):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 5)).astype(np.float32)
  module = mil.AttentionMIL(hidden=6, attention_dim=3, kind=kind, dropout=0.5)
  params = module.init(jax.random.PRNGKey(0), x, train=False)["params"]
  m, alpha = module.apply({"params": params}, x, train=False)
  p = jax.tree.map(np.asarray, params)
  dense = lambda name, v: v @ p[name]["kernel"] + p[name]["bias"]
  h = np.maximum(dense("fc", x), 0)
  if kind == "balnmp":  # Linear(L->1) -> tanh -> Linear(1->1)
    a = dense("attention_out", np.tanh(dense("attention_in", h)))
  else:
    v = np.tanh(dense("attention_v", h))
    if kind == "gated":
      v = v / (1 + np.exp(-dense("attention_u", h)))
    a = dense("attention_w", v)
  want_alpha = _np_softmax(a[..., 0])
  np.testing.assert_allclose(alpha, want_alpha, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m, np.einsum("bn,bnl->bl", want_alpha, h), rtol=1e-5, atol=1e-6)
  if kind == "balnmp":  # D = 1: the attention MLP is rank one
    assert p["attention_in"]["kernel"].shape == (6, 1) and p["attention_out"]["kernel"].shape == (1, 1)


def test_padding_tiles_are_masked_and_the_bag_is_permutation_invariant():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 5, 4)).astype(np.float32)
  padded = np.concatenate([x, 100 * rng.normal(size=(1, 3, 4)).astype(np.float32)], 1)
  mask = np.arange(8)[None] < 5
  module = mil.AttentionMIL(hidden=6, attention_dim=3, kind="gated")
  params = module.init(jax.random.PRNGKey(0), x, train=False)
  m, alpha = module.apply(params, x, train=False)
  mp, alphap = module.apply(params, padded, mask, train=False)
  np.testing.assert_allclose(mp, m, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(alphap[0, 5:], 0)
  perm = rng.permutation(5)
  ms, _ = module.apply(params, x[:, perm], train=False)
  np.testing.assert_allclose(ms, m, rtol=1e-5, atol=1e-6)
  empty = mil.masked_softmax(jnp.ones((1, 3)), jnp.zeros((1, 3), bool))
  np.testing.assert_array_equal(empty, 0)


def test_balnmp_tiles_the_whole_clinical_vector_not_each_element():
  c = np.arange(1, 6, dtype=np.float32)[None]
  out = mil.ClinicalEncoder(kind="tile", repeats=10).apply({}, c)
  np.testing.assert_array_equal(out[0], np.tile(c[0], 10))  # [c1..c5, c1..c5, ...]
  assert out.shape == (1, 50)


def _net(**kw):
  return mil.MissingModalityNet(num_classes=2, clinical_dim=5, encoder=None,
                                aggregator={"hidden": 8, "attention_dim": 4}, **kw)


def _batch(rng, b=3, n=6, f=10):
  return {"features": jnp.asarray(rng.normal(size=(b, n, f)), jnp.float32),
          "tile_mask": jnp.asarray(np.arange(n)[None] < rng.integers(1, n + 1, (b, 1))),
          "clinical": jnp.asarray(rng.normal(size=(b, 5)), jnp.float32)}


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_the_wsi_only_branch_never_sees_the_clinical_vector(fusion):
  rng = np.random.default_rng(2)
  net, batch = _net(fusion=fusion), _batch(rng)
  variables = net.init(jax.random.PRNGKey(0), batch)
  out = net.apply(variables, batch)
  assert out["logits_m"].shape == out["logits_s"].shape == (3, 2)
  np.testing.assert_array_equal(out["wsi_m"], out["wsi_s"])  # one shared aggregator
  grad = lambda key: jax.grad(lambda c: net.apply(variables, {**batch, "clinical": c})[key].sum())(
      batch["clinical"])
  assert np.abs(grad("logits_s")).sum() == 0 and np.abs(grad("logits_m")).sum() > 0
  # An example without clinical data gets the prompt in M too ('M with the prompt').
  present = jnp.array([True, False, True])
  routed = net.apply(variables, batch, clinical_present=present)
  np.testing.assert_allclose(routed["logits_m"][0], out["logits_m"][0], rtol=1e-6)
  other = net.apply(variables, {**batch, "clinical": batch["clinical"] * 0 + 7.0},
                    clinical_present=jnp.array([False, False, False]))
  np.testing.assert_allclose(routed["logits_m"][1], other["logits_m"][1], rtol=1e-5, atol=1e-6)


def test_separate_aggregators_and_an_end_to_end_tile_encoder():
  rng = np.random.default_rng(3)
  net = mil.MissingModalityNet(num_classes=3, clinical_dim=5, encoder="tiny_cnn",
                               encoder_kwargs={"width": 4}, shared_aggregator=False,
                               aggregator={"hidden": 8, "attention_dim": 4},
                               clinical_encoder={"kind": "tile"})
  batch = {"tiles": jnp.asarray(rng.normal(size=(2, 10, 16, 16, 3)), jnp.float32),
           "clinical": jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)}
  variables = net.init(jax.random.PRNGKey(0), batch)
  assert {"mil_m", "mil_s", "enc", "prompt"} <= set(variables["params"])
  assert variables["params"]["prompt"].shape == (50,)
  out = net.apply(variables, batch, train=True, mutable=["batch_stats"],
                  rngs={"dropout": jax.random.PRNGKey(1)})[0]
  assert out["logits_m"].shape == (2, 3) and not np.allclose(out["wsi_m"], out["wsi_s"])


def _np_adaptive_pool(x, out):
  """Cell by cell, as torch's AdaptiveAvgPool2d: bin i is [floor(i h / o), ceil((i+1) h / o))."""
  h, w = x.shape[1:3]
  cells = [[x[:, (i * h) // out: -(-((i + 1) * h) // out), (j * w) // out: -(-((j + 1) * w) // out)]
            .mean(axis=(1, 2)) for j in range(out)] for i in range(out)]
  return np.stack([np.stack(row, 1) for row in cells], 1)


@pytest.mark.parametrize("size", [1, 3, 7, 10, 14])
def test_vgg_adaptive_pool_matches_torchs_bins(size):
  x = np.random.default_rng(size).normal(size=(2, size, size + 1, 3)).astype(np.float32)
  np.testing.assert_allclose(vgg.adaptive_avg_pool(jnp.asarray(x), (7, 7)),
                             _np_adaptive_pool(x, 7), rtol=1e-5, atol=1e-6)


def test_vgg16_bn_has_13_convs_and_25088_features_at_full_width():
  enc = resnet.get_encoder("vgg16_bn", width=8)
  x = jnp.zeros((2, 32, 32, 3))
  variables = enc.init(jax.random.PRNGKey(0), x, train=False)
  assert len([k for k in variables["params"] if k.startswith("conv")]) == 13
  assert enc.apply(variables, x, train=False).shape == (2, resnet.feature_dim("vgg16_bn", width=8))
  assert resnet.feature_dim("vgg16_bn") == 25088


def test_fills_give_ms_logits_for_other_clinical_inputs_from_one_pass():
  rng = np.random.default_rng(4)
  net, batch = _net(), _batch(rng)
  variables = net.init(jax.random.PRNGKey(0), batch)
  zeros = jnp.zeros_like(batch["clinical"])
  out = net.apply(variables, batch, fills={"zero_fill": zeros, "prompt": None})
  np.testing.assert_allclose(out["logits_m/zero_fill"],
                             net.apply(variables, {**batch, "clinical": zeros})["logits_m"],
                             rtol=1e-6)
  prompted = net.apply(variables, batch, clinical_present=jnp.zeros((3,), bool))["logits_m"]
  np.testing.assert_allclose(out["logits_m/prompt"], prompted, rtol=1e-6)
  np.testing.assert_array_equal(out["logits_m"], net.apply(variables, batch)["logits_m"])
