"""The one trainer: stages, mesh, jitted step, checkpoints, evaluation, results.

`train_and_evaluate(config, workdir)` runs `config.stages` in order; stage `s` lives in
`workdir/s/` and is finished once `workdir/s/results.json` exists. Everything that is the
same for every method lives here; a task (tasks/<method>.py) says only what to initialise,
what to minimise and how to evaluate.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import time
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from medguide_jax import (checkpointing, metric_writers, optim, param_sources, parallel, paths,
                          run_info, stage_records, tasks, workdir_lock)
from medguide_jax.data import builders, mixture, pipeline, sources
from medguide_jax.validation import (STOP_WHEN, ConfigError, check_config, check_select_after,
                                     source_names)
from medguide_jax.evaluation import evaluators as evaluators_lib

EXIT_PREEMPTED = 75
EVAL_SPLITS = ("validation", "test")


class Preempted(Exception):
  """A preemption signal arrived and a checkpoint was saved (exit code 75)."""


class NonFiniteError(FloatingPointError):
  """A non-finite loss or gradient; the last good checkpoint stays as it was."""


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; one pytree, checkpointed whole."""
  step: jax.Array
  params: Any
  model_state: Any            # batch statistics and other collections the model mutates
  extra: Any                  # the task's non-parameter training state (queues, counters)
  teacher: Any                # frozen teacher variables: never trained, never checkpointed
  opt_state: Any
  best: Any                   # {'params', 'model_state'} at the best validation score
  best_score: jax.Array       # +inf when lower is better and nothing was evaluated yet
  best_step: jax.Array
  evals_since_best: jax.Array
  bad_step: jax.Array         # first step whose loss or gradient was non-finite; -1 if none


# --------------------------------------------------------------------------- preemption
_SIGNALLED = []


def _on_sigterm(signum, frame):  # pylint: disable=unused-argument
  _SIGNALLED.append(signum)


def _preempted(step: int) -> bool:
  if jax.process_count() > 1:
    return multihost_utils.reached_preemption_sync_point(step)
  return bool(_SIGNALLED)


# --------------------------------------------------------------------------- the step
def _select(ok, new, old):
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def micro_batches(batch: dict, accumulate: int) -> dict:
  """[B, ...] -> [accumulate, B / accumulate, ...], strided: micro-batch i holds rows
  i, i + accumulate, ... A batch sharded over the devices in contiguous blocks stays
  sharded the same way inside every micro-batch (each device keeps its own rows), so XLA
  needs no all-gather; the contiguous split would put each micro-batch on a subset of the
  devices."""
  return jax.tree.map(
      lambda x: x.reshape((-1, accumulate) + x.shape[1:]).swapaxes(0, 1), batch)


def _grads(task, params, state: tasks.LossState, batch, rng, accumulate: int):
  """((loss, (metrics, new LossState)), gradients) over the global batch; with accumulate
  > 1, the mean over micro-batches in a scan (same update, less memory)."""
  grad_fn = jax.value_and_grad(task.loss, has_aux=True)
  if accumulate == 1:
    return grad_fn(params, state, batch, rng)
  micro = micro_batches(batch, accumulate)

  def body(carry, xs):
    (loss, metrics), st, g = carry
    mb, i = xs
    # Each micro-batch draws its own dropout masks.
    (l, (m, st)), gi = grad_fn(params, st, mb, jax.random.fold_in(rng, i))
    add = lambda a, b: a + b / accumulate
    return ((add(loss, l), jax.tree.map(add, metrics, m)), st, jax.tree.map(add, g, gi)), None

  zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
  (l0, (m0, _)), _ = jax.eval_shape(grad_fn, params, state,
                                    jax.tree.map(lambda x: x[0], micro), rng)
  init = ((jnp.zeros((), l0.dtype), zeros(m0)), state, zeros(params))
  ((loss, metrics), state, grads), _ = jax.lax.scan(body, init, (micro, jnp.arange(accumulate)))
  return (loss, (metrics, state)), grads


