"""SwAV and contrastive losses against independent float64 numpy implementations.

The numpy references below restate the papers' formulas (METHODS.md section 5 for SwAV,
SimCLR for NT-Xent) loop by loop; none of them calls medguide_jax.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from jax.sharding import NamedSharding, PartitionSpec as P

from launch.local import REPO_ROOT, free_port, process_env
from medguide_jax.losses import contrastive, swav

K, N = 30, 24  # prototypes, samples


# ----------------------------------------------------------------------------- numpy references
def np_sinkhorn(scores, eps=0.05, iters=3):
  """The reference's distributed_sinkhorn on one worker, in the [K, N] layout, float64."""
  q = np.exp(np.asarray(scores, np.float64) / eps).T  # [K, N]
  k, n = q.shape
  q /= q.sum()
  for _ in range(iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= n
  return (q * n).T


def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_swapped_loss(scores, codes, assign, tau=0.1):
  scores, codes = np.asarray(scores, np.float64), np.asarray(codes, np.float64)
  total = 0.0
  for a, i in enumerate(assign):
    sub = 0.0
    for v in range(scores.shape[0]):
      if v != i:
        sub -= np.mean(np.sum(codes[a] * np_log_softmax(scores[v] / tau), axis=1))
    total += sub / (scores.shape[0] - 1)
  return total / len(assign)


def np_swapped_grad(scores, codes, assign, tau=0.1):
  """d loss / d scores: for each (a, v != i_a), (softmax(s_v / tau) * sum_k q - q) / tau."""
  scores, codes = np.asarray(scores, np.float64), np.asarray(codes, np.float64)
  num_views, batch, _ = scores.shape
  grad = np.zeros_like(scores)
  for a, i in enumerate(assign):
    for v in range(num_views):
      if v != i:
        p = np.exp(np_log_softmax(scores[v] / tau))
        grad[v] += (p * codes[a].sum(1, keepdims=True) - codes[a]) / (tau * batch)
  return grad / (len(assign) * (num_views - 1))


def np_nt_xent(z1, z2, tau):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  two_b, b = len(z), len(z1)
  losses, correct = [], []
  for i in range(two_b):
    pos = (i + b) % two_b
    others = [j for j in range(two_b) if j != i]
    logits = np.array([z[i] @ z[j] / tau for j in others])
    lse = np.log(np.sum(np.exp(logits)))
    losses.append(lse - z[i] @ z[pos] / tau)
    correct.append(others[int(np.argmax(logits))] == pos)
  return np.mean(losses), np.mean(correct)


def _scores(seed=0, shape=(N, K)):
  return np.random.default_rng(seed).uniform(-1, 1, shape)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


# ----------------------------------------------------------------------------- sinkhorn
def test_sinkhorn_matches_numpy_and_rows_sum_to_one():
  s = _scores()
  codes = swav.sinkhorn(jnp.asarray(s, jnp.float32))
  assert codes.dtype == jnp.float32 and codes.shape == (N, K)
  np.testing.assert_allclose(codes, np_sinkhorn(s), rtol=1e-5, atol=1e-7)
  # The last step normalises each sample, so rows sum to 1; prototype columns do not yet
  # hold N/K each after 3 iterations (they only approach it as iterations grow).
  np.testing.assert_allclose(np.sum(codes, axis=1), 1.0, atol=1e-6)
  assert np.abs(np.sum(codes, axis=0) - N / K).max() > 0.05
  converged = swav.sinkhorn(jnp.asarray(s, jnp.float32), num_iters=100)
  np.testing.assert_allclose(np.sum(converged, axis=0), N / K, atol=1e-4)


def test_sinkhorn_stable_equals_plain_and_input_dtype_is_irrelevant():
  s = jnp.asarray(_scores(1), jnp.float32)
  plain = swav.sinkhorn(s, epsilon=0.03, num_iters=4)
  np.testing.assert_allclose(plain, np_sinkhorn(np.asarray(s), 0.03, 4), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(swav.sinkhorn(s, epsilon=0.03, num_iters=4, stable=True), plain,
                             rtol=1e-5, atol=1e-7)
  # bf16 scores are upcast: the codes are those of the rounded scores, computed in float32.
  s16 = s.astype(jnp.bfloat16)
  codes16 = swav.sinkhorn(s16)
  assert codes16.dtype == jnp.float32
  np.testing.assert_allclose(codes16, np_sinkhorn(np.asarray(s16, np.float64)), rtol=1e-5,
                             atol=1e-7)


def test_sinkhorn_has_no_gradient():
  s = jnp.asarray(_scores(2), jnp.float32)
  w = jnp.asarray(np.random.default_rng(3).normal(size=(N, K)), jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(swav.sinkhorn(x) * w))(s)
  np.testing.assert_array_equal(grad, 0.0)


def test_sinkhorn_sharded_over_8_devices_equals_single_device(mesh):
  s = jnp.asarray(_scores(4), jnp.float32)
  single = swav.sinkhorn(s)
  sharded_in = jax.device_put(s, NamedSharding(mesh, P("data")))
  by_jit = jax.jit(swav.sinkhorn)(sharded_in)
  np.testing.assert_allclose(by_jit, single, rtol=1e-6, atol=1e-7)
  by_shard_map = jax.jit(lambda x: swav.sinkhorn_sharded(x, mesh=mesh))(sharded_in)
  assert by_shard_map.sharding.spec == P("data")
  np.testing.assert_allclose(by_shard_map, single, rtol=1e-6, atol=1e-7)
  stable = swav.sinkhorn_sharded(sharded_in, mesh=mesh, stable=True)
  np.testing.assert_allclose(stable, single, rtol=1e-5, atol=1e-7)


def test_sinkhorn_bad_arguments(mesh):
  with pytest.raises(ValueError, match=r"rows \(20\).*divisible by the 8 devices"):
    swav.sinkhorn_sharded(jnp.zeros((20, K)), mesh=mesh)
  with pytest.raises(ValueError, match="axis_name 'model'"):
    swav.sinkhorn_sharded(jnp.zeros((N, K)), mesh=mesh, axis_name="model")
  with pytest.raises(ValueError, match="epsilon"):
    swav.sinkhorn(jnp.zeros((N, K)), epsilon=0.0)


# ----------------------------------------------------------------------------- swapped prediction
def test_swapped_prediction_loss_and_gradient_match_numpy():
  rng = np.random.default_rng(5)
  scores = rng.uniform(-1, 1, (4, 6, 10))  # V=4 crops, B=6, K=10
  codes = np.stack([np_sinkhorn(scores[0]), np_sinkhorn(scores[2])])  # assign crops (0, 2)
  fn = lambda s, q: swav.swapped_prediction_loss(s, q, assign_crops=(0, 2), temperature=0.1)
  s32, q32 = jnp.asarray(scores, jnp.float32), jnp.asarray(codes, jnp.float32)
  np.testing.assert_allclose(fn(s32, q32), np_swapped_loss(scores, codes, (0, 2)), rtol=1e-5)
  g_scores, g_codes = jax.grad(fn, argnums=(0, 1))(s32, q32)
  np.testing.assert_allclose(g_scores, np_swapped_grad(scores, codes, (0, 2)), rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_array_equal(g_codes, 0.0)  # codes are targets, not predictions
  # Crop 0 predicts crop 2's codes, never its own: with crop 2's codes zeroed it gets none.
  g_own = jax.grad(fn)(s32, q32.at[1].set(0.0))
  np.testing.assert_array_equal(g_own[0], 0.0)
  assert np.abs(np.asarray(g_own[1])).max() > 1e-3


def test_swapped_prediction_bad_assign_crops():
  with pytest.raises(ValueError, match=r"assign_crops .* \[0, 2\), got \(0, 2\)"):
    swav.swapped_prediction_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)),
                                 assign_crops=(0, 2))


