"""SwAV: Sinkhorn-Knopp codes, the swapped-prediction loss and the embedding queue.

Pure functions; the SSL task (Ghesu et al. 2022, contrastive learning + online clustering)
combines them. Facts followed (facebookresearch/swav, main_swav.py; METHODS.md section 5):
  * Scores are similarities z . c between L2-normalised projections z [.., D] and
    row-normalised prototypes C [K, D] (K = 3000). Prototypes are normalised before every
    forward pass, outside the gradient (`normalize_prototypes`, a parameter transform).
  * Codes come from `distributed_sinkhorn` as of the current code ("simplify SK code"):
    Q = exp(scores / eps)^T, divided by its total, then num_iters times: each prototype row
    to mass 1/K, each sample column to mass 1/N; returned as (N Q)^T, so every sample's code
    row sums to 1. eps = 0.05, 3 iterations, no max subtraction (the old
    --improve_numerical_stability and VISSL subtract the global max; `stable=True`).
    Distributed, only the total and the K row sums are all-reduced; columns stay local.
  * Codes are computed without gradient from detached scores of the crops in
    crops_for_assign = [0, 1]; with a queue, the queue's scores (queue embeddings times the
    current prototypes) are prepended and the codes of the last B rows kept.
  * Loss: L = mean_{i in A} mean_{v != i} -mean_b sum_k q_i[b, k] log softmax(s_v[b] / tau)_k,
    tau = 0.1. Gradients flow through the prediction side only.
  * Queue: stores embeddings z, not scores; FIFO with the newest rows first.

Everything is float32 inside, whatever the input dtype: exp(1 / 0.05) ~ 4.9e8 overflows fp16.
"""
from __future__ import annotations

from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from medguide_jax.losses.contrastive import l2_normalize
from medguide_jax.parallel import DATA_AXIS

Metrics = dict[str, jnp.ndarray]
# The aux entries of `swav_loss` that are arrays, not scalar metrics: drop them before logging.
ARRAY_AUX_KEYS = ("scores", "codes")
_HIGHEST = lax.Precision.HIGHEST


def _sinkhorn_local(scores: jnp.ndarray, *, epsilon: float, num_iters: int, stable: bool,
                    num_samples: int, all_sum: Callable, all_max: Callable) -> jnp.ndarray:
  """Sinkhorn-Knopp on a block of rows, reductions over samples through `all_sum`.

  Works in the [N, K] layout (the reference transposes to [K, N]; only the layout differs):
  "row sums" of the reference (per prototype) are sums over axis 0 here, "column sums" (per
  sample) over axis 1. `all_sum`/`all_max` combine partial results over the row blocks: the
  identity on a global array, lax.psum/pmax inside shard_map.
  """
  logits = scores.astype(jnp.float32) / epsilon  # [n, K]
  if stable:
    logits = logits - all_max(jnp.max(logits))
  q = jnp.exp(logits)  # [n, K]
  num_prototypes = q.shape[1]
  q = q / all_sum(jnp.sum(q))
  for _ in range(num_iters):
    q = q / all_sum(jnp.sum(q, axis=0, keepdims=True))  # each prototype: mass 1
    q = q / num_prototypes                              # ... then 1/K
    q = q / jnp.sum(q, axis=1, keepdims=True)           # each sample: mass 1 (local)
    q = q / num_samples                                 # ... then 1/N
  return q * num_samples


def _check_sinkhorn_args(scores: jnp.ndarray, epsilon: float, num_iters: int) -> None:
  chex.assert_rank(scores, 2)
  if epsilon <= 0:
    raise ValueError(f"epsilon must be > 0, got {epsilon}.")
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}.")


