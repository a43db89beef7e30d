"""Optax optimisers and learning-rate schedules built from an `opt` config block.

The config block is an `ml_collections.ConfigDict` (a plain mapping works too):

  opt.name = 'sgd' | 'adam' | 'adamw' | 'lars'   # required
  opt.lr = 0.1                             # required; peak learning rate
  opt.momentum, opt.nesterov               # sgd (defaults 0.9, True)
  opt.b1, opt.b2, opt.eps                  # adam/adamw (defaults 0.9, 0.999, 1e-8)
  opt.weight_decay = 0.0                   # adamw: decoupled; sgd/adam/lars: L2 on the grad
  opt.trust_coefficient = 0.001            # lars: LARC's eta (SwAV's apex LARC, clip=False)
  opt.weight_decay_mask = '.*'             # regex over '/'-joined parameter paths
  opt.schedule = 'constant' | 'cosine' | 'keras_decay' | 'cosine_restarts'
  opt.warmup_steps = 0                     # linear warmup from lr * warmup_start_factor to lr
  opt.warmup_start_factor = 0.0            # SwAV: 0.3 / 4.8 = 0.0625
  opt.decay = 0.0                          # keras_decay: lr / (1 + decay * step)
  opt.end_lr_factor = 0.0                  # cosine ends at lr * end_lr_factor
  opt.restart_period = 0                   # cosine_restarts: T_0, in epochs (steps when the
  opt.restart_mult = 1                     # trainer knows no epoch); T_mult
  opt.restart_offset = 0                   # cosine_restarts: epochs the schedule starts at
                                           # (BALNMP steps its scheduler at the start of each
                                           # epoch, so epoch e trains at SGDR's lr(e + 1): 1)
  opt.grad_clip_norm = 0.0                 # 0 = off; global-norm clipping
  opt.accumulate_steps = 1                 # read by the trainer: micro-batches per update
  opt.lr_base_batch = 0                    # read by the trainer: lr *= batch / lr_base_batch
  opt.freeze_steps = 0                     # the parameters matching freeze_steps_params get
  opt.freeze_steps_params = ''             # no update (and no state change) for this many
                                           # updates, e.g. SwAV's prototypes for 313 steps

Parameter paths are the dict keys from the root of the tree handed over, joined with
'/' (e.g. 'enc_inferior/conv1/kernel'), and every regex must match a whole path
(`re.fullmatch`). Weight decay needs the parameters: call `tx.update(grads, state,
params)`.

The chain per update is: clip by global norm -> (sgd/adam: add L2 decay) -> momentum
or Adam moments -> (adamw: add decoupled decay) -> scale by -schedule(step). LARS is
SwAV's apex LARC(clip=False) around SGD: per parameter tensor, when both norms are non-zero,
g <- (g + wd*w) * eta*|w| / (|g| + wd*|w| + 1e-8), else g is left as it is (no decay);
then momentum (no Nesterov) and the learning rate. It applies to every parameter, biases
and norms included, as the reference does (`weight_decay_mask` narrows the decay).
Gradient accumulation is the trainer's: it averages the gradients of k micro-batches
inside one jitted step (train.make_train_step), so `tx` always sees one gradient per
update and the schedule counts updates.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medguide_jax import paths

OPTIMIZERS = ('sgd', 'adam', 'adamw', 'lars')
SCHEDULES = ('constant', 'cosine', 'keras_decay', 'cosine_restarts')

_REQUIRED = ('name', 'lr')
DEFAULTS = {
    'momentum': 0.9,
    'nesterov': True,
    'b1': 0.9,
    'b2': 0.999,
    'eps': 1e-8,
    'weight_decay': 0.0,
    'weight_decay_mask': '.*',
    'schedule': 'constant',
    'warmup_steps': 0,
    'decay': 0.0,
    'end_lr_factor': 0.0,
    'restart_period': 0,
    'restart_mult': 1,
    'restart_offset': 0,
    'grad_clip_norm': 0.0,
    'accumulate_steps': 1,
    'trust_coefficient': 0.001,
    'warmup_start_factor': 0.0,
    'lr_base_batch': 0,
    'freeze_steps': 0,
    'freeze_steps_params': '',
}

_TRAINABLE = 'trainable'
_FROZEN = 'frozen'

PyTree = Any


# ---------------------------------------------------------------------------
# Parameter-tree helpers.
# ---------------------------------------------------------------------------


def param_paths(params: PyTree) -> list[str]:
  """The '/'-joined path of every leaf of `params`, in `jax.tree` leaf order."""
  return paths.paths(params)


def regex_mask(params: PyTree, regex: str) -> PyTree:
  """A tree like `params` with True where the leaf's path fully matches `regex`."""
  return paths.fullmatch_mask(params, regex)


