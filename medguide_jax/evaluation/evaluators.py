"""Evaluators named in the config: what an evaluation computes beyond the task's own metrics.

A stage's `evals` block names them, in the spirit of big_vision's `config.evals`:

  evals = {"knn": {"k": 20, "prefix": ""},            # the entry's name is its type ...
           "robust": {"type": "robustness"},          # ... unless `type` says otherwise
           "pictures": {"count": 8, "splits": "test"}}

Fields every entry accepts: `type` (default: the entry's name), `prefix` (prepended to its
metric keys; default the evaluator's own, e.g. 'robust/'), `splits` (comma-separated;
default 'validation,test'), `every_eval` (also run at the evaluations during training, not
only on the selected parameters at the end; needed when `select` uses one of its metrics),
`enabled` (False turns an entry off from the command line). Every other field is an option
of that evaluator. Adding a missing-rate sweep or zero-shot classification means adding an
evaluator here, not a branch in a task's predict.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import ml_collections
import numpy as np

# type -> 'module:class' (imported on first use).
REGISTRY = {
    "knn": "medguide_jax.evaluation.knn:KNN",
    "knn_loo": "medguide_jax.evaluation.knn:KNNLeaveOneOut",
    "robustness": "medguide_jax.evaluation.robustness:Robustness",
    "predictions_csv": "medguide_jax.evaluation.glam_outputs:PredictionsCSV",
    "pictures": "medguide_jax.evaluation.glam_outputs:Pictures",
    "missing_rate": "medguide_jax.evaluation.missing_rate:MissingRate",
    "generation": "medguide_jax.evaluation.hybridmed:Generation",
    "retrieval": "medguide_jax.evaluation.hybridmed:Retrieval",
    "zero_shot": "medguide_jax.evaluation.hybridmed:ZeroShot",
    "paired": "medguide_jax.evaluation.paired:Paired",
    "dice_val_threshold": "medguide_jax.evaluation.segmentation:ValThresholdDice",
}


@dataclasses.dataclass
class EvalContext:
  """What an evaluator sees of one evaluation of one split."""
  task: Any                        # the stage's Task
  split: str
  outputs: dict[str, np.ndarray]   # task.predict over the split: every example once, in order
  variables: dict                  # the evaluated variables (global arrays)
  # predict(split, fn=None): outputs of fn(variables, batch) (default task.predict) over a
  # whole split, jitted and gathered by the trainer; fn must be the same object each call.
  predict: Callable[..., dict[str, np.ndarray]]
  source: Any                      # the split's random-access source (ids, pictures)
  stage_dir: str
  bootstrap: int
  seed: int


class Evaluator:
  """Base class: `keys()` declares the (unprefixed) metric keys `run(ctx)` may return."""
  default_prefix = ""

  def __init__(self, task, *, name: str, prefix: str | None = None,
               splits: str = "validation,test", every_eval: bool = False):
    self.task, self.name = task, name
    self.prefix = self.default_prefix if prefix is None else prefix
    self.splits = tuple(s.strip() for s in splits.split(",") if s.strip())
    self.every_eval = every_eval

  def keys(self) -> set[str]:
    return set()

  def run(self, ctx: EvalContext) -> dict[str, Any]:
    raise NotImplementedError

  def prefixed_keys(self) -> set[str]:
    return {self.prefix + k for k in self.keys()}

  def __call__(self, ctx: EvalContext) -> dict[str, Any]:
    return {self.prefix + k: v for k, v in self.run(ctx).items()}


def _evaluator_class(type_name: str):
  if type_name not in REGISTRY:
    raise ValueError(f"unknown evaluator type {type_name!r}; valid: {sorted(REGISTRY)}")
  module, _, cls = REGISTRY[type_name].partition(":")
  return getattr(importlib.import_module(module), cls)


def from_config(evals: ml_collections.ConfigDict | dict | None, task) -> list[Evaluator]:
  """The enabled evaluators of a stage's `evals` block, in name order. A bad entry is a
  ValueError naming `evals.<name>` (the trainer turns it into exit 2)."""
  evals = evals.to_dict() if hasattr(evals, "to_dict") else dict(evals or {})
  out = []
  for name, spec in sorted(evals.items()):
    options = dict(spec)
    if not options.pop("enabled", True):
      continue
    type_name = options.pop("type", name)
    try:
      out.append(_evaluator_class(type_name)(task, name=name, **options))
    except (TypeError, ValueError) as e:
      raise ValueError(f"evals.{name} ({type_name}): {e}") from e
  return out
