"""Image classification, single- or multi-task: the one supervised task every method uses.

guidance's classifier stages (multi-task: the diagnosis and the 7-point criteria), ssl's
probe / finetune / scratch stages (single task), and every later linear probe or
label-efficient fine-tune are this task with a different network. What varies is wiring:

  model          a flax module called as model(batch, train=...) -> {'logits', 'features'?}:
                 'logits' [B, C] (single task) or one [B, C_t] per task
  task_names     None: one task, labels [B] int under 'label' (-1 = unlabelled, ignored);
                 a tuple: T tasks, labels [B, T] under 'labels'
  class_balanced Keras class_weight='balanced' per task from the training labels

The loss is the (class-weighted) softmax cross-entropy, mean over tasks; the metrics are
balanced accuracy and macro one-vs-rest AUC per task (and their means), with bootstrap 95%
intervals, from evaluation/metrics.py. Best-on-validation selection (`select`) and label
fractions (`train_examples`) are the trainer's, for every task.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medguide_jax.data import sources
from medguide_jax.evaluation import metrics as metrics_lib
from medguide_jax.losses import classification
from medguide_jax.tasks import base


def train_labels(train_source, key: str) -> np.ndarray:
  """Every training label ([N] or [N, T]), read once per open source (sources.record_field):
  every classifier stage of a run needs them."""
  return sources.record_field(train_source, key)


class SupervisedTask(base.Task):
  """Classification with (class-balanced) cross-entropy; see the module docstring."""

  def __init__(self, ctx: base.TaskContext, *, model, num_classes: Sequence[int],
               task_names: Sequence[str] | None = None, class_balanced: bool = False,
               headline: str | None = None, columns: Sequence[str] | None = None):
    super().__init__(ctx)
    self.model = model
    self.task_names = None if task_names is None else tuple(task_names)
    self.num_tasks_classes = tuple(int(c) for c in num_classes)
    if self.task_names is None and len(self.num_tasks_classes) != 1:
      raise ValueError(f"a single-task classifier needs one class count, got {num_classes}")
    self.num_classes = self.num_tasks_classes[0]
    self.label_key = "label" if self.task_names is None else "labels"
    metric = "balanced_accuracy" if self.task_names is None else "mean/balanced_accuracy"
    self.headline = headline or metric
    self.columns = tuple(columns or (metric,))
    self.class_weights = None
    if class_balanced:
      self.class_weights = tuple(jnp.asarray(w) for w in self._balanced_weights())

  def _balanced_weights(self) -> list[np.ndarray]:
    labels = train_labels(self.ctx.train_source, self.label_key)
    labels = labels[:, None] if labels.ndim == 1 else labels
    return [classification.balanced_class_weights(labels[labels[:, t] >= 0, t], c)
            for t, c in enumerate(self.num_tasks_classes)]

  # -- training ------------------------------------------------------------------------------
  def init(self, rng, batch):
    return dict(self.model.init({"params": rng, "dropout": rng}, batch, train=False))

  def forward(self, params, model_state, batch, rng):
    """The model in training mode -> (outputs, updated collections)."""
    return base.apply_mutable(self.model, {"params": params, **model_state},
                              list(model_state), batch, train=True, rngs={"dropout": rng})

  def classification_loss(self, logits, batch, weights) -> tuple[jax.Array, dict]:
    """Mean (class-weighted) cross-entropy of `logits` for the batch's labels."""
    if self.task_names is None:
      cw = None if self.class_weights is None else self.class_weights[0]
      loss, m = classification.softmax_cross_entropy(
          logits=logits, labels=jnp.maximum(batch["label"], 0), class_weights=cw,
          weights=weights * (batch["label"] >= 0))
      return loss, {"ce": loss, "accuracy": m["accuracy"]}
    return classification.multitask_cross_entropy(
        logits=logits, labels=batch["labels"], mask=weights, class_weights=self.class_weights,
        task_names=self.task_names)

  def loss(self, params, state, batch, rng):
    out, model_state = self.forward(params, state.model_state, batch, rng)
    loss, metrics = self.classification_loss(out["logits"], batch,
                                             batch["mask"].astype(jnp.float32))
    return loss, (metrics, state.replace(model_state=model_state))

  # -- evaluation ----------------------------------------------------------------------------
  def predict(self, variables, batch):
    out = self.model.apply(variables, batch, train=False)
    labels = batch[self.label_key]
    result: dict[str, Any] = {self.label_key: labels}
    if "features" in out:
      result["features"] = out["features"]
    # The validation loss as Keras reports it: unweighted cross-entropy, mean over tasks.
    if self.task_names is None:
      result["loss"], _ = classification.softmax_cross_entropy(
          logits=out["logits"], labels=jnp.maximum(labels, 0), reduction="none")
      result["probs"] = jax.nn.softmax(out["logits"].astype(jnp.float32))
      return result
    result["loss"], _ = classification.multitask_cross_entropy(
        logits=out["logits"], labels=labels, reduction="none")
    for t, logits in zip(self.task_names, out["logits"]):
      result[f"probs/{t}"] = jax.nn.softmax(logits.astype(jnp.float32))
    return result

  def evaluate(self, outputs, *, bootstrap, seed):
    labels = np.asarray(outputs[self.label_key])
    result: dict[str, Any] = {}
    if "features" in outputs:
      result["feature_std"] = metrics_lib.feature_std(outputs["features"])
    if self.task_names is None:
      labelled = labels >= 0
      result["loss"] = float(np.mean(outputs["loss"][labelled]))
      result.update(metrics_lib.classification_metrics(
          labels[labelled], np.asarray(outputs["probs"])[labelled], bootstrap=bootstrap,
          seed=seed))
      return result
    result["loss"] = float(np.mean(outputs["loss"]))
    result.update(metrics_lib.multitask_classification_metrics(
        labels, [outputs[f"probs/{t}"] for t in self.task_names], self.task_names,
        bootstrap=bootstrap, seed=seed))
    return result

  def metric_keys(self) -> set[str]:
    keys = {"loss", "feature_std"}  # feature_std where the model returns features
    if self.task_names is None:
      return keys | {"balanced_accuracy", "auc", "accuracy"}
    return keys | {f"{t}/{m}" for t in self.task_names + ("mean",)
                   for m in ("balanced_accuracy", "auc")}
