"""Contrastive losses: SimCLR's NT-Xent and the general InfoNCE, pure functions.

Facts followed:
  * NT-Xent (Chen et al., SimCLR, ICML 2020): a batch of B images gives 2B views; each view's
    positive is the other view of its image and its negatives are the other 2B - 2 views.
    Similarities are cosine similarities (L2-normalised embeddings) divided by a temperature
    tau, and the loss is the mean over all 2B views of the softmax cross-entropy of the
    positive. Self-similarity is excluded from the softmax.
  * InfoNCE (van den Oord et al., 2018; the MoCo/CLIP form): query b's positive is key b; the
    other keys are its negatives.

Both are written over the global batch: under `jax.jit` with inputs sharded on the batch
axis, XLA gathers what the similarity matrix needs. Math is float32 whatever the input dtype.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from medguide_jax.losses.classification import softmax_cross_entropy

Metrics = dict[str, jnp.ndarray]
_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jnp.ndarray, *, axis: int = -1, eps: float = 1e-12) -> jnp.ndarray:
  """x / max(||x||_2, eps) along `axis` (PyTorch `F.normalize` semantics), in float32.

  Args:
    x: any float array.
    axis: the axis whose vectors get unit norm.
    eps: floor of the norm, so an all-zero vector stays zero instead of becoming NaN.

  Returns:
    float32 array of x's shape.
  """
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def nt_xent(z1: jnp.ndarray, z2: jnp.ndarray, *,
            temperature: float = 0.1) -> tuple[jnp.ndarray, Metrics]:
  """SimCLR's normalised-temperature cross-entropy over the global batch (nats).

  Views are ordered [z1; z2]; view i's positive is view (i + B) mod 2B. The logits of view i
  are cos(z_i, z_j) / temperature over j != i (the self-similarity is masked out).

  Args:
    z1: [B, D] embeddings of the first view of each image (normalised here).
    z2: [B, D] embeddings of the second view, row b pairs with z1[b].
    temperature: tau > 0.

  Returns:
    (loss, {"nt_xent": loss, "contrastive_accuracy": fraction of the 2B views whose most
    similar other view is their positive}).
  """
  chex.assert_rank(z1, 2)
  chex.assert_equal_shape([z1, z2])
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  batch = z1.shape[0]
  z = l2_normalize(jnp.concatenate([z1, z2], axis=0))  # [2B, D]
  sim = jnp.einsum("id,jd->ij", z, z, precision=_HIGHEST) / temperature  # [2B, 2B]
  logits = jnp.where(jnp.eye(2 * batch, dtype=bool), -jnp.inf, sim)  # no self-pairs
  labels = (jnp.arange(2 * batch) + batch) % (2 * batch)  # [2B]
  loss, metrics = softmax_cross_entropy(logits=logits, labels=labels)
  return loss, {"nt_xent": loss, "contrastive_accuracy": metrics["accuracy"]}


def info_nce(queries: jnp.ndarray, keys: jnp.ndarray, *,
             temperature: float = 0.1) -> tuple[jnp.ndarray, Metrics]:
  """InfoNCE with positives on the diagonal: query b's positive is key b (nats).

  Keys may hold more rows than queries (extra negatives, e.g. a memory queue appended after
  the B positives). Both sides are L2-normalised here.

  Args:
    queries: [B, D].
    keys: [M, D] with M >= B; keys[:B] are the positives of queries in order.
    temperature: tau > 0.

  Returns:
    (loss, {"info_nce": loss, "contrastive_accuracy": fraction of queries whose most similar
    key is their positive}).
  """
  chex.assert_rank([queries, keys], 2)
  if queries.shape[1] != keys.shape[1] or keys.shape[0] < queries.shape[0]:
    raise ValueError(f"keys must be [M >= B, D] for queries [B, D]; got queries "
                     f"{queries.shape} and keys {keys.shape}.")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  q, k = l2_normalize(queries), l2_normalize(keys)
  logits = jnp.einsum("bd,md->bm", q, k, precision=_HIGHEST) / temperature  # [B, M]
  loss, metrics = softmax_cross_entropy(logits=logits, labels=jnp.arange(queries.shape[0]))
  return loss, {"info_nce": loss, "contrastive_accuracy": metrics["accuracy"]}