def count_params(params: PyTree) -> int:
  """Total number of scalar entries over all leaves of `params`."""
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def _check_matches(params: PyTree, regex: str, what: str) -> None:
  """Raises ValueError when `regex` fully matches no path of `params`."""
  paths.check_matches(param_paths(params), regex, what)


# ---------------------------------------------------------------------------
# Config handling.
# ---------------------------------------------------------------------------


def resolve(opt: Mapping[str, Any]) -> dict[str, Any]:
  """The config block as a plain dict with defaults filled in, validated."""
  given = dict(opt.items())
  unknown = sorted(set(given) - set(DEFAULTS) - set(_REQUIRED))
  if unknown:
    raise ValueError(f'Unknown opt config keys {unknown}; known keys: '
                     f'{sorted(_REQUIRED + tuple(DEFAULTS))}.')
  missing = [k for k in _REQUIRED if given.get(k) is None]
  if missing:
    raise ValueError(f'opt config lacks required keys {missing}.')
  cfg = {**DEFAULTS, **given}
  if cfg['name'] not in OPTIMIZERS:
    raise ValueError(
        f'Unknown optimizer {cfg["name"]!r}; valid names: {OPTIMIZERS}.')
  if cfg['schedule'] not in SCHEDULES:
    raise ValueError(
        f'Unknown schedule {cfg["schedule"]!r}; valid names: {SCHEDULES}.')
  if int(cfg['accumulate_steps']) < 1:
    raise ValueError(
        f'opt.accumulate_steps must be >= 1, got {cfg["accumulate_steps"]}.')
  return cfg


# ---------------------------------------------------------------------------
# Learning-rate schedule.
# ---------------------------------------------------------------------------


def _keras_decay_schedule(lr: float, decay: float) -> optax.Schedule:
  """Keras' legacy `decay` argument: lr / (1 + decay * step)."""

  def schedule(step):
    return lr / (1.0 + decay * jnp.asarray(step, jnp.float32))

  return schedule


def _cosine_restarts_schedule(cfg: dict[str, Any], steps: int,
                              steps_per_epoch: int) -> optax.Schedule:
  """SGDR (Loshchilov & Hutter 2017) as torch's CosineAnnealingWarmRestarts(T_0, T_mult,
  eta_min) stepped once per epoch: the lr is constant within an epoch; epoch e (counted from
  `restart_offset`) lies in a cycle of T_i epochs, T_cur epochs in, and
  lr = eta_min + (lr - eta_min) (1 + cos(pi T_cur / T_i)) / 2, eta_min = lr * end_lr_factor."""
  lr, floor = float(cfg['lr']), float(cfg['lr']) * float(cfg['end_lr_factor'])
  period, mult = int(cfg['restart_period']), int(cfg['restart_mult'])
  offset = int(cfg['restart_offset'])
  if period < 1 or mult < 1 or offset < 0:
    raise ValueError(f'cosine_restarts needs restart_period >= 1, restart_mult >= 1 and '
                     f'restart_offset >= 0, got {period}, {mult}, {offset}.')
  # Cycle starts in epochs, up to the last epoch of the run (exact integers, not logs).
  last = steps // max(steps_per_epoch, 1) + offset + 1
  starts, length = [0], period
  while starts[-1] <= last:
    starts.append(starts[-1] + length)
    length *= mult
  starts = np.asarray(starts, np.int64)
  lengths = np.diff(starts)

  def schedule(step):
    epoch = jnp.asarray(step, jnp.int32) // max(steps_per_epoch, 1) + offset
    cycle = jnp.searchsorted(jnp.asarray(starts[1:]), epoch, side='right')
    t_cur = (epoch - jnp.asarray(starts)[cycle]).astype(jnp.float32)
    t_i = jnp.asarray(lengths, jnp.float32)[cycle]
    return floor + (lr - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * t_cur / t_i))

  return schedule