def make_train_step(task, tx, schedule, *, seed: int, accumulate: int, frozen_state_mask):
  """The jitted-to-be update: gradients over the global batch, optax, NaN guard.

  A step whose loss or gradient is non-finite leaves the state unchanged and records its
  number in bad_step. Besides the task's metrics it reports the loss, the learning rate
  the schedule gives this update, and the global L2 norms of the gradient, the update and
  the parameters (as big_vision logs them).
  """
  prepare = task.prepare_params

  def step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    # A parameter transform before the forward pass (SwAV: prototypes re-normalised); the
    # gradient is taken at, and the update applied to, the transformed parameters.
    state = state.replace(params=prepare(state.params))
    inputs = tasks.LossState(step=state.step, model_state=state.model_state, extra=state.extra,
                             teacher=state.teacher)
    (loss, (metrics, out)), grads = _grads(task, state.params, inputs, batch, rng, accumulate)
    # Frozen modules keep their batch statistics (the mask is static: plain bools).
    model_state = jax.tree.map(lambda frozen, old, new: old if frozen else new,
                               frozen_state_mask, state.model_state, out.model_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = prepare(optax.apply_updates(state.params, updates))  # stored as used
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.bad_step < 0)
    changed = _select(ok, (params, model_state, out.extra, opt_state),
                      (state.params, state.model_state, state.extra, state.opt_state))
    new = state.replace(step=state.step + 1, params=changed[0], model_state=changed[1],
                        extra=changed[2], opt_state=changed[3],
                        bad_step=jnp.where(ok | (state.bad_step >= 0), state.bad_step,
                                           state.step))
    return new, {"loss": loss, "grad_norm": grad_norm, "update_norm": optax.tree.norm(updates),
                 "param_norm": optax.tree.norm(params), "lr": schedule(state.step), **metrics}

  return step


# --------------------------------------------------------------------------- set-up
def _frozen_state_mask(model_state: dict, freeze: str) -> dict:
  """Per collection (batch_stats, ...), which leaves belong to frozen modules."""
  return {col: optim.regex_mask(tree, freeze) if freeze else jax.tree.map(lambda _: False, tree)
          for col, tree in model_state.items()}


def _example_batch(train_ds) -> dict:
  """One host batch, for shapes only (read without advancing the real iterator)."""
  return next(iter(train_ds))


def _abstract_global(batch: dict, global_batch_size: int, mesh) -> dict:
  sharding = parallel.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((global_batch_size,) + x.shape[1:], x.dtype,
                                                     sharding=sharding), batch)


