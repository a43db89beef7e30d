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
over the test images that have a mask with a lesion in it.

Sparsity: GMIC adds beta * sum|A| over the saliency map. Here `model.sparsity` (lambda)
weights the per-pixel mean |A|, i.e. beta = lambda / (h w C), so lambda means the same at
every resolution. The default lambda = 1 is beta = 2.3e-5 on GLAM's full-resolution
184x120x2 map, inside the range of GMIC's released betas (3.3e-6 .. 2.3e-4); 0.1 left the
maps' background at a mean of 0.1 and gave the same AUC.
"""
from __future__ import annotations

import csv
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from medguide_jax import metric_writers
from medguide_jax.data import mammo, multicrop
from medguide_jax.evaluation import metrics as metrics_lib
from medguide_jax.evaluation import segmentation
from medguide_jax.models import glam as glam_lib

MODES = ("global", "local", "joint", "inference")
CLASSES = ("benign", "malignant")
_EPS = 1e-6


def decode_mask(data: bytes, shape: tuple[int, int], what: str) -> np.ndarray:
  """A {0,255} PNG -> uint8 {0,1} [H,W]; b'' (no mask file) -> zeros."""
  if not data:
    return np.zeros(shape, np.uint8)
  mask = multicrop.decode(data, what=what)[..., 0] > 0.5
  if mask.shape != tuple(shape):
    raise ValueError(f"{what}: mask shape {mask.shape} differs from the image's {tuple(shape)}")
  return mask.astype(np.uint8)


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def glam_example(record: dict, rng=None, *, augment: bool) -> dict:
  """A GLAM record -> standardised image [H,W,1], labels [2]; for evaluation also the masks
  [H,W,2] (uint8) and which classes have one [2]. No augmentation: the reference's only
  training-time augmentation is noise in the crop window, which the stored views have
  already fixed."""
  del rng
  name = _text(record.get("id", "?"))
  image = multicrop.decode(record["image"], what=f"image {name}")[..., 0]
  out = {"image": mammo.standardize(image)[..., None],
         "labels": np.array([record["benign"], record["malignant"]], np.float32)}
  if not augment:
    out["seg"] = np.stack([decode_mask(record[f"{c}_mask"], image.shape, f"{c}_mask of {name}")
                           for c in CLASSES], axis=-1)
    out["has_seg"] = np.array([record[f"has_{c}_mask"] for c in CLASSES], np.float32)
  return out


def bce_rows(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example binary cross-entropy [B] of probabilities [B,C] (the pooled sigmoid maps
  already are), mean over classes."""
  p = jnp.clip(probs.astype(jnp.float32), _EPS, 1.0 - _EPS)
  return -(labels * jnp.log(p) + (1.0 - labels) * jnp.log1p(-p)).mean(-1)


