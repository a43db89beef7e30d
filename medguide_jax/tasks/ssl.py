"""Self-supervised learning from many medical modalities (Ghesu et al. 2022): the stages' wiring.

  swav      pretraining: multi-crop -> encoder -> projection (MLP, BN, L2) -> K prototypes;
            SwAV's swapped prediction with Sinkhorn codes (+ optional SimCLR NT-Xent on the
            two global crops), an embedding queue in the train state, prototypes
            re-normalised before every step and held for `opt.freeze_steps`.
  probe     linear classifier on the frozen encoder (init_from a pretraining stage).
  finetune  encoder + linear head, all trained (without init_from: the scratch baseline).
  hybrid    L = L_sup + lambda * L_SwAV on labelled data (the paper's "optional
            supervision"): supervised CE on the global crops, SwAV on all crops.
  knn       no training: the features, for the `knn` evaluator's vote.

Where the pieces are: the network in models/swav.py (SSLNet); the losses in losses/swav.py
and losses/contrastive.py; the classifier stages are tasks/supervised.py; multi-crop decoding
in data/multicrop.py; kNN and the robustness perturbations are evaluators
(evaluation/knn.py, evaluation/robustness.py) named in configs/ssl_finetune.py.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from medguide_jax.data import images as images_lib
from medguide_jax.data import multicrop, sources
from medguide_jax.evaluation import metrics as metrics_lib
from medguide_jax.losses import contrastive, swav
from medguide_jax.models import swav as swav_model
from medguide_jax.tasks import base, supervised

TASKS = ("swav", "probe", "finetune", "hybrid", "knn")
_MULTICROP_TASKS = ("swav", "hybrid")
NORMS = ("source", "fixed", "image")


def network(config, num_classes: int, *, train_encoder: bool = True) -> swav_model.SSLNet:
  m = config.model
  return swav_model.SSLNet(encoder=m.encoder, encoder_kwargs=tuple(m.encoder_kwargs.items()),
                           proj_hidden=m.proj_hidden, proj_dim=m.proj_dim,
                           num_prototypes=m.num_prototypes, num_classes=num_classes,
                           train_encoder=train_encoder, dtype=jnp.dtype(config.compute_dtype))


class _SSLData:
  """Decoding shared by every ssl stage: per-source normalisation; multi-crop views for the
  SwAV objective's training batches, one image (and its normalisation) otherwise."""

  def _setup_data(self, ctx: base.TaskContext) -> None:
    config, s, train_source = ctx.config, ctx.config.ssl, ctx.train_source
    if config.data.norm not in NORMS:
      raise ValueError(f"data.norm={config.data.norm!r}; valid: 'source' (per-source mean/std),"
                       " 'fixed' (0.5, 0.25 for all), 'image' (each view standardised)")
    # A mapping gives per-source (mean, std) (missing sources: DEFAULT_NORM); None
    # standardises each view by its own statistics.
    self.norms = {"source": lambda: sources.once_per_source(
                      train_source, "norms", lambda: multicrop.source_norms(train_source)),
                  "fixed": dict, "image": lambda: None}[config.data.norm]()
    self.crops = tuple(multicrop.CropSpec(count=n, size=size, scale=tuple(scale))
                       for n, size, scale in ((s.global_crops, s.global_size, s.global_scale),
                                              (s.local_crops, s.local_size, s.local_scale))
                       if n > 0)
    if not self.crops or self.crops[0].count < 2:
      raise ValueError(f"ssl.global_crops={s.global_crops}: SwAV needs at least 2 global crops")
    self.augment_cfg = multicrop.AugmentConfig.from_config(s.augment.to_dict())
    self.multicrop = ctx.stage.task in _MULTICROP_TASKS

  def example_fn(self, record, rng, *, augment: bool):
    channels = self.config.data.channels
    if "label" not in record and "labels" in record:
      # Report / findings layouts (chest X-rays) carry multi-label findings, no class: their
      # images pretrain SwAV unlabelled (-1), as an unlabelled dataset's do.
      record = {**record, "label": -1}
    if self.multicrop and augment:
      return multicrop.multicrop_example(record, rng, crops=self.crops, channels=channels,
                                         norm=self.norms, augment_cfg=self.augment_cfg)
    size = self.crops[0].size if self.multicrop else self.config.data.image_size
    out = multicrop.single_image_example(record, rng if augment else None, image_size=size,
                                         channels=channels, norm=self.norms)
    # The robustness evaluator perturbs [0, 1] intensities: it needs the normalisation used.
    mean, std = (self.norms or {}).get(images_lib.text(record.get("source", "")),
                                      multicrop.DEFAULT_NORM)
    out["norm_mean"], out["norm_std"] = np.float32(mean), np.float32(std)
    return out


