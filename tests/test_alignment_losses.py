"""hybridmed's alignment losses (L_CG; L_CL as MGCA or GLoRIA) against float64 numpy references.

The references restate METHODS.md 3(a') loop by loop, sample by sample (and, for GLoRIA, image
by report); none calls medguide_jax.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medguide_jax import parallel
from medguide_jax.losses import alignment as al

B, N, W, D = 4, 6, 5, 8  # samples, patches / regions, words, embedding width
LENGTHS = np.array([5, 3, 1, 4])  # real words per report (the rest are pads)


# ----------------------------------------------------------------------------- numpy references
def _lse(x):
  x = np.asarray(x, np.float64)
  m = x.max()
  return m + np.log(np.exp(x - m).sum())


def _softmax(x, axis=-1):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_global(image, text, scale):
  logits = scale * _unit(image) @ _unit(text).T
  n = len(image)
  i2t = np.mean([_lse(logits[k]) - logits[k, k] for k in range(n)])
  t2i = np.mean([_lse(logits[:, l]) - logits[l, l] for l in range(n)])
  return (i2t + t2i) / 2


def np_clipped_weights(scores, mask, low=0.1, high=0.9):
  out = np.zeros(scores.shape)
  for b in range(len(scores)):
    idx = np.flatnonzero(mask[b])
    if len(idx) == 0:
      continue
    vals = scores[b, idx].astype(np.float64)
    vals = np.clip(vals, np.quantile(vals, low), np.quantile(vals, high))
    out[b, idx] = vals / vals.sum()
  return out


def np_mgca(patches, words, word_mask, patch_mask=None, word_weights=None, patch_weights=None,
            tau=0.1, pads_as_negatives=False):
  """(loss, L_word, L_patch) of MGCA's token-level loss, one report at a time."""
  batch, num_patches, _ = patches.shape
  num_words = words.shape[1]
  if patch_mask is None:
    patch_mask = np.ones((batch, num_patches), bool)
  v, w = _unit(patches), _unit(words)

  def norm_weights(given, mask):
    x = mask.astype(np.float64) if given is None else given * mask
    return x / x.sum()

  l_word = l_patch = 0.0
  num_valid = 0
  for b in range(batch):
    real_w = [i for i in range(num_words) if word_mask[b, i]]
    real_p = [j for j in range(num_patches) if patch_mask[b, j]]
    if not real_w or not real_p:
      continue
    num_valid += 1
    omega = norm_weights(None if word_weights is None else word_weights[b], word_mask[b])
    pi = norm_weights(None if patch_weights is None else patch_weights[b], patch_mask[b])
    # word -> patch
    o = np.zeros_like(w[b])
    for i in range(num_words):
      alpha = _softmax([w[b, i] @ v[b, j] / tau for j in real_p])
      o[i] = _unit(sum(a * v[b, j] for a, j in zip(alpha, real_p)))
    cand = range(num_words) if pads_as_negatives else real_w
    s = lambda i, k: w[b, i] @ o[k] / tau
    for i in real_w:
      row = _lse([s(i, k) for k in cand]) - s(i, i)
      col = _lse([s(k, i) for k in cand]) - s(i, i)
      l_word += omega[i] * (row + col) / 2
    # patch -> word
    u = np.zeros_like(v[b])
    for j in range(num_patches):
      beta = _softmax([v[b, j] @ w[b, i] / tau for i in real_w])
      u[j] = _unit(sum(a * w[b, i] for a, i in zip(beta, real_w)))
    p = lambda j, m: v[b, j] @ u[m] / tau
    for j in real_p:
      row = _lse([p(j, m) for m in real_p]) - p(j, j)
      col = _lse([p(m, j) for m in real_p]) - p(j, j)
      l_patch += pi[j] * (row + col) / 2
  return (l_word + l_patch) / num_valid, l_word / num_valid, l_patch / num_valid


