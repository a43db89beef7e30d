"""Tests for the HybridMED text towers (medguide_jax/models/text.py).

Golden values come from independent numpy forwards (post-LN BERT written from HF's
BertModel, and full re-runs of the decoder for greedy decoding and scoring), never from the
code under test.
"""
from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from medguide_jax import paths
from medguide_jax.models import text

V, D, LAYERS, HEADS, MLP, MAX_LEN = 50, 32, 2, 4, 64, 16
PAD, BOS, EOS = text.PAD_ID, text.BOS_ID, text.EOS_ID
KEY = jax.random.PRNGKey(0)


def _perturb(params, seed, scale=0.3):
  """Every leaf replaced by N(0, scale) noise (LayerNorm scales 1 + noise), so outputs are
  far from the near-constant ones of the N(0, 0.02) init and every weight matters."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    noise = rng.normal(scale=scale, size=leaf.shape).astype(np.float32)
    return jnp.asarray(noise + (1.0 if paths.path_str(path).endswith("scale") else 0.0))
  return jax.tree_util.tree_map_with_path(one, params)


def _encoder(**kw):
  return text.BertEncoder(V, hidden=D, layers=LAYERS, heads=HEADS, mlp=MLP, max_len=MAX_LEN,
                          **kw)


def _decoders(**kw):
  kw = {"vocab_size": V, "hidden": D, "layers": LAYERS, "heads": HEADS, "mlp": MLP,
        "max_len": MAX_LEN, "dropout": 0.0, **kw}
  return text.ReportDecoders(**kw)


def _batch(b=3, length=7, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, V, size=(b, length)).astype(np.int32)
  lengths = np.array([length, 4, 2, 5, 6][:b])
  mask = np.arange(length)[None] < lengths[:, None]
  ids[:, 0] = BOS
  return np.where(mask, ids, PAD).astype(np.int32), mask


def _memory(b=3, m=5, width=D, seed=1):
  rng = np.random.default_rng(seed)
  memory = rng.normal(size=(b, m, width)).astype(np.float32)
  mask = np.arange(m)[None] < np.array([m, 3, 1, 4, 2][:b])[:, None]
  return memory, mask


# ---------------------------------------------------------------------------
# BertEncoder
# ---------------------------------------------------------------------------


def _np_layernorm(x, p, eps=1e-12):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_bert(p, ids, mask, types, heads):
  """HF BertModel's forward in numpy (float64): [D, D] Linear weights, heads split from
  channels by view(B, L, H, Dh), extended mask (1 - mask) * finfo(float32).min."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  b, length = ids.shape
  e = p["embeddings"]
  x = (e["word"]["embedding"][ids] + e["position"]["embedding"][:length][None]
       + e["token_type"]["embedding"][types])
  x = _np_layernorm(x, e["norm"])
  extended = (1.0 - mask[:, None, None, :]) * np.finfo(np.float32).min
  width = x.shape[-1]
  dh = width // heads

  def split(t):
    return t.reshape(b, length, heads, dh).transpose(0, 2, 1, 3)

  probs = None
  for i in range(len([k for k in p if k.startswith("layer_")])):
    lp = p[f"layer_{i}"]
    a = lp["attention"]
    q, k, v = (split(x @ a[n]["kernel"].reshape(width, width) + a[n]["bias"].reshape(width))
               for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + extended
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, width)
    out = ctx @ a["out"]["kernel"].reshape(width, width) + a["out"]["bias"]
    x = _np_layernorm(x + out, lp["attention_norm"])
    h = x @ lp["mlp"]["intermediate"]["kernel"] + lp["mlp"]["intermediate"]["bias"]
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    h = h @ lp["mlp"]["output"]["kernel"] + lp["mlp"]["output"]["bias"]
    x = _np_layernorm(x + h, lp["mlp_norm"])
  pooled = np.tanh(x[:, 0] @ p["pooler"]["kernel"] + p["pooler"]["bias"])
  return x, pooled, probs


