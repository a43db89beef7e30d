"""A test-only method with a teacher: guidance's classifiers, plus a 'distill' stage whose
student (the inferior classifier) also regresses the logits of a frozen teacher (a finished
superior classifier, loaded through teacher_from)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from medguide_jax.data import paired
from medguide_jax.tasks import base, guidance, supervised


class DistillTask(supervised.SupervisedTask):
  """CE of the student + the mean squared difference of its logits from the teacher's."""

  def __init__(self, ctx: base.TaskContext):
    super().__init__(ctx, model=guidance.network(ctx.config, "inferior"),
                     num_classes=paired.NUM_CLASSES, task_names=paired.TASKS)
    self.teacher_model = guidance.network(ctx.config, "superior")

  def init_teacher(self, rng, batch):
    return dict(self.teacher_model.init({"params": rng, "dropout": rng}, batch, train=False))

  def loss(self, params, state, batch, rng):
    out, model_state = self.forward(params, state.model_state, batch, rng)
    ce, metrics = self.classification_loss(out["logits"], batch,
                                           batch["mask"].astype(jnp.float32))
    teacher = self.teacher_model.apply(state.teacher, batch, train=False)["logits"]
    kd = jnp.mean(jnp.stack([jnp.mean(jnp.square(s - jax.lax.stop_gradient(t)))
                             for s, t in zip(out["logits"], teacher)]))
    return ce + kd, ({**metrics, "kd": kd}, state.replace(model_state=model_state))


def make_task(ctx: base.TaskContext) -> base.Task:
  if ctx.stage.task == "distill":
    return DistillTask(ctx)
  return guidance.make_task(ctx)