def _main_schedule(cfg: dict[str, Any], steps: int, steps_per_epoch: int = 1
                   ) -> optax.Schedule:
  """The schedule that follows warmup, over `steps` updates."""
  lr = float(cfg['lr'])
  if cfg['schedule'] == 'cosine_restarts':
    return _cosine_restarts_schedule(cfg, steps, steps_per_epoch)
  if cfg['schedule'] == 'constant':
    return optax.constant_schedule(lr)
  if cfg['schedule'] == 'keras_decay':
    return _keras_decay_schedule(lr, float(cfg['decay']))
  if steps <= 0:
    raise ValueError(
        f'cosine schedule needs num_steps > warmup_steps, got {steps} steps '
        'after warmup.')
  return optax.cosine_decay_schedule(
      lr, decay_steps=steps, alpha=float(cfg['end_lr_factor']))


def make_schedule(opt: Mapping[str, Any], num_steps: int, steps_per_epoch: int = 1
                  ) -> optax.Schedule:
  """Learning rate as a function of the optimiser-update count.

  Linear warmup from 0 (step 0) to `opt.lr` (step `warmup_steps`), then the named
  schedule, whose own step count starts at 0 where warmup ends. With gradient
  accumulation `num_steps` counts optimiser updates, not micro-batches.

  Args:
    opt: the `opt` config block.
    num_steps: total number of optimiser updates of the run.
    steps_per_epoch: updates per pass over the training split (the trainer's
      ceil(examples / batch)): the unit of cosine_restarts' restart_period and offset.

  Returns:
    An optax schedule (step -> learning rate).
  """
  cfg = resolve(opt)
  warmup = int(cfg['warmup_steps'])
  if not 0 <= warmup <= num_steps:
    raise ValueError(
        f'opt.warmup_steps={warmup} must lie in [0, num_steps={num_steps}].')
  main = _main_schedule(cfg, num_steps - warmup, steps_per_epoch)
  if warmup == 0:
    return main
  lr = float(cfg['lr'])
  warm = optax.linear_schedule(lr * float(cfg['warmup_start_factor']), lr, warmup)
  return optax.join_schedules([warm, main], [warmup])


# ---------------------------------------------------------------------------
# Optimiser.
# ---------------------------------------------------------------------------


def _decay_mask(regex: str) -> Callable[[PyTree], PyTree]:
  """Weight-decay mask as a function, so it also fits trees masked by freezing."""
  return lambda params: regex_mask(params, regex)


def _base_chain(cfg: dict[str, Any],
                schedule: optax.Schedule) -> optax.GradientTransformation:
  """The configured update rule, for every trainable parameter."""
  wd = float(cfg['weight_decay'])
  decay = (optax.add_decayed_weights(wd, _decay_mask(cfg['weight_decay_mask']))
           if wd else None)
  clip = float(cfg['grad_clip_norm'])
  parts = [optax.clip_by_global_norm(clip) if clip > 0 else None]
  if cfg['name'] == 'lars':
    momentum = float(cfg['momentum'])
    parts += [scale_by_larc(float(cfg['trust_coefficient']), wd,
                            _decay_mask(cfg['weight_decay_mask'])),
              optax.trace(momentum, nesterov=False) if momentum else None]
  elif cfg['name'] == 'sgd':
    momentum = float(cfg['momentum'])
    trace = (optax.trace(momentum, nesterov=bool(cfg['nesterov']))
             if momentum else None)
    parts += [decay, trace]
  else:
    adam = optax.scale_by_adam(
        b1=float(cfg['b1']), b2=float(cfg['b2']), eps=float(cfg['eps']))
    parts += [decay, adam] if cfg['name'] == 'adam' else [adam, decay]
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*[p for p in parts if p is not None])


