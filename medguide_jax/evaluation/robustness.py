"""Robustness to test-time image changes (Ghesu et al. 2022's claims): intensity, gamma,
contrast, rotation, scaling and noise applied to the evaluation images.

The evaluator runs the task's predict once more over the split with every perturbation
(one jitted pass), and reports `robust/<kind>/{balanced_accuracy, auc, accuracy}`.
Perturbations act on [0, 1] intensities, so the batches must say how they were normalised
('norm_mean', 'norm_std' [B], as ssl's decoder adds); with per-image standardisation
(data.norm='image') the change cannot be inverted and the evaluator reports nothing.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from medguide_jax.evaluation import evaluators
from medguide_jax.evaluation import metrics as metrics_lib

# (kind, level) of the default report.
ROBUSTNESS = (("intensity", 0.3), ("gamma", 1.8), ("contrast", 0.5), ("rotation", 20.0),
              ("scaling", 0.75), ("noise", 0.05))
KINDS = tuple(k for k, _ in ROBUSTNESS)


def _resample(x01: jax.Array, kind: str, level: float) -> jax.Array:
  """Rotation by `level` degrees or zoom by `level` about the centre (bilinear, zero fill)."""
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
  return jax.vmap(jax.vmap(sample, in_axes=2, out_axes=2))(x01)


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
    y = _resample(x01, kind, level)
  elif kind == "noise":
    y = x01 + level * jax.random.normal(jax.random.key(1234), x01.shape, x01.dtype)
  else:
    raise ValueError(f"unknown perturbation {kind!r}; valid: {list(KINDS)}")
  return jnp.clip(y, 0.0, 1.0)


class Robustness(evaluators.Evaluator):
  """Classification metrics under each perturbation. Options: levels (a dict kind -> level;
  default ROBUSTNESS), image_key ('image')."""
  default_prefix = "robust/"

  def __init__(self, task, *, levels: dict | None = None, image_key: str = "image", **kw):
    super().__init__(task, **kw)
    self.levels = tuple((levels or dict(ROBUSTNESS)).items())
    unknown = [k for k, _ in self.levels if k not in KINDS]
    if unknown:
      raise ValueError(f"unknown perturbations {unknown}; valid: {list(KINDS)}")
    self.image_key = image_key
    self.invertible = task.config.data.get("norm", "") != "image"
    if not self.invertible:
      logging.warning("evals.%s: data.norm='image' standardises each view by its own "
                      "statistics, which a perturbation cannot be put through; no robustness "
                      "report", self.name)

  def keys(self) -> set[str]:
    if not self.invertible:
      return set()
    return {f"{kind}/{m}" for kind, _ in self.levels
            for m in ("balanced_accuracy", "auc", "accuracy")}

  def _predict_perturbed(self, variables, batch):
    """{'probs@<kind>': [B, C]} of the task's predict on each perturbed copy."""
    mean = batch["norm_mean"][:, None, None, None]
    std = batch["norm_std"][:, None, None, None]
    x01 = batch[self.image_key] * std + mean
    out = {}
    for kind, level in self.levels:
      xp = (perturb(x01, kind, level) - mean) / std
      out[f"probs@{kind}"] = self.task.predict(variables, {**batch, self.image_key: xp})["probs"]
    return out

  def run(self, ctx: evaluators.EvalContext) -> dict:
    if not self.invertible:
      return {}
    labels = np.asarray(ctx.outputs["label"])
    labelled = labels >= 0
    outputs = ctx.predict(ctx.split, self._predict_perturbed)
    result = {}
    for kind, _ in self.levels:
      probs = np.asarray(outputs[f"probs@{kind}"])[labelled]
      for k, v in metrics_lib.classification_metrics(labels[labelled], probs, bootstrap=0,
                                                     seed=ctx.seed).items():
        result[f"{kind}/{k}"] = v
    return result
