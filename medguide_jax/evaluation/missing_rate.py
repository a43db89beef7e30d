"""The missing-rate sweep of the missing_modality method: AUC as clinical data goes missing.

For each rate r in `rates` and each of `masks` seeded draws, round(r P) of the split's P
patients lose their clinical data (patients, not bags: every bag of a patient is affected
alike). A bag's probabilities are the task's `probs` when its patient keeps the clinical
data and `probs_absent/<policy>` when not; a patient's are the mean (BALNMP's merge) or
the max of its bags'. Per inference policy and rate:

  <policy>/missing_<r>/auc                 mean over the masks of the patient-level AUC,
                                           with a bootstrap 95% interval over patients
  <policy>/missing_<r>/{accuracy,f1,sensitivity,specificity}_at_0.5
  <policy>/missing_<r>/{...}_at_youden     at the threshold maximising Youden's J on the
                                           validation split with complete data (the paper
                                           reports at the ROC cut-off, BALNMP re-reports at 0.5)

The masks depend on (config seed, mask index, rate) only, so every stage and policy of a run
sees the same patients lose their data: differences between rows are paired. On the test
split it also writes <stage>/predictions.csv (one row per patient: label, the probability
with and without clinical data per policy) and redraws <workdir>/auc_vs_missing_rate.png
from every finished stage's results (one line per table row, CI bands; also logged to the
stage's TensorBoard events). Threshold metrics need two classes (binary tasks); with more,
only the AUC (macro one-vs-rest) is given.
"""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
from etils import epath

from medguide_jax import metric_writers
from medguide_jax.data import images, sources
from medguide_jax.evaluation import evaluators
from medguide_jax.evaluation import metrics as metrics_lib

RATES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
THRESHOLD_METRICS = ("accuracy", "f1", "sensitivity", "specificity")


def rate_key(rate: float) -> str:
  return f"missing_{rate:.1f}"


def patients_of(source) -> list[str]:
  """The patient of every record of a split, in order (read once per open source)."""
  return sources.once_per_source(source, "patients", lambda: [
      images.text(source[i]["patient"]) for i in range(len(source))])


