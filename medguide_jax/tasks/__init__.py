"""One module per method; each has `make_task(ctx) -> Task` for the stage in `ctx.stage`.

`get_task(ctx)` finds the module of `ctx.config.method`: a method is added by a module here
and a line in METHODS, never by a branch in the trainer. A module may also define
`finish_run(config, workdir, results)`, called once every stage has finished.
"""
from __future__ import annotations

import importlib

from medguide_jax.tasks.base import LossState, Task, TaskContext

__all__ = ["LossState", "METHODS", "Task", "TaskContext", "finish_run", "get_task"]

METHODS = {"guidance": "medguide_jax.tasks.guidance", "ssl": "medguide_jax.tasks.ssl",
           "glam": "medguide_jax.tasks.glam",
           "missing_modality": "medguide_jax.tasks.missing_modality",
           "hybridmed": "medguide_jax.tasks.hybridmed",
           "downstream": "medguide_jax.tasks.downstream"}


def get_task(ctx: TaskContext) -> Task:
  """The Task for `ctx.stage.task` of this experiment's method (config.method)."""
  method = ctx.config.get("method", "")
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; valid: {sorted(METHODS)}")
  return importlib.import_module(METHODS[method]).make_task(ctx)


def finish_run(config, workdir, results: dict) -> None:
  """The method module's `finish_run(config, workdir, results)`, if it has one: run-level
  outputs drawn from every stage's results once all have finished (missing_modality's AUC
  against missing rate plot). Nothing for the other methods."""
  module = importlib.import_module(METHODS[config.get("method", "")])
  hook = getattr(module, "finish_run", None)
  if hook is not None:
    hook(config, workdir, results)