# ----------------------------------------------------------------------------- swav_loss
def _swav_inputs(seed=6, views=3, batch=4, dim=5, k=7, queue_len=8):
  rng = np.random.default_rng(seed)
  z = _unit(rng.normal(size=(views, batch, dim)))
  protos = _unit(rng.normal(size=(k, dim)))
  queue = _unit(rng.normal(size=(2, queue_len, dim)))
  return z, protos, queue


def np_swav(z, protos, queue=None, assign=(0, 1), tau=0.1):
  scores = np.einsum("vbd,kd->vbk", z, protos)
  batch = z.shape[1]
  codes = []
  for a, i in enumerate(assign):
    out = scores[i] if queue is None else np.concatenate([queue[a] @ protos.T, scores[i]])
    codes.append(np_sinkhorn(out)[-batch:])
  codes = np.stack(codes)
  return np_swapped_loss(scores, codes, assign, tau), codes


def test_swav_loss_matches_numpy_with_and_without_queue():
  z, protos, queue = _swav_inputs()
  args = (jnp.asarray(z, jnp.float32), jnp.asarray(protos, jnp.float32))
  q32 = jnp.asarray(queue, jnp.float32)
  for use_queue in (False, True):
    loss, aux = swav.swav_loss(*args, queue=q32, use_queue=use_queue)
    want_loss, want_codes = np_swav(z, protos, queue if use_queue else None)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(aux["codes"], want_codes, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux["scores"], np.einsum("vbd,kd->vbk", z, protos), rtol=1e-5,
                               atol=1e-6)
    rows = want_codes.reshape(-1, protos.shape[0])
    entropy = -np.mean(np.sum(rows * np.log(rows), axis=1))
    np.testing.assert_allclose(aux["code_entropy"], entropy, rtol=1e-4)
    usage = len(set(rows.argmax(1).tolist())) / protos.shape[0]
    np.testing.assert_allclose(aux["prototype_usage"], usage)
  # The queue changes the codes (the test would be vacuous otherwise) ...
  assert not np.allclose(np_swav(z, protos, queue)[1], np_swav(z, protos)[1], atol=1e-4)
  # ... and use_queue=False ignores it.
  no_queue, _ = swav.swav_loss(*args)
  np.testing.assert_array_equal(swav.swav_loss(*args, queue=q32, use_queue=False)[0], no_queue)


