"""What a task gives the trainer: the base class, with a no-op default for every optional hook.

A task is one stage of a method: what to initialise (`init`), what to minimise (`loss`),
what to compute per example in eval mode (`predict`) and which metrics those outputs give
(`evaluate`, declared up front by `metric_keys`). Networks live in models/, losses in
losses/, decoding in data/, and evaluators that need more than the task's own outputs
(kNN, perturbations, prediction files, pictures) in evaluation/, named in the stage's
`evals` config. The trainer calls every hook below unconditionally.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

from medguide_jax.data import decoders

Variables = dict[str, Any]   # {'params': ..., 'batch_stats': ...}


@dataclasses.dataclass(frozen=True)
class TaskContext:
  """Everything a task is built from; the trainer makes one per stage."""
  config: ml_collections.ConfigDict   # the whole experiment
  stage: ml_collections.ConfigDict    # this stage's block, run-time fields resolved
  train_source: Any                   # the training split (random access, len, dataset_info)
  mesh: Any = None                    # jax.sharding.Mesh, for per-device work (shard_map)


@flax.struct.dataclass
class LossState:
  """What a loss reads besides the parameters and the batch; it returns this with
  `model_state` and `extra` updated (the trainer ignores changes to the others)."""
  step: jax.Array    # updates done before this one (queues, schedules inside the loss)
  model_state: Any   # flax collections the model mutates (batch_stats)
  extra: Any         # the task's non-parameter training state (`init_extra`: SwAV's queue)
  teacher: Any       # frozen teacher variables (`init_teacher`), or {} without a teacher


class Task:
  """One stage of a method. Subclasses set `headline`, `columns` and `in_table`, and
  implement `init`, `loss`, `predict`, `evaluate` and `metric_keys`."""

  headline: str = "loss"         # the results-table metric, e.g. 'mean/balanced_accuracy'
  in_table: bool = True          # does this stage get a row in results.json's table
  columns: tuple[str, ...] = ()  # the metrics the printed table shows

  def __init__(self, ctx: TaskContext):
    self.ctx = ctx
    self.config, self.stage, self.mesh = ctx.config, ctx.stage, ctx.mesh

  # -- required ------------------------------------------------------------------------------
  def init(self, rng: jax.Array, batch: dict) -> Variables:
    """Variables for a (possibly abstract) example batch."""
    raise NotImplementedError

  def loss(self, params, state: LossState, batch: dict, rng: jax.Array
           ) -> tuple[jax.Array, tuple[dict, LossState]]:
    """Training loss over the global batch -> (loss, (metrics, state with the new
    model_state and extra))."""
    raise NotImplementedError

  def predict(self, variables: Variables, batch: dict) -> dict[str, jax.Array]:
    """Per-example outputs [B, ...] in eval mode (a 'loss' [B] if `select` uses val/loss)."""
    raise NotImplementedError

  def evaluate(self, outputs: dict[str, np.ndarray], *, bootstrap: int, seed: int
               ) -> dict[str, Any]:
    """Metrics over a whole split from the concatenated, unpadded outputs."""
    raise NotImplementedError

  def metric_keys(self) -> set[str]:
    """Every key `evaluate` may return (CI keys '<k>_ci95' implied): the trainer checks
    `select` and the table's columns against these before step 0."""
    raise NotImplementedError

  # -- optional hooks (defaults do nothing) --------------------------------------------------
  def init_extra(self) -> Any:
    """The task's non-parameter training state at step 0 (queues, counters): checkpointed
    with the train state, never trained, handed to `loss` as `state.extra`."""
    return {}

  def init_teacher(self, rng: jax.Array, batch: dict) -> Variables | None:
    """The structure of the task's frozen teacher variables (any values: the trainer
    loads them from the stage's `teacher_from`), or None for a task without a teacher."""
    del rng, batch
    return None

  def prepare_params(self, params):
    """A parameter transform before every step's forward pass and every predict; the
    gradient is taken at, and the update applied to, the transformed parameters (SwAV
    re-normalises its prototypes)."""
    return params

  @functools.cached_property
  def _layout_decoder(self):
    return decoders.for_dataset(self.config.data)

  def example_fn(self, record: dict, rng: np.random.Generator | None, *, augment: bool
                 ) -> dict[str, np.ndarray]:
    """One stored record -> one example of numpy arrays (runs in grain workers). The
    default is the decoder the dataset's record layout declares (data/decoders.py)."""
    return self._layout_decoder(record, rng, augment=augment)

  def table_rows(self) -> list[tuple[str, str]]:
    """(row-name suffix, metric prefix) of each row this stage puts in results.json's table:
    the row '<stage><suffix>' holds the test metrics under the prefix, unprefixed (so the
    headline and columns name them without it). One row of every metric by default; the
    missing_modality method gives one per inference policy ('multimodal/zero_fill')."""
    return [("", "")]

  def on_log(self, step: int, scalars: dict[str, float]) -> None:
    """Called on process 0's log steps with the scalars just logged (collapse warnings)."""
    del step, scalars


def apply_mutable(model, variables: Variables, mutable: list[str], *args, **kwargs):
  """model.apply returning (out, updated collections as a dict) even when nothing is mutable."""
  if not mutable:
    return model.apply(variables, *args, **kwargs), {}
  out, state = model.apply(variables, *args, mutable=mutable, **kwargs)
  return out, dict(state)