def test_encoder_parameter_tree():
  ids, mask = _batch()
  params = _encoder().init(KEY, ids, mask)["params"]
  dh = D // HEADS
  want = {"embeddings/word/embedding": (V, D), "embeddings/position/embedding": (MAX_LEN, D),
          "embeddings/token_type/embedding": (2, D), "embeddings/norm/scale": (D,),
          "embeddings/norm/bias": (D,), "pooler/kernel": (D, D), "pooler/bias": (D,)}
  for i in range(LAYERS):
    for n in ("query", "key", "value"):
      want[f"layer_{i}/attention/{n}/kernel"] = (D, HEADS, dh)
      want[f"layer_{i}/attention/{n}/bias"] = (HEADS, dh)
    want[f"layer_{i}/attention/out/kernel"] = (HEADS, dh, D)
    want[f"layer_{i}/attention/out/bias"] = (D,)
    want[f"layer_{i}/mlp/intermediate/kernel"] = (D, MLP)
    want[f"layer_{i}/mlp/intermediate/bias"] = (MLP,)
    want[f"layer_{i}/mlp/output/kernel"] = (MLP, D)
    want[f"layer_{i}/mlp/output/bias"] = (D,)
    for n in ("attention_norm", "mlp_norm"):
      want[f"layer_{i}/{n}/scale"] = (D,)
      want[f"layer_{i}/{n}/bias"] = (D,)
  got = {k: tuple(v.shape) for k, v in paths.flatten(params).items()}
  assert got == want
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
  # BERT's initializer_range.
  assert np.std(np.asarray(params["embeddings"]["word"]["embedding"])) == pytest.approx(
      0.02, rel=0.15)
  no_pooler = _encoder(pooler=False).init(KEY, ids, mask)["params"]
  assert "pooler" not in no_pooler


def test_encoder_matches_numpy_bert():
  ids, mask = _batch()
  types = (np.arange(ids.shape[1])[None] >= 3).astype(np.int32) * np.ones_like(ids)
  model = _encoder()
  params = _perturb(model.init(KEY, ids, mask)["params"], seed=3)
  out = model.apply({"params": params}, ids, mask, token_types=types, return_attention=True)
  tokens, pooled, probs = _np_bert(params, ids, mask.astype(np.float64), types, HEADS)
  assert out["tokens"].dtype == jnp.float32 and out["tokens"].shape == (3, 7, D)
  np.testing.assert_allclose(out["tokens"], tokens, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out["pooled"], pooled, atol=1e-5, rtol=1e-5)
  assert out["attention"].shape == (3, HEADS, 7, 7)
  np.testing.assert_allclose(out["attention"], probs, atol=1e-5)
  # Padded keys get no weight at all.
  assert np.all(np.asarray(out["attention"])[~np.broadcast_to(mask[:, None, None, :],
                                                              probs.shape)] == 0)
  plain = _encoder(pooler=False)
  out = plain.apply({"params": {k: v for k, v in params.items() if k != "pooler"}}, ids, mask)
  np.testing.assert_allclose(out["pooled"], out["tokens"][:, 0])
  assert "attention" not in out


def test_encoder_ignores_pad_content():
  ids, mask = _batch()
  model = _encoder()
  params = _perturb(model.init(KEY, ids, mask)["params"], seed=4)
  other = np.where(mask, ids, np.random.default_rng(9).integers(4, V, size=ids.shape))
  a = model.apply({"params": params}, ids, mask)
  b = model.apply({"params": params}, other.astype(np.int32), mask)
  np.testing.assert_allclose(np.asarray(a["tokens"])[mask], np.asarray(b["tokens"])[mask],
                             atol=1e-6)
  np.testing.assert_allclose(a["pooled"], b["pooled"], atol=1e-6)


def test_encoder_dropout_only_in_training():
  ids, mask = _batch()
  model = _encoder()
  variables = model.init(KEY, ids, mask)
  eval_a = model.apply(variables, ids, mask)["tokens"]
  eval_b = model.apply(variables, ids, mask, train=False)["tokens"]
  train = model.apply(variables, ids, mask, train=True,
                      rngs={"dropout": jax.random.PRNGKey(1)})["tokens"]
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(eval_a, train)
  with pytest.raises(ValueError, match="max_len"):
    model.apply(variables, np.zeros((1, MAX_LEN + 1), np.int32), np.ones((1, MAX_LEN + 1)))


# ---------------------------------------------------------------------------
# ReportDecoders
# ---------------------------------------------------------------------------


def _init_decoders(model, seed=5, width=D, branch="summariser"):
  ids, _ = _batch()
  memory, mask = _memory(width=width)
  return _perturb(model.init(KEY, ids, memory, mask, branch=branch)["params"], seed)


def _count(params):
  return sum(np.size(x) for x in jax.tree.leaves(params))


def test_decoder_parameter_names_show_the_sharing():
  params = _init_decoders(_decoders())
  layer = set(params["layer_0"])
  assert layer == {"self_attention", "self_attention_norm", "mlp", "mlp_norm",
                   "cross_attention_summariser", "cross_attention_norm_summariser",
                   "cross_attention_captioner", "cross_attention_norm_captioner"}
  assert set(params) == {"token_embed", "position_embed", "layer_0", "layer_1",
                         "final_norm", "output_bias", "memory_summariser",
                         "memory_captioner"}
  shared = _init_decoders(_decoders(share_cross_attention=True))
  assert set(shared["layer_0"]) == {"self_attention", "self_attention_norm", "mlp",
                                    "mlp_norm", "cross_attention", "cross_attention_norm"}
  assert {"memory_summariser", "memory_captioner"} <= set(shared)