def resolve_stage(stage: ml_collections.ConfigDict, steps_per_epoch: int | None = None
                  ) -> ml_collections.ConfigDict:
  """A copy of the stage block with its run-time-derived fields (-1) filled in; with
  `num_epochs` > 0, num_steps is num_epochs passes over the training split."""
  s = ml_collections.ConfigDict(stage.to_dict())
  if s.get("num_epochs", 0) > 0 and steps_per_epoch:
    s.num_steps = int(math.ceil(s.num_epochs * steps_per_epoch))
  tenth = max(s.num_steps // 10, 1)
  if s.eval_every < 0:
    s.eval_every = tenth
  if s.checkpoint_every < 0:
    s.checkpoint_every = tenth
  if s.log_every < 0:
    s.log_every = max((s.eval_every or tenth) // 2, 1)
  if s.opt.warmup_steps < 0:
    s.opt.warmup_steps = min(100, s.num_steps // 10)
  if s.opt.get("lr_base_batch", 0) > 0:  # large-batch linear scaling (Goyal et al.)
    s.opt.lr = s.opt.lr * s.batch_size / s.opt.lr_base_batch
    s.opt.lr_base_batch = 0
  return s


def open_sources(config) -> dict:
  """{split: random-access source} of config.data, prepared on first use."""
  try:
    return sources.open_splits(config.data, ("train",) + EVAL_SPLITS)
  except (builders.DatasetNotPreparedError, FileNotFoundError, ValueError) as e:
    raise ConfigError(f"data {config.data.name!r}: {e}") from e


def labelled_subset(train, stage, name: str):
  """The training split a stage sees: all of it, or the fixed subset `train_examples` (a
  count) or `train_fraction` (a share) asks for, stratified by the record field
  `train_stratify` when it names one (mixture.Subset: nested, every class kept)."""
  n, fraction = int(stage.get("train_examples", 0)), float(stage.get("train_fraction", 0.0))
  key = stage.get("train_stratify", "")
  if n and fraction:
    raise ConfigError(f"stages.{name}: train_examples={n} and train_fraction={fraction}: "
                      "set one of them")
  if fraction:
    n = max(1, int(round(fraction * len(train))))
  if not n or (fraction == 1.0 and not key):
    return train
  try:
    strata = None
    if key:
      strata = mixture.label_strata(sources.record_field(train, key))
    # One Subset object per (source, n, key): tasks cache per-source work by identity.
    return sources.once_per_source(train, ("subset", n, key),
                                   lambda: mixture.Subset(train, n, strata))
  except KeyError as e:
    raise ConfigError(f"stages.{name}.train_stratify={key!r}: the training records have no "
                      f"field {e}") from e
  except ValueError as e:
    raise ConfigError(f"stages.{name}.{e}") from e


class StageSetup:
  """The stage's pieces the loop and the evaluation share."""

  def __init__(self, config, name: str, workdir: epath.Path, mesh, data_sources=None):
    self.config, self.name, self.mesh = config, name, mesh
    stage = config.stages[name]
    self.dir = workdir / name
    self.tracing = False  # a profiler trace is open (config.profile_steps)
    if config.profile_steps and not re.fullmatch(r"\d+:\d+", config.profile_steps):
      raise ConfigError(f"profile_steps={config.profile_steps!r}: expected 'start:stop', "
                        "e.g. '10:15'")
    try:
      parallel.check_batch_size(stage.batch_size, f"stages.{name}.batch_size")
      parallel.check_batch_size(stage.eval_batch_size, f"stages.{name}.eval_batch_size")
    except ValueError as e:  # bad usage: exit 2 before anything is written
      raise ConfigError(str(e)) from e
    if stage.opt.accumulate_steps > 1 and (stage.batch_size // jax.device_count()
                                           ) % stage.opt.accumulate_steps:
      raise ConfigError(f"stages.{name}: the per-device batch {stage.batch_size // jax.device_count()}"
                        f" is not divisible by opt.accumulate_steps={stage.opt.accumulate_steps}")
    self.sources = data_sources or open_sources(config)
    self.sources = {**self.sources, "train": labelled_subset(self.sources["train"], stage, name)}
    # Updates per pass over the training split: the unit of num_epochs and of the schedule.
    epoch = -(-len(self.sources["train"]) // stage.batch_size)
    self.stage = stage = resolve_stage(stage, epoch)
    check_select_after(f"stages.{name}", stage)  # against num_steps as num_epochs made it
    try:  # schedule errors surface now, before any stage has written anything
      self.schedule = optim.make_schedule(stage.opt, stage.num_steps, epoch)  # the stage's one
    except ValueError as e:
      raise ConfigError(f"stages.{name}.opt: {e}") from e
    try:
      self.task = tasks.get_task(tasks.TaskContext(config, stage, self.sources["train"], mesh))
      self.evaluators = evaluators_lib.from_config(stage.get("evals"), self.task)
    except ValueError as e:  # a task's config check: bad usage, nothing written yet
      raise ConfigError(f"stages.{name} ({stage.task}): {e}") from e
    self.metric_keys = self._check_metric_keys()
    # A bad regex is exit 2 now, not after the first stages have run.
    param_sources.init_rules(stage.init_params, f"stages.{name}.init_params")
    param_sources.init_rules(stage.get("teacher_params", ""), f"stages.{name}.teacher_params")
    self.example_fn = self.task.example_fn

  def _check_metric_keys(self) -> set[str]:
    """Every metric an evaluation of this stage may give; `select` and the table's columns
    must be among them (checked before anything is written)."""
    keys, training = set(self.task.metric_keys()), set(self.task.metric_keys())
    for ev in self.evaluators:
      clash = keys & ev.prefixed_keys()
      if clash:
        raise ConfigError(f"stages.{self.name}.evals.{ev.name}: its metrics {sorted(clash)} "
                          "clash with the task's or another evaluator's; give it a prefix")
      keys |= ev.prefixed_keys()
      training |= ev.prefixed_keys() if ev.every_eval else set()
    if self.stage.select:
      mode, _, key = self.stage.select.partition(":")
      key = key.removeprefix("val/")
      if mode not in ("min", "max") or key not in training:
        hint = (f"; {key!r} comes from an evaluator without every_eval=True" if key in keys
                else "")
        raise ConfigError(f"stages.{self.name}.select={self.stage.select!r}: expected "
                          f"'min:val/<metric>' or 'max:val/<metric>' with a metric of the "
                          f"evaluations during training{hint}; they have {sorted(training)}")
    return keys

  @functools.cached_property
  def state_spec(self) -> "StateSpec":
    """The stage's abstract TrainState, shardings, initialiser and optimiser, built once."""
    return init_state(self, _example_batch(self.dataset("train", train=True)))

  @functools.cache
  def predict_fn(self, fn=None):
    """`fn(variables, batch)` (default: the task's predict) after the task's parameter
    transform, jitted once per stage and fn (every evaluation reuses the compile)."""
    fn = fn or self.task.predict
    prepare = self.task.prepare_params
    predict = lambda variables, batch: fn({**variables, "params": prepare(variables["params"])},
                                          batch)
    return jax.jit(predict, out_shardings=parallel.replicated(self.mesh))

  def dataset(self, split: str, *, train: bool):
    bs = self.stage.batch_size if train else self.stage.eval_batch_size
    return pipeline.make_dataset(
        self.sources[split], example_fn=functools.partial(self.example_fn, augment=train),
        global_batch_size=bs, rows=parallel.process_rows(self.mesh, bs),
        seed=self.config.seed, train=train, num_batches=max(self.stage.num_steps, 1),
        num_workers=self.config.data.num_workers if train else 0,
        prefetch=self.config.data.prefetch)


def init_key(seed: int) -> jax.Array:
  """Parameter-init key. 'rbg' compiles in a fraction of threefry's time on CPU (ResNet
  init: seconds instead of tens of seconds); parameters are replicated, so the values do
  not depend on the device count. Dropout in the step stays on partitionable threefry."""
  return jax.random.key(seed, impl="rbg")


class StateSpec(NamedTuple):
  abstract: TrainState    # ShapeDtypeStructs with shardings
  shardings: TrainState
  fresh: Any              # rng -> the initial TrainState without its teacher ({})
  tx: optax.GradientTransformation

  def initial(self, rng) -> TrainState:
    """The initial state on its shardings, teacher {} (it is loaded, never initialised)."""
    return jax.jit(self.fresh, out_shardings=_checkpointed(self.shardings))(rng)


def _checkpointed(state: TrainState) -> TrainState:
  """What a checkpoint holds: everything but the teacher (reloaded from its source)."""
  return state.replace(teacher={})


def init_state(setup: StageSetup, example: dict) -> StateSpec:
  """The stage's StateSpec from one host batch (for shapes)."""
  stage, task, mesh = setup.stage, setup.task, setup.mesh
  abstract_batch = _abstract_global(example, stage.batch_size, mesh)
  abstract_vars = jax.eval_shape(task.init, init_key(setup.config.seed), abstract_batch)
  teacher = jax.eval_shape(task.init_teacher, init_key(0), abstract_batch)
  if (teacher is None) == bool(stage.get("teacher_from")):
    raise ConfigError(f"stages.{setup.name}.teacher_from={stage.get('teacher_from')!r}: "
                      + ("task %r has no teacher" % stage.task if teacher is None else
                         "task %r needs a teacher: name the stage or file to load it from"
                         % stage.task))
  try:
    tx, _ = optim.make_optimizer(stage.opt, stage.num_steps, abstract_vars["params"],
                                 freeze=stage.freeze, schedule=setup.schedule)
  except ValueError as e:
    raise ConfigError(f"stages.{setup.name}: {e}") from e
  lower_better = stage.select.startswith("min:")

  def fresh(rng):
    batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_batch)
    variables = task.init(rng, batch)
    params = variables.pop("params")
    keep = {"params": params, "model_state": variables} if stage.select else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                      extra=task.init_extra(), teacher={},
                      opt_state=tx.init(params), best=keep,
                      best_score=jnp.asarray(np.inf if lower_better else -np.inf, jnp.float32),
                      best_step=jnp.zeros((), jnp.int32), evals_since_best=jnp.zeros((), jnp.int32),
                      bad_step=-jnp.ones((), jnp.int32))

  # The teacher's structure comes from its abstract init alone: fresh states leave it out
  # (random teacher weights would be computed only to be replaced by the loaded ones).
  abstract = jax.eval_shape(fresh, init_key(0)).replace(teacher=teacher or {})
  names = paths.paths(abstract.params) + [
      k.partition("/")[2] for k in paths.paths(abstract.teacher)]  # FSDP rules see both
  try:
    shardings = parallel.param_shardings(mesh, abstract, setup.config.mesh.fsdp_rules,
                                         setup.config.mesh.min_fsdp_size_mb, param_paths=names)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return StateSpec(abstract, shardings, fresh, tx)


def _restore_or_init(setup: StageSetup, ckpt: checkpointing.Checkpointer, data_iter,
                     spec: StateSpec, workdir: epath.Path) -> TrainState:
  """Restore order: this stage's checkpoint, config.resume, init_from, scratch. The teacher
  is loaded from `teacher_from` in every case (checkpoints do not hold it)."""
  teacher = {}
  if setup.stage.get("teacher_from"):
    teacher = param_sources.load_teacher(setup.stage, setup.name, setup.dir, spec.abstract.teacher,
                                         spec.shardings.teacher, workdir)
  step, state = ckpt.restore_latest(_checkpointed(spec.abstract), data_iter)
  if state is not None:
    logging.info("[%s] resumed from %s at step %d", setup.name, ckpt.directory, step)
    return state.replace(teacher=teacher)
  if setup.config.resume:
    other = checkpointing.Checkpointer(epath.Path(setup.config.resume) / setup.name / "checkpoints")
    step, state = other.restore_latest(_checkpointed(spec.abstract), data_iter)
    if state is None:
      raise ConfigError(f"config.resume={setup.config.resume!r} has no checkpoint for stage "
                        f"{setup.name!r}")
    logging.info("[%s] resumed from %s at step %d", setup.name, other.directory, step)
    return state.replace(teacher=teacher)
  state = spec.initial(init_key(setup.config.seed)).replace(teacher=teacher)
  if setup.stage.init_from:
    variables = param_sources.load_init({"params": state.params, **state.model_state},
                                        setup.stage, workdir)
    params = variables.pop("params")
    # Optimiser slots (momenta) start at zero whatever the parameters, so opt_state stays.
    state = jax.device_put(state.replace(params=params, model_state=variables), spec.shardings)
  if setup.stage.select:
    # Own buffers for `best`: the step donates params, and a donated buffer may appear once.
    state = state.replace(best=_copy({"params": state.params, "model_state": state.model_state}))
  return state


# --------------------------------------------------------------------------- evaluation
def predict_split(setup: StageSetup, variables: dict, split: str, fn=None
                  ) -> dict[str, np.ndarray]:
  """Per-example outputs of `fn` (default: the task's predict) over a whole split: every
  example exactly once, in the source's order."""
  predict = setup.predict_fn(fn)
  chunks = []
  for batch in setup.dataset(split, train=False):
    mask = batch.pop("mask")
    out = predict(variables, parallel.to_global(batch, setup.mesh))
    out["_mask"] = parallel.to_global({"m": mask}, setup.mesh)["m"]
    chunks.append(jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True)))
  outputs = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  keep = outputs.pop("_mask")
  return {k: v[keep] for k, v in outputs.items()}


