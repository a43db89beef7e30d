"""Golden-value tests of the losses; expected values come from plain numpy, not the code."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medguide_jax.losses import classification as cl

LOGITS = np.array([[2.0, 1.0, 0.1],
                   [0.5, 2.5, -1.0]], np.float32)  # [B=2, C=3]
LABELS = np.array([0, 2], np.int32)  # [B]


def _np_ce(logits, labels):
  """Per-example CE [B] via a numerically stable numpy log-sum-exp."""
  m = logits.max(axis=1, keepdims=True)
  log_z = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
  return log_z - logits[np.arange(len(labels)), labels]


def test_ce_golden_value():
  # Row 0: log(e^2 + e^1 + e^0.1) - 2; row 1: log(e^0.5 + e^2.5 + e^-1) + 1.
  by_hand = np.array([np.log(np.exp(2.0) + np.exp(1.0) + np.exp(0.1)) - 2.0,
                      np.log(np.exp(0.5) + np.exp(2.5) + np.exp(-1.0)) + 1.0])
  np.testing.assert_allclose(_np_ce(LOGITS, LABELS), by_hand, rtol=1e-6)
  loss, metrics = cl.softmax_cross_entropy(logits=jnp.asarray(LOGITS),
                                           labels=jnp.asarray(LABELS))
  np.testing.assert_allclose(loss, by_hand.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["ce"], loss)
  np.testing.assert_allclose(metrics["accuracy"], 0.5)  # row 0 right, row 1 wrong


def test_ce_class_weighted_is_keras_semantics():
  cw = np.array([0.5, 1.0, 3.0], np.float32)
  loss, _ = cl.softmax_cross_entropy(logits=jnp.asarray(LOGITS), labels=jnp.asarray(LABELS),
                                     class_weights=jnp.asarray(cw))
  # Per-sample multiplier, mean over samples (class weights are not in the denominator).
  expected = np.mean(cw[LABELS] * _np_ce(LOGITS, LABELS))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_ce_masked_and_weighted():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=6).astype(np.int32)
  mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
  cw = np.array([1.0, 2.0, 0.5, 4.0], np.float32)
  loss, metrics = cl.softmax_cross_entropy(logits=jnp.asarray(logits),
                                           labels=jnp.asarray(labels),
                                           weights=jnp.asarray(mask),
                                           class_weights=jnp.asarray(cw))
  ce = _np_ce(logits, labels)
  np.testing.assert_allclose(loss, np.sum(mask * cw[labels] * ce) / mask.sum(), rtol=1e-5)
  keep = mask > 0
  # Masked rows behave as if they were never in the batch.
  plain, _ = cl.softmax_cross_entropy(logits=jnp.asarray(logits[keep]),
                                      labels=jnp.asarray(labels[keep]),
                                      class_weights=jnp.asarray(cw))
  np.testing.assert_allclose(loss, plain, rtol=1e-5)
  acc = np.mean(logits[keep].argmax(1) == labels[keep])
  np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)


def test_ce_gradient_under_jit():
  mask = np.array([1.0, 0.0], np.float32)
  cw = np.array([2.0, 1.0, 1.0], np.float32)

  def loss_fn(logits):
    return cl.softmax_cross_entropy(logits=logits, labels=jnp.asarray(LABELS),
                                    weights=jnp.asarray(mask), class_weights=jnp.asarray(cw))[0]

  grad = jax.jit(jax.grad(loss_fn))(jnp.asarray(LOGITS))
  # d/dlogits = w_i * cw[y_i] * (softmax_i - onehot_i) / sum(w).
  p = np.exp(LOGITS - LOGITS.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  expected = (mask * cw[LABELS])[:, None] * (p - np.eye(3)[LABELS]) / mask.sum()
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_ce_all_masked_is_zero():
  loss, metrics = cl.softmax_cross_entropy(logits=jnp.asarray(LOGITS),
                                           labels=jnp.asarray(LABELS),
                                           weights=jnp.zeros(2))
  assert float(loss) == 0.0 and float(metrics["accuracy"]) == 0.0


def test_ce_bad_shapes_raise():
  with pytest.raises(AssertionError):
    cl.softmax_cross_entropy(logits=jnp.asarray(LOGITS), labels=jnp.zeros(3, jnp.int32))
  with pytest.raises(AssertionError):
    cl.softmax_cross_entropy(logits=jnp.asarray(LOGITS), labels=jnp.asarray(LABELS),
                             class_weights=jnp.ones(4))
  with pytest.raises(AssertionError):
    cl.softmax_cross_entropy(logits=jnp.asarray(LOGITS), labels=jnp.asarray(LABELS),
                             weights=jnp.ones((2, 1)))
  with pytest.raises(AssertionError):  # float labels
    cl.softmax_cross_entropy(logits=jnp.asarray(LOGITS), labels=jnp.zeros(2))


def test_multitask_ce():
  rng = np.random.default_rng(1)
  widths = (5, 3, 2)
  logits = [rng.normal(size=(4, c)).astype(np.float32) for c in widths]
  labels = np.stack([rng.integers(0, c, size=4) for c in widths], axis=1).astype(np.int32)
  mask = np.array([1, 0, 1, 1], np.float32)
  cws = [rng.uniform(0.5, 2.0, size=c).astype(np.float32) for c in widths]
  names = ("DIAG", "PN", "BWV")
  loss, metrics = cl.multitask_cross_entropy(
      logits=[jnp.asarray(l) for l in logits], labels=jnp.asarray(labels),
      mask=jnp.asarray(mask), class_weights=[jnp.asarray(c) for c in cws], task_names=names)
  per_task = [np.sum(mask * cw[labels[:, t]] * _np_ce(l, labels[:, t])) / mask.sum()
              for t, (l, cw) in enumerate(zip(logits, cws))]
  np.testing.assert_allclose(loss, np.mean(per_task), rtol=1e-5)
  assert set(metrics) == {f"{k}/{n}" for k in ("ce", "accuracy") for n in names}
  for t, n in enumerate(names):
    np.testing.assert_allclose(metrics[f"ce/{n}"], per_task[t], rtol=1e-5)
    acc = np.sum(mask * (logits[t].argmax(1) == labels[:, t])) / mask.sum()
    np.testing.assert_allclose(metrics[f"accuracy/{n}"], acc, rtol=1e-6)
  with pytest.raises(AssertionError):  # labels [B, T] with the wrong T
    cl.multitask_cross_entropy(logits=[jnp.asarray(l) for l in logits],
                               labels=jnp.asarray(labels[:, :2]), task_names=names[:2])


def test_balanced_class_weights():
  labels = np.array([0, 0, 0, 0, 1, 1, 3, 3, 3, 3, 3, 3])  # class 2 absent
  w = cl.balanced_class_weights(labels, num_classes=4)
  n, k = 12, 3
  np.testing.assert_allclose(w, [n / (k * 4), n / (k * 2), 0.0, n / (k * 6)], rtol=1e-6)
  # Over the training samples the weights average to 1 (sklearn 'balanced' property).
  np.testing.assert_allclose(w[labels].mean(), 1.0, rtol=1e-6)
  with pytest.raises(ValueError):
    cl.balanced_class_weights(np.array([0, 5]), num_classes=4)
  with pytest.raises(ValueError):
    cl.balanced_class_weights(np.zeros((2, 2), np.int64), num_classes=4)


def test_mse_with_and_without_mask():
  rng = np.random.default_rng(2)
  pred = rng.normal(size=(4, 3)).astype(np.float32)
  tgt = rng.normal(size=(4, 3)).astype(np.float32)
  loss, metrics = cl.mse(predictions=jnp.asarray(pred), targets=jnp.asarray(tgt))
  np.testing.assert_allclose(loss, np.mean((pred - tgt) ** 2), rtol=1e-6)  # global mean
  np.testing.assert_allclose(metrics["mse"], loss)
  mask = np.array([1, 0, 0, 1], np.float32)
  masked, _ = cl.mse(predictions=jnp.asarray(pred), targets=jnp.asarray(tgt),
                     mask=jnp.asarray(mask))
  np.testing.assert_allclose(masked, np.mean((pred[[0, 3]] - tgt[[0, 3]]) ** 2), rtol=1e-6)
  with pytest.raises(AssertionError):
    cl.mse(predictions=jnp.asarray(pred), targets=jnp.asarray(tgt[:, :2]))
