"""Self-supervised learning from many medical modalities (Ghesu et al. 2022) as trainer stages.

  swav      pretraining: multi-crop -> encoder -> projection (MLP, BN, L2) -> K prototypes;
            SwAV's swapped prediction with Sinkhorn codes (+ optional SimCLR NT-Xent on the
            two global crops), an embedding queue in the train state, prototypes
            re-normalised before every step and held for `opt.freeze_steps`.
  probe     linear classifier on the frozen encoder (init_from a pretraining stage).
  knn       no training: k-nearest-neighbour vote over the training split's features.
  finetune  encoder + linear head, all trained (init_from pretraining; without init_from
            it is the from-scratch baseline).
  hybrid    L = L_sup + lambda * L_SwAV on labelled data (the paper's "optional
            supervision"): supervised CE on the global crops, SwAV on all crops.

Every classifier stage evaluates on the clean test images and on perturbed copies
(intensity, gamma, contrast, rotation, scaling: the paper's robustness claims), reported as
`robust/<kind>/accuracy` etc. Parameter subtrees keep one name across stages (encoder,
projection, prototypes, head), so downstream stages load `encoder/.*` by `init_from`.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from medguide_jax.data import images as images_lib
from medguide_jax.data import multicrop, sources
from medguide_jax.evaluation import metrics as metrics_lib
from medguide_jax.losses import classification, contrastive, swav
from medguide_jax.models import resnet

PRETRAIN_TASKS = ("swav",)
CLASSIFIER_TASKS = ("probe", "finetune", "hybrid")
TASKS = PRETRAIN_TASKS + CLASSIFIER_TASKS + ("knn",)
_MULTICROP_TASKS = ("swav", "hybrid")

# Test-time perturbations for the robustness report: (kind, level). Applied to the
# network's input in [0, 1] intensity space before normalisation (see `perturb`).
ROBUSTNESS = (("intensity", 0.3), ("gamma", 1.8), ("contrast", 0.5), ("rotation", 20.0),
              ("scaling", 0.75), ("noise", 0.05))


# --------------------------------------------------------------------------- the network
class ProjectionHead(nn.Module):
  """SwAV's projection: Linear -> BN -> ReLU -> Linear, then L2 normalisation (hidden=0:
  one Linear)."""
  hidden: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, *, train: bool):
    x = h
    if self.hidden:
      x = nn.Dense(self.hidden, dtype=self.dtype, name="dense1")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                       name="norm")(x)
      x = nn.relu(x)
    x = nn.Dense(self.out_dim, dtype=self.dtype, name="dense2")(x).astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Prototypes(nn.Module):
  """K prototype vectors, stored [K, D] like the reference's Linear(D, K, bias=False).weight.
  Rows are L2-normalised before every step by `SSLTask.prepare_params`."""
  num_prototypes: int
  dim: int

  @nn.compact
  def __call__(self):
    init = lambda key, shape: swav.normalize_prototypes(jax.random.normal(key, shape), axis=1)
    return self.param("weight", init, (self.num_prototypes, self.dim))


class SSLNet(nn.Module):
  """Encoder + projection + prototypes (pretraining) and a linear head (downstream)."""
  encoder: str
  encoder_kwargs: Any
  proj_hidden: int
  proj_dim: int
  num_prototypes: int
  num_classes: int
  dtype: Any = jnp.float32

  def setup(self):
    self.enc = resnet.get_encoder(self.encoder, dtype=self.dtype, **dict(self.encoder_kwargs))
    self.projection = ProjectionHead(self.proj_hidden, self.proj_dim, self.dtype)
    self.prototypes = Prototypes(self.num_prototypes, self.proj_dim)
    self.head = nn.Dense(max(self.num_classes, 1), dtype=self.dtype)

  def __call__(self, x, *, train: bool = False):
    """Every submodule once (for init): features, projection, prototypes, logits."""
    h = self.enc(x, train=train)
    return {"features": h, "z": self.projection(h, train=train), "prototypes": self.prototypes(),
            "logits": self.head(h)}

  def embed_crops(self, crops: list[jax.Array], *, train: bool) -> tuple[jax.Array, jax.Array]:
    """Crop groups [B, n_g, S_g, S_g, C] -> (features [V, B, F], z [V, B, d]), crop-major.

    One encoder pass per resolution (the crops of a group go through together); the batch
    axis stays first inside each pass, so a batch-sharded input stays sharded.
    """
    hs, zs = [], []
    for group in crops:
      b, n = group.shape[:2]
      h = self.enc(group.reshape((b * n,) + group.shape[2:]), train=train)
      z = self.projection(h, train=train)
      hs.append(h.reshape(b, n, -1).transpose(1, 0, 2))
      zs.append(z.reshape(b, n, -1).transpose(1, 0, 2))
    return jnp.concatenate(hs), jnp.concatenate(zs)

  def prototype_weights(self):
    return self.prototypes()

  def classify(self, x, *, train: bool, train_encoder: bool = True):
    h = self.enc(x, train=train and train_encoder)
    if not train_encoder:
      h = jax.lax.stop_gradient(h)
    return self.head(h), h


# --------------------------------------------------------------------------- perturbations
def perturb(x01: jax.Array, kind: str, level: float) -> jax.Array:
  """A test-time change of images [B, H, W, C] in [0, 1] intensity space.

  intensity: x + level (brightness shift); gamma: x ** level; contrast: (x - mean) * level
  + mean per image; rotation: `level` degrees about the centre (bilinear, zero fill);
  scaling: zoom by `level` about the centre (< 1 shrinks the content, zero fill);
  noise: + N(0, level^2) with a fixed key. Results are clipped to [0, 1].
  """
  if kind == "intensity":
    y = x01 + level
  elif kind == "gamma":
    y = jnp.power(jnp.clip(x01, 0.0, 1.0), level)
  elif kind == "contrast":
    mean = jnp.mean(x01, axis=(1, 2, 3), keepdims=True)
    y = (x01 - mean) * level + mean
  elif kind in ("rotation", "scaling"):
    _, h, w, _ = x01.shape
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2,
                          jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2, indexing="ij")
    if kind == "rotation":
      t = math.radians(level)
      src_y = math.cos(t) * yy - math.sin(t) * xx
      src_x = math.sin(t) * yy + math.cos(t) * xx
    else:
      src_y, src_x = yy / level, xx / level
    coords = [src_y + (h - 1) / 2, src_x + (w - 1) / 2]
    sample = lambda img: jax.scipy.ndimage.map_coordinates(img, coords, order=1, cval=0.0)
    y = jax.vmap(jax.vmap(sample, in_axes=2, out_axes=2))(x01)
  elif kind == "noise":
    y = x01 + level * jax.random.normal(jax.random.key(1234), x01.shape, x01.dtype)
  else:
    raise ValueError(f"unknown perturbation {kind!r}; valid: {[k for k, _ in ROBUSTNESS]}")
  return jnp.clip(y, 0.0, 1.0)


# --------------------------------------------------------------------------- the task
def source_norms(train_source, *, max_records: int = 512) -> dict[str, tuple[float, float]]:
  """Per-source intensity mean and std (of [0, 1] pixels) over up to `max_records` records
  spread evenly through the training split: 'normalisation per source'."""
  n = len(train_source)
  idx = np.unique(np.linspace(0, n - 1, min(n, max_records)).astype(int))
  sums: dict[str, list[float]] = {}
  for i in idx:
    record = train_source[int(i)]
    src = record["source"]
    src = src.decode() if isinstance(src, bytes) else str(src)
    img = multicrop.decode(record["image"], what=f"record {i}")
    s = sums.setdefault(src, [0.0, 0.0, 0.0])
    s[0] += float(img.sum()); s[1] += float(np.square(img, dtype=np.float64).sum())
    s[2] += img.size
  out = {}
  for src, (s1, s2, cnt) in sorted(sums.items()):
    mean = s1 / cnt
    out[src] = (round(mean, 4), round(max(math.sqrt(max(s2 / cnt - mean * mean, 0.0)), 1e-3), 4))
  return out


class SSLTask:
  """One stage of the SSL experiment (see the module docstring and tasks/base.py)."""

  def __init__(self, config, stage, train_source):
    if stage.task not in TASKS:
      raise ValueError(f"stage task {stage.task!r} is not an ssl task; valid: {TASKS}")
    self.mode, self.config, self.stage = stage.task, config, stage
    m, s = config.model, config.ssl
    self.class_names = images_lib.class_names(train_source)
    if self.mode not in PRETRAIN_TASKS and not self.class_names:
      raise ValueError(f"stage task {self.mode!r} needs labels, but dataset "
                       f"{config.data.name!r} has no class_names (it is unlabelled)")
    self.num_classes = len(self.class_names)
    self.model = SSLNet(encoder=m.encoder, encoder_kwargs=tuple(m.encoder_kwargs.items()),
                        proj_hidden=m.proj_hidden, proj_dim=m.proj_dim,
                        num_prototypes=m.num_prototypes, num_classes=self.num_classes,
                        dtype=jnp.dtype(config.compute_dtype))
    if config.data.norm not in ("source", "fixed", "image"):
      raise ValueError(f"data.norm={config.data.norm!r}; valid: 'source' (per-source mean/std),"
                       " 'fixed' (0.5, 0.25 for all), 'image' (each view standardised)")
    # multicrop: a mapping gives per-source (mean, std) (missing sources: DEFAULT_NORM);
    # None standardises each view by its own statistics.
    self.norms = {"source": lambda: sources.once_per_source(
                      train_source, "norms", lambda: source_norms(train_source)), "fixed": dict,
                  "image": lambda: None}[config.data.norm]()
    self.crops = tuple(multicrop.CropSpec(count=n, size=size, scale=tuple(scale))
                       for n, size, scale in ((s.global_crops, s.global_size, s.global_scale),
                                              (s.local_crops, s.local_size, s.local_scale))
                       if n > 0)
    if not self.crops or self.crops[0].count < 2:
      raise ValueError(f"ssl.global_crops={s.global_crops}: SwAV needs at least 2 global crops")
    self.assign = tuple(s.assign_crops)
    if max(self.assign) >= self.crops[0].count:
      raise ValueError(f"ssl.assign_crops={self.assign} must index the "
                       f"{self.crops[0].count} global crops")
    self.augment_cfg = multicrop.AugmentConfig.from_config(s.augment.to_dict())
    self.in_table = self.mode != "swav"
    self.headline = "balanced_accuracy" if self.in_table else "knn_accuracy"
    self.columns = ["balanced_accuracy", "auc", "accuracy"]
    self.queue_length = 0
    if self.mode in _MULTICROP_TASKS and s.queue_length > 0:
      bsz = stage.batch_size // stage.opt.accumulate_steps
      self.queue_length = (s.queue_length // bsz) * bsz  # the reference rounds to batches
      if self.queue_length == 0:
        raise ValueError(f"ssl.queue_length={s.queue_length} is shorter than one batch "
                         f"({bsz}); use 0 (no queue) or at least {bsz}")
    if config.ssl.sinkhorn not in ("global", "shard_map"):
      raise ValueError(f"ssl.sinkhorn={config.ssl.sinkhorn!r}; valid: 'global', 'shard_map'")
    self.mesh = None  # set by the trainer (StageSetup)
    self._warned_collapse = False
    self._bank = None

  # ----------------------------------------------------------------- data
  def example_fn(self, record, rng, *, augment: bool):
    channels = self.config.data.channels
    if self.mode in _MULTICROP_TASKS and augment:
      return multicrop.multicrop_example(record, rng, crops=self.crops, channels=channels,
                                         norm=self.norms, augment_cfg=self.augment_cfg)
    size = self.crops[0].size if self.mode in _MULTICROP_TASKS else self.config.data.image_size
    out = multicrop.single_image_example(record, rng if augment else None, image_size=size,
                                         channels=channels, norm=self.norms)
    # Evaluation perturbs images in [0, 1] intensity space: it needs the normalisation used.
    src = record["source"]
    mean, std = (self.norms or {}).get(src.decode() if isinstance(src, bytes) else str(src),
                                       multicrop.DEFAULT_NORM)
    out["norm_mean"], out["norm_std"] = np.float32(mean), np.float32(std)
    return out

  def _eval_input(self, batch):
    """One image per example: the first global crop of a multi-crop batch, else the image."""
    return batch["crops_0"][:, 0] if "crops_0" in batch else batch["image"]

  # ----------------------------------------------------------------- parameters
  def prepare_params(self, params):
    """Prototypes re-normalised before every forward pass (the reference does it in place,
    under no_grad, at the start of each iteration)."""
    if "prototypes" not in params:
      return params
    w = params["prototypes"]["weight"]
    return {**params, "prototypes": {"weight": swav.normalize_prototypes(w, axis=1)}}

  def init(self, rng, batch):
    variables = dict(self.model.init({"params": rng}, self._eval_input(batch), train=False))
    if self.queue_length:
      length = self.queue_length
      variables["queue"] = {
          "z": jnp.zeros((len(self.assign), length, self.config.model.proj_dim), jnp.float32),
          "filled": jnp.zeros((), jnp.int32)}
    return variables

  # ----------------------------------------------------------------- losses
  def _ssl_loss(self, z, prototypes, model_state, step, mask):
    """SwAV (+ NT-Xent) on crop-major projections z [V, B, d]; returns (loss, metrics,
    new queue state)."""
    s = self.config.ssl
    queue = model_state.get("queue")
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
    new_queue = None
    if queue is not None:
      started = step >= s.queue_start
      z_assign = jax.lax.stop_gradient(z[jnp.asarray(self.assign)]).astype(jnp.float32)
      rolled = swav.update_queue(queue["z"], z_assign)
      new_queue = {
          "z": jnp.where(started, rolled, queue["z"]),
          "filled": jnp.where(started, jnp.minimum(queue["filled"] + z.shape[1],
                                                   queue["z"].shape[1]), queue["filled"])}
      metrics["queue_in_use"] = jnp.asarray(use_queue, jnp.float32)
    del mask  # training batches are never padded
    return loss, metrics, new_queue

  def loss(self, params, model_state, batch, rng, step):
    del rng
    variables = {"params": params, **model_state}
    mutable = [c for c in model_state if c != "queue"]
    apply = functools.partial(_apply_mutable, self.model, variables, mutable)
    if self.mode == "swav":
      (h, z), new_state = apply([batch[f"crops_{i}"] for i in range(len(self.crops))],
                                train=True, method=SSLNet.embed_crops)
      loss, metrics, new_queue = self._ssl_loss(z, params["prototypes"]["weight"],
                                                model_state, step, batch["mask"])
      metrics["feature_std"] = jnp.mean(jnp.std(h[0], axis=0))
    elif self.mode == "hybrid":
      crops = [batch[f"crops_{i}"] for i in range(len(self.crops))]
      (h, z), new_state = apply(crops, train=True, method=SSLNet.embed_crops)
      l_ssl, metrics, new_queue = self._ssl_loss(z, params["prototypes"]["weight"],
                                                 model_state, step, batch["mask"])
      # Supervised CE on the global crops' features (the labelled images, augmented).
      n_global = self.crops[0].count
      logits = self.model.apply(variables, h[:n_global].reshape((-1, h.shape[-1])),
                                method=lambda mdl, f: mdl.head(f))
      labels = jnp.tile(batch["label"], n_global)
      l_sup, sup = classification.softmax_cross_entropy(logits=logits, labels=labels)
      loss = l_sup + self.config.ssl.hybrid_lambda * l_ssl
      metrics.update(sup_loss=l_sup, ssl_loss=l_ssl, accuracy=sup["accuracy"])
    else:  # probe / finetune
      (logits, _), new_state = apply(batch["image"], train=True,
                                     train_encoder=self.mode != "probe", method=SSLNet.classify)
      loss, sup = classification.softmax_cross_entropy(logits=logits, labels=batch["label"],
                                                       weights=batch["mask"].astype(jnp.float32))
      metrics, new_queue = {"ce": loss, "accuracy": sup["accuracy"]}, None
    new_state = dict(new_state)
    if new_queue is not None:
      new_state["queue"] = new_queue
    elif "queue" in model_state:
      new_state["queue"] = model_state["queue"]
    return loss, (metrics, new_state)

  # ----------------------------------------------------------------- evaluation

  def predict(self, variables, batch):
    x = self._eval_input(batch)
    out = {"label": batch["label"]}
    logits, h = self.model.apply(variables, x, train=False, method=SSLNet.classify)
    out["features"] = h
    if self.mode in CLASSIFIER_TASKS:
      probs = jax.nn.softmax(logits.astype(jnp.float32))
      safe = jnp.maximum(batch["label"], 0)
      out["loss"] = -jnp.log(jnp.take_along_axis(probs, safe[:, None], -1)[:, 0] + 1e-12)
      out["probs"] = probs
      # Perturbations act on [0, 1] intensities: invertible only with a per-source or fixed
      # normalisation (data.norm='image' standardises each view and has no robustness report).
      if self.config.ssl.robustness and self.config.data.norm != "image":
        mean, std = batch["norm_mean"][:, None, None, None], batch["norm_std"][:, None, None, None]
        x01 = x * std + mean
        for kind, level in ROBUSTNESS:
          xp = (perturb(x01, kind, level) - mean) / std
          lp, _ = self.model.apply(variables, xp, train=False, method=SSLNet.classify)
          out[f"probs@{kind}"] = jax.nn.softmax(lp.astype(jnp.float32))
    return out

  def prepare_eval(self, predict_split):
    """kNN: the training split's features and labels are the neighbour bank."""
    if self.mode == "knn":
      train = predict_split("train")
      self._bank = (train["features"], train["label"])

  def evaluate(self, outputs, *, bootstrap, seed):
    labels = np.asarray(outputs["label"])
    feats = np.asarray(outputs["features"], np.float32)
    result: dict[str, Any] = {"feature_std": float(np.mean(np.std(feats, axis=0)))}
    labelled = labels >= 0
    if self.mode == "swav":
      if labelled.sum() > 1 and self.num_classes:
        result["knn_accuracy"] = float(knn_loo_accuracy(feats[labelled], labels[labelled],
                                                        k=self.config.ssl.knn_k))
      return result
    if self.mode == "knn":
      bank_f, bank_y = self._bank
      keep = bank_y >= 0
      probs = knn_probs(bank_f[keep], bank_y[keep], feats, k=self.config.ssl.knn_k,
                        num_classes=self.num_classes, temperature=self.config.ssl.knn_temperature)
    else:
      probs = np.asarray(outputs["probs"])
      result["loss"] = float(np.mean(outputs["loss"][labelled]))
    result.update(classification_metrics(labels[labelled], probs[labelled], bootstrap=bootstrap,
                                         seed=seed))
    for kind, _ in ROBUSTNESS:
      if f"probs@{kind}" in outputs:
        pk = np.asarray(outputs[f"probs@{kind}"])[labelled]
        for k, v in classification_metrics(labels[labelled], pk, bootstrap=0, seed=seed).items():
          result[f"robust/{kind}/{k}"] = v
    return result

  def on_log(self, step: int, scalars: dict) -> None:
    """Warns once when SwAV's loss sits at ln K (three log lines in a row) after the
    prototypes are released (collapse: every sample predicts a uniform distribution)."""
    loss = scalars.get("train/swav_loss")
    if loss is None or self._warned_collapse or step <= self.stage.opt.freeze_steps:
      return
    ln_k = math.log(self.config.model.num_prototypes)
    # "Sits at": three log lines in a row within 1% (a falling loss passes ln K once).
    near = abs(loss - ln_k) < 0.01 * ln_k
    self._near_ln_k = getattr(self, "_near_ln_k", 0) + 1 if near else 0
    if self._near_ln_k >= 3:
      self._warned_collapse = True
      logging.warning(
          "[ssl] step %d: the SwAV loss %.4f sits at ln K = %.4f (K=%d prototypes): the "
          "representation may have collapsed. Known fixes (SwAV README): ssl.epsilon=0.03, a "
          "longer opt.freeze_steps, model.proj_hidden=0 (no BN in the head), fewer local crops "
          "or softer augmentation, a shorter or later queue.", step, loss, ln_k,
          self.config.model.num_prototypes)