def missing_masks(num_patients: int, rate: float, masks: int, seed: int) -> np.ndarray:
  """bool [masks, P]: which patients lack clinical data, round(rate P) of them per mask."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"missing rate {rate} outside [0, 1]")
  count = int(round(rate * num_patients))
  out = np.zeros((masks, num_patients), bool)
  for k in range(masks):
    rng = np.random.default_rng([seed, k, int(round(rate * 1000))])
    out[k, rng.permutation(num_patients)[:count]] = True
  return out


def threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
  """Binary metrics of `scores >= threshold` (written out: four counts; sklearn's
  definitions, 0 where a denominator is 0)."""
  pred, pos = scores >= threshold, labels == 1
  tp, fp = np.sum(pred & pos), np.sum(pred & ~pos)
  fn, tn = np.sum(~pred & pos), np.sum(~pred & ~pos)
  div = lambda a, b: float(a / b) if b else 0.0
  return {"accuracy": div(tp + tn, len(labels)), "f1": div(2 * tp, 2 * tp + fp + fn),
          "sensitivity": div(tp, tp + fn), "specificity": div(tn, tn + fp)}


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
  """The score threshold maximising sensitivity + specificity - 1 (ties: the highest),
  over the thresholds of the ROC curve (every distinct score)."""
  best, best_j = 0.5, -np.inf
  for t in np.unique(scores)[::-1]:
    m = threshold_metrics(labels, scores, float(t))
    j = m["sensitivity"] + m["specificity"] - 1
    if j > best_j + 1e-12:
      best, best_j = float(t), j
  return best


class MissingRate(evaluators.Evaluator):
  """The sweep (module docstring). Options: rates, masks, aggregate ('mean' | 'max')."""

  def __init__(self, task, *, rates=RATES, masks: int = 5, aggregate: str = "mean", **kw):
    super().__init__(task, **kw)
    rates = [float(r) for r in (rates.split(",") if isinstance(rates, str) else rates)]
    bad = [r for r in rates if not 0.0 <= r <= 1.0]
    if bad:
      raise ValueError(f"rates {bad} outside [0, 1]")
    if masks < 1:
      raise ValueError(f"masks={masks} must be >= 1")
    if aggregate not in ("mean", "max"):
      raise ValueError(f"aggregate={aggregate!r}; valid: 'mean', 'max'")
    self.rates, self.masks, self.aggregate = tuple(rates), int(masks), aggregate
    self.binary = len(task.class_names) == 2
    self._youden: dict[str, float] = {}

  def keys(self) -> set[str]:
    per_rate = ["auc"] + ([f"{m}_at_{t}" for m in THRESHOLD_METRICS for t in ("0.5", "youden")]
                          if self.binary else [])
    return {f"{p}/{rate_key(r)}/{m}" for p in self.task.policies for r in self.rates
            for m in per_rate}

  def _by_patient(self, ctx) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(patient ids, bag -> patient index [N], patient labels [P])."""
    bags = patients_of(ctx.source)
    names = sorted(set(bags))
    index = {p: i for i, p in enumerate(names)}
    of_bag = np.asarray([index[p] for p in bags])
    labels = np.full(len(names), -1, np.int64)
    for i, y in zip(of_bag, np.asarray(ctx.outputs["label"])):
      if labels[i] not in (-1, y):
        raise ValueError(f"patient {names[i]!r} has bags labelled {labels[i]} and {y}")
      labels[i] = y
    return names, of_bag, labels

  def _merge(self, probs: np.ndarray, of_bag: np.ndarray, num: int) -> np.ndarray:
    out = np.zeros((num, probs.shape[1]))
    if self.aggregate == "mean":
      np.add.at(out, of_bag, probs)
      return out / np.bincount(of_bag, minlength=num)[:, None]
    out[:] = -np.inf
    np.maximum.at(out, of_bag, probs)
    return out

  def run(self, ctx: evaluators.EvalContext) -> dict:
    names, of_bag, labels = self._by_patient(ctx)
    num = len(names)
    present = self._merge(np.asarray(ctx.outputs["probs"], np.float64), of_bag, num)
    result, table = {}, {"patient": names, "label": labels.tolist(),
                         "probs": present[:, -1].tolist()}
    for policy in self.task.policies:
      absent = self._merge(np.asarray(ctx.outputs[f"probs_absent/{policy}"], np.float64),
                           of_bag, num)
      table[f"probs_absent/{policy}"] = absent[:, -1].tolist()
      if ctx.split == "validation" and self.binary:
        self._youden[policy] = youden_threshold(labels, present[:, 1])
      for rate in self.rates:
        missing = missing_masks(num, rate, self.masks, ctx.seed)           # [K, P]
        probs = np.where(missing[..., None], absent[None], present[None])  # [K, P, C]
        key = f"{policy}/{rate_key(rate)}"
        def mean_auc(y, p):  # nan (no warning) for a resample with one class only
          aucs = np.array([metrics_lib.roc_auc_ovr(y, p[:, k]) for k in range(p.shape[1])])
          return float(np.mean(aucs[~np.isnan(aucs)])) if (~np.isnan(aucs)).any() else np.nan
        stacked = probs.transpose(1, 0, 2)                                 # [P, K, C]
        result[f"{key}/auc"] = mean_auc(labels, stacked)
        if ctx.bootstrap:
          result[f"{key}/auc_ci95"] = metrics_lib.bootstrap_ci(
              mean_auc, labels, stacked, num_samples=ctx.bootstrap, seed=ctx.seed)
        if self.binary:
          for name, threshold in (("0.5", 0.5), ("youden", self._youden.get(policy, 0.5))):
            per_mask = [threshold_metrics(labels, probs[k, :, 1], threshold)
                        for k in range(self.masks)]
            for m in THRESHOLD_METRICS:
              result[f"{key}/{m}_at_{name}"] = float(np.mean([d[m] for d in per_mask]))
    if ctx.split == "test":
      self._write_predictions(os.path.join(ctx.stage_dir, "predictions.csv"), table)
    return result

  @staticmethod
  def _write_predictions(path: str, table: dict) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    columns = list(table)
    writer.writerow(columns)
    for row in zip(*(table[c] for c in columns)):
      writer.writerow([f"{v:.6f}" if isinstance(v, float) else v for v in row])
    metric_writers.write_text_atomic(epath.Path(path), buf.getvalue())


def auc_curves(workdir: str) -> dict[str, dict]:
  """{table row: {'rates': [...], 'auc': [...], 'ci': [[lo, hi], ...]}} from every finished
  stage's results.json in `workdir` (its `missing_<r>/auc` columns)."""
  curves = {}
  for path in sorted(epath.Path(workdir).glob("*/results.json")):
    for row in json.loads(path.read_text()).get("table", []):
      rates = sorted(float(k[len("missing_"):-len("/auc")]) for k in row
                     if k.startswith("missing_") and k.endswith("/auc"))
      if rates:
        keys = [f"{rate_key(r)}/auc" for r in rates]
        curves[row["model"]] = {"rates": rates, "auc": [row[k] for k in keys],
                                "ci": [row.get(f"{k}_ci95") for k in keys]}
  return curves


def plot_auc_vs_missing_rate(curves: dict[str, dict], path: str) -> bytes:
  """A PNG of AUC against missing rate, one line (with its CI band) per row; written to
  `path` atomically; returns the PNG bytes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
  for name, c in curves.items():
    line, = ax.plot(c["rates"], c["auc"], marker="o", label=name)
    if all(ci is not None for ci in c["ci"]):
      lo, hi = zip(*c["ci"])
      ax.fill_between(c["rates"], lo, hi, color=line.get_color(), alpha=0.15)
  ax.set_xlabel("test patients without clinical data (missing rate)")
  ax.set_ylabel("patient-level AUC (95% CI)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower left")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  if metric_writers.is_writer():
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
      f.write(buf.getvalue())
    os.replace(tmp, path)
  return buf.getvalue()