def test_decoder_parameter_count_grows_by_cross_attention_only():
  dm_sum, dm_cap = D, 24   # findings tokens, and image tokens of another width
  two = _count(_decoders(memory_dims=(dm_sum, dm_cap)).init(
      KEY, *_batch()[:1], *_memory(width=dm_sum), branch="summariser")["params"])
  one = _count(_decoders(branches=("summariser",), memory_dims=(dm_sum,)).init(
      KEY, *_batch()[:1], *_memory(width=dm_sum), branch="summariser")["params"])
  cross = 3 * (D * D + D) + (D * D + D)   # q, k, v from the projected memory; out
  norm = 2 * D
  projection = dm_cap * D + D
  assert two - one == LAYERS * (cross + norm) + projection
  shared_two = _count(_decoders(memory_dims=(dm_sum, dm_cap), share_cross_attention=True)
                      .init(KEY, *_batch()[:1], *_memory(width=dm_sum),
                            branch="summariser")["params"])
  shared_one = _count(_decoders(branches=("summariser",), memory_dims=(dm_sum,),
                                share_cross_attention=True)
                      .init(KEY, *_batch()[:1], *_memory(width=dm_sum),
                            branch="summariser")["params"])
  assert shared_two - shared_one == projection
  assert shared_one == one


def test_decoder_branches_and_errors():
  model = _decoders(memory_dims=(D, 24))
  params = _init_decoders(model)
  ids, _ = _batch()
  memory, mask = _memory()
  image, image_mask = _memory(width=24, seed=2)
  summary = model.apply({"params": params}, ids, memory, mask, branch="summariser")
  caption = model.apply({"params": params}, ids, image, image_mask, branch="captioner")
  assert summary.shape == caption.shape == (3, 7, V) and summary.dtype == jnp.float32
  with pytest.raises(ValueError, match=r"Unknown decoder branch 'teacher'.*summariser"):
    model.apply({"params": params}, ids, memory, mask, branch="teacher")
  with pytest.raises(ValueError, match="width 24"):
    model.apply({"params": params}, ids, memory, mask, branch="captioner")
  with pytest.raises(ValueError, match="max_len"):
    text.greedy_decode(model, params, memory, mask, branch="summariser",
                       max_len=MAX_LEN + 1)


def test_decoder_is_causal_and_honours_memory_mask():
  model = _decoders()
  params = _init_decoders(model)
  ids, _ = _batch()
  memory, mask = _memory()
  base = np.asarray(model.apply({"params": params}, ids, memory, mask, branch="captioner"))
  later = ids.copy()
  later[:, 4:] = (later[:, 4:] + 7) % V
  changed = np.asarray(model.apply({"params": params}, later, memory, mask,
                                   branch="captioner"))
  np.testing.assert_allclose(changed[:, :4], base[:, :4], atol=1e-6)
  assert not np.allclose(changed[:, 4:], base[:, 4:])
  noisy = np.where(mask[..., None], memory, 100.0 * np.random.default_rng(3).normal(
      size=memory.shape)).astype(np.float32)
  masked = np.asarray(model.apply({"params": params}, ids, noisy, mask, branch="captioner"))
  np.testing.assert_allclose(masked, base, atol=1e-6)
  unmasked = np.asarray(model.apply({"params": params}, ids, noisy, np.ones_like(mask),
                                    branch="captioner"))
  assert not np.allclose(unmasked, base)


@pytest.mark.parametrize("branch,share", [("summariser", False), ("captioner", True)])
def test_cached_decoding_matches_full_forward(branch, share):
  model = _decoders(share_cross_attention=share)
  params = _init_decoders(model, branch=branch)
  ids, _ = _batch()
  memory, mask = _memory()
  full = np.asarray(model.apply({"params": params}, ids, memory, mask, branch=branch))
  cache = text.init_cache(model, params, memory, mask, branch=branch, length=10)
  # A 3-token prefix in one call, then one token at a time.
  first, cache = text.decode_step(model, params, cache, ids[:, :3], branch=branch)
  steps = [np.asarray(first)]
  for t in range(3, ids.shape[1]):
    logits, cache = text.decode_step(model, params, cache, ids[:, t:t + 1], branch=branch)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)
  assert int(cache["index"]) == ids.shape[1]


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def _eos_heavy(params, boost=2.0):
  """EOS made likely, so that sequences end at different steps."""
  return {**params, "output_bias": params["output_bias"].at[EOS].add(boost)}


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _full_logits(model, params, memory, mask, prefix, branch):
  return np.asarray(model.apply({"params": params}, prefix.astype(np.int32), memory, mask,
                                branch=branch))


