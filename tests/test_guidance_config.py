"""configs/guidance.py: the sizes' protocols (paper = the reference's, cpu = the 15-minute one),
the selection warm-up, and the per-task learning-rate arithmetic the paper size relies on."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import guidance
from medguide_jax import train
from medguide_jax.data import paired
from medguide_jax.losses import classification
from medguide_jax.models import heads
from medguide_jax.validation import ConfigError, check_config

CLASSIFIERS = ("inferior", "superior", "multimodal")
HEADS = ("guided", "guided_plus")


@pytest.mark.parametrize("arg", ["dataset=synthetic,smoke", "dataset=synthetic,size=cpu",
                                 "dataset=derm7pt,size=cpu", "dataset=derm7pt,size=paper",
                                 "dataset=derm7pt"])
def test_every_size_passes_the_config_check(arg):
  check_config(guidance.get_config(arg))


def test_the_default_size_is_the_paper_protocol():
  assert guidance.get_config("dataset=derm7pt").to_dict() == guidance.get_config(
      "dataset=derm7pt,size=paper").to_dict()


def test_paper_size_follows_the_reference():
  """METHODS.md section 1: 512 px, a 2048-d latent, G 1024-512-512-1024 at SGD 0.5 for 500
  epochs of batch 100, heads for 500 epochs of batch 100 with patience 200 epochs."""
  c = guidance.get_config("dataset=derm7pt,size=paper")
  assert c.data.name == "derm7pt" and c.data.image_size == 512
  assert c.model.encoder == "resnet50" and c.model.head_hidden == 0
  assert c.model.head_dropout == 0.25 and c.model.guidance_dropout == 0.25
  assert tuple(c.model.guidance_hidden) == (1024, 512, 512, 1024)
  g = c.stages.guidance
  assert (g.batch_size, g.num_epochs, g.eval_every, g.select) == (100, 500, 0, "")
  assert (g.opt.name, g.opt.lr, g.opt.momentum, g.opt.nesterov) == ("sgd", 0.5, 0.9, True)
  assert (g.opt.schedule, g.opt.decay) == ("keras_decay", 1e-6)
  for name in HEADS:
    s = c.stages[name]
    assert (s.batch_size, s.num_epochs, s.select, s.select_after) == (
        100, 500, "min:val/loss", 0)
    assert (s.opt.name, s.opt.nesterov, s.opt.decay) == ("sgd", True, 1e-6)
    assert s.opt.lr == pytest.approx(8e-4)  # 1e-4 per task (test below)
    # 408 training cases at batch 100: 5 updates an epoch, 2500 in all; an evaluation every
    # 250 (50 epochs), so patience 4 is the reference's 200 epochs.
    resolved = train.resolve_stage(s, steps_per_epoch=5)
    assert (resolved.num_steps, resolved.eval_every) == (2500, 250)
    assert resolved.patience * resolved.eval_every // 5 == 200
  for name in CLASSIFIERS:
    assert c.stages[name].select_after == c.stages[name].num_steps // 4


def test_a_mean_over_tasks_gives_each_task_layer_an_eighth_of_its_own_gradient():
  """Why the paper size's head lr is 8 x 1e-4: the per-task layers of MultiTaskHead see only
  their task's loss, and the loss is the mean over the 8 tasks, so under SGD (linear in the
  gradient) lr 8e-4 moves each task's layer as the reference's separate model at 1e-4."""
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(6, 12)), jnp.float32)
  labels = jnp.asarray(np.stack([rng.integers(0, c, 6) for c in paired.NUM_CLASSES], 1))
  head = heads.MultiTaskHead(num_classes=paired.NUM_CLASSES, dropout_rate=0.0)
  params = head.init(jax.random.key(0), z, train=False)

  def mean_loss(p):
    logits = head.apply(p, z, train=False)
    return classification.multitask_cross_entropy(logits=logits, labels=labels)[0]

  def own_losses(p):  # the sum of the 8 separate models' losses: layer t sees only loss t
    logits = head.apply(p, z, train=False)
    return sum(classification.softmax_cross_entropy(logits=lt, labels=labels[:, t])[0]
               for t, lt in enumerate(logits))

  mean_grad = jax.jit(jax.grad(mean_loss))(params)["params"]
  own_grad = jax.jit(jax.grad(own_losses))(params)["params"]
  num_tasks = len(paired.NUM_CLASSES)
  assert num_tasks == 8 and set(mean_grad) == {f"task_{t}" for t in range(num_tasks)}
  for t in range(num_tasks):
    for key in ("kernel", "bias"):
      np.testing.assert_allclose(mean_grad[f"task_{t}"][key],
                                 own_grad[f"task_{t}"][key] / num_tasks, rtol=1e-5, atol=1e-8)


def test_cpu_size_is_the_short_protocol():
  c = guidance.get_config("dataset=derm7pt,size=cpu")
  assert c.model.encoder == "resnet18" and c.data.image_size == 64
  steps = {name: c.stages[name].num_steps for name in c.stages}
  assert steps == {"inferior": 150, "superior": 150, "multimodal": 150, "guidance": 150,
                   "guided": 300, "guided_plus": 300}
  for name in CLASSIFIERS:
    assert c.stages[name].select_after == 37 and c.stages[name].patience == 0
  for name in HEADS:
    assert c.stages[name].select_after == 0 and c.stages[name].patience == 4


def test_smoke_size_has_no_warmup_and_no_patience():
  c = guidance.get_config("dataset=synthetic,smoke")
  assert all(c.stages[name].select_after == 0 and c.stages[name].patience == 0
             for name in c.stages)
  assert {c.stages[name].num_steps for name in c.stages} == {300}


def test_lowering_num_steps_below_the_warmup_names_the_field():
  c = guidance.get_config("dataset=derm7pt,size=cpu")
  c.stages.multimodal.num_steps = 30
  with pytest.raises(ConfigError, match=r"stages.multimodal.select_after=37: must be < "
                                        r"num_steps=30"):
    check_config(c)
