"""Tests for medguide_jax.optim: schedules, update rules, masks, freezing, accumulation."""
from __future__ import annotations

import math
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from medguide_jax import optim


def _opt(**kw) -> ml_collections.ConfigDict:
  base = {'name': 'sgd', 'lr': 0.1, 'momentum': 0.0, 'nesterov': False}
  return ml_collections.ConfigDict({**base, **kw})


def _params() -> dict:
  ones = lambda *shape: np.ones(shape, np.float32)
  return {
      'enc_inferior': {'conv': {'kernel': ones(3, 4), 'bias': ones(4)}},
      'enc_superior': {'conv': {'kernel': ones(5), 'bias': ones(6)}},
      'head': {'kernel': ones(2, 7), 'bias': ones(7)},
  }


def _step(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _jit_step(tx):
  return jax.jit(lambda p, s, g: _step(tx, p, s, g))


def _close(a, b, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol), a, b)


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def test_param_paths_mask_and_count():
  params = _params()
  paths = optim.param_paths(params)
  assert 'enc_inferior/conv/kernel' in paths and 'head/bias' in paths
  assert len(paths) == 6
  mask = optim.regex_mask(params, '^(?!.*(bias|scale)$).*')
  assert mask['head']['kernel'] and not mask['head']['bias']
  assert optim.count_params(params) == 12 + 4 + 5 + 6 + 14 + 7


# ---------------------------------------------------------------------------
# Schedules.
# ---------------------------------------------------------------------------


def test_warmup_then_cosine_golden_values():
  s = optim.make_schedule(
      _opt(schedule='cosine', warmup_steps=10, end_lr_factor=0.1), num_steps=110)
  expected = {0: 0.0, 5: 0.05, 10: 0.1, 60: 0.01 + 0.09 * 0.5, 110: 0.01}
  for step, lr in expected.items():
    np.testing.assert_allclose(s(step), lr, rtol=1e-6, atol=1e-8, err_msg=step)


def test_keras_decay_and_constant():
  s = optim.make_schedule(_opt(schedule='keras_decay', decay=1e-3), 5000)
  for t in (0, 1, 1000, 3000):
    np.testing.assert_allclose(s(t), 0.1 / (1 + 1e-3 * t), rtol=1e-6)
  c = optim.make_schedule(_opt(warmup_steps=4), 100)
  np.testing.assert_allclose([c(0), c(2), c(4), c(50)], [0.0, 0.05, 0.1, 0.1],
                             rtol=1e-6)


def test_unknown_names_raise():
  params = _params()
  with pytest.raises(ValueError, match='sgd'):
    optim.make_optimizer(_opt(name='rmsprop'), 10, params)
  with pytest.raises(ValueError, match='cosine'):
    optim.make_schedule(_opt(schedule='linear'), 10)
  with pytest.raises(ValueError, match='weight_decy'):
    optim.make_optimizer(_opt(weight_decy=1e-4), 10, params)


# ---------------------------------------------------------------------------
# Update rules.
# ---------------------------------------------------------------------------


def _numpy_nesterov(x, a, lr, mu, steps):
  """PyTorch-style Nesterov SGD on f(x) = 0.5 * sum(a * x**2)."""
  buf = np.zeros_like(x)
  for _ in range(steps):
    g = a * x
    buf = mu * buf + g
    x = x - lr * (g + mu * buf)
  return x


def test_sgd_nesterov_matches_numpy():
  a = np.array([1.0, 2.0, 0.5], np.float32)
  x0 = np.array([1.0, -2.0, 3.0], np.float32)
  tx, _ = optim.make_optimizer(
      _opt(momentum=0.9, nesterov=True), 100, {'x': x0})
  params = {'x': jnp.asarray(x0)}
  state, step = tx.init(params), _jit_step(tx)
  grad_fn = jax.jit(jax.grad(lambda p: 0.5 * jnp.sum(a * p['x'] ** 2)))
  for _ in range(5):
    params, state = step(params, state, grad_fn(params))
  expected = _numpy_nesterov(x0, a, lr=0.1, mu=0.9, steps=5)
  np.testing.assert_allclose(params['x'], expected, rtol=1e-5)


