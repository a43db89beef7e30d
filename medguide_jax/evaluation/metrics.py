"""Host-side (numpy) classification metrics with bootstrap confidence intervals.

Definitions follow scikit-learn so that numbers are comparable with the reference code:
  * balanced accuracy = mean recall over the classes present in the labels;
  * AUC = Mann-Whitney U / (n_pos * n_neg) with average ranks for ties, i.e.
    P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg);
  * multi-class AUC = unweighted (macro) mean of one-vs-rest AUCs.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
  """Mean per-class recall over the classes present in `labels`.

  Args:
    labels: [N] int true classes.
    preds: [N] int predicted classes (classes absent from `labels` only count as errors).

  Returns:
    Balanced accuracy in [0, 1]; nan when N == 0.
  """
  labels, preds = np.asarray(labels).ravel(), np.asarray(preds).ravel()
  if labels.shape != preds.shape:
    raise ValueError(f"labels {labels.shape} and preds {preds.shape} differ in shape.")
  if labels.size == 0:
    return float("nan")
  recalls = [np.mean(preds[labels == c] == c) for c in np.unique(labels)]
  return float(np.mean(recalls))


def _average_ranks(scores: np.ndarray) -> np.ndarray:
  """1-based ranks of `scores` [N], tied values sharing the mean of their ranks."""
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  upper = np.cumsum(counts)  # rank of the last member of each tie group
  return (upper - (counts - 1) / 2.0)[inverse.ravel()]


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
  """AUC of `scores` [N] for boolean `positive` [N]; nan without both positives and negatives."""
  n_pos = int(positive.sum())
  n_neg = positive.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  rank_sum = _average_ranks(scores)[positive].sum()
  u_stat = rank_sum - n_pos * (n_pos + 1) / 2.0
  return float(u_stat / (n_pos * n_neg))


def roc_auc_ovr(labels: np.ndarray, probs: np.ndarray) -> float:
  """ROC AUC: binary, or macro one-vs-rest over the classes present in `labels`.

  Args:
    labels: [N] int true classes in [0, C).
    probs: [N, C] class scores (probabilities or logits: only their order matters). A 1-D
      [N] array is taken as the positive-class score of a binary problem.

  Returns:
    For C <= 2: the AUC of probs[:, -1] for labels == C - 1 (so for C == 2 exactly the binary
    AUC of probs[:, 1], as sklearn). For C > 2: the mean of the one-vs-rest AUCs of classes
    present in `labels`; a class with no positives or no negatives is skipped. nan if no
    AUC can be computed (e.g. a single class present).
  """
  labels, probs = np.asarray(labels).ravel(), np.asarray(probs, dtype=np.float64)
  if probs.ndim == 1:
    probs = np.stack([1.0 - probs, probs], axis=1)
  if probs.ndim != 2 or probs.shape[0] != labels.size:
    raise ValueError(f"probs must be [N, C] with N={labels.size}, got {probs.shape}.")
  num_classes = probs.shape[1]
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}).")
  if num_classes <= 2:
    return _binary_auc(labels == num_classes - 1, probs[:, -1])
  aucs = [_binary_auc(labels == c, probs[:, c]) for c in np.unique(labels)]
  aucs = [a for a in aucs if not np.isnan(a)]
  return float(np.mean(aucs)) if aucs else float("nan")


def _bootstrap_values(metric_fn: Callable[..., Any], arrays: Sequence[np.ndarray],
                      num_samples: int, seed: int) -> np.ndarray:
  """metric_fn on `num_samples` row-resamples of `arrays`: [S] or [S, K] for vector metrics.

  Every array is indexed with the same rows, so paired data stay paired.
  """
  arrays = [np.asarray(a) for a in arrays]
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError(f"arrays differ in length: {[len(a) for a in arrays]}.")
  if n == 0:
    raise ValueError("cannot bootstrap empty arrays.")
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_samples):
    idx = rng.integers(0, n, size=n)
    values.append(np.asarray(metric_fn(*[a[idx] for a in arrays]), dtype=np.float64))
  return np.stack(values)


def percentile_interval(values: np.ndarray, alpha: float) -> np.ndarray:
  """Nan-ignoring percentile interval of `values` [S, ...] -> [2, ...] (nan if all nan)."""
  q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]
  if values.ndim == 1:
    values = values[:, None]
    squeeze = True
  else:
    squeeze = False
  out = np.full((2, values.shape[1]), np.nan)
  for k in range(values.shape[1]):
    finite = values[:, k][~np.isnan(values[:, k])]
    if finite.size:
      out[:, k] = np.percentile(finite, q)
  return out[:, 0] if squeeze else out


def bootstrap_ci(metric_fn: Callable[..., float], *arrays: np.ndarray,
                 num_samples: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
  """Percentile bootstrap confidence interval of `metric_fn(*arrays)`.

  Args:
    metric_fn: maps the (resampled) arrays to a scalar, e.g. roc_auc_ovr.
    *arrays: arrays sharing their leading dim N; rows are resampled with replacement,
      with the same indices for every array.
    num_samples: number of bootstrap resamples.
    seed: numpy Generator seed (deterministic).
    alpha: 1 - coverage; 0.05 gives the 2.5th and 97.5th percentiles.

  Returns:
    (lo, hi). Resamples where the metric is nan (e.g. a single class drawn) are ignored;
    (nan, nan) if all are nan.
  """
  values = _bootstrap_values(metric_fn, arrays, num_samples, seed)  # [S]
  lo, hi = percentile_interval(values, alpha)
  return float(lo), float(hi)


def _ba_auc(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
  """(balanced accuracy of argmax(probs), macro OvR AUC) of one task: labels [N], probs [N, C]."""
  return balanced_accuracy(labels, np.argmax(probs, axis=-1)), roc_auc_ovr(labels, probs)


def _task_metrics(labels: np.ndarray, probs: Sequence[np.ndarray]) -> np.ndarray:
  """[2T + 2]: per task (balanced accuracy, AUC), then mean BA and mean AUC over tasks."""
  per_task = np.asarray([_ba_auc(labels[:, t], p) for t, p in enumerate(probs)],
                        dtype=np.float64)  # [T, 2]
  with np.errstate(all="ignore"):
    # nanmean: a task whose AUC is undefined (one class present) is left out of the mean.
    means = [np.nan if np.all(np.isnan(col)) else np.nanmean(col) for col in per_task.T]
  return np.concatenate([per_task.ravel(), means])


def with_intervals(keys: list[str], point: np.ndarray, metric_fn: Callable[..., Any],
                    arrays: Sequence[np.ndarray], bootstrap: int, seed: int) -> dict[str, Any]:
  """{key: point value} and, when bootstrap > 0, {key_ci95: [lo, hi]} from resampling rows
  of `arrays` jointly (one index set per resample for every key)."""
  result: dict[str, Any] = {k: float(v) for k, v in zip(keys, point)}
  if bootstrap > 0:
    values = _bootstrap_values(metric_fn, arrays, bootstrap, seed)  # [S, K]
    for k, (lo, hi) in zip(keys, percentile_interval(values, 0.05).T):
      result[f"{k}_ci95"] = [float(lo), float(hi)]
  return result


def classification_metrics(labels: np.ndarray, probs: np.ndarray, *, bootstrap: int = 0,
                           seed: int = 0) -> dict[str, Any]:
  """One task: balanced accuracy and (macro OvR) AUC with bootstrap 95% CIs, and accuracy.

  Args:
    labels: [N] int labels. probs: [N, C] class probabilities.
    bootstrap: resamples for the CIs (0: none). seed: bootstrap seed.

  Returns:
    {"balanced_accuracy", "auc", "accuracy"} and, when bootstrap > 0,
    "balanced_accuracy_ci95" and "auc_ci95".
  """
  labels, probs = np.asarray(labels), np.asarray(probs)
  result = with_intervals(["balanced_accuracy", "auc"], np.asarray(_ba_auc(labels, probs)),
                           _ba_auc, [labels, probs], bootstrap, seed)
  result["accuracy"] = float(np.mean(np.argmax(probs, -1) == labels))
  return result


def multitask_classification_metrics(
    labels: np.ndarray,
    probs: Sequence[np.ndarray],
    task_names: Sequence[str],
    *,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
  """Per-task and mean balanced accuracy and AUC, optionally with 95% bootstrap CIs.

  Args:
    labels: [N, T] int labels.
    probs: T arrays, task t of shape [N, C_t] (probabilities; argmax gives the prediction).
    task_names: T names.
    bootstrap: number of bootstrap resamples; 0 for no CIs.
    seed: bootstrap seed.

  Returns:
    {"<task>/balanced_accuracy", "<task>/auc", "mean/balanced_accuracy", "mean/auc"} as
    floats and, when bootstrap > 0, "<key>_ci95": [lo, hi] for each. Cases are resampled
    jointly across tasks (one index set per resample), so the mean-metric CIs keep the
    correlation between tasks.
  """
  labels = np.asarray(labels)
  probs = [np.asarray(p) for p in probs]
  num_tasks = len(task_names)
  if labels.ndim != 2 or labels.shape[1] != num_tasks or len(probs) != num_tasks:
    raise ValueError(f"need labels [N, {num_tasks}] and {num_tasks} probs arrays; got "
                     f"labels {labels.shape} and {len(probs)} arrays.")
  keys = [f"{t}/{m}" for t in task_names for m in ("balanced_accuracy", "auc")]
  keys += ["mean/balanced_accuracy", "mean/auc"]
  return with_intervals(keys, _task_metrics(labels, probs), lambda y, *p: _task_metrics(y, p),
                         [labels, *probs], bootstrap, seed)


def feature_std(features: np.ndarray) -> float:
  """Mean over dimensions of the per-dimension std of features [N, F] (collapse monitor:
  0 when every example maps to the same point)."""
  return float(np.mean(np.std(np.asarray(features, np.float32), axis=0)))