def evaluate_split(setup: StageSetup, variables: dict, split: str, *, bootstrap: int = 0,
                   during_training: bool = False) -> dict:
  """The task's metrics over `split`, then each evaluator's that runs there (during
  training, only those with every_eval)."""
  outputs = predict_split(setup, variables, split)
  metrics = setup.task.evaluate(outputs, bootstrap=bootstrap, seed=setup.config.seed)
  ctx = evaluators_lib.EvalContext(
      task=setup.task, split=split, outputs=outputs, variables=variables,
      predict=functools.partial(predict_split, setup, variables), source=setup.sources[split],
      stage_dir=os.fspath(setup.dir), bootstrap=bootstrap, seed=setup.config.seed)
  for evaluator in setup.evaluators:
    if split in evaluator.splits and (evaluator.every_eval or not during_training):
      metrics.update(evaluator(ctx))
  return metrics


def _rule_holds(setup: StageSetup, log: dict, step: int) -> bool:
  """Whether the stage's stop_when holds on this evaluation's logged scalars; when it does,
  <stage>/stop_when.json records the step (written before the checkpoint of that step, so
  a resume from it stops too; one from an earlier checkpoint trains to it again)."""
  m = STOP_WHEN.fullmatch(setup.stage.stop_when)
  key, op, bound = m["key"], m["op"], float(m["value"])
  if key.startswith("train/") and key not in log:
    return False  # an evaluation that is not a log step: the rule waits for one that is
  if key not in log:
    raise ValueError(f"stages.{setup.name}.stop_when={setup.stage.stop_when!r}: this "
                     f"evaluation logged no {key!r}; it logged {sorted(log)}")
  value = log[key]
  holds = {">": value > bound, ">=": value >= bound, "<": value < bound,
           "<=": value <= bound}[op]
  if holds:
    logging.info("[%s] stop_when %s: %s = %.4f at step %d", setup.name,
                 setup.stage.stop_when, key, value, step)
    metric_writers.write_json_atomic(setup.dir / "stop_when.json",
                                     {"step": step, "rule": setup.stage.stop_when,
                                      "value": value})
  return holds