def test_adamw_matches_optax_reference():
  opt = _opt(name='adamw', lr=1e-2, weight_decay=1e-2)
  params = _params()
  tx, _ = optim.make_optimizer(opt, 100, params)
  ref = optax.adamw(1e-2, weight_decay=1e-2)
  grads = jax.tree.map(lambda p: np.full_like(p, 0.3), params)
  p1, s1, step1 = params, tx.init(params), _jit_step(tx)
  p2, s2, step2 = params, ref.init(params), _jit_step(ref)
  for _ in range(3):
    p1, s1 = step1(p1, s1, grads)
    p2, s2 = step2(p2, s2, grads)
  _close(p1, p2)


@pytest.mark.parametrize('name', ['sgd', 'adam', 'adamw'])
def test_weight_decay_mask(name):
  opt = _opt(name=name, weight_decay=0.01,
             weight_decay_mask='^(?!.*(bias|scale)$).*')
  params = _params()
  tx, _ = optim.make_optimizer(opt, 100, params)
  zeros = jax.tree.map(np.zeros_like, params)
  new, _ = _jit_step(tx)(params, tx.init(params), zeros)
  # L2 in adam is normalised by the second moment: the step is ~lr, not lr * wd.
  decayed = 1.0 - 0.1 if name == 'adam' else 1.0 - 0.1 * 0.01
  for path, leaf in zip(optim.param_paths(params), jax.tree.leaves(new)):
    want = 1.0 if path.endswith('bias') else decayed
    np.testing.assert_allclose(leaf, want, rtol=1e-5, err_msg=path)


def test_weight_decay_mask_matching_nothing_raises():
  with pytest.raises(ValueError, match='nomatch'):
    optim.make_optimizer(
        _opt(weight_decay=0.1, weight_decay_mask='nomatch'), 10, _params())


def test_grad_clip_by_global_norm():
  tx, _ = optim.make_optimizer(_opt(lr=1.0, grad_clip_norm=1.0), 10,
                               {'a': jnp.zeros(1), 'b': jnp.zeros(1)})
  params = {'a': jnp.zeros(1), 'b': jnp.zeros(1)}
  state = tx.init(params)
  big = {'a': jnp.array([3.0]), 'b': jnp.array([4.0])}  # norm 5 -> scaled by 1/5
  update = jax.jit(tx.update)
  updates, state = update(big, state, params)
  _close(updates, {'a': jnp.array([-0.6]), 'b': jnp.array([-0.8])})
  small = {'a': jnp.array([0.3]), 'b': jnp.array([0.4])}  # norm 0.5 -> as is
  updates, _ = update(small, state, params)
  _close(updates, {'a': jnp.array([-0.3]), 'b': jnp.array([-0.4])})


# ---------------------------------------------------------------------------
# Freezing.
# ---------------------------------------------------------------------------


def _state_arrays(state):
  return [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]


def test_freeze():
  params = _params()
  opt = _opt(momentum=0.9, nesterov=True, weight_decay=1e-3)
  tx, _ = optim.make_optimizer(opt, 100, params, freeze='enc_inferior/.*')
  state = tx.init(params)
  update = _jit_step(tx)
  grads = jax.tree.map(lambda p: np.full_like(p, 0.5), params)
  new = params
  for _ in range(4):
    new, state = update(new, state, grads)
  _close(new['enc_inferior'], params['enc_inferior'], atol=0)
  for name in ('enc_superior', 'head'):
    for before, after in zip(jax.tree.leaves(params[name]),
                             jax.tree.leaves(new[name])):
      assert np.all(np.abs(after - before) > 1e-3), name
  # State: momentum buffers only for the 4 unfrozen leaves.
  arrays = _state_arrays(state)
  assert not any(x.shape in ((3, 4), (4,)) for x in arrays)
  assert sum(x.size for x in arrays) == optim.count_params(params) - 12 - 4


def test_freeze_matching_nothing_raises():
  with pytest.raises(ValueError, match='enc_infrior'):
    optim.make_optimizer(_opt(), 10, _params(), freeze='enc_infrior/.*')




def _larc_numpy(w, g, m, *, lr, eta, wd, momentum):
  """apex LARC(clip=False) + SGD momentum, written out independently."""
  wn, gn = np.linalg.norm(w), np.linalg.norm(g)
  if wn > 0 and gn > 0:
    g = (g + wd * w) * eta * wn / (gn + wd * wn + 1e-8)
  m = momentum * m + g
  return w - lr * m, m


