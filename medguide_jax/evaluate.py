"""Re-evaluating and exploring finished runs.

  python -m medguide_jax.evaluate --workdir=W [--stages=guided_plus,inferior]

re-evaluates every finished stage of W from its saved variables, prints the results
table and writes W/reevaluation.json. In Colab:

  run = medguide_jax.load_run(W)              # the config's default stage
  out = run.predict(batch)                     # batch: dict of numpy arrays, as the pipeline makes
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import jax
import ml_collections
from absl import app, flags
from etils import epath

from medguide_jax import checkpointing, metric_writers, parallel, train


@dataclasses.dataclass
class Run:
  """A finished stage: its config, task (whose `.model` is the flax module) and variables."""
  config: ml_collections.ConfigDict
  stage: str
  task: Any
  variables: dict
  setup: Any

  @property
  def model(self):
    return self.task.model

  def predict(self, batch: dict) -> dict:
    """The task's eval-mode outputs for a host batch (numpy in, numpy out)."""
    return jax.tree.map(jax.device_get, self.setup.predict_fn()(self.variables, batch))

  def evaluate(self, split: str = "test", bootstrap: int = 0) -> dict:
    return train.evaluate_split(self.setup, self.variables, split, bootstrap=bootstrap)


def load_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir} a medguide_jax workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def finished_stages(workdir: str | epath.Path, config) -> list[str]:
  """The stages of `config` that finished in `workdir`, in run order."""
  return [s for s in train.stage_order(config)
          if (epath.Path(workdir) / s / "results.json").exists()]


def load_run(workdir: str | epath.Path, stage: str | None = None) -> Run:
  """The config, model and parameters of a finished stage of the run in `workdir`.

  With no `stage`: the method's default stage (config.default_stage) if it finished in
  `workdir`, else the last finished stage in run order (a run made with `stages=...` may
  not have run the default one). FileNotFoundError when no stage (or not `stage`) finished.
  """
  workdir = epath.Path(workdir)
  config = load_config(workdir)
  done = finished_stages(workdir, config)
  if stage is None:
    if not done:
      raise FileNotFoundError(f"no stage of {workdir} has finished; stages: "
                              f"{train.stage_order(config)}")
    stage = config.get("default_stage") if config.get("default_stage") in done else done[-1]
  if stage not in config.stages:
    raise ValueError(f"stage {stage!r} is not in {workdir}; stages: {list(config.stages)}")
  if stage not in done:
    raise FileNotFoundError(f"stage {stage!r} of {workdir} has not finished; finished: {done}")
  setup = train.StageSetup(config, stage, workdir, parallel.make_mesh())
  variables = checkpointing.load_variables(workdir / stage / "variables")
  return Run(config=config, stage=stage, task=setup.task, variables=variables, setup=setup)


_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's workdir.")
_STAGES = flags.DEFINE_list("stages", [], "Stages to evaluate (default: every finished one).")


def main(argv) -> int:
  del argv
  workdir = epath.Path(_WORKDIR.value)
  try:
    config = load_config(workdir)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  done = finished_stages(workdir, config)
  unfinished = [s for s in train.stage_order(config) if s not in done]
  names = _STAGES.value or done
  if not names:
    print(f"error: no stage of {workdir} has finished (unfinished: {', '.join(unfinished)}); "
          "nothing to evaluate", file=sys.stderr)
    return 1
  if unfinished and not _STAGES.value:
    print(f"not evaluated (unfinished): {', '.join(unfinished)}", file=sys.stderr)
  not_done = [n for n in names if n not in done]
  if not_done:
    print(f"error: --stages names stages that have not finished in {workdir}: "
          f"{', '.join(not_done)} (finished: {', '.join(done) or 'none'})", file=sys.stderr)
    return 1
  results, columns = {"stages": {}, "table": []}, []
  for name in names:
    run = load_run(workdir, name)
    metrics = {}
    for split in train.EVAL_SPLITS:
      metrics.update({f"{split}/{k}": v for k, v in
                      run.evaluate(split, bootstrap=config.stages[name].bootstrap).items()})
    results["stages"][name] = {"metrics": metrics}
    results["table"] += train.stage_rows(name, run.task, metrics)
    if run.task.in_table:
      columns += [c for c in run.task.columns if c not in columns]
  metric_writers.write_json_atomic(workdir / "reevaluation.json", results)
  print(train.markdown_table(results["table"], columns))
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(lambda argv: sys.exit(main(argv)))