def _stopped_by_rule(setup: StageSetup, step: int) -> bool:
  """A stage restored at the step its stop_when held stops there."""
  path = setup.dir / "stop_when.json"
  if not setup.stage.get("stop_when") or not path.exists():
    return False
  return int(json.loads(path.read_text())["step"]) == step


def _variables(state: TrainState, which: str) -> dict:
  src = state.best if which == "best" else {"params": state.params, "model_state": state.model_state}
  return {"params": src["params"], **src["model_state"]}


def _scalars(metrics: dict, prefix: str) -> dict[str, float]:
  return {f"{prefix}{k}": float(v) for k, v in metrics.items()
          if np.ndim(v) == 0 and not k.endswith("_ci95")}


def _track_best(setup: StageSetup, state: TrainState, val: dict) -> TrainState:
  """Keeps the parameters with the best validation score (early stopping's memory)."""
  mode, _, key = setup.stage.select.partition(":")
  if key.removeprefix("val/") not in val:  # declared (checked at set-up) but not given
    raise ValueError(f"stages.{setup.name}.select={setup.stage.select!r}: this evaluation gave "
                     f"no {key.removeprefix('val/')!r}; it gave {sorted(val)}")
  score = float(val[key.removeprefix("val/")])
  best = float(state.best_score)
  if (score < best) if mode == "min" else (score > best):
    # A copy: the step donates state.params, which must not take the best with it.
    best = _copy({"params": state.params, "model_state": state.model_state})
    return state.replace(best=best,
                         best_score=jnp.asarray(score, jnp.float32),
                         best_step=jnp.copy(state.step), evals_since_best=jnp.zeros((), jnp.int32))
  return state.replace(evals_since_best=state.evals_since_best + 1)