def test_lars_matches_apex_larc_semantics():
  rng = np.random.default_rng(0)
  params = {'a': rng.normal(size=(4, 3)).astype(np.float32), 'b': np.zeros(3, np.float32)}
  opt = _opt(name='lars', lr=4.8, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001)
  tx, _ = optim.make_optimizer(opt, 10, params)
  state = tx.init(params)
  p, want, mom = params, {k: v.astype(np.float64) for k, v in params.items()}, {
      k: np.zeros(v.shape) for k, v in params.items()}
  step = _jit_step(tx)
  for _ in range(3):
    grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    p, state = step(p, state, grads)
    for k in want:
      want[k], mom[k] = _larc_numpy(want[k], grads[k].astype(np.float64), mom[k], lr=4.8,
                                    eta=0.001, wd=1e-6, momentum=0.9)
  _close(p, want, atol=1e-5)
  # A zero parameter ('b' starts at 0) is left unscaled and undecayed: plain SGD there.
  assert not np.allclose(p['b'], 0)


def test_freeze_steps_holds_params_then_releases():
  params = _params()
  opt = _opt(name='sgd', momentum=0.9, weight_decay=0.1, freeze_steps=2,
             freeze_steps_params='head/.*')
  tx, _ = optim.make_optimizer(opt, 10, params)
  state, p = tx.init(params), params
  grads = jax.tree.map(np.ones_like, params)
  step = _jit_step(tx)
  for _ in range(2):
    p, state = step(p, state, grads)
  _close(p['head'], params['head'])  # held: no grad step, no decay
  assert not np.allclose(p['enc_inferior']['conv']['kernel'], 1.0)
  p3, _ = step(p, state, grads)
  # Released with empty momentum: the first update is plain SGD with L2 decay.
  _close(p3['head'], jax.tree.map(lambda w: w - 0.1 * (1.0 + 0.1 * w), params['head']))


def test_freeze_steps_needs_a_matching_regex():
  with pytest.raises(ValueError, match='freeze_steps_params'):
    optim.make_optimizer(_opt(freeze_steps=3), 10, _params())
  with pytest.raises(ValueError, match='prototypes'):
    optim.make_optimizer(_opt(freeze_steps=3, freeze_steps_params='prototypes'), 10, _params())


def test_warmup_start_factor():
  sched = optim.make_schedule(_opt(lr=4.8, warmup_steps=10, warmup_start_factor=0.0625,
                                   schedule='cosine', end_lr_factor=0.001), 110)
  np.testing.assert_allclose(float(sched(0)), 0.3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 4.8, rtol=1e-6)
  np.testing.assert_allclose(float(sched(110)), 0.0048, rtol=1e-4)


def _torch_warm_restarts(base, t0, mult, eta_min, epochs):
  """torch.optim.lr_scheduler.CosineAnnealingWarmRestarts stepped once per epoch, as its
  step() recurrence does it: the lr of epochs 0, 1, ..."""
  t_cur, t_i, out = 0, t0, []
  for _ in range(epochs):
    out.append(eta_min + (base - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2)
    t_cur += 1
    if t_cur >= t_i:
      t_cur, t_i = t_cur - t_i, t_i * mult
  return out


def test_cosine_restarts_is_torchs_warm_restarts_per_epoch_with_balnmps_offset():
  opt = {"name": "sgd", "lr": 1e-4, "schedule": "cosine_restarts", "restart_period": 20,
         "restart_mult": 2, "end_lr_factor": 0.1}
  per_epoch = 7
  want = _torch_warm_restarts(1e-4, 20, 2, 1e-5, 201)
  sched = optim.make_schedule(opt, 200 * per_epoch, steps_per_epoch=per_epoch)
  got = [float(sched(e * per_epoch + k)) for e in range(200) for k in (0, per_epoch - 1)]
  np.testing.assert_allclose(got, np.repeat(want[:200], 2), rtol=1e-5)
  # BALNMP calls scheduler.step() at the start of each epoch: epoch e trains at lr(e + 1).
  shifted = optim.make_schedule({**opt, "restart_offset": 1}, 200 * per_epoch, per_epoch)
  np.testing.assert_allclose([float(shifted(e * per_epoch)) for e in range(200)], want[1:],
                             rtol=1e-5)
  with pytest.raises(ValueError, match="restart_period >= 1"):
    optim.make_schedule({**opt, "restart_period": 0}, 10)
