"""Closed / open accuracy of visual question answering, as VQA-RAD papers report it.

A VQA classifier predicts one class of the training answer vocabulary (data/vqa.py
'answers'). An answer outside that vocabulary (class -1: seen only in validation or test)
can never be predicted, so it counts WRONG: accuracies are over every question, not only
those a classifier could answer (otherwise a dataset whose open test answers are mostly
new would look easy). Accuracy is exact match of the normalised answer, i.e. of the class.

`vqa_accuracy` gives overall, closed and open accuracy, each with a percentile bootstrap
95% interval from evaluation/metrics.py (`with_intervals`: one resample of the questions
for all three, so they stay paired); a resample without closed (or open) questions has no
accuracy for them and is left out of that interval.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from medguide_jax.evaluation import metrics

KEYS = ("accuracy", "closed/accuracy", "open/accuracy")


def _accuracies(pred: np.ndarray, answer: np.ndarray, closed: np.ndarray) -> np.ndarray:
  """[3]: accuracy over all, closed and open questions (nan where there are none)."""
  correct = (pred == answer) & (answer >= 0)
  out = []
  for rows in (np.ones_like(closed), closed, ~closed):
    out.append(float(np.mean(correct[rows])) if rows.any() else np.nan)
  return np.asarray(out, np.float64)


def _checked(pred, answer, closed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  pred, answer, closed = np.asarray(pred), np.asarray(answer), np.asarray(closed)
  for name, a in (("pred", pred), ("answer", answer), ("closed", closed)):
    if a.ndim != 1:
      raise ValueError(f"vqa_accuracy: {name} must be 1-D [N], got shape {a.shape}")
  if not pred.shape == answer.shape == closed.shape:
    raise ValueError(f"vqa_accuracy: pred {pred.shape}, answer {answer.shape} and closed "
                     f"{closed.shape} must have one length")
  if not len(pred):
    raise ValueError("vqa_accuracy: no questions (N = 0)")
  for name, a in (("pred", pred), ("answer", answer)):
    if not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"vqa_accuracy: {name} must hold integer classes, got {a.dtype}")
  if closed.dtype != bool:
    raise ValueError(f"vqa_accuracy: closed must be bool, got {closed.dtype}")
  if (answer < -1).any():
    raise ValueError("vqa_accuracy: answer classes must be >= 0, or -1 for an answer outside "
                     f"the training vocabulary; got {int(answer.min())}")
  return pred.astype(np.int64), answer.astype(np.int64), closed


def vqa_accuracy(pred, answer, closed, *, bootstrap: int = 0, seed: int = 0
                 ) -> dict[str, Any]:
  """Accuracy of predicted answer classes.

  Args:
    pred: [N] int, the predicted class of each question.
    answer: [N] int, the true class; -1 = outside the training vocabulary (counted wrong).
    closed: [N] bool, True for a closed question.
    bootstrap: resamples for the 95% intervals (0: none). seed: the resampling seed.

  Returns:
    {'accuracy', 'closed/accuracy', 'open/accuracy'} (nan for a kind without questions),
    with '<key>_ci95' [lo, hi] when bootstrap > 0; 'closed/n', 'open/n' (questions),
    'open/out_of_vocabulary' and 'closed/out_of_vocabulary' (questions whose answer is -1).
  """
  pred, answer, closed = _checked(pred, answer, closed)
  out = metrics.with_intervals(list(KEYS), _accuracies(pred, answer, closed), _accuracies,
                               [pred, answer, closed], bootstrap, seed)
  out["closed/n"], out["open/n"] = int(closed.sum()), int((~closed).sum())
  out["open/out_of_vocabulary"] = int(((answer < 0) & ~closed).sum())
  out["closed/out_of_vocabulary"] = int(((answer < 0) & closed).sum())
  return out