def test_swav_loss_traced_use_queue_under_jit():
  z, protos, queue = (jnp.asarray(x, jnp.float32) for x in _swav_inputs(7))
  step = jax.jit(lambda flag: swav.swav_loss(z, protos, queue=queue, use_queue=flag)[0])
  for flag in (False, True):
    np.testing.assert_allclose(step(jnp.asarray(flag)),
                               swav.swav_loss(z, protos, queue=queue, use_queue=flag)[0],
                               rtol=1e-6)
  # queue_is_full is the reference's switch: a zero-initialised queue is not used.
  assert not swav.queue_is_full(jnp.zeros_like(queue)) and swav.queue_is_full(queue)


def test_swav_loss_gradient_flows_through_predictions_only():
  z, protos, _ = (jnp.asarray(x, jnp.float32) for x in _swav_inputs(8))
  _, aux = swav.swav_loss(z, protos)
  fixed_codes = aux["codes"]

  def with_fixed_codes(z_, p_):
    scores = jnp.einsum("vbd,kd->vbk", z_, p_)
    return swav.swapped_prediction_loss(scores, fixed_codes)

  got = jax.grad(lambda z_, p_: swav.swav_loss(z_, p_)[0], argnums=(0, 1))(z, protos)
  want = jax.grad(with_fixed_codes, argnums=(0, 1))(z, protos)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(w)).max() > 1e-3


def test_swav_loss_sharded_equals_single_device(mesh):
  z, protos, queue = _swav_inputs(9, batch=8, queue_len=16)
  z, protos, queue = (jnp.asarray(x, jnp.float32) for x in (z, protos, queue))
  want, want_aux = swav.swav_loss(z, protos, queue=queue, use_queue=True)
  z_s = jax.device_put(z, NamedSharding(mesh, P(None, "data")))
  q_s = jax.device_put(queue, NamedSharding(mesh, P(None, "data")))
  for m in (None, mesh):
    got, aux = jax.jit(lambda a, b, m=m: swav.swav_loss(a, protos, queue=b, use_queue=True,
                                                        mesh=m))(z_s, q_s)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(aux["codes"], want_aux["codes"], rtol=1e-5, atol=1e-7)


def test_swav_loss_bad_shapes():
  z, protos, queue = (jnp.asarray(x, jnp.float32) for x in _swav_inputs())
  with pytest.raises(ValueError, match=r"prototypes \(7, 4\) must be \[K, D\]"):
    swav.swav_loss(z, protos[:, :4])
  with pytest.raises(ValueError, match=r"queue \(1, 8, 5\) must be \[A=2, L, D=5\]"):
    swav.swav_loss(z, protos, queue=queue[:1], use_queue=True)
  with pytest.raises(ValueError, match="use_queue is set but queue is None"):
    swav.swav_loss(z, protos, use_queue=True)


# ----------------------------------------------------------------------------- queue, prototypes
def test_update_queue_is_fifo_newest_first():
  def batch(t):  # [A=2, B=2, D=3] filled with the step number t
    return jnp.full((2, 2, 3), float(t))

  q = jnp.zeros((2, 6, 3))
  for t in (1, 2, 3):
    q = swav.update_queue(q, batch(t))
  np.testing.assert_array_equal(q[0, :, 0], [3, 3, 2, 2, 1, 1])
  q = swav.update_queue(q, batch(4))  # full: the oldest batch (1) drops off
  np.testing.assert_array_equal(q[1, :, 0], [4, 4, 3, 3, 2, 2])
  with pytest.raises(ValueError, match=r"z_assign \(2, 7, 3\).*queue \(2, 6, 3\)"):
    swav.update_queue(q, jnp.zeros((2, 7, 3)))


