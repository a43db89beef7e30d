"""k-nearest-neighbour evaluation of a representation (no training).

`KNN` classifies a split by a weighted vote of the training split's features (Wu et al.
2018, as DINO's kNN monitor); `KNNLeaveOneOut` is the cheap within-split monitor used while
pretraining. Both read 'features' [N, F] and 'label' [N] (-1 = unlabelled) from the task's
outputs, and the class count from `task.num_classes`.
"""
from __future__ import annotations

import numpy as np

from medguide_jax.evaluation import evaluators
from medguide_jax.evaluation import metrics as metrics_lib


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  return a @ b.T


def knn_probs(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, *, k: int,
              num_classes: int, temperature: float = 0.07) -> np.ndarray:
  """Weighted kNN class scores: the k most cosine-similar bank entries vote with weight
  exp(sim / T); rows normalised to sum to 1. bank [M, F], bank_labels [M], queries [N, F]."""
  sims = _cosine(queries, bank)
  k = min(k, bank.shape[0])
  top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
  w = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
  votes = np.zeros((queries.shape[0], num_classes))
  np.add.at(votes, (np.arange(queries.shape[0])[:, None], bank_labels[top]), w)
  return votes / votes.sum(axis=1, keepdims=True)


def knn_loo_accuracy(features: np.ndarray, labels: np.ndarray, *, k: int) -> float:
  """Leave-one-out kNN accuracy within one split (unweighted vote)."""
  sims = _cosine(features, features)
  np.fill_diagonal(sims, -np.inf)
  k = min(k, features.shape[0] - 1)
  top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
  num_classes = int(labels.max()) + 1
  votes = np.zeros((features.shape[0], num_classes))
  np.add.at(votes, (np.arange(features.shape[0])[:, None], labels[top]), 1.0)
  return float(np.mean(np.argmax(votes, 1) == labels))


class KNN(evaluators.Evaluator):
  """balanced_accuracy, auc (with bootstrap CIs) and accuracy of a weighted k-NN vote over
  the training split's features. Options: k (20), temperature (0.07)."""
  default_prefix = "knn/"

  def __init__(self, task, *, k: int = 20, temperature: float = 0.07, **kw):
    super().__init__(task, **kw)
    if k < 1 or temperature <= 0:
      raise ValueError(f"k={k} must be >= 1 and temperature={temperature} > 0")
    self.k, self.temperature = int(k), float(temperature)

  def keys(self) -> set[str]:
    return {"balanced_accuracy", "auc", "accuracy"}

  def run(self, ctx: evaluators.EvalContext) -> dict:
    train = ctx.predict("train")
    keep = train["label"] >= 0
    labels = np.asarray(ctx.outputs["label"])
    labelled = labels >= 0
    probs = knn_probs(train["features"][keep], train["label"][keep],
                      np.asarray(ctx.outputs["features"], np.float32), k=self.k,
                      num_classes=ctx.task.num_classes, temperature=self.temperature)
    return metrics_lib.classification_metrics(labels[labelled], probs[labelled],
                                              bootstrap=ctx.bootstrap, seed=ctx.seed)


class KNNLeaveOneOut(evaluators.Evaluator):
  """knn_accuracy: leave-one-out k-NN accuracy within the split (absent when the split has
  fewer than two labelled examples or the dataset no classes). Option: k (20)."""

  def __init__(self, task, *, k: int = 20, **kw):
    super().__init__(task, **kw)
    if k < 1:
      raise ValueError(f"k={k} must be >= 1")
    self.k = int(k)

  def keys(self) -> set[str]:
    return {"knn_accuracy"}

  def run(self, ctx: evaluators.EvalContext) -> dict:
    labels = np.asarray(ctx.outputs["label"])
    labelled = labels >= 0
    if labelled.sum() <= 1 or not ctx.task.num_classes:
      return {}
    feats = np.asarray(ctx.outputs["features"], np.float32)
    return {"knn_accuracy": knn_loo_accuracy(feats[labelled], labels[labelled], k=self.k)}