def np_gloria(regions, words, word_mask, t1=4.0, t2=5.0, t3=10.0):
  """(loss, image->text CE, text->image CE) of GLoRIA's local loss, image k by report l."""
  batch = len(regions)
  z = np.zeros((batch, batch))
  for k in range(batch):
    v = regions[k].astype(np.float64)  # [N, D]
    for l in range(batch):
      e = words[l][word_mask[l]].astype(np.float64)  # the real words, [n, D]
      s = e @ v.T  # s[i, j] = e_i . v_j
      a = _softmax(t1 * _softmax(s, axis=0), axis=1)  # over words, then over regions
      c = a @ v  # c_i = sum_j a_ij v_j
      cos = [c[i] @ e[i] / max(np.linalg.norm(c[i]) * np.linalg.norm(e[i]), 1e-8)
             for i in range(len(e))]
      z[k, l] = np.log(np.sum(np.exp(t2 * np.array(cos))))
  logits = t3 * z
  valid = [b for b in range(batch) if word_mask[b].any()]
  i2t = np.mean([_lse(logits[k, valid]) - logits[k, k] for k in valid])
  t2i = np.mean([_lse(logits[valid, l]) - logits[l, l] for l in valid])
  return (i2t + t2i) / 2, i2t, t2i


# ----------------------------------------------------------------------------- inputs
def _mask(lengths=LENGTHS, width=W):
  return np.arange(width)[None, :] < np.asarray(lengths)[:, None]


def _local_inputs(seed=0, batch=B, lengths=LENGTHS):
  rng = np.random.default_rng(seed)
  patches = rng.normal(size=(batch, N, D)).astype(np.float32)
  words = rng.normal(size=(batch, W, D)).astype(np.float32)
  return patches, words, _mask(lengths)


# Jitted once per shape: op-by-op dispatch of these losses is slower than compiling them.
_global = jax.jit(al.global_alignment, static_argnames=("max_logit_scale",))
_mgca = jax.jit(al.mgca_local_alignment, static_argnames=("temperature", "pads_as_negatives"))
_gloria = jax.jit(al.gloria_local_alignment, static_argnames=("tau1", "tau2", "tau3"))


def _j(*xs):
  return tuple(jnp.asarray(x) for x in xs)


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() != 8:
    pytest.skip("needs the 8 host devices tests/conftest.py asks for")
  return parallel.make_mesh()


# ----------------------------------------------------------------------------- L_CG
def test_global_alignment_matches_numpy_and_caps_the_scale():
  rng = np.random.default_rng(0)
  image, text = rng.normal(size=(6, D)), rng.normal(size=(6, D))
  for s in (0.0, al.INIT_LOGIT_SCALE, 4.0):
    loss, m = _global(image=jnp.asarray(image), text=jnp.asarray(text),
                                  logit_scale=s)
    np.testing.assert_allclose(loss, np_global(image, text, math.exp(s)), rtol=1e-5)
    np.testing.assert_allclose(loss, (m["image_to_text"] + m["text_to_image"]) / 2, rtol=1e-6)
  # Above log(100) the value used is capped at 100 (CLIP), and None removes the cap.
  capped, m = _global(image=jnp.asarray(image), text=jnp.asarray(text),
                                  logit_scale=6.0)
  np.testing.assert_allclose(m["logit_scale"], 100.0, rtol=1e-6)
  np.testing.assert_allclose(capped, np_global(image, text, 100.0), rtol=1e-5)
  free, _ = _global(image=jnp.asarray(image), text=jnp.asarray(text),
                                logit_scale=6.0, max_logit_scale=None)
  np.testing.assert_allclose(free, np_global(image, text, math.exp(6.0)), rtol=1e-5)


def test_global_alignment_scale_is_learnable_below_the_cap_only():
  rng = np.random.default_rng(1)
  image, text = _j(rng.normal(size=(5, D)), rng.normal(size=(5, D)))
  f = jax.jit(lambda s: al.global_alignment(image=image, text=text, logit_scale=s)[0])
  assert abs(float(jax.grad(f)(jnp.float32(al.INIT_LOGIT_SCALE)))) > 1e-4
  assert float(jax.grad(f)(jnp.float32(5.0))) == 0.0