def sinkhorn(scores: jnp.ndarray, *, epsilon: float = 0.05, num_iters: int = 3,
             stable: bool = False) -> jnp.ndarray:
  """SwAV codes of a global batch by the reference's Sinkhorn-Knopp (float32, no gradient).

  After the last step every row (sample) of the codes sums to 1 exactly up to rounding; the
  columns (prototypes) only approach N/K as num_iters grows, since the last normalisation is
  per sample. Written over the global array: under jit with `scores` sharded on axis 0, XLA
  inserts the cross-device reductions. The codes are equivariant to permuting the rows.

  Args:
    scores: [N, K] similarities z . c of N samples to K prototypes, any float dtype.
    epsilon: entropic regularisation; codes are built from exp(scores / epsilon).
    num_iters: Sinkhorn iterations (3 in the reference).
    stable: subtract the global max of scores / epsilon before exp (VISSL and the old
      --improve_numerical_stability). The result is mathematically identical, because the
      first step divides by the total; use it when |scores| / epsilon can overflow exp.

  Returns:
    [N, K] float32 codes, rows summing to 1, under stop_gradient.
  """
  _check_sinkhorn_args(scores, epsilon, num_iters)
  codes = _sinkhorn_local(lax.stop_gradient(scores), epsilon=epsilon, num_iters=num_iters,
                          stable=stable, num_samples=scores.shape[0],
                          all_sum=lambda x: x, all_max=lambda x: x)
  return lax.stop_gradient(codes)


def sinkhorn_sharded(scores: jnp.ndarray, *, mesh: Mesh, axis_name: str = DATA_AXIS,
                     epsilon: float = 0.05, num_iters: int = 3,
                     stable: bool = False) -> jnp.ndarray:
  """`sinkhorn` with the distributed reference's communication, inside jax.shard_map.

  Each device holds N / S rows (S = size of `axis_name`). Per iteration only the K
  per-prototype sums are all-reduced (plus the total once, and the max once if `stable`);
  per-sample normalisation is local; N = local rows * S. Equals `sinkhorn` on the global
  array up to float rounding of the reduction order.

  Args:
    scores: [N, K] similarities, N divisible by the size of `axis_name`.
    mesh: the device mesh; `axis_name` must be one of its axes.
    axis_name: the mesh axis the rows are split over.
    epsilon, num_iters, stable: as in `sinkhorn`.

  Returns:
    [N, K] float32 codes sharded on axis 0 over `axis_name`, under stop_gradient.
  """
  _check_sinkhorn_args(scores, epsilon, num_iters)
  if axis_name not in mesh.shape:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}.")
  if scores.shape[0] % mesh.shape[axis_name]:
    raise ValueError(f"scores rows ({scores.shape[0]}) must be divisible by the "
                     f"{mesh.shape[axis_name]} devices of mesh axis {axis_name!r}.")

  def local(block):  # [N / S, K]
    return _sinkhorn_local(
        block, epsilon=epsilon, num_iters=num_iters, stable=stable,
        num_samples=block.shape[0] * lax.axis_size(axis_name),
        all_sum=lambda x: lax.psum(x, axis_name), all_max=lambda x: lax.pmax(x, axis_name))

  codes = jax.shard_map(local, mesh=mesh, in_specs=P(axis_name),
                        out_specs=P(axis_name))(lax.stop_gradient(scores))
  return lax.stop_gradient(codes)


def _check_assign_crops(assign_crops: Sequence[int], num_views: int) -> tuple[int, ...]:
  assign = tuple(int(i) for i in assign_crops)
  if num_views < 2:
    raise ValueError(f"swapped prediction needs at least 2 crops, got {num_views}.")
  if not assign or len(set(assign)) != len(assign) or not all(
      0 <= i < num_views for i in assign):
    raise ValueError(f"assign_crops must be distinct crop indices in [0, {num_views}), got "
                     f"{assign_crops}.")
  return assign


