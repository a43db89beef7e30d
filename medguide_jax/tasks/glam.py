"""GLAM (Liu et al., MIDL 2021): weakly supervised segmentation of mammograms, as stages.

  global     the global module alone: BCE on y_global (the mean of the top-t% pooled
             saliency maps A1..A3) + an L1 sparsity term on its saliency map S_g
  local      the local module on the patches the frozen global module selects: BCE on
             y_local (top-t% pooling over the patches' local maps) + L1 sparsity on them
  joint      both modules: the sum of the two objectives
  inference  no training: evaluate the parameters it is given (init_from, or the official
             weights converted by `python -m medguide_jax.models.glam_convert`)

The released model is `model_sep` (global, then local on the frozen global module's patches)
and `model_joint` (a further joint stage); the reference repository holds no training code,
so the losses follow what its forward pass implies and GMIC's sparsity term (METHODS.md 4).

Training sees image-level labels only ('benign', 'malignant'). Masks are read for
evaluation: Dice of the global map S_g (upsampled x16, the GMIC-style baseline) and of the
fused GLAM map S = (local canvas + up(S_g)) / 2, soft and at a threshold, per lesion class,
over the test images that have a mask with a lesion in it; the `dice_val_threshold`
evaluator adds the hard Dice at the threshold chosen on the validation split.

Sparsity: GMIC adds beta * sum|A| over the saliency map. Here `model.sparsity` (lambda)
weights the per-pixel mean |A|, i.e. beta = lambda / (h w C), so lambda means the same at
every resolution. The default lambda = 1 is beta = 2.3e-5 on GLAM's full-resolution
184x120x2 map, inside the range of GMIC's released betas (3.3e-6 .. 2.3e-4); 0.1 left the
maps' background at a mean of 0.1 and gave the same AUC.

Where the pieces are: the network in models/glam.py (and the official-weights converter,
models/glam_convert.py); the loss is losses/classification.py's binary_cross_entropy plus
the L1 term here; decoding in data/mammo.py (glam_example); Dice in evaluation/segmentation.py;
predictions.csv and the pictures are evaluators (evaluation/glam_outputs.py) named in
configs/glam.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from medguide_jax.data import images, mammo
from medguide_jax.evaluation import metrics as metrics_lib
from medguide_jax.evaluation import segmentation
from medguide_jax.losses import classification
from medguide_jax.models import glam as glam_lib
from medguide_jax.tasks import base

MODES = ("global", "local", "joint", "inference")
CLASSES = mammo.GLAM_CLASSES
_TRAINS_GLOBAL = ("global", "joint")
_TRAINS_LOCAL = ("local", "joint")


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  values = values.reshape(values.shape[0], -1).astype(jnp.float32).mean(-1)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def auc_metrics(labels: np.ndarray, preds: np.ndarray, prefix: str, *, bootstrap: int,
                seed: int) -> dict:
  """'<prefix>/<class>' and '<prefix>/mean' AUCs of per-class probabilities [N, 2] (the
  mean with a bootstrap CI when bootstrap > 0), through the one metrics path."""
  probs = [np.stack([1.0 - preds[:, c], preds[:, c]], axis=-1) for c in range(len(CLASSES))]
  r = metrics_lib.multitask_classification_metrics(
      labels, probs, CLASSES, bootstrap=bootstrap if len(labels) > 1 else 0, seed=seed)
  out = {f"{prefix}/{name}": r[f"{name}/auc"] for name in CLASSES}
  out[f"{prefix}/mean"] = r["mean/auc"]
  if "mean/auc_ci95" in r:
    out[f"{prefix}/mean_ci95"] = r["mean/auc_ci95"]
  return out


def _check_geometry(image_shape: tuple[int, int], crop: tuple[int, ...]) -> None:
  h, w = image_shape
  if len(crop) != 2:
    raise ValueError(f"model.crop_shape must be (height, width), got {crop}")
  if h % 16 or w % 16:
    raise ValueError(f"data image_shape {image_shape} is not divisible by 16 (the "
                     "global module's saliency stride)")
  if crop[0] > h or crop[1] > w or crop[0] % 4 or crop[1] % 4:
    raise ValueError(f"model.crop_shape {crop} must fit in the image {image_shape} and "
                     "be divisible by 4 (the local module's stride)")


class GlamTask(base.Task):
  """A GLAM stage for the trainer (see the module docstring and tasks/base.py)."""
  headline = "auc/mean"
  columns = ("auc/mean", "auc/benign", "auc/malignant", "dice_global/benign",
             "dice_fused/benign", "dice_global/malignant", "dice_fused/malignant")

  def __init__(self, ctx: base.TaskContext):
    super().__init__(ctx)
    config, stage = ctx.config, ctx.stage
    if stage.task not in MODES:
      raise ValueError(f"stage task {stage.task!r} is not a glam mode; valid: {MODES}")
    self.mode, m = stage.task, config.model
    metadata = ctx.train_source.dataset_info.metadata or {}
    if "image_shape" not in metadata:
      raise ValueError(f"dataset {config.data.name!r} has no 'image_shape' in its metadata: "
                       "not a GLAM dataset (synthetic_mammo, nyu_mammo, cbis_ddsm, ...)")
    if metadata.get("evaluation_only") and self.mode != "inference":
      raise ValueError(
          f"dataset {config.data.name!r} is evaluation-only (too few exams to split: every "
          f"image is in all three splits), so stage task {self.mode!r} would train on its test "
          "images; evaluate it with pretrained=<stage dir> or weights=<file>")
    self.image_shape = tuple(int(v) for v in metadata["image_shape"])
    self.crop_shape = tuple(int(v) for v in m.crop_shape)
    _check_geometry(self.image_shape, self.crop_shape)
    self.sparsity, self.threshold = float(m.sparsity), float(m.dice_threshold)
    self.weights = m.get("weights", "")
    self.model = glam_lib.GLAM(
        global_widths=tuple(m.global_widths), local_depth=int(m.local_depth),
        local_width=int(m.local_width), crop_shape=self.crop_shape,
        num_patches=int(m.num_patches), percent_t_global=float(m.percent_t_global),
        percent_t_local=float(m.percent_t_local), dtype=jnp.dtype(config.compute_dtype),
        remat=bool(m.remat))
    self.uses_local = self.mode != "global"

  def example_fn(self, record, rng, *, augment):
    example = super().example_fn(record, rng, augment=augment)
    if example["image"].shape[:2] != self.image_shape:
      raise ValueError(f"image {images.text(record.get('id', '?'))} is "
                       f"{example['image'].shape[:2]}, the dataset metadata says "
                       f"{self.image_shape}")
    return example

  def init(self, rng, batch):
    variables = dict(self.model.init({"params": rng}, batch["image"], train=False,
                                     local=True))
    if self.weights:
      from medguide_jax.models import glam_convert  # pylint: disable=g-import-not-at-top
      loaded = glam_convert.load_variables(self.weights, like=variables)
      logging.info("glam: parameters from %s", self.weights)
      return loaded
    return variables

  def loss(self, params, state, batch, rng):
    del rng
    weights = batch["mask"].astype(jnp.float32)
    out, model_state = base.apply_mutable(
        self.model, {"params": params, **state.model_state}, list(state.model_state),
        batch["image"], train=True, train_global=self.mode in _TRAINS_GLOBAL,
        local=self.uses_local)
    bce = lambda y: classification.binary_cross_entropy(probs=y, labels=batch["labels"],
                                                        weights=weights)
    metrics, total = {}, 0.0
    if self.mode in _TRAINS_GLOBAL:
      metrics["bce_global"] = bce(out["y_global"])
      metrics["l1_global"] = _masked_mean(jnp.abs(out["saliency_global"]), weights)
      total = total + metrics["bce_global"] + self.sparsity * metrics["l1_global"]
    if self.mode in _TRAINS_LOCAL:
      metrics["bce_local"] = bce(out["y_local"])
      metrics["l1_local"] = _masked_mean(jnp.abs(out["saliency_local_patches"]), weights)
      total = total + metrics["bce_local"] + self.sparsity * metrics["l1_local"]
    metrics["loss"] = total
    return total, (metrics, state.replace(model_state=model_state))

  def dice_maps(self, variables, pixels: jax.Array) -> tuple[dict, dict[str, jax.Array]]:
    """(the model's eval-mode outputs, the maps Dice scores): 'global' (S_g nearest-upsampled
    to the image) and, where the stage has a local module, 'fused' (S); float32 [B,H,W,2].
    Also the forward pass of evaluation/segmentation.py's ValThresholdDice."""
    out = self.model.apply(variables, pixels, train=False, local=self.uses_local,
                           fuse=self.uses_local)
    maps = {"global": glam_lib.resize_nearest(out["saliency_global"].astype(jnp.float32),
                                              self.image_shape)}
    if self.uses_local:
      maps["fused"] = out["saliency"].astype(jnp.float32)
    return out, maps

  def predict(self, variables, batch):
    out, maps = self.dice_maps(variables, batch["image"])
    labels = batch["labels"]
    bce = lambda y: classification.binary_cross_entropy(probs=y, labels=labels,
                                                        reduction="none")
    result = {"labels": labels, "y_global": out["y_global"].astype(jnp.float32),
              "loss": bce(out["y_global"])}
    if self.uses_local:
      result["y_local"] = out["y_local"].astype(jnp.float32)
      result["loss"] = result["loss"] + bce(out["y_local"])
      result["patch_positions"] = out["patch_positions"]
    if "seg" in batch:
      result["has_seg"] = batch["has_seg"]
      for name, s in maps.items():
        for k, v in segmentation.dice_sums(s, batch["seg"], self.threshold).items():
          result[f"dice_{name}/{k}"] = v
    return result

  def evaluate(self, outputs, *, bootstrap, seed):
    labels = outputs["labels"].astype(np.int64)
    result = {"loss": float(np.mean(outputs["loss"]))}
    result.update(auc_metrics(labels, outputs["y_global"], "auc", bootstrap=bootstrap,
                              seed=seed))
    if "y_local" in outputs:
      result.update(auc_metrics(labels, outputs["y_local"], "auc_local", bootstrap=0,
                                seed=seed))
    if "has_seg" in outputs:
      result.update(segmentation.dice_metrics(outputs, labels, CLASSES))
    return result

  def metric_keys(self) -> set[str]:
    aucs = ("auc", "auc_local") if self.uses_local else ("auc",)
    maps = ("global", "fused") if self.uses_local else ("global",)
    keys = {"loss"} | {f"{p}/{c}" for p in aucs for c in CLASSES + ("mean",)}
    keys |= {f"dice_{m}{h}/{c}" for m in maps for h in ("", "_hard") for c in CLASSES}
    keys |= {f"dice_images/{c}" for c in CLASSES}
    if self.uses_local:
      keys |= {f"dice_gain{h}/{c}" for h in ("", "_hard") for c in CLASSES}
    return keys

  @functools.cached_property
  def _maps_fn(self):
    return jax.jit(lambda v, x: self.model.apply(v, x, train=False, local=True, fuse=True))

  def picture_maps(self, variables, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(saliency [B,H,W,2] at the image's size, patch positions [B,n,2]) for the pictures:
    the fused map where the stage has a local module, else the up-sampled global one."""
    out = jax.tree.map(np.asarray, self._maps_fn(variables, pixels))
    if self.uses_local:
      return out["saliency"], out["patch_positions"]
    saliency = np.asarray(glam_lib.resize_nearest(out["saliency_global"], self.image_shape))
    return saliency, np.zeros((len(pixels), 0, 2), np.int32)


def make_task(ctx: base.TaskContext) -> base.Task:
  return GlamTask(ctx)