@jax.jit
def _copy(tree):
  """Fresh buffers for every leaf, in one compiled call."""
  return jax.tree.map(jnp.copy, tree)


# --------------------------------------------------------------------------- the loop
def _check_finite(setup: StageSetup, state: TrainState, ckpt: checkpointing.Checkpointer) -> None:
  bad = int(state.bad_step)
  if bad >= 0:
    steps = ckpt.steps()
    kept = (f"the checkpoint at step {steps[-1]} in {ckpt.directory} is untouched" if steps else
            "no checkpoint was written yet, so a rerun starts the stage from scratch")
    # bad_step counts from 0; logs and checkpoints number a step by the updates done after it.
    raise NonFiniteError(f"[{setup.name}] non-finite loss or gradient at step {bad + 1}; {kept}")


def _profile(setup: StageSetup, step: int) -> None:
  """Traces steps [start, stop) of `config.profile_steps='start:stop'` into <stage>/profile;
  step=-1 closes a trace still open when the stage ends."""
  window = setup.config.profile_steps
  if not window:
    return
  start, stop = (int(x) for x in window.split(":"))
  if step == start:
    jax.profiler.start_trace(str(setup.dir / "profile"))
    setup.tracing = True
  elif setup.tracing and (step == stop or step == -1):
    jax.profiler.stop_trace()
    setup.tracing = False


def _every(n: int, step: int, last: int) -> bool:
  return step == last or (n > 0 and step % n == 0)


def jit_train_step(setup: StageSetup, tx, shardings, model_state):
  """The stage's step, jitted with explicit shardings; the state is donated."""
  step = make_train_step(setup.task, tx, setup.schedule, seed=setup.config.seed,
                         accumulate=setup.stage.opt.accumulate_steps,
                         frozen_state_mask=_frozen_state_mask(model_state, setup.stage.freeze))
  return jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(setup.mesh)),
                 out_shardings=(shardings, parallel.replicated(setup.mesh)), donate_argnums=0)


def train_stage(setup: StageSetup, workdir: epath.Path) -> TrainState:
  """Trains one stage to num_steps (or early stop), resuming whatever was there."""
  stage, name = setup.stage, setup.name
  train_ds = setup.dataset("train", train=True)
  data_iter = iter(train_ds)
  spec = setup.state_spec
  shardings = spec.shardings
  ckpt = checkpointing.Checkpointer(setup.dir / "checkpoints", keep=stage.keep_checkpoints,
                                   owner=True)
  state = _restore_or_init(setup, ckpt, data_iter, spec, workdir)
  step_fn = jit_train_step(setup, spec.tx, shardings, state.model_state)
  first = int(state.step)
  writer = metric_writers.MetricWriter(setup.dir, resume_step=first)
  progress = metric_writers.Progress(stage.num_steps, first, name)
  logging.info("[%s] %d parameters; training steps %d..%d", name,
               optim.count_params(state.params), first, stage.num_steps)
  stopped_early = (stage.patience > 0 and int(state.evals_since_best) >= stage.patience
                   or _stopped_by_rule(setup, first))
  # The writer's event file is closed on every way out (an error, a preemption), so a later
  # run in the same process (a notebook, the tests) inherits no open file.
  try:
    for step in range(first + 1, stage.num_steps + 1) if not stopped_early else ():
      _profile(setup, step - 1)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = step_fn(state, parallel.to_global(next(data_iter), setup.mesh))
      log, last = {}, stage.num_steps
      if _every(stage.log_every, step, last):
        _check_finite(setup, state, ckpt)
        log.update(_scalars(metrics, "train/"), **progress.report(step))
        setup.task.on_log(step, log)
      if (stage.select or stage.get("stop_when")) and _every(stage.eval_every, step, last):
        t = time.monotonic()
        _check_finite(setup, state, ckpt)
        if stage.select or stage.get("stop_when", "").startswith("eval/validation/"):
          val = evaluate_split(setup, _variables(state, "last"), "validation",
                               during_training=True)
          log.update(_scalars(val, "eval/validation/"))
        if stage.get("stop_when", "").startswith("eval/train/"):
          log.update(_scalars(evaluate_split(setup, _variables(state, "last"), "train",
                                             during_training=True), "eval/train/"))
        progress.pause(time.monotonic() - t)
        ruled = bool(stage.get("stop_when")) and _rule_holds(setup, log, step)
        # Evaluations before select_after are logged but are no candidates and do not count
        # for patience (the last one is, if stop_when ends the stage before select_after).
        if stage.select and (step >= stage.get("select_after", 0) or ruled):
          state = jax.device_put(_track_best(setup, state, val), shardings)
        stopped_early = ruled or (stage.patience > 0
                                  and int(state.evals_since_best) >= stage.patience)
      if log:
        writer.write(step, log)
      preempted = _preempted(step)
      if _every(stage.checkpoint_every, step, last) or preempted or stopped_early:
        _check_finite(setup, state, ckpt)
        writer.flush()  # the events up to this checkpoint outlive a kill after it
        ckpt.save(step, _checkpointed(state), data_iter)
      if preempted:
        ckpt.wait()
        raise Preempted(f"[{name}] preempted; checkpoint saved at step {step}")
      if stopped_early:
        logging.info("[%s] early stop at step %d (best step %d)", name, step, int(state.best_step))
        break
    _profile(setup, -1)
    ckpt.wait()
    ckpt.close()
  finally:
    writer.close()
  return state