def bce(probs: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """`bce_rows` averaged over the weighted (unpadded) batch: the training loss."""
  return jnp.sum(bce_rows(probs, labels) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  values = values.reshape(values.shape[0], -1).astype(jnp.float32).mean(-1)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def dice_sums(saliency: jax.Array, seg: jax.Array, threshold: float) -> dict[str, jax.Array]:
  """Per image and class [B,C]: sum(S*M), sum(S), sum(M), and the same for S > threshold."""
  s, m = saliency.astype(jnp.float32), seg.astype(jnp.float32)
  hard = (s > threshold).astype(jnp.float32)
  total = lambda a: a.sum(axis=(1, 2))
  return {"inter": total(s * m), "pred": total(s), "target": total(m),
          "hard_inter": total(hard * m), "hard_pred": total(hard)}


class GlamTask:
  """A GLAM stage for the trainer (see tasks/base.py)."""

  def __init__(self, config, stage, train_source):
    if stage.task not in MODES:
      raise ValueError(f"stage task {stage.task!r} is not a glam mode; valid: {MODES}")
    self.mode = stage.task
    m = config.model
    metadata = train_source.dataset_info.metadata or {}
    if "image_shape" not in metadata:
      raise ValueError(f"dataset {config.data.name!r} has no 'image_shape' in its metadata: "
                       "not a GLAM dataset (synthetic_mammo, nyu_mammo, cbis_ddsm, ...)")
    if metadata.get("evaluation_only") and self.mode != "inference":
      raise ValueError(
          f"dataset {config.data.name!r} is evaluation-only (too few exams to split: every "
          f"image is in all three splits), so stage task {self.mode!r} would train on its test "
          "images; evaluate it with pretrained=<stage dir> or weights=<file>")
    self.image_shape = tuple(int(v) for v in metadata["image_shape"])
    h, w = self.image_shape
    crop = tuple(int(v) for v in m.crop_shape)
    if len(crop) != 2:
      raise ValueError(f"model.crop_shape must be (height, width), got {tuple(m.crop_shape)}")
    if h % 16 or w % 16:
      raise ValueError(f"data image_shape {self.image_shape} is not divisible by 16 (the "
                       "global module's saliency stride)")
    if crop[0] > h or crop[1] > w or crop[0] % 4 or crop[1] % 4:
      raise ValueError(f"model.crop_shape {crop} must fit in the image {self.image_shape} and "
                       "be divisible by 4 (the local module's stride)")
    self.crop_shape = crop
    self.sparsity = float(m.sparsity)
    self.threshold = float(m.dice_threshold)
    self.visualize = int(m.visualize)
    self.weights = m.get("weights", "")
    self.model = glam_lib.GLAM(
        global_widths=tuple(m.global_widths), local_depth=int(m.local_depth),
        local_width=int(m.local_width), crop_shape=crop, num_patches=int(m.num_patches),
        percent_t_global=float(m.percent_t_global), percent_t_local=float(m.percent_t_local),
        dtype=jnp.dtype(config.compute_dtype), remat=bool(m.remat))
    self.uses_local = self.mode != "global"
    self.in_table = True
    self.headline = "auc/mean"
    self.columns = ["auc/mean", "auc/benign", "auc/malignant",
                    "dice_global/benign", "dice_fused/benign",
                    "dice_global/malignant", "dice_fused/malignant"]

  # -- the trainer's hooks ------------------------------------------------------------------

  def example_fn(self, record, rng, *, augment):
    example = glam_example(record, rng, augment=augment)
    if example["image"].shape[:2] != self.image_shape:
      raise ValueError(f"image {_text(record.get('id', '?'))} is {example['image'].shape[:2]}, "
                       f"the dataset metadata says {self.image_shape}")
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

  def loss(self, params, model_state, batch, rng, step=None):
    del rng, step
    weights = batch["mask"].astype(jnp.float32)
    train_global = self.mode in ("global", "joint")
    out, new_state = self.model.apply(
        {"params": params, **model_state}, batch["image"], train=True,
        train_global=train_global, local=self.uses_local, mutable=list(model_state))
    labels = batch["labels"]
    metrics, total = {}, 0.0
    if self.mode in ("global", "joint"):
      metrics["bce_global"] = bce(out["y_global"], labels, weights)
      metrics["l1_global"] = _masked_mean(jnp.abs(out["saliency_global"]), weights)
      total = total + metrics["bce_global"] + self.sparsity * metrics["l1_global"]
    if self.mode in ("local", "joint"):
      metrics["bce_local"] = bce(out["y_local"], labels, weights)
      metrics["l1_local"] = _masked_mean(jnp.abs(out["saliency_local_patches"]), weights)
      total = total + metrics["bce_local"] + self.sparsity * metrics["l1_local"]
    metrics["loss"] = total
    return total, (metrics, dict(new_state))

  def predict(self, variables, batch):
    out = self.model.apply(variables, batch["image"], train=False, local=self.uses_local,
                           fuse=self.uses_local)
    labels = batch["labels"]
    result = {"labels": labels, "y_global": out["y_global"].astype(jnp.float32),
              "loss": bce_rows(out["y_global"], labels)}
    maps = {"global": glam_lib.resize_nearest(out["saliency_global"].astype(jnp.float32),
                                              self.image_shape)}
    if self.uses_local:
      result["y_local"] = out["y_local"].astype(jnp.float32)
      result["loss"] = result["loss"] + bce_rows(out["y_local"], labels)
      result["patch_positions"] = out["patch_positions"]
      maps["fused"] = out["saliency"].astype(jnp.float32)
    if "seg" in batch:
      result["has_seg"] = batch["has_seg"]
      for name, s in maps.items():
        for k, v in dice_sums(s, batch["seg"], self.threshold).items():
          result[f"dice_{name}/{k}"] = v
    return result

  def evaluate(self, outputs, *, bootstrap, seed):
    labels = outputs["labels"].astype(np.int64)
    result = {"loss": float(np.mean(outputs["loss"]))}
    for prefix, key in (("auc", "y_global"), ("auc_local", "y_local")):
      if key in outputs:
        aucs = class_aucs(labels, outputs[key])
        result.update({f"{prefix}/{name}": a for name, a in zip(CLASSES, aucs)})
        result[f"{prefix}/mean"] = _finite_mean(aucs)
    if bootstrap and len(labels) > 1:
      result["auc/mean_ci95"] = list(metrics_lib.bootstrap_ci(
          lambda y, p: _finite_mean(class_aucs(y, p)), labels, outputs["y_global"],
          num_samples=bootstrap, seed=seed))
    if "has_seg" in outputs:
      result.update(dice_metrics(outputs, labels))
    return result

  def write_outputs(self, stage_dir, variables, source, outputs) -> None:
    """predictions.csv over the test split (as the reference's) and per-image PNGs."""
    ids = [_text(source[i]["id"]) for i in range(len(source))]
    variables = jax.tree.map(np.asarray, multihost_utils.process_allgather(variables,
                                                                          tiled=True))
    if not metric_writers.is_writer():
      return
    write_predictions(os.path.join(stage_dir, "predictions.csv"), ids, outputs)
    if self.visualize > 0:
      self._write_pictures(os.path.join(stage_dir, "visualization"), variables, source, ids)

  def _write_pictures(self, out_dir, variables, source, ids) -> None:
    os.makedirs(out_dir, exist_ok=True)
    apply = jax.jit(lambda v, x: self.model.apply(v, x, train=False, local=True, fuse=True))
    for i in range(min(self.visualize, len(source))):
      example = glam_example(source[i], augment=False)
      out = jax.tree.map(np.asarray, apply(variables, example["image"][None]))
      saliency = out["saliency"][0] if self.uses_local else np.asarray(
          glam_lib.resize_nearest(out["saliency_global"], self.image_shape))[0]
      picture = render_example(
          example["image"][..., 0], example["seg"], example["has_seg"],
          out["patch_positions"][0] if self.uses_local else np.zeros((0, 2), np.int32),
          self.crop_shape, saliency, title=ids[i])
      path = os.path.join(out_dir, f"{ids[i].replace(os.sep, '_')}.png")
      Image.fromarray(picture).save(path)
    logging.info("glam: %d pictures in %s", min(self.visualize, len(source)), out_dir)


def class_aucs(labels: np.ndarray, preds: np.ndarray) -> list[float]:
  """The AUC of each class's prediction [N,C] for its labels [N,C] (nan without both)."""
  return [metrics_lib.roc_auc_ovr(labels[:, c], preds[:, c]) for c in range(len(CLASSES))]


def _finite_mean(values: list[float]) -> float:
  finite = [v for v in values if np.isfinite(v)]
  return float(np.mean(finite)) if finite else float("nan")


def dice_metrics(outputs: dict, labels: np.ndarray) -> dict:
  """Mean per-image Dice per class and map, over images with a mask and that lesion class,
  and the relative gain of the fused map over the global one."""
  result = {}
  maps = [m for m in ("global", "fused") if f"dice_{m}/inter" in outputs]
  for c, name in enumerate(CLASSES):
    valid = (outputs["has_seg"][:, c] > 0) & (labels[:, c] == 1)
    for m in maps:
      get = lambda k: outputs[f"dice_{m}/{k}"][:, c]
      result[f"dice_{m}/{name}"], n = segmentation.mean_dice(
          get("inter"), get("pred"), get("target"), valid)
      result[f"dice_{m}_hard/{name}"], _ = segmentation.mean_dice(
          get("hard_inter"), get("hard_pred"), get("target"), valid)
      result[f"dice_images/{name}"] = n
    if "fused" in maps:
      for suffix in ("", "_hard"):
        result[f"dice_gain{suffix}/{name}"] = segmentation.relative_gain(
            result[f"dice_fused{suffix}/{name}"], result[f"dice_global{suffix}/{name}"])
  return result


def write_predictions(path: str, ids: list[str], outputs: dict) -> None:
  """The reference's predictions.csv: image_index, benign_pred, malignant_pred, labels
  (plus the local module's predictions when there are any)."""
  if len(ids) != len(outputs["y_global"]):
    raise ValueError(f"{len(ids)} ids for {len(outputs['y_global'])} predictions")
  header = ["image_index", "benign_pred", "malignant_pred", "benign_label", "malignant_label"]
  local = "y_local" in outputs
  if local:
    header += ["benign_pred_local", "malignant_pred_local"]
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  for i, name in enumerate(ids):
    row = [name, f"{outputs['y_global'][i, 0]:.4f}", f"{outputs['y_global'][i, 1]:.4f}",
           int(outputs["labels"][i, 0]), int(outputs["labels"][i, 1])]
    if local:
      row += [f"{outputs['y_local'][i, 0]:.4f}", f"{outputs['y_local'][i, 1]:.4f}"]
    writer.writerow(row)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)


# -- pictures (numpy + Pillow: no plotting library needed) -----------------------------------

_GREEN, _RED, _BLUE = (np.array(c, np.float32) for c in ((40, 200, 60), (230, 40, 30),
                                                          (40, 120, 255)))


def _grey_rgb(image: np.ndarray) -> np.ndarray:
  lo, hi = np.percentile(image, [0.5, 99.5])
  grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255
  return np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
  """The boundary pixels of a boolean mask, `width` px thick."""
  mask = mask.astype(bool)
  inner = mask.copy()
  for _ in range(width):
    shrunk = inner.copy()
    shrunk[1:] &= inner[:-1]
    shrunk[:-1] &= inner[1:]
    shrunk[:, 1:] &= inner[:, :-1]
    shrunk[:, :-1] &= inner[:, 1:]
    inner = shrunk
  return mask & ~inner


def render_example(image, seg, has_seg, positions, crop_shape, saliency, *, title="",
                   max_height: int = 736) -> np.ndarray:
  """The reference's picture: input with ground-truth outlines | patch map | benign saliency
  | malignant saliency, side by side, as uint8 RGB (downscaled to `max_height`)."""
  h, w = image.shape
  scale = max(1, int(np.ceil(h / max_height)))
  width = max(1, 2 * scale)
  base = _grey_rgb(image)
  panels = []
  outlined = base.copy()
  for c, colour in ((0, _GREEN), (1, _RED)):
    if has_seg[c]:
      outlined[_outline(seg[..., c] > 0, width)] = colour
  panels.append(outlined)
  patch = outlined.copy()
  ch, cw = crop_shape
  for r, col in np.asarray(positions).reshape(-1, 2):
    box = np.zeros((h, w), bool)
    box[max(r, 0):r + ch, max(col, 0):col + cw] = True
    patch[_outline(box, width)] = _BLUE
  panels.append(patch)
  for c, colour in ((0, _GREEN), (1, _RED)):
    alpha = np.clip(saliency[..., c], 0, 1)[..., None] * 0.95
    panels.append(base * (1 - alpha) + colour * alpha)
  gap = np.full((h, max(4, w // 60), 3), 255, np.float32)
  strip = np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1)
  strip = strip[::scale, ::scale] if scale > 1 else strip
  del title  # the file name carries the image id
  return np.clip(strip, 0, 255).astype(np.uint8)