def test_global_alignment_invariances_and_perfect_alignment():
  rng = np.random.default_rng(2)
  image, text = rng.normal(size=(6, D)), rng.normal(size=(6, D))
  f = lambda i, t: float(_global(image=jnp.asarray(i), text=jnp.asarray(t),
                                             logit_scale=al.INIT_LOGIT_SCALE)[0])
  base = f(image, text)
  np.testing.assert_allclose(f(3.0 * image, 0.2 * text), base, rtol=1e-5)
  perm = rng.permutation(6)
  np.testing.assert_allclose(f(image[perm], text[perm]), base, rtol=1e-5)
  assert f(image, image + 0.01 * text) < 0.1 < base


# ----------------------------------------------------------------------------- MGCA weights
def test_clipped_attention_weights_match_numpy_quantiles():
  rng = np.random.default_rng(3)
  scores = rng.uniform(size=(4, 12))
  mask = _mask([12, 7, 1, 0], 12)
  got = al.clipped_attention_weights(scores=jnp.asarray(scores), mask=jnp.asarray(mask))
  np.testing.assert_allclose(got, np_clipped_weights(scores, mask), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.sum(got, axis=1), [1, 1, 1, 0], atol=1e-6)
  # The 10-90% clip is active: the extremes of a full row share their neighbours' weight.
  assert np.sum(np.isclose(got[0], got[0].max())) >= 2
  everything = al.clipped_attention_weights(scores=jnp.asarray(scores))
  np.testing.assert_allclose(everything, np_clipped_weights(scores, np.ones_like(mask)),
                             rtol=1e-5)


def test_attention_word_weights_use_the_cls_row_without_cls():
  rng = np.random.default_rng(4)
  heads, tokens = 3, 9
  attention = _softmax(rng.normal(size=(B, heads, tokens, tokens)) * 2, axis=-1)
  mask = _mask([9, 6, 2, 1], tokens)
  got = al.attention_word_weights(jnp.asarray(attention), jnp.asarray(mask))
  cls_row = attention[:, :, 0, :].mean(axis=1)
  words = mask & (np.arange(tokens) > 0)
  np.testing.assert_allclose(got, np_clipped_weights(cls_row, words), rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(got)[:, 0] == 0) and np.all(np.asarray(got)[~mask] == 0)
  np.testing.assert_allclose(np.sum(got, axis=1), [1, 1, 1, 0], atol=1e-6)  # row 3: only CLS
  grad = jax.grad(lambda a: jnp.sum(al.attention_word_weights(a, jnp.asarray(mask)) ** 2))(
      jnp.asarray(attention))
  np.testing.assert_array_equal(grad, 0.0)


# ----------------------------------------------------------------------------- MGCA loss
def test_mgca_matches_numpy_uniform_and_given_weights():
  patches, words, mask = _local_inputs(5)
  loss, m = _mgca(**dict(zip(("patches", "words", "word_mask"),
                                               _j(patches, words, mask))))
  want = np_mgca(patches, words, mask)
  np.testing.assert_allclose([loss, m["mgca_word"], m["mgca_patch"]], want, rtol=1e-5)
  rng = np.random.default_rng(6)
  ww, pw = rng.uniform(size=(B, W)), rng.uniform(size=(B, N))
  pmask = np.ones((B, N), bool)
  pmask[1, 4:] = False
  pmask[3, 0] = False
  for tau in (0.1, 0.5):
    got, m = _mgca(patches=jnp.asarray(patches), words=jnp.asarray(words),
                                     word_mask=jnp.asarray(mask), patch_mask=jnp.asarray(pmask),
                                     word_weights=jnp.asarray(ww), patch_weights=jnp.asarray(pw),
                                     temperature=tau)
    want = np_mgca(patches, words, mask, pmask, ww, pw, tau)
    np.testing.assert_allclose([got, m["mgca_word"], m["mgca_patch"]], want, rtol=1e-5)


def test_mgca_pads_are_irrelevant_unless_mirroring_the_reference():
  patches, words, mask = _local_inputs(7)
  junk = words.copy()
  junk[~mask] = np.random.default_rng(8).normal(size=(int((~mask).sum()), D)) * 5
  f = lambda w, quirk=False: float(_mgca(
      patches=jnp.asarray(patches), words=jnp.asarray(w), word_mask=jnp.asarray(mask),
      pads_as_negatives=quirk)[0])
  np.testing.assert_allclose(f(junk), f(words), rtol=1e-6)
  # MGCA's unmasked word -> patch direction: pads are negatives in L_word, content matters.
  np.testing.assert_allclose(f(words, True), np_mgca(patches, words, mask,
                                                     pads_as_negatives=True)[0], rtol=1e-5)
  assert abs(f(junk, True) - f(words, True)) > 1e-3