# --------------------------------------------------------------------------- results
def finish_stage(setup: StageSetup, state: TrainState) -> dict:
  """Evaluates the selected parameters on every split and writes the stage's outputs."""
  which = "best" if setup.stage.select else "last"
  variables = _variables(state, which)
  step = int(state.best_step) if which == "best" else int(state.step)
  # The task's extra state (SwAV's queue) is exported beside the collections, as it ended.
  checkpointing.save_variables(setup.dir / "variables", {**variables, **state.extra})
  metrics = {}
  for split in EVAL_SPLITS:
    result = evaluate_split(setup, variables, split, bootstrap=setup.stage.bootstrap)
    metrics.update({f"{split}/{k}": v for k, v in result.items()})
  stage_result = {"step": step, "checkpoint": which, "metrics": metrics}
  table = stage_rows(setup.name, setup.task, metrics)
  metric_writers.write_json_atomic(setup.dir / "results.json",
                                   {"stages": {setup.name: stage_result}, "table": table})
  return stage_result


def stage_rows(name: str, task, metrics: dict) -> list[dict]:
  """The stage's rows of results.json's table (Task.table_rows; none if not in_table)."""
  if not task.in_table:
    return []
  rows = []
  for suffix, prefix in task.table_rows():
    own = {f"test/{k[len('test/' + prefix):]}": v for k, v in metrics.items()
           if k.startswith(f"test/{prefix}")}
    rows.append(table_row(name + suffix, task.headline, own))
  return rows


def table_columns(task, keys: set[str]) -> set[str]:
  """The metric names a stage's table rows can show, from its declared metric keys."""
  return {k[len(prefix):] for _, prefix in task.table_rows() for k in keys
          if k.startswith(prefix)}


def table_row(name: str, headline: str, metrics: dict) -> dict:
  """One row of results.json's table: test metrics, the headline first, with CIs."""
  row = {"model": name}
  keys = [headline] + sorted(k.removeprefix("test/") for k in metrics
                             if k.startswith("test/") and not k.endswith("_ci95")
                             and k != f"test/{headline}")
  for key in keys:
    if f"test/{key}" in metrics:
      row[key] = metrics[f"test/{key}"]
      if f"test/{key}_ci95" in metrics:
        row[f"{key}_ci95"] = metrics[f"test/{key}_ci95"]
  return row