def _apply_mutable(model, variables, mutable, *args, **kwargs):
  """model.apply returning (out, updated collections) even when nothing is mutable."""
  if not mutable:
    return model.apply(variables, *args, **kwargs), {}
  out, state = model.apply(variables, *args, mutable=mutable, **kwargs)
  return out, dict(state)


# --------------------------------------------------------------------------- host metrics
def classification_metrics(labels: np.ndarray, probs: np.ndarray, *, bootstrap: int,
                           seed: int) -> dict[str, Any]:
  """accuracy, balanced accuracy and (macro OvR) AUC, with bootstrap 95% CIs."""
  result = metrics_lib.multitask_classification_metrics(
      labels[:, None], [probs], ("cls",), bootstrap=bootstrap, seed=seed)
  out = {"balanced_accuracy": result["cls/balanced_accuracy"], "auc": result["cls/auc"],
         "accuracy": float(np.mean(np.argmax(probs, -1) == labels))}
  for k in ("balanced_accuracy", "auc"):
    if f"cls/{k}_ci95" in result:
      out[f"{k}_ci95"] = result[f"cls/{k}_ci95"]
  return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  return a @ b.T


def knn_probs(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, *, k: int,
              num_classes: int, temperature: float = 0.07) -> np.ndarray:
  """Weighted kNN class scores (Wu et al. 2018 / DINO): the k most cosine-similar bank
  entries vote with weight exp(sim / T); rows normalised to sum to 1."""
  sims = _cosine(queries, bank)
  k = min(k, bank.shape[0])
  top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
  w = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
  votes = np.zeros((queries.shape[0], num_classes))
  np.add.at(votes, (np.arange(queries.shape[0])[:, None], bank_labels[top]), w)
  return votes / votes.sum(axis=1, keepdims=True)


def knn_loo_accuracy(features: np.ndarray, labels: np.ndarray, *, k: int) -> float:
  """Leave-one-out kNN accuracy within one split (a cheap representation monitor)."""
  sims = _cosine(features, features)
  np.fill_diagonal(sims, -np.inf)
  k = min(k, features.shape[0] - 1)
  top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
  num_classes = int(labels.max()) + 1
  votes = np.zeros((features.shape[0], num_classes))
  np.add.at(votes, (np.arange(features.shape[0])[:, None], labels[top]), 1.0)
  return float(np.mean(np.argmax(votes, 1) == labels))
