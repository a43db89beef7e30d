"""Deep Multimodal Guidance (Mallya & Hamarneh, MICCAI 2022) as six trainer stages.

  inferior     C_I: encoder f_I + multi-task head on the inferior modality
  superior     C_S: encoder f_S + head on the superior modality
  multimodal   both encoders, head on [z_I ; z_S] (sees both modalities at test time)
  guidance     G: z_I -> z_S, an MLP regressed with MSE onto the frozen encoders' latents
  guided       head on G(z_I)            (frozen f_I and G)
  guided_plus  head on [z_I ; G(z_I)]    (frozen f_I and G) -- the proposed model

Parameter subtrees keep one name across stages (enc_inferior, enc_superior, guidance,
head), so a later stage loads an earlier one's by `init_from` + `init_params`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medguide_jax.data import paired, sources
from medguide_jax.evaluation import metrics as metrics_lib
from medguide_jax.losses import classification
from medguide_jax.models import guidance as guidance_lib
from medguide_jax.models import heads, resnet

MODES = ("inferior", "superior", "multimodal", "guidance", "guided", "guided_plus")
_USES_INFERIOR = ("inferior", "multimodal", "guidance", "guided", "guided_plus")
_USES_SUPERIOR = ("superior", "multimodal", "guidance")


def _to_float(images: jax.Array, dtype) -> jax.Array:
  """uint8 [B,H,W,3] -> [-1, 1], as the reference's Inception preprocessing."""
  return (images.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)


class GuidanceNet(nn.Module):
  """Every stage's network; `mode` picks which parts exist and which train."""
  mode: str
  encoder: str
  encoder_kwargs: Any
  num_classes: tuple[int, ...]
  head_hidden: int
  head_dropout: float
  guidance_hidden: tuple[int, ...]
  guidance_dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: dict, *, train: bool) -> dict:
    mode, frozen_encoders = self.mode, self.mode in ("guidance", "guided", "guided_plus")
    enc = lambda name: resnet.get_encoder(self.encoder, dtype=self.dtype, parent=None,
                                          **dict(self.encoder_kwargs)).clone(parent=self, name=name)
    z = {}
    if mode in _USES_INFERIOR:
      z["inf"] = enc("enc_inferior")(_to_float(batch["image_inferior"], self.dtype),
                                     train=train and not frozen_encoders)
    if mode in _USES_SUPERIOR:
      z["sup"] = enc("enc_superior")(_to_float(batch["image_superior"], self.dtype),
                                     train=train and not frozen_encoders)
    if mode in ("guidance", "guided", "guided_plus"):
      g = guidance_lib.GuidanceMLP(hidden=tuple(self.guidance_hidden),
                                   out_dim=resnet.feature_dim(self.encoder, **dict(self.encoder_kwargs)),
                                   dropout_rate=self.guidance_dropout, name="guidance")
      z["guided"] = g(z["inf"], train=train and mode == "guidance")
    if mode == "guidance":
      return {"prediction": z["guided"], "target": jax.lax.stop_gradient(z["sup"])}
    features = {"inferior": [z.get("inf")], "superior": [z.get("sup")],
                "multimodal": [z.get("inf"), z.get("sup")], "guided": [z.get("guided")],
                "guided_plus": [z.get("inf"), z.get("guided")]}[mode]
    if mode in ("guided", "guided_plus"):
      features = [jax.lax.stop_gradient(f) for f in features]
    head = heads.MultiTaskHead(num_classes=self.num_classes, hidden=self.head_hidden,
                               dropout_rate=self.head_dropout, name="head")
    return {"logits": head(jnp.concatenate(features, axis=-1), train=train)}


def _train_labels(train_source) -> np.ndarray:
  """Every training label [N, T], read once per open source: reading them means reading
  whole records (images too), and every classifier stage of a run needs them."""
  return sources.once_per_source(train_source, "labels", lambda: np.stack(
      [np.asarray(train_source[i]["labels"]) for i in range(len(train_source))]))


def _train_class_weights(train_source, balanced: bool) -> tuple[np.ndarray, ...]:
  """Keras class_weight='balanced' per task, from the training split's labels."""
  labels = _train_labels(train_source)
  return tuple(classification.balanced_class_weights(labels[:, t], c) if balanced
               else np.ones(c, np.float32) for t, c in enumerate(paired.NUM_CLASSES))


class GuidanceTask:
  """A guidance stage for the trainer (see tasks/base.py)."""

  def __init__(self, config, stage, train_source):
    if stage.task not in MODES:
      raise ValueError(f"stage task {stage.task!r} is not a guidance mode; valid: {MODES}")
    self.mode = stage.task
    m = config.model
    self.model = GuidanceNet(
        mode=self.mode, encoder=m.encoder, encoder_kwargs=tuple(m.encoder_kwargs.items()),
        num_classes=paired.NUM_CLASSES, head_hidden=m.head_hidden, head_dropout=m.head_dropout,
        guidance_hidden=tuple(m.guidance_hidden), guidance_dropout=m.guidance_dropout,
        dtype=jnp.dtype(config.compute_dtype))
    self.in_table = self.mode != "guidance"
    self.headline = "mse" if self.mode == "guidance" else "mean/balanced_accuracy"
    self.columns = ["mean/balanced_accuracy", "mean/auc", "DIAG/balanced_accuracy"]
    if self.in_table:
      self.class_weights = tuple(jnp.asarray(w) for w in
                                 _train_class_weights(train_source, m.class_balanced))

  def init(self, rng, batch):
    return dict(self.model.init({"params": rng, "dropout": rng}, batch, train=False))

  def loss(self, params, model_state, batch, rng, step=None):
    del step  # no step-dependent behaviour
    out, new_state = self.model.apply({"params": params, **model_state}, batch, train=True,
                                      rngs={"dropout": rng}, mutable=list(model_state))
    if self.mode == "guidance":
      loss, metrics = classification.mse(predictions=out["prediction"], targets=out["target"],
                                         mask=batch["mask"])
    else:
      loss, metrics = classification.multitask_cross_entropy(
          logits=out["logits"], labels=batch["labels"], mask=batch["mask"],
          class_weights=self.class_weights, task_names=paired.TASKS)
    return loss, (metrics, dict(new_state))

  def predict(self, variables, batch):
    out = self.model.apply(variables, batch, train=False)
    if self.mode == "guidance":
      err = jnp.mean(jnp.square(out["prediction"] - out["target"]), axis=-1)
      return {"loss": err}
    probs = [jax.nn.softmax(l.astype(jnp.float32)) for l in out["logits"]]
    # Validation loss as Keras reports it: unweighted CE, mean over tasks.
    ce = [-jnp.log(jnp.take_along_axis(p, batch["labels"][:, t, None], -1)[:, 0] + 1e-12)
          for t, p in enumerate(probs)]
    return {"loss": jnp.mean(jnp.stack(ce), axis=0), "labels": batch["labels"],
            **{f"probs/{t}": p for t, p in zip(paired.TASKS, probs)}}

  def evaluate(self, outputs, *, bootstrap, seed):
    result = {"loss": float(np.mean(outputs["loss"]))}
    if self.mode == "guidance":
      result["mse"] = result["loss"]
      return result
    probs = [outputs[f"probs/{t}"] for t in paired.TASKS]
    result.update(metrics_lib.multitask_classification_metrics(
        outputs["labels"], probs, paired.TASKS, bootstrap=bootstrap, seed=seed))
    return result
