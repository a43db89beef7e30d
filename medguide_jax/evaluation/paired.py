"""Paired comparison of two stages on the same cases: `this stage − other stage`, with a
paired bootstrap interval.

Per-model intervals overlap long before a difference is unresolved: two models scored on
the same test cases share the cases' difficulty, so the interval of their difference is
much narrower than either model's. This evaluator gives that interval:

  evals = {"paired": {"save": True}}                      # in the stage compared against
  evals = {"paired": {"against": "inferior"}}             # in the stage compared

With `save` (the default) it writes the split's outputs (`task.predict`, every example in
order) to `<stage dir>/outputs_<split>.npz`. With `against=<stage>` it also reads
`<workdir>/<stage>/outputs_<split>.npz` (that stage must have run first, with this
evaluator), checks that both cover the same examples (same labels, in the same order), and
reports for every scalar metric of `task.evaluate` (or only `metrics`, comma-separated):

  paired/<against>/<metric>        this stage's value − the other's, on all cases
  paired/<against>/<metric>_ci95   [lo, hi]: 2.5th and 97.5th percentiles over `bootstrap`
                                   resamples of the cases, one index set per resample
                                   applied to both stages' outputs (a paired bootstrap)

The bootstrap count and seed are the stage's (`bootstrap`, the run's seed), so the
intervals are reproducible. Resamples where either metric is undefined (nan) are left out.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from medguide_jax import metric_writers
from medguide_jax.evaluation import evaluators
from medguide_jax.evaluation import metrics as metrics_lib


def outputs_path(stage_dir: str, split: str) -> str:
  return os.path.join(stage_dir, f"outputs_{split}.npz")


def save_outputs(path: str, outputs: dict) -> None:
  """The outputs as one .npz, written to a temporary file and renamed, so a reader never
  sees half a file (np.savez cannot write atomically itself)."""
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".outputs-", suffix=".npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in outputs.items()})
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_outputs(path: str) -> dict[str, np.ndarray]:
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} does not exist: the stage compared against must run first, with the "
        "'paired' evaluator (evals.paired.save=True) on this split")
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def _scalars(result: dict) -> dict[str, float]:
  return {k: float(v) for k, v in result.items()
          if not k.endswith("_ci95") and isinstance(v, (int, float, np.floating, np.integer))}


def paired_difference(evaluate, mine: dict, theirs: dict, *, bootstrap: int, seed: int,
                      keys: tuple[str, ...] = ()) -> dict:
  """{metric: mine − theirs, metric_ci95: [lo, hi]} over the metrics of `evaluate(outputs)`
  (a dict of scalars; only `keys` if given). Both output dicts are indexed with the same
  resampled rows."""
  a, b = _scalars(evaluate(mine)), _scalars(evaluate(theirs))
  names = [k for k in (keys or sorted(a)) if k in a and k in b]
  missing = [k for k in keys if k not in names]
  if missing:
    raise ValueError(f"metrics {missing} are not given by the task's evaluate; it gives "
                     f"{sorted(set(a) & set(b))}")
  result: dict = {k: a[k] - b[k] for k in names}
  if bootstrap > 0:
    n = len(next(iter(mine.values())))
    rng = np.random.default_rng(seed)
    values = np.empty((bootstrap, len(names)))
    for s in range(bootstrap):
      idx = rng.integers(0, n, size=n)
      ra = _scalars(evaluate({k: v[idx] for k, v in mine.items()}))
      rb = _scalars(evaluate({k: v[idx] for k, v in theirs.items()}))
      values[s] = [ra.get(k, np.nan) - rb.get(k, np.nan) for k in names]
    for k, (lo, hi) in zip(names, metrics_lib.percentile_interval(values, 0.05).T):
      result[f"{k}_ci95"] = [float(lo), float(hi)]
  return result


def _same_cases(mine: dict, theirs: dict, label_key: str, where: str) -> None:
  n_a, n_b = len(next(iter(mine.values()))), len(next(iter(theirs.values())))
  if n_a != n_b:
    raise ValueError(f"{where}: {n_b} examples there, {n_a} here; a paired comparison needs "
                     "the same cases")
  if label_key in mine and label_key in theirs and not np.array_equal(mine[label_key],
                                                                      theirs[label_key]):
    raise ValueError(f"{where}: the '{label_key}' of the examples differ from this stage's; "
                     "a paired comparison needs the same cases in the same order")


class Paired(evaluators.Evaluator):
  """Saves this stage's outputs and, with `against`, this − that stage's metrics with a
  paired bootstrap interval (module docstring)."""
  default_prefix = "paired/"

  def __init__(self, task, *, against: str = "", save: bool = True, metrics: str = "",
               **kw):
    super().__init__(task, **kw)
    self.against, self.save = against, bool(save)
    self.metrics = tuple(m.strip() for m in metrics.split(",") if m.strip())
    if self.metrics and not against:
      raise ValueError("metrics needs against=<stage>")

  def keys(self) -> set[str]:
    if not self.against:
      return set()
    names = self.metrics or tuple(sorted(self.task.metric_keys()))
    return {f"{self.against}/{k}{s}" for k in names for s in ("", "_ci95")}

  def run(self, ctx: evaluators.EvalContext) -> dict:
    outputs = {k: np.asarray(v) for k, v in ctx.outputs.items()}
    if self.save and metric_writers.is_writer():
      save_outputs(outputs_path(ctx.stage_dir, ctx.split), outputs)
    if not self.against:
      return {}
    path = outputs_path(os.path.join(os.path.dirname(ctx.stage_dir), self.against), ctx.split)
    theirs = load_outputs(path)
    missing = sorted(set(outputs) - set(theirs))
    if missing:
      raise ValueError(f"{path} lacks the outputs {missing} of this stage")
    theirs = {k: theirs[k] for k in outputs}
    _same_cases(outputs, theirs, getattr(ctx.task, "label_key", "label"), path)
    diff = paired_difference(lambda o: ctx.task.evaluate(o, bootstrap=0, seed=ctx.seed),
                             outputs, theirs, bootstrap=ctx.bootstrap, seed=ctx.seed,
                             keys=self.metrics)
    return {f"{self.against}/{k}": v for k, v in diff.items()}