def _np_greedy(model, params, memory, mask, branch, max_len):
  """Re-runs the full (uncached) forward on the prefix at every step; numpy argmax. The
  prefix is padded to max_len (causal attention: the padding cannot reach position t), so
  one jitted shape serves every step."""
  forward = jax.jit(lambda ids: model.apply({"params": params}, ids, memory, mask,
                                            branch=branch))
  prefix = np.full((memory.shape[0], max_len), PAD, np.int32)
  prefix[:, 0] = BOS
  done = np.zeros(memory.shape[0], bool)
  out = []
  for t in range(max_len):
    token = np.asarray(forward(prefix))[:, t].argmax(-1)
    token = np.where(done, PAD, token)
    out.append(token)
    done |= token == EOS
    if t + 1 < max_len:
      prefix[:, t + 1] = token
  return np.stack(out, axis=1)


def _np_scores(model, params, memory, mask, seqs, branch, alpha):
  """log p(y) / ((5 + |y|) / 6) ** alpha, |y| up to and including the first EOS."""
  seqs = np.asarray(seqs)
  prefix = np.concatenate([np.full((seqs.shape[0], 1), BOS), seqs[:, :-1]], axis=1)
  logp = _np_log_softmax(_full_logits(model, params, memory, mask, prefix, branch))
  token_logp = np.take_along_axis(logp, seqs[..., None], axis=-1)[..., 0]
  is_eos = seqs == EOS
  length = np.where(is_eos.any(1), is_eos.argmax(1) + 1, seqs.shape[1])
  valid = np.arange(seqs.shape[1])[None] < length[:, None]
  return (token_logp * valid).sum(1) / ((5.0 + length) / 6.0)**alpha


def _assert_pad_after_eos(seqs):
  seqs = np.asarray(seqs)
  for row in seqs:
    hits = np.flatnonzero(row == EOS)
    if hits.size:
      assert np.all(row[hits[0] + 1:] == PAD), row


def test_greedy_matches_full_forward_argmax():
  model = _decoders()
  params = _eos_heavy(_init_decoders(model, seed=6), boost=4.0)
  memory, mask = _memory(b=5)
  got = np.asarray(text.greedy_decode(model, params, memory, mask, branch="summariser",
                                      max_len=10))
  want = _np_greedy(model, params, memory, mask, "summariser", 10)
  np.testing.assert_array_equal(got, want)
  assert got.shape == (5, 10) and got.dtype == np.int32
  _assert_pad_after_eos(got)
  ended = (got == EOS).any(1)
  assert ended.any() and not ended.all() and (got[ended][:, -1] == PAD).all()
  # The memory mask is honoured: masked memory content changes nothing.
  noisy = np.where(mask[..., None], memory, 50.0).astype(np.float32)
  np.testing.assert_array_equal(
      text.greedy_decode(model, params, noisy, mask, branch="summariser", max_len=10), got)