def scale_by_larc(trust_coefficient: float, weight_decay: float = 0.0,
                  decay_mask: Callable[[PyTree], PyTree] | None = None,
                  eps: float = 1e-8) -> optax.GradientTransformation:
  """apex LARC (clip=False) as SwAV uses it, per parameter tensor.

  With w != 0 and g != 0: g <- (g + wd*w) * eta*|w| / (|g| + wd*|w| + eps); otherwise g is
  passed on unchanged and no decay is added. (optax.lars differs: it divides by |g + wd*w|
  and adds the decay even where a norm is zero.)
  """

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('LARS needs the parameters: call tx.update(grads, state, params)')
    mask = decay_mask(params) if (decay_mask and weight_decay) else jax.tree.map(
        lambda _: bool(weight_decay), params)

    def one(g, w, decay):
      wd = weight_decay if decay else 0.0
      w_norm, g_norm = jnp.linalg.norm(w), jnp.linalg.norm(g)
      rate = trust_coefficient * w_norm / (g_norm + wd * w_norm + eps)
      scaled = (g + wd * w) * rate
      return jnp.where((w_norm > 0) & (g_norm > 0), scaled.astype(g.dtype), g)

    return jax.tree.map(one, updates, params, mask), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


class FreezeForState(NamedTuple):
  count: jax.Array
  inner: Any


def freeze_for_steps(inner: optax.GradientTransformation, mask: PyTree,
                     steps: int) -> optax.GradientTransformation:
  """`inner`, except that masked parameters get no update for the first `steps` updates.

  `inner` sees zero gradients and zero parameters for them (so decay, LARC and momenta add
  nothing and their optimiser state stays at its zero start), and their updates are zeroed: SwAV's "prototype gradients are None for the first
  freeze_prototypes_niters iterations". Adam's bias-correction count still advances.
  """

  def init(params):
    return FreezeForState(jnp.zeros((), jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    frozen = state.count < steps
    zero = lambda u, m: jnp.where(frozen & m, jnp.zeros_like(u), u) if m else u
    # Zero gradients AND zero parameters: L2 decay, LARC and momenta then see nothing, so the
    # inner state of a held parameter stays at its initial zeros.
    updates = jax.tree.map(zero, updates, mask)
    seen = None if params is None else jax.tree.map(zero, params, mask)
    updates, inner_state = inner.update(updates, state.inner, seen)
    updates = jax.tree.map(zero, updates, mask)
    return updates, FreezeForState(state.count + 1, inner_state)

  return optax.GradientTransformation(init, update)


def make_optimizer(
    opt: Mapping[str, Any],
    num_steps: int,
    params: PyTree,
    *,
    freeze: str = '',
    schedule: optax.Schedule | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimiser described by the `opt` config block.

  Args:
    opt: the `opt` config block (see the module docstring).
    num_steps: total number of optimiser updates (not micro-batches).
    params: the parameter tree (nested dicts), used to build the freeze labels
      and to check the regexes.
    freeze: regex over '/'-joined parameter paths; matching parameters get zero
      updates and no optimiser state. '' freezes nothing.
    schedule: the `make_schedule(opt, num_steps)` the caller already built (the trainer
      builds one per stage), or None to build it here.

  Returns:
    (tx, schedule); `tx.update` is called once per optimiser update.

  Raises:
    ValueError: unknown optimiser, schedule or config key, or a `freeze` (or, with
      weight decay on, `weight_decay_mask`) regex that matches no parameter.
  """
  cfg = resolve(opt)
  schedule = schedule or make_schedule(cfg, num_steps)
  if float(cfg['weight_decay']):
    _check_matches(params, cfg['weight_decay_mask'], 'opt.weight_decay_mask')
  tx = _base_chain(cfg, schedule)
  if int(cfg['freeze_steps']) > 0:
    if not cfg['freeze_steps_params']:
      raise ValueError('opt.freeze_steps > 0 needs opt.freeze_steps_params (a regex of the '
                       'parameters to hold, e.g. ".*prototypes.*")')
    _check_matches(params, cfg['freeze_steps_params'], 'opt.freeze_steps_params')
    tx = freeze_for_steps(tx, regex_mask(params, cfg['freeze_steps_params']),
                          int(cfg['freeze_steps']))
  if freeze:
    _check_matches(params, freeze, 'freeze')
    labels = jax.tree.map(lambda f: _FROZEN if f else _TRAINABLE,
                          regex_mask(params, freeze))
    tx = optax.multi_transform(
        {_TRAINABLE: tx, _FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule
