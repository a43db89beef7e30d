"""Distillation losses against numpy, and where their gradients go."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medguide_jax.losses import distillation as dl


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_logit_distillation_is_t2_kl_of_softened_distributions():
  rng = np.random.default_rng(0)
  s, t, w = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) * 2, np.array([1, 1, 0, 1, 1.0])
  for temp in (1.0, 2.0, 4.0):
    p, q = _softmax(t / temp), _softmax(s / temp)
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    want = temp ** 2 * (w * kl).sum() / w.sum()
    loss, m = dl.logit_distillation(student_logits=jnp.asarray(s), teacher_logits=jnp.asarray(t),
                                    temperature=temp, weights=jnp.asarray(w))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], want / temp ** 2, rtol=1e-5)
  same, _ = dl.logit_distillation(student_logits=jnp.asarray(t), teacher_logits=jnp.asarray(t))
  assert abs(float(same)) < 1e-6


def test_logit_distillation_moves_only_the_student():
  s, t = jnp.array([[0.3, -1.0]]), jnp.array([[2.0, 0.5]])
  f = lambda s, t, stop: dl.logit_distillation(student_logits=s, teacher_logits=t,
                                               temperature=2.0, stop_teacher_gradient=stop)[0]
  gs, gt = jax.grad(f, argnums=(0, 1))(s, t, True)
  assert np.abs(gs).sum() > 0 and np.abs(gt).sum() == 0
  # the student's gradient is T * (q - p) / B (T^2 times the 1/T of the softened logits)
  p, q = _softmax(np.asarray(t) / 2), _softmax(np.asarray(s) / 2)
  np.testing.assert_allclose(gs, 2.0 * (q - p), rtol=1e-5)
  _, gt = jax.grad(f, argnums=(0, 1))(s, t, False)
  assert np.abs(gt).sum() > 0


def test_feature_distillation_mse_and_cosine_with_the_stop_gradient_where_named():
  rng = np.random.default_rng(1)
  a, b, w = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), np.array([1, 0, 1, 1.0])
  cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  mse, m = dl.feature_distillation(features=jnp.asarray(a), target=jnp.asarray(b),
                                   weights=jnp.asarray(w))
  np.testing.assert_allclose(mse, (w * ((a - b) ** 2).mean(-1)).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(m["cosine"], (w * cos).sum() / w.sum(), rtol=1e-5)
  c, _ = dl.feature_distillation(features=jnp.asarray(a), target=jnp.asarray(b), kind="cosine")
  np.testing.assert_allclose(c, (1 - cos).mean(), rtol=1e-5)
  for stop, moves in (("target", (True, False)), ("features", (False, True)),
                      ("none", (True, True))):
    g = jax.grad(lambda x, y: dl.feature_distillation(features=x, target=y,
                                                      stop_gradient=stop)[0],
                 argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
    assert tuple(bool(np.abs(x).sum() > 0) for x in g) == moves, stop


def test_bad_arguments_name_themselves():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="temperature"):
    dl.logit_distillation(student_logits=x, teacher_logits=x, temperature=0.0)
  with pytest.raises(ValueError, match="kind='l1'"):
    dl.feature_distillation(features=x, target=x, kind="l1")
  with pytest.raises(ValueError, match="stop_gradient='both'"):
    dl.feature_distillation(features=x, target=x, stop_gradient="both")
  with pytest.raises(AssertionError):
    dl.feature_distillation(features=x, target=jnp.zeros((2, 4)))