def test_mgca_invariances():
  patches, words, mask = _local_inputs(9)
  ww = np.random.default_rng(10).uniform(size=(B, W))

  def f(p, w, m, weights):
    return float(_mgca(patches=jnp.asarray(p), words=jnp.asarray(w),
                                         word_mask=jnp.asarray(m),
                                         word_weights=jnp.asarray(weights))[0])

  base = f(patches, words, mask, ww)
  np.testing.assert_allclose(f(4.0 * patches, 0.3 * words, mask, 7.0 * ww), base, rtol=1e-5)
  perm = np.array([2, 0, 3, 1])
  np.testing.assert_allclose(f(patches[perm], words[perm], mask[perm], ww[perm]), base,
                             rtol=1e-5)
  # the order of the words (with their weights) and of the patches within a sample is moot
  wp, pp = np.random.default_rng(11).permutation(W), np.random.default_rng(12).permutation(N)
  np.testing.assert_allclose(f(patches[:, pp], words[:, wp], mask[:, wp], ww[:, wp]), base,
                             rtol=1e-5)


def test_mgca_perfect_alignment_is_lower_and_filler_samples_drop_out():
  patches, words, mask = _local_inputs(13)
  f = lambda p, w, m: float(_mgca(patches=jnp.asarray(p),
                                                    words=jnp.asarray(w),
                                                    word_mask=jnp.asarray(m))[0])
  # One word per patch, word j describing patch j exactly (scale is irrelevant): both
  # directions are near 0, far below random words.
  full = np.ones((B, N), bool)
  random_words = np.random.default_rng(14).normal(size=(B, N, D))
  assert f(patches, 2.0 * patches, full) < 0.1 < 1.0 < f(patches, random_words, full)
  # A filler sample (no real word) contributes nothing and does not count in the mean.
  filler = np.concatenate([mask, np.zeros((1, W), bool)])
  np.testing.assert_allclose(
      f(np.concatenate([patches, patches[:1]]), np.concatenate([words, words[:1]]), filler),
      f(patches, words, mask), rtol=1e-5)


def test_mgca_gradients_are_finite_with_zero_pads():
  patches, words, mask = _local_inputs(14)
  words = words * mask[..., None]
  for quirk in (False, True):
    grads = jax.jit(jax.grad(lambda p, w: al.mgca_local_alignment(
        patches=p, words=w, word_mask=jnp.asarray(mask), pads_as_negatives=quirk)[0],
        argnums=(0, 1)))(*_j(patches, words))
    assert all(np.isfinite(g).all() for g in grads)
    assert np.abs(np.asarray(grads[1])[mask]).sum() > 0
    if not quirk:  # pads take no part: no gradient reaches them
      np.testing.assert_array_equal(np.asarray(grads[1])[~mask], 0.0)


# ----------------------------------------------------------------------------- GLoRIA loss
def test_gloria_matches_numpy():
  patches, words, mask = _local_inputs(15)
  for taus in ((4.0, 5.0, 10.0), (1.0, 2.0, 3.0)):
    loss, m = _gloria(regions=jnp.asarray(patches), words=jnp.asarray(words),
                                        word_mask=jnp.asarray(mask), tau1=taus[0],
                                        tau2=taus[1], tau3=taus[2])
    want = np_gloria(patches, words, mask, *taus)
    np.testing.assert_allclose([loss, m["image_to_text"], m["text_to_image"]], want, rtol=1e-5)