def swapped_prediction_loss(scores: jnp.ndarray, codes: jnp.ndarray, *,
                            assign_crops: Sequence[int] = (0, 1),
                            temperature: float = 0.1) -> jnp.ndarray:
  """SwAV's swapped prediction: each crop predicts the codes of every other assign crop.

  L = mean_{a} mean_{v != assign_crops[a]} [-mean_b sum_k codes[a, b, k] *
  log_softmax(scores[v, b] / temperature)_k], in float32 (nats). Codes are constants.

  Args:
    scores: [V, B, K] scores of all V crops of the same B images (crop-major).
    codes: [A, B, K] codes of the crops in `assign_crops`, in that order.
    assign_crops: A distinct crop indices into V.
    temperature: tau > 0 of the prediction softmax.

  Returns:
    The scalar loss.
  """
  chex.assert_rank([scores, codes], 3)
  num_views, batch, num_prototypes = scores.shape
  assign = _check_assign_crops(assign_crops, num_views)
  chex.assert_shape(codes, (len(assign), batch, num_prototypes))
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  log_p = jax.nn.log_softmax(scores.astype(jnp.float32) / temperature, axis=-1)  # [V, B, K]
  q = lax.stop_gradient(codes.astype(jnp.float32))  # [A, B, K]
  # cross[a, v]: mean over the batch of the cross-entropy of crop v predicting codes a.
  cross = -jnp.einsum("abk,vbk->av", q, log_p, precision=_HIGHEST) / batch  # [A, V]
  others = np.array([[v != i for v in range(num_views)] for i in assign], np.float32)
  return jnp.sum(cross * others) / (len(assign) * (num_views - 1))


def _crop_codes(out: jnp.ndarray, queue_z: jnp.ndarray | None, prototypes: jnp.ndarray,
                use_queue, sk: Callable[[jnp.ndarray], jnp.ndarray]) -> jnp.ndarray:
  """Codes [B, K] of one assign crop's detached scores `out`, with the queue prepended."""
  batch = out.shape[0]
  if queue_z is None or (isinstance(use_queue, (bool, np.bool_)) and not use_queue):
    return sk(out)

  def with_queue():
    queue_scores = jnp.einsum("ld,kd->lk", queue_z, prototypes,
                              preferred_element_type=jnp.float32)  # [L, K]
    return sk(jnp.concatenate([lax.stop_gradient(queue_scores), out], axis=0))[-batch:]

  if isinstance(use_queue, (bool, np.bool_)):
    return with_queue()
  return lax.cond(use_queue, with_queue, lambda: sk(out))


def _check_swav_args(z, prototypes, queue, use_queue, num_assign: int) -> None:
  chex.assert_rank([z, prototypes], [3, 2])
  if prototypes.shape[1] != z.shape[2]:
    raise ValueError(f"prototypes {prototypes.shape} must be [K, D] for z {z.shape} "
                     f"([V, B, D]).")
  if queue is None:
    if not (isinstance(use_queue, (bool, np.bool_)) and not use_queue):
      raise ValueError("use_queue is set but queue is None.")
    return
  if queue.ndim != 3 or queue.shape[0] != num_assign or queue.shape[2] != z.shape[2]:
    raise ValueError(f"queue {queue.shape} must be [A={num_assign}, L, D={z.shape[2]}].")


def swav_loss(z: jnp.ndarray, prototypes: jnp.ndarray, *,
              queue: jnp.ndarray | None = None, use_queue=False,
              assign_crops: Sequence[int] = (0, 1), epsilon: float = 0.05,
              num_iters: int = 3, temperature: float = 0.1, stable: bool = False,
              mesh: Mesh | None = None) -> tuple[jnp.ndarray, Metrics]:
  """The SwAV loss of a multi-crop batch, codes included.

  Codes of assign crop i are sinkhorn(stop_gradient(scores[i])), or, with the queue,
  sinkhorn([queue scores; scores[i]])[-B:]. Global concatenation matches the distributed
  reference (each process prepends its own queue slice) because Sinkhorn is equivariant to
  permuting rows.

  Args:
    z: [V, B, D] L2-normalised projections of all V crops of B images (crop-major).
    prototypes: [K, D] prototypes, already row-normalised by the caller.
    queue: [A, L, D] queued embeddings of the assign crops (newest first), or None.
    use_queue: Python bool, or a traced bool (then `lax.cond` picks the branch at run time).
    assign_crops: A distinct crop indices whose codes are targets.
    epsilon, num_iters, stable: Sinkhorn settings (see `sinkhorn`).
    temperature: tau of the prediction softmax.
    mesh: if given, codes come from `sinkhorn_sharded` over its 'data' axis (the reference's
      communication pattern); B (and L + B with a queue) must divide by its size.

  Returns:
    (loss, aux) with aux scalars "code_entropy" (mean entropy of a code row, nats) and
    "prototype_usage" (fraction of prototypes that are the argmax code of some sample of an
    assign crop), and the arrays "scores" [V, B, K] and "codes" [A, B, K] (ARRAY_AUX_KEYS).
  """
  assign = _check_assign_crops(assign_crops, z.shape[0])
  _check_swav_args(z, prototypes, queue, use_queue, len(assign))
  if mesh is None:
    sk = lambda s: sinkhorn(s, epsilon=epsilon, num_iters=num_iters, stable=stable)
  else:
    sk = lambda s: sinkhorn_sharded(s, mesh=mesh, epsilon=epsilon, num_iters=num_iters,
                                    stable=stable)
  scores = jnp.einsum("vbd,kd->vbk", z, prototypes,
                      preferred_element_type=jnp.float32)  # [V, B, K]
  codes = jnp.stack([
      _crop_codes(lax.stop_gradient(scores[i]), None if queue is None else queue[a],
                  prototypes, use_queue, sk) for a, i in enumerate(assign)])  # [A, B, K]
  loss = swapped_prediction_loss(scores, codes, assign_crops=assign, temperature=temperature)
  aux = {"code_entropy": _mean_row_entropy(codes),
         "prototype_usage": _prototype_usage(codes), "scores": scores, "codes": codes}
  return loss, aux


