"""hybridmed's generation losses (L_Sum, L_Cap) and token distillation (L_Dis) against numpy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medguide_jax import parallel
from medguide_jax.losses import distillation as dl
from medguide_jax.losses import generation as gen

B, L, V = 4, 7, 11
LENGTHS = np.array([7, 4, 1, 5])  # scored tokens per sequence


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def np_token_ce(logits, targets, mask, eps=0.0):
  """Sum over scored tokens of -sum_v y_v log p_v, y = (1 - eps) onehot + eps / V; / count."""
  total, count = 0.0, 0
  for b in range(logits.shape[0]):
    for t in range(logits.shape[1]):
      if mask[b, t]:
        log_p = _log_softmax(logits[b, t])
        y = np.full(log_p.shape, eps / log_p.size)
        y[targets[b, t]] += 1.0 - eps
        total += -(y * log_p).sum()
        count += 1
  return total / count


def np_token_kl(student, teacher, mask, temperature):
  total, count = 0.0, 0
  for b in range(student.shape[0]):
    for t in range(student.shape[1]):
      if mask[b, t]:
        log_p = _log_softmax(teacher[b, t] / temperature)
        log_q = _log_softmax(student[b, t] / temperature)
        total += temperature ** 2 * (np.exp(log_p) * (log_p - log_q)).sum()
        count += 1
  return total / count


def _inputs(seed=0, batch=B, lengths=LENGTHS):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(batch, L, V)) * 2).astype(np.float32)
  targets = rng.integers(0, V, size=(batch, L)).astype(np.int32)
  mask = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
  return logits, targets, mask


_ce = jax.jit(gen.token_cross_entropy, static_argnames=("label_smoothing", "reduction"))
_kd = jax.jit(dl.token_distillation, static_argnames=("temperature",))


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() != 8:
    pytest.skip("needs the 8 host devices tests/conftest.py asks for")
  return parallel.make_mesh()


# ----------------------------------------------------------------------------- teacher forcing
def test_shift_for_teacher_forcing():
  cls, sep, pad = 101, 102, 0
  ids = np.array([[cls, 7, 8, 9, sep, pad], [cls, 5, sep, pad, pad, pad], [cls, 1, 2, 3, 4, sep]])
  mask = ids != pad
  inputs, targets, target_mask = gen.shift_for_teacher_forcing(jnp.asarray(ids),
                                                               jnp.asarray(mask))
  np.testing.assert_array_equal(inputs, ids[:, :-1])
  np.testing.assert_array_equal(targets, ids[:, 1:])
  assert target_mask.dtype == jnp.bool_
  # the scored targets are the words and [SEP]; [CLS] is never a target, pads never scored
  np.testing.assert_array_equal(np.asarray(targets)[np.asarray(target_mask)],
                                [7, 8, 9, sep, 5, sep, 1, 2, 3, 4, sep])
  with pytest.raises(ValueError, match="at least 2 tokens"):
    gen.shift_for_teacher_forcing(jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1), bool))


# ----------------------------------------------------------------------------- token CE
def test_token_ce_matches_numpy_and_optax():
  logits, targets, mask = _inputs(1)
  args = dict(logits=jnp.asarray(logits), targets=jnp.asarray(targets), mask=jnp.asarray(mask))
  loss, m = _ce(**args)
  np.testing.assert_allclose(loss, np_token_ce(logits, targets, mask), rtol=1e-5)
  plain = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits),
                                                          jnp.asarray(targets))
  np.testing.assert_allclose(loss, np.sum(np.asarray(plain) * mask) / mask.sum(), rtol=1e-6)
  pred = np.argmax(logits, -1) == targets
  np.testing.assert_allclose(m["token_accuracy"], pred[mask].mean(), rtol=1e-6)
  assert float(m["num_tokens"]) == mask.sum()
  for eps in (0.1, 0.3):
    smoothed, _ = _ce(**args, label_smoothing=eps)
    np.testing.assert_allclose(smoothed, np_token_ce(logits, targets, mask, eps), rtol=1e-5)
    labels = optax.smooth_labels(jax.nn.one_hot(targets, V), eps)
    by_optax = optax.softmax_cross_entropy(jnp.asarray(logits), labels)
    np.testing.assert_allclose(smoothed, np.sum(np.asarray(by_optax) * mask) / mask.sum(),
                               rtol=1e-5)


def test_token_ce_is_a_per_token_mean_and_none_reduction():
  logits, targets, mask = _inputs(2)
  args = dict(logits=jnp.asarray(logits), targets=jnp.asarray(targets), mask=jnp.asarray(mask))
  per_token, m = _ce(**args, reduction="none")
  assert per_token.shape == (B, L)
  np.testing.assert_array_equal(np.asarray(per_token)[~mask], 0.0)
  np.testing.assert_array_equal(np.asarray(m["correct"])[~mask], 0.0)
  loss, _ = _ce(**args)
  np.testing.assert_allclose(loss, np.asarray(per_token).sum() / mask.sum(), rtol=1e-6)
  per_sequence = np.mean(np.asarray(per_token).sum(1) / mask.sum(1))
  assert abs(float(loss) - per_sequence) > 1e-3  # not the mean of per-sequence means


def test_token_ce_invariances():
  logits, targets, mask = _inputs(3)
  f = lambda lg, tg, mk: float(_ce(logits=jnp.asarray(lg), targets=jnp.asarray(tg),
                                   mask=jnp.asarray(mk))[0])
  base = f(logits, targets, mask)
  junk_logits, junk_targets = logits.copy(), targets.copy()
  junk_logits[~mask] = np.inf
  junk_logits[2, -1, :3] = np.nan  # a pad query that attended to nothing
  junk_targets[~mask] = 0
  np.testing.assert_allclose(f(junk_logits, junk_targets, mask), base, rtol=1e-6)
  perm = np.array([2, 3, 0, 1])
  np.testing.assert_allclose(f(logits[perm], targets[perm], mask[perm]), base, rtol=1e-6)
  perfect = jax.nn.one_hot(targets, V) * 30.0
  assert f(perfect, targets, mask) < 1e-6 < base
  grad = jax.grad(lambda lg: _ce(logits=lg, targets=jnp.asarray(targets),
                                 mask=jnp.asarray(mask))[0])(jnp.asarray(junk_logits))
  np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
  assert np.isfinite(grad).all()


def test_token_ce_bad_arguments():
  logits, targets, mask = (jnp.asarray(x) for x in _inputs(4))
  with pytest.raises(ValueError, match="label_smoothing"):
    gen.token_cross_entropy(logits=logits, targets=targets, mask=mask, label_smoothing=1.0)
  with pytest.raises(ValueError, match="reduction"):
    gen.token_cross_entropy(logits=logits, targets=targets, mask=mask, reduction="sum")
  with pytest.raises(AssertionError):
    gen.token_cross_entropy(logits=logits, targets=targets[:, 1:], mask=mask)
  with pytest.raises(AssertionError):
    gen.token_cross_entropy(logits=logits, targets=targets.astype(jnp.float32), mask=mask)


# ----------------------------------------------------------------------------- token distillation
def test_token_distillation_is_per_token_t2_kl():
  student, _, mask = _inputs(5)
  teacher = _inputs(6)[0] * 1.5
  for temp in (1.0, 2.0, 4.0):
    loss, m = _kd(student_logits=jnp.asarray(student), teacher_logits=jnp.asarray(teacher),
                  mask=jnp.asarray(mask), temperature=temp)
    want = np_token_kl(student, teacher, mask, temp)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], want / temp ** 2, rtol=1e-5)
  same, _ = _kd(student_logits=jnp.asarray(teacher), teacher_logits=jnp.asarray(teacher),
                mask=jnp.asarray(mask), temperature=2.0)
  assert abs(float(same)) < 1e-6


def test_token_distillation_moves_only_the_student_and_ignores_pads():
  student, _, mask = _inputs(7)
  teacher = _inputs(8)[0]
  f = lambda s, t: dl.token_distillation(student_logits=s, teacher_logits=t,
                                         mask=jnp.asarray(mask), temperature=2.0)[0]
  gs, gt = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(student), jnp.asarray(teacher))
  np.testing.assert_array_equal(gt, 0.0)
  np.testing.assert_array_equal(np.asarray(gs)[~mask], 0.0)
  assert np.abs(np.asarray(gs)[mask]).sum() > 0
  junk_s, junk_t = student.copy(), teacher.copy()
  junk_s[~mask], junk_t[~mask] = np.nan, 50.0
  np.testing.assert_allclose(jax.jit(f)(junk_s, junk_t), jax.jit(f)(student, teacher),
                             rtol=1e-6)


# ----------------------------------------------------------------------------- sharding
def test_sharded_over_8_devices_equals_single_device(mesh):
  batch = 16
  lengths = np.random.default_rng(9).integers(1, L + 1, size=batch)
  logits, targets, mask = _inputs(10, batch=batch, lengths=lengths)
  teacher = _inputs(11, batch=batch)[0]
  args = dict(logits=logits, targets=targets, mask=mask, teacher=teacher)
  single = {k: jnp.asarray(v) for k, v in args.items()}
  sharded = {k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in single.items()}
  assert len(sharded["logits"].sharding.device_set) == 8

  def fn(a):
    ce, ce_m = gen.token_cross_entropy(logits=a["logits"], targets=a["targets"],
                                       mask=a["mask"], label_smoothing=0.1)
    kd, kd_m = dl.token_distillation(student_logits=a["logits"], teacher_logits=a["teacher"],
                                     mask=a["mask"], temperature=2.0)
    return {"ce": ce, "kd": kd, **ce_m, **kd_m}

  want = jax.jit(fn)(single)
  got = jax.jit(fn)(sharded)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
