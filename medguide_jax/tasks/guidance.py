"""Deep Multimodal Guidance (Mallya & Hamarneh, MICCAI 2022): the six stages' wiring.

  inferior     C_I: encoder f_I + multi-task head on the inferior modality
  superior     C_S: encoder f_S + head on the superior modality
  multimodal   both encoders, head on [z_I ; z_S] (sees both modalities at test time)
  guidance     G: z_I -> z_S, an MLP regressed with MSE onto the frozen encoders' latents
  guided       head on G(z_I)            (frozen f_I and G)
  guided_plus  head on [z_I ; G(z_I)]    (frozen f_I and G) -- the proposed model

Where the pieces are: the network of every stage in models/guidance.py (GuidanceNet, G);
the classifier stages are tasks/supervised.py (class-balanced cross-entropy over the 8
Derm7pt tasks); G's loss is losses/classification.py's mse; the paired-image decoder is
data/transforms.py (the 'paired' layout's).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from medguide_jax.data import paired
from medguide_jax.losses import classification
from medguide_jax.models import guidance as guidance_lib
from medguide_jax.tasks import base, supervised

MODES = guidance_lib.MODES


def network(config, mode: str) -> guidance_lib.GuidanceNet:
  m = config.model
  return guidance_lib.GuidanceNet(
      mode=mode, encoder=m.encoder, encoder_kwargs=tuple(m.encoder_kwargs.items()),
      num_classes=paired.NUM_CLASSES, head_hidden=m.head_hidden, head_dropout=m.head_dropout,
      guidance_hidden=tuple(m.guidance_hidden), guidance_dropout=m.guidance_dropout,
      dtype=jnp.dtype(config.compute_dtype))


class GuidanceRegressionTask(base.Task):
  """The guidance stage: G regressed with MSE onto the frozen superior latents."""
  headline, in_table = "mse", False

  def __init__(self, ctx: base.TaskContext):
    super().__init__(ctx)
    self.model = network(ctx.config, "guidance")

  def init(self, rng, batch):
    return dict(self.model.init({"params": rng, "dropout": rng}, batch, train=False))

  def loss(self, params, state, batch, rng):
    out, model_state = base.apply_mutable(
        self.model, {"params": params, **state.model_state}, list(state.model_state), batch,
        train=True, rngs={"dropout": rng})
    loss, metrics = classification.mse(predictions=out["prediction"], targets=out["target"],
                                       mask=batch["mask"])
    return loss, (metrics, state.replace(model_state=model_state))

  def predict(self, variables, batch):
    out = self.model.apply(variables, batch, train=False)
    return {"loss": jnp.mean(jnp.square(out["prediction"] - out["target"]), axis=-1)}

  def evaluate(self, outputs, *, bootstrap, seed):
    del bootstrap, seed
    loss = float(np.mean(outputs["loss"]))
    return {"loss": loss, "mse": loss}

  def metric_keys(self) -> set[str]:
    return {"loss", "mse"}


def make_task(ctx: base.TaskContext) -> base.Task:
  """The task of `ctx.stage.task` (one of MODES)."""
  mode = ctx.stage.task
  if mode not in MODES:
    raise ValueError(f"stage task {mode!r} is not a guidance mode; valid: {MODES}")
  if mode == "guidance":
    return GuidanceRegressionTask(ctx)
  return supervised.SupervisedTask(
      ctx, model=network(ctx.config, mode), num_classes=paired.NUM_CLASSES,
      task_names=paired.TASKS, class_balanced=ctx.config.model.class_balanced,
      columns=("mean/balanced_accuracy", "mean/auc", "DIAG/balanced_accuracy"))