def test_gloria_invariances_and_perfect_alignment():
  patches, words, mask = _local_inputs(16)

  def f(p, w, m):
    return float(_gloria(regions=jnp.asarray(p), words=jnp.asarray(w),
                                           word_mask=jnp.asarray(m))[0])

  base = f(patches, words, mask)
  junk = words.copy()
  junk[~mask] = 9.0
  np.testing.assert_allclose(f(patches, junk, mask), base, rtol=1e-6)
  np.testing.assert_allclose(f(patches, words * mask[..., None], mask), base, rtol=1e-6)
  perm = np.array([3, 1, 0, 2])
  np.testing.assert_allclose(f(patches[perm], words[perm], mask[perm]), base, rtol=1e-5)
  wp, pp = np.random.default_rng(17).permutation(W), np.random.default_rng(18).permutation(N)
  np.testing.assert_allclose(f(patches[:, pp], words[:, wp], mask[:, wp]), base, rtol=1e-5)
  # Reports of equal length whose words are their image's regions: near-0 loss. (With unequal
  # lengths the sum over words favours long reports, and a one-word report's word softmax is
  # trivially 1, so its attention is uniform: GLoRIA's own behaviour.)
  full = np.ones((B, W), bool)
  assert f(patches, patches[:, :W], full) < 0.1 < 1.0 < f(patches, words, full)
  filler = np.concatenate([mask, np.zeros((1, W), bool)])
  np.testing.assert_allclose(
      f(np.concatenate([patches, patches[:1]]), np.concatenate([words, words[:1]]), filler),
      base, rtol=1e-5)


def test_gloria_gradients_are_finite_with_zero_pads():
  patches, words, mask = _local_inputs(19)
  grads = jax.jit(jax.grad(lambda p, w: al.gloria_local_alignment(
      regions=p, words=w, word_mask=jnp.asarray(mask))[0], argnums=(0, 1)))(
          *_j(patches, words * mask[..., None]))
  assert all(np.isfinite(g).all() for g in grads)
  np.testing.assert_array_equal(np.asarray(grads[1])[~mask], 0.0)
  assert np.abs(np.asarray(grads[1])[mask]).sum() > 0


def test_bad_arguments():
  patches, words, mask = _j(*_local_inputs(20))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    al.mgca_local_alignment(patches=patches, words=words, word_mask=mask, temperature=0.0)
  with pytest.raises(AssertionError):
    al.mgca_local_alignment(patches=patches, words=words[:, :, :4], word_mask=mask)
  with pytest.raises(AssertionError):
    al.gloria_local_alignment(regions=patches, words=words, word_mask=mask[:, :3])
  with pytest.raises(ValueError, match="low <= high"):
    al.clipped_attention_weights(scores=jnp.ones((2, 3)), low=0.9, high=0.1)


# ----------------------------------------------------------------------------- sharding
def test_sharded_over_8_devices_equals_single_device(mesh):
  batch = 16
  lengths = np.random.default_rng(21).integers(0, W + 1, size=batch)
  lengths[0] = W
  patches, words, mask = _local_inputs(22, batch=batch, lengths=lengths)
  weights = np.random.default_rng(23).uniform(size=(batch, W)).astype(np.float32)
  args = dict(zip(("patches", "words", "word_mask", "word_weights"),
                  _j(patches, words, mask, weights)))
  sharded = {k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in args.items()}
  assert len(sharded["words"].sharding.device_set) == 8

  losses = {
      "global": lambda a: al.global_alignment(image=a["patches"][:, 0], text=a["words"][:, 0],
                                              logit_scale=jnp.float32(al.INIT_LOGIT_SCALE)),
      "mgca": lambda a: al.mgca_local_alignment(**a),
      "gloria": lambda a: al.gloria_local_alignment(regions=a["patches"], words=a["words"],
                                                    word_mask=a["word_mask"]),
  }
  for name, fn in losses.items():
    want = jax.jit(fn)(args)  # one device
    assert len(want[0].sharding.device_set) == 1
    got = jax.jit(fn)(sharded)
    for key in want[1]:
      np.testing.assert_allclose(got[1][key], want[1][key], rtol=1e-5, err_msg=f"{name}/{key}")
    g_want = jax.jit(jax.grad(lambda p: fn({**args, "patches": p})[0]))(args["patches"])
    g_got = jax.jit(jax.grad(lambda p: fn({**sharded, "patches": p})[0]))(sharded["patches"])
    np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-6, err_msg=name)