def test_normalize_prototypes_rows_and_kernel_axis():
  w = np.random.default_rng(10).normal(size=(7, 5))
  rows = swav.normalize_prototypes(jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(rows, w / np.linalg.norm(w, axis=1, keepdims=True), rtol=1e-6)
  kernel = swav.normalize_prototypes(jnp.asarray(w.T, jnp.float32), axis=0)  # flax [D, K]
  np.testing.assert_allclose(kernel, np.asarray(rows).T, rtol=1e-6)


# ----------------------------------------------------------------------------- contrastive
def test_nt_xent_matches_numpy_and_is_symmetric():
  rng = np.random.default_rng(11)
  z1, z2 = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  a, b = jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)
  loss, aux = contrastive.nt_xent(a, b, temperature=0.5)
  want_loss, want_acc = np_nt_xent(z1, z2, 0.5)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(aux["contrastive_accuracy"], want_acc)
  np.testing.assert_allclose(contrastive.nt_xent(b, a, temperature=0.5)[0], loss, rtol=1e-6)
  np.testing.assert_allclose(contrastive.nt_xent(3 * a, b, temperature=0.5)[0], loss,
                             rtol=1e-5)  # normalised inside
  grad = jax.grad(lambda x: contrastive.nt_xent(x, b)[0])(a)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_nt_xent_perfect_pairs():
  z = jnp.eye(6, 8)  # six orthogonal images, both views identical
  loss, aux = contrastive.nt_xent(z, z, temperature=0.5)
  assert float(aux["contrastive_accuracy"]) == 1.0
  # The positive has logit 1 / 0.5 = 2, the 2B - 2 = 10 negatives logit 0.
  np.testing.assert_allclose(loss, np.log(np.exp(2.0) + 10) - 2.0, rtol=1e-5)


def test_info_nce_matches_numpy_with_extra_negatives():
  rng = np.random.default_rng(12)
  q, k = _unit(rng.normal(size=(4, 3))), _unit(rng.normal(size=(6, 3)))
  logits = q @ k.T / 0.2
  want = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i, i] for i in range(4)])
  loss, aux = contrastive.info_nce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                   temperature=0.2)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(aux["contrastive_accuracy"],
                             np.mean(logits.argmax(1) == np.arange(4)))
  with pytest.raises(ValueError, match=r"queries \(4, 3\) and keys \(3, 3\)"):
    contrastive.info_nce(jnp.asarray(q), jnp.asarray(k[:3]), temperature=0.2)


# ----------------------------------------------------------------------------- multi-process
_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from medguide_jax import parallel
    port, nproc, pid, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if nproc > 1:
      parallel.initialize_distributed(f"localhost:{port}", nproc, pid)
    import jax
    from jax.experimental import multihost_utils
    from medguide_jax.losses import swav
    mesh = parallel.make_mesh()
    scores = np.random.default_rng(7).uniform(-1, 1, (%d, %d)).astype(np.float32)
    start, stop = parallel.process_rows(mesh, scores.shape[0])
    x = parallel.to_global(scores[start:stop], mesh)
    codes = jax.jit(swav.sinkhorn)(x)
    codes_sm = jax.jit(lambda s: swav.sinkhorn_sharded(s, mesh=mesh))(x)
    got = multihost_utils.process_allgather({"jit": codes, "shard_map": codes_sm}, tiled=True)
    if jax.process_index() == 0:
      np.savez(out, devices=jax.device_count(), processes=jax.process_count(), **got)
    """) % (N, K)


def _run_processes(script, tmp_path, num_processes, devices, tag):
  """Starts the script in `num_processes` processes; returns them and the .npz path of rank 0."""
  out, port = tmp_path / f"{tag}.npz", free_port()
  env = process_env(devices)
  procs = [subprocess.Popen([sys.executable, str(script), str(port), str(num_processes),
                             str(i), str(out)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(num_processes)]
  return procs, out


def test_codes_two_processes_equal_one_process(tmp_path):
  script = tmp_path / "sinkhorn_multiprocess.py"
  script.write_text(_SCRIPT)
  runs = [_run_processes(script, tmp_path, 2, 2, "two"),
          _run_processes(script, tmp_path, 1, 4, "one")]
  logs = []
  try:
    for procs, _ in runs:
      for p in procs:
        logs.append(p.communicate(timeout=helpers.HANG_GUARD_S)[0])
        assert p.returncode == 0, "\n".join(logs)[-6000:]
  finally:
    for procs, _ in runs:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
  two, one = (np.load(out) for _, out in runs)
  assert (int(two["processes"]), int(two["devices"])) == (2, 4)
  assert (int(one["processes"]), int(one["devices"])) == (1, 4)
  want = np_sinkhorn(np.random.default_rng(7).uniform(-1, 1, (N, K)).astype(np.float32))
  for key in ("jit", "shard_map"):
    np.testing.assert_allclose(two[key], want, rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(two[key], one[key], rtol=1e-6, atol=1e-7, err_msg=key)
