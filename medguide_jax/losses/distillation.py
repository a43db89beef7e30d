"""Distillation losses: pure, keyword-only, float32, masked means over the batch.

Bidirectional distillation (missing_modality, Zhang et al. 2023; METHODS.md 2(a)):
  M -> S  `logit_distillation`: T^2 KL(softmax(sg(z_teacher) / T) || softmax(z_student / T))
          (Hinton et al. 2015's form; T^2 keeps the gradient scale independent of T);
  S -> M  `feature_distillation`: MSE or cosine distance between two feature vectors, with
          the stop-gradient on the side `stop_gradient` names.
Which side is the teacher is the caller's choice: these functions stop the gradient where
they are told to and nowhere else, so the same functions serve either direction.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from medguide_jax.losses.classification import _safe_divide

Metrics = dict[str, jnp.ndarray]


def _weights(weights: jnp.ndarray | None, batch: int) -> jnp.ndarray:
  if weights is None:
    return jnp.ones((batch,), jnp.float32)
  chex.assert_shape(weights, (batch,))
  return weights.astype(jnp.float32)


def logit_distillation(*, student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
                       temperature: float = 1.0, weights: jnp.ndarray | None = None,
                       stop_teacher_gradient: bool = True) -> tuple[jnp.ndarray, Metrics]:
  """T^2 * mean_i w_i KL(p_teacher,i || p_student,i) with p = softmax(logits / T).

  Args:
    student_logits, teacher_logits: [B, C].
    temperature: T > 0.
    weights: [B] per-example weights (padding mask); the mean's normaliser.
    stop_teacher_gradient: no gradient reaches the teacher's logits (the default, and the
      point of distillation); False lets both sides move (a symmetric agreement term).

  Returns:
    (loss, {'kl': the un-scaled mean KL}).
  """
  chex.assert_rank(student_logits, 2)
  chex.assert_equal_shape([student_logits, teacher_logits])
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  t = jnp.float32(temperature)
  teacher = teacher_logits.astype(jnp.float32)
  if stop_teacher_gradient:
    teacher = jax.lax.stop_gradient(teacher)
  log_p = jax.nn.log_softmax(teacher / t, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [B]
  w = _weights(weights, kl.shape[0])
  mean_kl = _safe_divide(jnp.sum(w * kl), jnp.sum(w))
  return t * t * mean_kl, {"kl": mean_kl}


def feature_distillation(*, features: jnp.ndarray, target: jnp.ndarray, kind: str = "mse",
                         stop_gradient: str = "target", weights: jnp.ndarray | None = None
                         ) -> tuple[jnp.ndarray, Metrics]:
  """Mean over the batch of d(features_i, target_i).

  Args:
    features, target: [B, D].
    kind: 'mse' (mean over D of the squared difference) or 'cosine' (1 - cosine similarity).
    stop_gradient: 'target' (only `features` moves toward the target: distillation),
      'features', or 'none'.
    weights: [B] per-example weights (padding mask).

  Returns:
    (loss, {'cosine': the mean cosine similarity, whatever `kind`}).
  """
  chex.assert_rank(features, 2)
  chex.assert_equal_shape([features, target])
  if stop_gradient not in ("target", "features", "none"):
    raise ValueError(f"stop_gradient={stop_gradient!r}; valid: 'target', 'features', 'none'")
  f, g = features.astype(jnp.float32), target.astype(jnp.float32)
  if stop_gradient == "target":
    g = jax.lax.stop_gradient(g)
  elif stop_gradient == "features":
    f = jax.lax.stop_gradient(f)
  norm = lambda x: jnp.maximum(jnp.linalg.norm(x, axis=-1), 1e-8)
  cosine = jnp.sum(f * g, axis=-1) / (norm(f) * norm(g))
  if kind == "mse":
    d = jnp.mean(jnp.square(f - g), axis=-1)
  elif kind == "cosine":
    d = 1.0 - cosine
  else:
    raise ValueError(f"feature distillation kind={kind!r}; valid: 'mse', 'cosine'")
  w = _weights(weights, d.shape[0])
  return (_safe_divide(jnp.sum(w * d), jnp.sum(w)),
          {"cosine": _safe_divide(jnp.sum(w * cosine), jnp.sum(w))})


def token_distillation(*, student_logits: jnp.ndarray, teacher_logits: jnp.ndarray,
                       mask: jnp.ndarray, temperature: float = 1.0
                       ) -> tuple[jnp.ndarray, Metrics]:
  """hybridmed's L_Dis: per-token T^2 KL(p_teacher(.; T) || p_student(.; T)) (nats per token).

  loss = T^2 sum_{b,t} mask[b,t] KL_bt / sum_{b,t} mask[b,t], p = softmax(logits / T) over the
  vocabulary, the teacher (the frozen summarisation branch) under stop_gradient. The paper's
  form sums over the tokens of a sequence (METHODS.md 3(a)); this is the mean over the real
  tokens of the whole batch, the normalisation of `generation.token_cross_entropy`, so L_Dis
  and L_Cap are on one scale and the value does not depend on how the batch is sharded.
  It is `logit_distillation` over the B * L token positions with the mask as weights.

  Args:
    student_logits, teacher_logits: [B, L, V] at the same (teacher-forced) positions.
    mask: [B, L] bool (or 0/1), True for the tokens that are scored.
    temperature: T > 0.

  Returns:
    (loss, {'kl': the un-scaled per-token mean KL}).
  """
  chex.assert_rank(student_logits, 3)
  chex.assert_equal_shape([student_logits, teacher_logits])
  batch, length, vocab = student_logits.shape
  chex.assert_shape(mask, (batch, length))
  # Pad positions get weight 0; zero their logits too, so junk there (inf, NaN) cannot leak
  # into the masked sum as NaN * 0.
  real = jnp.asarray(mask).astype(bool)[..., None]
  flat = lambda x: jnp.where(real, x.astype(jnp.float32), 0.0).reshape(batch * length, vocab)
  return logit_distillation(student_logits=flat(student_logits),
                            teacher_logits=flat(teacher_logits), temperature=temperature,
                            weights=jnp.asarray(mask).astype(jnp.float32).reshape(-1),
                            stop_teacher_gradient=True)