def test_beam_size_one_is_greedy():
  model = _decoders()
  params = _eos_heavy(_init_decoders(model, seed=6), boost=4.0)
  memory, mask = _memory(b=5)
  greedy = text.greedy_decode(model, params, memory, mask, branch="summariser", max_len=9)
  beam, score = text.beam_search(model, params, memory, mask, branch="summariser",
                                 max_len=9, beam_size=1, alpha=0.6)
  assert (np.asarray(greedy) == EOS).any()
  np.testing.assert_array_equal(beam, greedy)
  np.testing.assert_allclose(
      score, _np_scores(model, params, memory, mask, greedy, "summariser", 0.6), atol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_beats_greedy(alpha):
  model = _decoders()
  params = _eos_heavy(_init_decoders(model, seed=6))
  memory, mask = _memory(b=5, seed=4)
  greedy = text.greedy_decode(model, params, memory, mask, branch="captioner", max_len=9)
  beam, score = text.beam_search(model, params, memory, mask, branch="captioner",
                                 max_len=9, beam_size=4, alpha=alpha)
  assert beam.shape == (5, 9) and score.shape == (5,)
  assert (np.asarray(beam)[:, :-1] == EOS).any()   # some hypotheses ended early
  _assert_pad_after_eos(beam)
  # The returned score is the sequence's score, recomputed by a full forward.
  np.testing.assert_allclose(
      score, _np_scores(model, params, memory, mask, beam, "captioner", alpha), atol=1e-4)
  greedy_score = _np_scores(model, params, memory, mask, greedy, "captioner", alpha)
  assert np.all(np.asarray(score) >= greedy_score - 1e-5)
  assert np.any(np.asarray(score) > greedy_score + 1e-3)
  # Masked memory content changes nothing.
  noisy = np.where(mask[..., None], memory, -30.0).astype(np.float32)
  again, _ = text.beam_search(model, params, noisy, mask, branch="captioner", max_len=9,
                              beam_size=4, alpha=alpha)
  np.testing.assert_array_equal(again, beam)


def test_wide_beam_finds_the_best_sequence():
  """With a beam wider than every candidate set, beam search is exhaustive: it must return
  the best of all sequences (brute force over a 6-token vocabulary, 3 steps)."""
  vocab, steps = 6, 3
  model = _decoders(vocab_size=vocab)
  params = _init_decoders(model, seed=9)
  memory, mask = _memory(b=2, seed=6)
  ids, score = text.beam_search(model, params, memory, mask, branch="summariser",
                                max_len=steps, beam_size=32, alpha=0.6)
  every = np.array(list(itertools.product(range(vocab), repeat=steps)))
  # Everything after the first EOS becomes pad (as decoding writes it).
  after_eos = np.cumsum(np.cumsum(every == EOS, axis=1), axis=1) > 1
  every = np.unique(np.where(after_eos, PAD, every), axis=0)
  for i in range(2):
    rep = lambda a: np.repeat(a[i:i + 1], len(every), axis=0)
    scores = _np_scores(model, params, rep(memory), rep(mask), every, "summariser", 0.6)
    np.testing.assert_array_equal(ids[i], every[scores.argmax()])
    np.testing.assert_allclose(score[i], scores.max(), atol=1e-4)
  # The optimum ends at EOS for one example and runs to max_len for the other, and greedy
  # decoding misses it for the first.
  assert (np.asarray(ids) == EOS).any(1).tolist() == [True, False]
  greedy = text.greedy_decode(model, params, memory, mask, branch="summariser", max_len=steps)
  assert _np_scores(model, params, memory, mask, greedy, "summariser", 0.6)[0] < score[0] - 0.1


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  ids, mask = _batch()
  memory, memory_mask = _memory()
  enc = _encoder(dtype=jnp.bfloat16)
  variables = enc.init(KEY, ids, mask)
  out = enc.apply(variables, ids, mask, return_attention=True)
  exact = _encoder().apply(variables, ids, mask)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  assert all(x.dtype == jnp.float32 for x in out.values())
  np.testing.assert_allclose(out["tokens"], exact["tokens"], atol=0.1)
  dec = _decoders(dtype=jnp.bfloat16)
  params = dec.init(KEY, ids, memory, memory_mask, branch="captioner")["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert dec.apply({"params": params}, ids, memory, memory_mask,
                   branch="captioner").dtype == jnp.float32
  ids_out, score = text.beam_search(dec, params, memory, memory_mask, branch="captioner",
                                    max_len=5, beam_size=2)
  assert ids_out.shape == (3, 5) and np.all(np.isfinite(score))


# ---------------------------------------------------------------------------
# Tower naming
# ---------------------------------------------------------------------------


def test_tower_regexes_partition_the_parameters():
  model = text.TextTowers(txt=_encoder(), dec=_decoders(memory_dims=(D, 24)))
  ids, mask = _batch()
  variables = model.init(KEY, ids, mask, ids)
  out = model.apply(variables, ids, mask, ids)
  assert out["logits"].shape == (3, 7, V) and out["findings"]["tokens"].shape == (3, 7, D)
  names = paths.paths(variables["params"])
  assert any(n.startswith("dec/memory_captioner/") for n in names)   # both branches built
  hits = {tower: {n for n in names if re.fullmatch(regex, n)}
          for tower, regex in text.TOWER_REGEXES.items()}
  assert not hits["img"]   # the image tower joins in the full model
  assert hits["txt"] and hits["dec"] and not hits["txt"] & hits["dec"]
  assert hits["txt"] | hits["dec"] == set(names)
  mask_tree = paths.fullmatch_mask(variables["params"], text.TOWER_REGEXES["dec"])
  assert _count(variables["params"]["dec"]) == sum(
      np.size(x) for x, m in zip(jax.tree.leaves(variables["params"]),
                                 jax.tree.leaves(mask_tree)) if m)