class _SwAVObjective:
  """SwAV (+ NT-Xent) over multi-crop views, with its queue, prototype re-normalisation and
  collapse warning: the pretraining stage's objective, and the hybrid stage's L_SwAV."""

  def _setup_swav(self, ctx: base.TaskContext) -> None:
    s, stage = ctx.config.ssl, ctx.stage
    self.assign = tuple(s.assign_crops)
    if max(self.assign) >= self.crops[0].count:
      raise ValueError(f"ssl.assign_crops={self.assign} must index the "
                       f"{self.crops[0].count} global crops")
    self.queue_length = 0
    if s.queue_length > 0:
      bsz = stage.batch_size // stage.opt.accumulate_steps
      self.queue_length = (s.queue_length // bsz) * bsz  # the reference rounds to batches
      if self.queue_length == 0:
        raise ValueError(f"ssl.queue_length={s.queue_length} is shorter than one batch "
                         f"({bsz}); use 0 (no queue) or at least {bsz}")
    if s.sinkhorn not in ("global", "shard_map"):
      raise ValueError(f"ssl.sinkhorn={s.sinkhorn!r}; valid: 'global', 'shard_map'")
    self._warned_collapse, self._near_ln_k = False, 0

  def prepare_params(self, params):
    """Prototypes re-normalised before every forward pass (the reference does it in place,
    under no_grad, at the start of each iteration)."""
    if "prototypes" not in params:
      return params
    w = params["prototypes"]["weight"]
    return {**params, "prototypes": {"weight": swav.normalize_prototypes(w, axis=1)}}

  def init_extra(self):
    """The embedding queue (SwAV's), FIFO over the assigned crops' projections."""
    if not self.queue_length:
      return {}
    return {"queue": {
        "z": jnp.zeros((len(self.assign), self.queue_length, self.config.model.proj_dim),
                       jnp.float32),
        "filled": jnp.zeros((), jnp.int32)}}

  def _embed(self, params, model_state, batch):
    """(features, z) [V, B, ...] of every crop, and the updated batch statistics."""
    crops = [batch[f"crops_{i}"] for i in range(len(self.crops))]
    return base.apply_mutable(self.model, {"params": params, **model_state}, list(model_state),
                              crops, train=True, method=swav_model.SSLNet.embed_crops)

  def _ssl_loss(self, z, prototypes, state: base.LossState):
    """SwAV (+ NT-Xent) on crop-major projections z [V, B, d] -> (loss, metrics, new extra)."""
    s, step = self.config.ssl, state.step
    queue = state.extra.get("queue")
    metrics, loss = {}, jnp.zeros((), jnp.float32)
    use_queue = False if queue is None else queue["filled"] >= queue["z"].shape[1]
    if s.swav_weight:
      l_swav, aux = swav.swav_loss(
          z, prototypes, queue=None if queue is None else queue["z"], use_queue=use_queue,
          assign_crops=self.assign, epsilon=s.epsilon, num_iters=s.sinkhorn_iters,
          temperature=s.temperature, stable=s.stable,
          mesh=self.mesh if s.sinkhorn == "shard_map" else None)
      loss = loss + s.swav_weight * l_swav
      metrics.update(swav_loss=l_swav, code_entropy=aux["code_entropy"],
                     prototype_usage=aux["prototype_usage"])
    if s.contrastive_weight:
      l_nce, aux = contrastive.nt_xent(z[0], z[1], temperature=s.contrastive_temperature)
      loss = loss + s.contrastive_weight * l_nce
      metrics.update(contrastive_loss=l_nce, contrastive_accuracy=aux["contrastive_accuracy"])
    if queue is None:
      return loss, metrics, state.extra
    started = step >= s.queue_start
    z_assign = jax.lax.stop_gradient(z[jnp.asarray(self.assign)]).astype(jnp.float32)
    new_queue = {
        "z": jnp.where(started, swav.update_queue(queue["z"], z_assign), queue["z"]),
        "filled": jnp.where(started, jnp.minimum(queue["filled"] + z.shape[1],
                                                 queue["z"].shape[1]), queue["filled"])}
    metrics["queue_in_use"] = jnp.asarray(use_queue, jnp.float32)
    return loss, metrics, {**state.extra, "queue": new_queue}

  def on_log(self, step: int, scalars: dict) -> None:
    """Warns once when SwAV's loss sits at ln K (three log lines in a row within 1%) after
    the prototypes are released (collapse: every sample predicts a uniform distribution);
    a falling loss passes ln K once."""
    loss = scalars.get("train/swav_loss")
    if loss is None or self._warned_collapse or step <= self.stage.opt.freeze_steps:
      return
    ln_k = math.log(self.config.model.num_prototypes)
    self._near_ln_k = self._near_ln_k + 1 if abs(loss - ln_k) < 0.01 * ln_k else 0
    if self._near_ln_k >= 3:
      self._warned_collapse = True
      logging.warning(
          "[ssl] step %d: the SwAV loss %.4f sits at ln K = %.4f (K=%d prototypes): the "
          "representation may have collapsed. Known fixes (SwAV README): ssl.epsilon=0.03, a "
          "longer opt.freeze_steps, model.proj_hidden=0 (no BN in the head), fewer local crops "
          "or softer augmentation, a shorter or later queue.", step, loss, ln_k,
          self.config.model.num_prototypes)


class _FeatureSpread:
  """Stages that only embed: evaluated by the features' spread (their evaluators add the rest)."""

  def evaluate(self, outputs, *, bootstrap, seed):
    del bootstrap, seed
    return {"feature_std": metrics_lib.feature_std(outputs["features"])}

  def metric_keys(self) -> set[str]:
    return {"feature_std"}


class PretrainTask(_SSLData, _SwAVObjective, _FeatureSpread, base.Task):
  """The swav stage: labels unused; evaluated by the features' spread (and the knn_loo
  evaluator the config names)."""
  headline, in_table = "knn_accuracy", False

  def __init__(self, ctx: base.TaskContext):
    super().__init__(ctx)
    self._setup_data(ctx)
    self._setup_swav(ctx)
    self.num_classes = len(images_lib.class_names(ctx.train_source))
    self.model = network(ctx.config, self.num_classes)

  def init(self, rng, batch):
    return dict(self.model.init({"params": rng}, batch, train=False))

  def loss(self, params, state, batch, rng):
    del rng
    (h, z), model_state = self._embed(params, state.model_state, batch)
    loss, metrics, extra = self._ssl_loss(z, params["prototypes"]["weight"], state)
    metrics["feature_std"] = jnp.mean(jnp.std(h[0], axis=0))
    return loss, (metrics, state.replace(model_state=model_state, extra=extra))

  def predict(self, variables, batch):
    return {"label": batch["label"],
            "features": self.model.apply(variables, batch, train=False)["features"]}


class ClassifierTask(_SSLData, supervised.SupervisedTask):
  """probe (frozen encoder) and finetune: the supervised task on SSLNet."""

  def __init__(self, ctx: base.TaskContext):
    class_names = images_lib.class_names(ctx.train_source)
    if not class_names:
      raise ValueError(f"stage task {ctx.stage.task!r} needs labels, but dataset "
                       f"{ctx.config.data.name!r} has no class_names (it is unlabelled)")
    model = network(ctx.config, len(class_names), train_encoder=ctx.stage.task != "probe")
    super().__init__(ctx, model=model, num_classes=(len(class_names),),
                     columns=("balanced_accuracy", "auc", "accuracy"))
    self._setup_data(ctx)


class KNNTask(_FeatureSpread, ClassifierTask):
  """knn: trains nothing; its predictions are the features the `knn` evaluator votes with."""

  def __init__(self, ctx: base.TaskContext):
    if ctx.stage.num_steps:
      raise ValueError(f"task 'knn' trains nothing: num_steps must be 0, got "
                       f"{ctx.stage.num_steps}")
    super().__init__(ctx)


class HybridTask(_SwAVObjective, ClassifierTask):
  """hybrid: L_sup on the global crops' features + hybrid_lambda * L_SwAV on all crops."""

  def __init__(self, ctx: base.TaskContext):
    super().__init__(ctx)
    self._setup_swav(ctx)

  def loss(self, params, state, batch, rng):
    del rng
    (h, z), model_state = self._embed(params, state.model_state, batch)
    l_ssl, metrics, extra = self._ssl_loss(z, params["prototypes"]["weight"], state)
    n_global = self.crops[0].count
    logits = self.model.apply({"params": params, **state.model_state},
                              h[:n_global].reshape((-1, h.shape[-1])),
                              method=swav_model.SSLNet.classify_features)
    labels = {"label": jnp.tile(batch["label"], n_global)}
    l_sup, sup = self.classification_loss(logits, labels, jnp.ones(logits.shape[:1]))
    loss = l_sup + self.config.ssl.hybrid_lambda * l_ssl
    metrics.update(sup_loss=l_sup, ssl_loss=l_ssl, accuracy=sup["accuracy"])
    return loss, (metrics, state.replace(model_state=model_state, extra=extra))


def make_task(ctx: base.TaskContext) -> base.Task:
  """The task of `ctx.stage.task` (one of TASKS)."""
  classes = {"swav": PretrainTask, "probe": ClassifierTask, "finetune": ClassifierTask,
             "hybrid": HybridTask, "knn": KNNTask}
  if ctx.stage.task not in classes:
    raise ValueError(f"stage task {ctx.stage.task!r} is not an ssl task; valid: {TASKS}")
  return classes[ctx.stage.task](ctx)