def markdown_table(table: list[dict], columns: list[str]) -> str:
  """The results table as markdown: value [lo, hi] per headline column."""
  lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for row in table:
    cells = []
    for c in columns:
      v, ci = row.get(c), row.get(f"{c}_ci95")
      cells.append("" if v is None else f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# --------------------------------------------------------------------------- stages
def _check_state(setup: StageSetup) -> int:
  """The stage's state is buildable (optimiser regexes, teacher, FSDP rules) and a stage
  checkpoint that does not fit the config is an error, before anything is written.
  Returns the newest checkpoint's step (0 if none)."""
  for key in ("init_from", "teacher_from"):  # sources given as paths exist
    param_sources.check_sources(setup.stage.get(key, ""), setup.dir.parent,
                                f"stages.{setup.name}.{key}")
  ckpt_dir = setup.dir / "checkpoints"
  abstract = _checkpointed(setup.state_spec.abstract)  # built (and cached) now
  if not ckpt_dir.exists():
    return 0
  ckpt = checkpointing.Checkpointer(ckpt_dir, keep=setup.stage.keep_checkpoints)
  steps = ckpt.steps()
  if steps:
    try:
      ckpt.check_fits(steps[-1], abstract)
    except checkpointing.CheckpointMismatchError:
      raise
    except Exception:  # pylint: disable=broad-except
      pass  # unreadable metadata: restore_latest sets that step aside and falls back
  ckpt.close()
  return steps[-1] if steps else 0


def _dependencies(config, name: str) -> set[str]:
  """The stages `name` inits from, distils from, or compares against (an evaluator's
  `against`, e.g. evaluation/paired.py's)."""
  stage = config.stages[name]
  compared = {str(e.get("against", "")) for e in (stage.get("evals") or {}).values()}
  return (set(source_names(f"{stage.init_from},{stage.get('teacher_from', '')}")) | compared) \
      & set(config.stages)


def stage_order(config) -> list[str]:
  """Stages in dependency order (a stage runs after those it inits from or compares
  against); ties by name.

  ml_collections sorts a ConfigDict's keys, so the order cannot come from the config file.
  """
  order, pending = [], set(config.stages)
  while pending:
    ready = sorted(n for n in pending if not _dependencies(config, n) & pending)
    if not ready:
      raise ConfigError(f"init_from forms a cycle among stages {sorted(pending)}")
    order.append(ready[0])
    pending.remove(ready[0])
  return order


def _check_columns(setups: list[StageSetup]) -> None:
  """Every column of the printed table is a metric some stage in the table declares (a
  stage may lack one: GLAM's global stage has no fused map)."""
  declared = set().union(*[table_columns(s.task, s.metric_keys) for s in setups
                           if s.task.in_table])
  missing = sorted({c for s in setups if s.task.in_table for c in s.task.columns} - declared)
  if missing:
    raise ValueError(f"table columns {missing} are declared by no stage's task or evaluators")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every stage of `config` in order into `workdir`; returns the combined results.

  Raises ConfigError (bad config, nothing written), Preempted (checkpoint saved) or
  NonFiniteError (last good checkpoint kept).
  """
  check_config(config)
  stage_records.allowed_resume_changes(config)
  workdir = _absolute(workdir)
  mesh = parallel.make_mesh()
  data_sources = open_sources(config)  # once: every stage reads the same dataset
  setups = [StageSetup(config, name, workdir, mesh, data_sources) for name in stage_order(config)]
  _check_columns(setups)
  finished = {s.name: stage_records.check_finished(s, config) for s in setups}
  records = {s.name: stage_records.resume_records(s, config, _check_state(s))
             for s in setups if not finished[s.name]}
  lock = _hold_workdir(workdir)
  try:
    if metric_writers.is_writer():
      metric_writers.write_json_atomic(workdir / "config.json", config.to_dict())
      metric_writers.write_json_atomic(workdir / "run.json",
                                       run_info.collect(config, setups[0].sources))
    _barrier("workdir created")
    _run_stages(setups, finished, records, workdir)
    columns = [c for s in setups if s.task.in_table for c in s.task.columns]
    results = collect_results(workdir, [s.name for s in setups], list(dict.fromkeys(columns)))
    tasks.finish_run(config, workdir, results)
    return results
  finally:
    lock.release()


def _hold_workdir(workdir: epath.Path) -> workdir_lock.WorkdirLock:
  """Creates the workdir and takes its lock (process 0, for every process); a workdir that
  cannot be made, or that another live run holds, is exit 2 before anything is written."""
  lock = workdir_lock.WorkdirLock(workdir, enabled=metric_writers.is_writer())
  error = ""
  if metric_writers.is_writer():
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      lock.acquire()
    except OSError as e:
      error = f"workdir {workdir}: cannot create or write it: {e.strerror or e}"
    except ConfigError as e:
      error = str(e)
  if jax.process_count() > 1:  # every process stops if process 0 could not take it
    failed = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
    error = error or ("process 0 could not take the workdir" if int(failed) else "")
  if error:
    raise ConfigError(error)
  return lock


def _run_stages(setups: list[StageSetup], finished: dict, records: dict,
                workdir: epath.Path) -> None:
  _SIGNALLED.clear()  # a notebook may call again after a preemption
  old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    for setup in setups:
      if finished[setup.name]:
        logging.info("[%s] finished earlier; skipped", setup.name)
        continue
      if metric_writers.is_writer() and records[setup.name] is not None:
        setup.dir.mkdir(parents=True, exist_ok=True)
        metric_writers.write_json_atomic(setup.dir / "stage_config.json", records[setup.name])
      finish_stage(setup, train_stage(setup, workdir))
      _barrier(f"stage {setup.name} finished")  # others read what process 0 wrote
  finally:
    signal.signal(signal.SIGTERM, old_handler)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _absolute(path: str | epath.Path) -> epath.Path:
  """orbax wants absolute paths; gs:// ones already are."""
  path = epath.Path(path)
  return path if "://" in str(path) else epath.Path(os.path.abspath(path))


def collect_results(workdir: epath.Path, names: list[str], columns: list[str]) -> dict:
  """Merges the stages' results.json into workdir/results.json and prints the table."""
  results = {"stages": {}, "table": []}
  for name in names:
    stage_results = metric_writers.read_json(workdir / name / "results.json")
    results["stages"].update(stage_results["stages"])
    results["table"].extend(stage_results["table"])
  metric_writers.write_json_atomic(workdir / "results.json", results)
  if results["table"] and metric_writers.is_writer():
    print(markdown_table(results["table"], columns), flush=True)
  return results
