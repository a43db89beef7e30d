"""What a task provides to the trainer (train.py owns everything else)."""
from __future__ import annotations

from typing import Any, Protocol

import jax
import numpy as np

Variables = dict[str, Any]   # {'params': ..., 'batch_stats': ...}


class Task(Protocol):
  """A method's stage: what to initialise, what to minimise, how to evaluate."""

  headline: str        # the results-table metric, e.g. 'mean/balanced_accuracy'
  in_table: bool       # does this stage get a row in results.json's table
  columns: list[str]   # the metrics the printed table shows

  def init(self, rng: jax.Array, batch: dict) -> Variables:
    """Variables for a (possibly abstract) example batch."""

  def loss(self, params, model_state, batch: dict, rng: jax.Array, step: jax.Array
           ) -> tuple[jax.Array, tuple[dict, Any]]:
    """Training loss over the global batch -> (loss, (metrics, new model_state)).
    `step` counts the updates done before this one (queues, schedules inside the loss)."""

  def predict(self, variables: Variables, batch: dict) -> dict[str, jax.Array]:
    """Per-example outputs [B, ...] in eval mode (a 'loss' [B] if `select` uses val/loss)."""

  def evaluate(self, outputs: dict[str, np.ndarray], *, bootstrap: int, seed: int
               ) -> dict[str, Any]:
    """Metrics over a whole split from the concatenated, unpadded outputs."""


# Optional hooks the trainer calls when a task has them:
#   prepare_params(params) -> params        before every step's forward pass and predict
#                                           (SwAV re-normalises its prototypes)
#   example_fn(record, rng, *, augment)     the task's own decoding (multi-crop)
#   prepare_eval(predict_split)             before an evaluation; predict_split(split) gives
#                                           that split's outputs (kNN: the training bank)
#   on_log(step, scalars)                   after each log line (collapse warnings)
#   write_outputs(stage_dir, variables, source, outputs)
#                                           after the test split's predictions, on every
#                                           process (glam: predictions.csv, pictures)