def _mean_row_entropy(codes: jnp.ndarray) -> jnp.ndarray:
  """Mean over all rows of -sum_k q log q (nats); 0 log 0 = 0."""
  plogp = jnp.where(codes > 0, codes * jnp.log(jnp.where(codes > 0, codes, 1.0)), 0.0)
  return -jnp.mean(jnp.sum(plogp, axis=-1))


def _prototype_usage(codes: jnp.ndarray) -> jnp.ndarray:
  """Fraction of the K prototypes that are the argmax of at least one code row."""
  num_prototypes = codes.shape[-1]
  winners = jnp.argmax(codes.reshape(-1, num_prototypes), axis=-1)  # [A * B]
  used = jnp.zeros((num_prototypes,), bool).at[winners].set(True)
  return jnp.mean(used.astype(jnp.float32))


def update_queue(queue: jnp.ndarray, z_assign: jnp.ndarray) -> jnp.ndarray:
  """FIFO update: the newest embeddings go first, the oldest B rows drop off the end.

  Args:
    queue: [A, L, D] queued embeddings (newest first).
    z_assign: [A, B, D] embeddings of the assign crops of this batch, B <= L.

  Returns:
    [A, L, D] queue (queue's dtype) = concat([z_assign, queue[:, :L - B]], axis=1).
  """
  if (queue.ndim != 3 or z_assign.ndim != 3 or queue.shape[0] != z_assign.shape[0]
      or queue.shape[2] != z_assign.shape[2] or z_assign.shape[1] > queue.shape[1]):
    raise ValueError(f"z_assign {z_assign.shape} must be [A, B, D] with B <= L for queue "
                     f"{queue.shape} ([A, L, D]).")
  keep = queue.shape[1] - z_assign.shape[1]
  return jnp.concatenate([z_assign.astype(queue.dtype), queue[:, :keep]], axis=1)


def queue_is_full(queue: jnp.ndarray) -> jnp.ndarray:
  """Traced bool: the queue's last slot is non-zero, the reference's test for "filled".

  The reference uses its queue only once this holds (a zero-initialised queue would add
  all-zero rows to the Sinkhorn problem). Pass the result as `swav_loss(use_queue=...)`.
  """
  return jnp.any(queue[:, -1] != 0)


def normalize_prototypes(w: jnp.ndarray, *, axis: int = 1) -> jnp.ndarray:
  """Prototype vectors L2-normalised (float32), before the forward pass.

  Args:
    w: [K, D] as the reference's Linear weight (axis=1, the default). A flax Dense kernel
      is [D, K]: pass axis=0.
    axis: the embedding axis D.

  Returns:
    w with unit-norm prototype vectors. Wrapping it in stop_gradient is the caller's choice.
  """
  chex.assert_rank(w, 2)
  return l2_normalize(w, axis=axis)
