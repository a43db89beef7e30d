"""downstream: what a pretrained chest X-ray image encoder is worth (hybridmed part 3; the
evaluations of HybridMED, MGCA and GLoRIA, METHODS.md 3(b)), for ANY image tower this
codebase produces: hybridmed's joint stage, ssl's SwAV pretraining, or random init. The
encoder is loaded by the stage's init_from / init_params (its tower becomes `img`:
'img/.*' from hybridmed, 'img/(.*)=enc/\\1' from SwAV); networks are models/downstream.py's.

Stage tasks (configs/downstream.py names the stages and fractions):
  linear     a linear classifier on the frozen tower (freeze='img/.*'): the shared
             supervised task, one binary task per label group (CheXpert-style multi-label:
             AUC per group, their mean the headline) or the dataset's classes (single-task
             'label' layouts such as PneumoniaMNIST: AUC and accuracy)
  finetune   the same, the tower trained too
  segment    a U-Net decoder over the tower's multi-scale maps, one mask per class (union
             of the class's region masks); Dice + BCE; Dice per image (evaluation/
             segmentation.py), frozen (freeze='img/.*') or fine-tuned
  detect     a CenterNet head on the tower's coarsest map (models/detection.py); COCO AP by
             pycocotools (evaluation/detection.py), over the IoU thresholds the config names
  vqa        image tokens + question tokens fused by cross-attention (models/vqa.py),
             answer classification over the training answers; closed and open accuracy,
             a test answer outside the training vocabulary counted wrong

Label fractions are the trainer's (train_fraction, stratified by train_stratify). Labels of
multi-label layouts: 1 positive, 0 negative, NaN not mentioned (negative), -1 uncertain:
`downstream.uncertain` 'ones' (U-Ones, the default: CheXpert's best policy for most
classes, Irvin et al. 2019) or 'zeros' (U-Zeros). A label group is positive when any of its
labels is (metadata 'label_groups'; else each label is its own group).

Images: grey, DEFAULT_NORM, resized to data.image_size. Classification trains on
cxr.CXR_AUGMENT crops (no flip); the dense tasks (segment, detect) and VQA on the whole
image resized, without geometric augmentation, so masks, boxes and left/right stay true.
"""
from __future__ import annotations

import io
import json
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from medguide_jax.data import cxr, images as images_lib, multicrop, sources, vqa as vqa_data
from medguide_jax.evaluation import detection as det_eval, metrics as metrics_lib
from medguide_jax.evaluation import segmentation as seg_eval, vqa as vqa_eval
from medguide_jax.losses import classification, detection as det_loss, segmentation as seg_loss
from medguide_jax.models import detection, downstream as nets, vqa as vqa_model
from medguide_jax.tasks import base, supervised

KINDS = ("linear", "finetune", "segment", "detect", "vqa")
UNCERTAIN = ("ones", "zeros")
GT_CAPACITY = 64   # ground-truth boxes per image the detection evaluation keeps
IOU_THRESHOLDS = {"coco": None, "rsna": det_eval.RSNA_IOU_THRESHOLDS}


# ----------------------------------------------------------------------------- shared
def frozen(stage) -> bool:
  """The tower is frozen when the stage's `freeze` regex covers a parameter path of it
  (linear evaluation, the frozen-encoder modes): it then also runs in eval mode."""
  return bool(stage.freeze) and re.fullmatch(stage.freeze, "img/kernel") is not None


def metadata(ctx: base.TaskContext) -> dict:
  return dict(getattr(getattr(ctx.train_source, "dataset_info", None), "metadata", None) or {})


def check_pretrained(ctx: base.TaskContext) -> None:
  """An init_from path (a finished stage of another run) must have been trained with this
  config's image tower: its run's config.json names encoder and encoder_kwargs; a mismatch
  is a config error naming both (before any parameter is read)."""
  m = ctx.config.model
  for source in filter(None, (s.strip() for s in ctx.stage.get("init_from", "").split(","))):
    if "/" not in source:
      continue
    path = epath.Path(source).parent / "config.json"
    if not path.exists():
      continue
    theirs = json.loads(path.read_text()).get("model", {})
    mine = (m.encoder, dict(m.encoder_kwargs))
    other = (theirs.get("encoder"), dict(theirs.get("encoder_kwargs") or {}))
    if other[0] is not None and (other[0] != mine[0] or any(
        other[1].get(k) != v for k, v in mine[1].items())):
      raise ValueError(
          f"init_from {source!r} was trained with model.encoder={other[0]!r} "
          f"encoder_kwargs={other[1]}, this config has model.encoder={mine[0]!r} "
          f"encoder_kwargs={mine[1]}: set --config.model.encoder / encoder_kwargs to match")


def _image(record, rng, config, *, augment: bool) -> np.ndarray:
  """The record's image, grey, resized (classification training: CXR_AUGMENT crops)."""
  data = config.data
  return multicrop.single_image_example(
      {"image": record["image"], "label": 0}, rng if augment else None,
      image_size=data.image_size, channels=data.get("channels", 1), norm={},
      augment_cfg=cxr.CXR_AUGMENT, crop_scale=cxr.CXR_CROP_SCALE)["image"]


def _size(data: bytes) -> tuple[int, int]:
  """(height, width) of an encoded image, from its header."""
  with Image.open(io.BytesIO(data)) as im:
    return im.height, im.width


def region_classes(meta: dict, names: str) -> tuple[list[str], dict[int, int]]:
  """The classes of the dense tasks and region label -> class index. `names` ('' = all):
  comma-separated label groups (metadata 'label_groups') or region names; a region whose
  name is in none is ignored."""
  region_names = list(meta.get("region_names") or meta.get("label_names") or [])
  groups = dict(meta.get("label_groups") or {n: [n] for n in region_names})
  chosen = [n.strip() for n in names.split(",") if n.strip()] if names else list(groups)
  unknown = [n for n in chosen if n not in groups]
  if unknown:
    raise ValueError(f"downstream classes {unknown}: not label groups / region names of the "
                     f"dataset (valid: {sorted(groups)})")
  index = {region_names.index(r): c for c, g in enumerate(chosen) for r in groups[g]
           if r in region_names}
  return chosen, index


def _regions(record, classes: dict[int, int]) -> list[tuple[int, np.ndarray, bytes]]:
  """(class, box, mask PNG) of each region of a chosen class."""
  labels = np.asarray(record["region_labels"]).reshape(-1)
  boxes = np.asarray(record["region_boxes"], np.float32).reshape(-1, 4)
  masks = list(record["region_masks"])
  return [(classes[int(l)], boxes[i], masks[i]) for i, l in enumerate(labels)
          if int(l) in classes]


def _record_id(record) -> str:
  return images_lib.text(record.get("id", "?"))


# ----------------------------------------------------------------------------- classification
def group_targets(meta: dict, uncertain: str):
  """(task names, fn(record labels [L]) -> int32 [T] 0/1) for a multi-label layout: label
  groups of metadata 'label_groups' (else each label), uncertain (-1) as `uncertain`
  says, NaN (not mentioned) negative. hybridmed's probe uses it too."""
  if uncertain not in UNCERTAIN:
    raise ValueError(f"downstream.uncertain={uncertain!r}; valid: {UNCERTAIN}")
  names = list(meta.get("label_names") or [])
  if not names:
    raise ValueError("the dataset has no label_names: nothing to classify")
  groups = dict(meta.get("label_groups") or {n: [n] for n in names})
  index = [[names.index(l) for l in members] for members in groups.values()]
  u = 1.0 if uncertain == "ones" else 0.0

  def targets(labels) -> np.ndarray:
    labels = np.asarray(labels, np.float32)
    if labels.shape != (len(names),):
      raise ValueError(f"labels of shape {labels.shape}; the dataset has {len(names)} "
                       "label_names")
    labels = np.where(labels < 0, u, np.nan_to_num(labels, nan=0.0)) > 0
    return np.asarray([labels[i].any() for i in index], np.int32)
  return tuple(groups), targets


class ClassifyTask(supervised.SupervisedTask):
  """linear / finetune (module docstring): the shared supervised task on Classifier."""

  def __init__(self, ctx: base.TaskContext):
    check_pretrained(ctx)
    meta, m = metadata(ctx), ctx.config.model
    findings = sources.layout(ctx.config.data.name) in ("cxr_reports", "cxr_findings")
    # A findings set whose labels are one-hot classes (COVIDx: metadata class_names) is one
    # multi-class task, as its protocol scores it (accuracy); the others are multi-label.
    self.one_hot = findings and bool(meta.get("class_names"))
    self.multi_label = findings and not self.one_hot
    if self.multi_label:
      names, self._targets = group_targets(meta, ctx.config.downstream.uncertain)
      num_classes, kw = (2,) * len(names), dict(
          task_names=names, headline="mean/auc", columns=("mean/auc", "mean/balanced_accuracy"))
    else:
      classes = list(meta.get("class_names") or [])
      if len(classes) < 2:
        raise ValueError(f"dataset {ctx.config.data.name!r} has {len(classes)} class names: "
                         "a classifier needs two or more")
      num_classes, kw = (len(classes),), dict(
          headline="auc", columns=("auc", "accuracy", "balanced_accuracy"))
    net = nets.Classifier(m.encoder, dict(m.encoder_kwargs), frozen(ctx.stage),
                          num_classes=num_classes, single=not self.multi_label)
    super().__init__(ctx, model=net, num_classes=num_classes, **kw)

  def example_fn(self, record, rng, *, augment):
    out = {"image": _image(record, rng, self.config, augment=augment)}
    if self.multi_label:
      out["labels"] = self._targets(record["labels"])
    elif self.one_hot:
      out["label"] = np.int32(np.argmax(np.asarray(record["labels"])))
    else:
      out["label"] = np.int32(record["label"])
    return out


# ----------------------------------------------------------------------------- segmentation
def _mask(png: bytes, shape: tuple[int, int], size: int, what: str) -> np.ndarray:
  """A region mask PNG at the image's `shape` -> bool [size, size] (area > half)."""
  with Image.open(io.BytesIO(png)) as im:
    if (im.height, im.width) != shape:
      raise ValueError(f"{what}: mask of {im.height}x{im.width} px, image of "
                       f"{shape[0]}x{shape[1]} px")
    m = np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR))
  return m >= 128


class _HeadTask(base.Task):
  """What segment, detect and vqa share: init and the training-mode forward of `self.model`
  (a 'dropout' stream for the networks that use one)."""
  model: Any

  def init(self, rng, batch):
    return dict(self.model.init({"params": rng, "dropout": rng}, batch, train=False))

  def forward(self, params, state, batch, rng):
    """The model in training mode -> (outputs, the state with its updated collections)."""
    out, model_state = base.apply_mutable(
        self.model, {"params": params, **state.model_state}, list(state.model_state), batch,
        train=True, rngs={"dropout": rng})
    return out, state.replace(model_state=model_state)


class SegmentTask(_HeadTask):
  """segment (module docstring): Dice + BCE; Dice per image and class from on-device sums."""

  def __init__(self, ctx: base.TaskContext):
    super().__init__(ctx)
    check_pretrained(ctx)
    d, m = ctx.config.downstream, ctx.config.model
    self.classes, self.class_of = region_classes(metadata(ctx), d.classes)
    self.model = nets.Segmenter(m.encoder, dict(m.encoder_kwargs), frozen(ctx.stage),
                                num_classes=len(self.classes))
    self.headline = "dice"
    self.columns = ("dice", "dice_all")

  def example_fn(self, record, rng, *, augment):
    size = self.config.data.image_size
    shape = _size(record["image"])
    masks = np.zeros((size, size, len(self.classes)), bool)
    for c, _, png in _regions(record, self.class_of):
      masks[..., c] |= _mask(png, shape, size, f"record {_record_id(record)}")
    return {"image": _image(record, rng, self.config, augment=False), "masks": masks}

  def loss(self, params, state, batch, rng):
    out, state = self.forward(params, state, batch, rng)
    loss, metrics = seg_loss.segmentation_loss(out["logits"], batch["masks"],
                                               batch["mask"].astype(jnp.float32))
    return loss, (metrics, state)

  def predict(self, variables, batch):
    logits = self.model.apply(variables, batch, train=False)["logits"]
    probs = jax.nn.sigmoid(logits.astype(jnp.float32))
    sums = seg_eval.dice_sums(probs, batch["masks"], 0.5)
    return {"hard_inter": sums["hard_inter"], "hard_pred": sums["hard_pred"],
            "target": sums["target"], "inter": sums["inter"], "pred": sums["pred"]}

  def evaluate(self, outputs, *, bootstrap, seed):
    """Hard Dice (threshold 0.5) per image and class (evaluation/segmentation.py): `dice`
    averages, per class, the images whose truth has that class (GLAM's convention here),
    `dice_all` every image, an empty prediction of an empty truth scoring 1 (SIIM-ACR's);
    the headline figures are their means over classes; `soft_dice` the probabilities'
    Dice on the positive images. Intervals from resampling images (all classes jointly)."""
    positive = np.asarray(outputs["target"]) > 0                                  # [N, C]
    hard = seg_eval.dice_from_sums(outputs["hard_inter"], outputs["hard_pred"],
                                   outputs["target"], empty="one")
    soft = seg_eval.dice_from_sums(outputs["inter"], outputs["pred"], outputs["target"],
                                   empty="one")

    def point(hard, soft, positive):
      on = lambda x: np.where(positive, x, np.nan)     # the images with the class
      with warnings.catch_warnings():  # a class no image has: nan, left out of the means
        warnings.simplefilter("ignore", RuntimeWarning)
        pos, alls = np.nanmean(on(hard), 0), hard.mean(0)
        return np.concatenate([[np.nanmean(pos), alls.mean(), np.nanmean(np.nanmean(
            on(soft), 0))], pos, alls])
    keys = (["dice", "dice_all", "soft_dice"] + [f"{c}/dice" for c in self.classes]
            + [f"{c}/dice_all" for c in self.classes])
    result = metrics_lib.with_intervals(keys, point(hard, soft, positive), point,
                                        [hard, soft, positive], bootstrap, seed)
    for c, name in enumerate(self.classes):
      result[f"{name}/images"] = int(positive[:, c].sum())
    return result

  def metric_keys(self):
    return ({"dice", "dice_all", "soft_dice"} | {f"{c}/{k}" for c in self.classes
                                                for k in ("dice", "dice_all", "images")})


# ----------------------------------------------------------------------------- detection
class DetectTask(_HeadTask):
  """detect (module docstring): CenterNet on the tower's coarsest map; COCO AP."""

  def __init__(self, ctx: base.TaskContext):
    super().__init__(ctx)
    check_pretrained(ctx)
    d, m = ctx.config.downstream, ctx.config.model
    if d.iou_thresholds not in IOU_THRESHOLDS:
      raise ValueError(f"downstream.iou_thresholds={d.iou_thresholds!r}; valid: "
                       f"{sorted(IOU_THRESHOLDS)}")
    self.classes, self.class_of = region_classes(metadata(ctx), d.classes)
    self.model = nets.Detector(m.encoder, dict(m.encoder_kwargs), frozen(ctx.stage),
                               num_classes=len(self.classes))
    self.stride = nets.stride(m.encoder, dict(m.encoder_kwargs), -1)
    self.max_objects = int(d.max_objects)
    self.headline = "map"
    self.columns = ("map", "map50") if d.iou_thresholds == "coco" else ("map",)

  def example_fn(self, record, rng, *, augment):
    size = self.config.data.image_size
    h, w = _size(record["image"])
    regions = _regions(record, self.class_of)
    boxes = np.asarray([r[1] for r in regions], np.float32).reshape(-1, 4)
    boxes = boxes * np.asarray([size / w, size / h, size / w, size / h], np.float32)
    labels = np.asarray([r[0] for r in regions], np.int32)
    targets = detection.encode_targets(boxes, labels, image_size=(size, size),
                                       stride=self.stride, num_classes=len(self.classes),
                                       max_objects=self.max_objects)
    # The evaluation's ground truth: every box, clipped to the image (up to GT_CAPACITY).
    if len(boxes) > GT_CAPACITY:
      raise ValueError(f"record {_record_id(record)}: {len(boxes)} boxes, more than the "
                       f"{GT_CAPACITY} the evaluation holds per image")
    kept, kept_labels, _, _ = detection.clean_boxes(boxes, labels, (size, size),
                                                    len(self.classes))
    gt_boxes = np.zeros((GT_CAPACITY, 4), np.float32)
    gt_labels = np.full((GT_CAPACITY,), -1, np.int32)
    gt_boxes[:len(kept)], gt_labels[:len(kept)] = kept, kept_labels
    out = {f"target/{k_}": np.asarray(v) for k_, v in targets.items()
           if k_ not in ("clipped", "empty", "dropped")}
    out.update(image=_image(record, rng, self.config, augment=False), gt_boxes=gt_boxes,
               gt_labels=gt_labels)
    return out

  def _targets(self, batch):
    return {k.partition("/")[2]: v for k, v in batch.items() if k.startswith("target/")}

  def loss(self, params, state, batch, rng):
    out, state = self.forward(params, state, batch, rng)
    loss, metrics = det_loss.centernet_loss(out, self._targets(batch),
                                            weights=batch["mask"].astype(jnp.float32))
    return loss, (metrics, state)

  def predict(self, variables, batch):
    out = self.model.apply(variables, batch, train=False)
    size = self.config.data.image_size
    boxes, scores, classes = detection.decode(out, stride=self.stride, image_size=(size, size),
                                              top_k=self.config.downstream.top_k)
    return {"boxes": boxes, "scores": scores, "classes": classes,
            "gt_boxes": batch["gt_boxes"], "gt_labels": batch["gt_labels"]}

  def evaluate(self, outputs, *, bootstrap, seed):
    d = self.config.downstream
    preds, gts = [], []
    for i in range(len(outputs["scores"])):
      keep = detection.nms(outputs["boxes"][i], outputs["scores"][i], outputs["classes"][i],
                           iou_threshold=d.nms_iou, max_detections=d.top_k)
      preds.append(keep)
      real = outputs["gt_labels"][i] >= 0
      gts.append((outputs["gt_boxes"][i][real], outputs["gt_labels"][i][real]))
    return det_eval.map_with_interval(gts, preds, iou_thresholds=IOU_THRESHOLDS[
        d.iou_thresholds], class_names=self.classes, bootstrap=bootstrap, seed=seed)

  def metric_keys(self):
    return ({"map", "map50", "images", "objects"} | {f"map/{c}" for c in self.classes})


# ----------------------------------------------------------------------------- VQA
class VqaTask(_HeadTask):
  """vqa (module docstring): answer classification over the training answers."""

  def __init__(self, ctx: base.TaskContext):
    super().__init__(ctx)
    check_pretrained(ctx)
    meta, m, data = metadata(ctx), ctx.config.model, ctx.config.data
    answers = list(meta.get("answers") or [])
    if not answers:
      raise ValueError(f"dataset {data.name!r} has no answer vocabulary (metadata 'answers'):"
                       " is it a 'cxr_vqa' dataset?")
    self.answer_index = {a: i for i, a in enumerate(answers)}
    self.tok = cxr.tokenizer_for(data, meta)
    self.frozen = frozen(ctx.stage)
    self.model = vqa_model.VqaNet(
        encoder=m.encoder, encoder_kwargs=dict(m.encoder_kwargs), vocab_size=self.tok.vocab_size,
        max_len=self.tok.max_len, num_answers=len(answers), text_kwargs=dict(m.text),
        hidden=m.fusion.hidden, layers=m.fusion.layers, heads=m.fusion.heads,
        freeze_image=self.frozen)
    self.headline = "accuracy"
    self.columns = ("accuracy", "closed/accuracy", "open/accuracy")

  def example_fn(self, record, rng, *, augment):
    return vqa_data.vqa_example(record, rng if augment else None,
                                image_size=self.config.data.image_size, tokenizer=self.tok,
                                answer_index=self.answer_index,
                                question_len=self.tok.max_len,
                                channels=self.config.data.get("channels", 1))

  def loss(self, params, state, batch, rng):
    out, state = self.forward(params, state, batch, rng)
    weights = batch["mask"].astype(jnp.float32) * (batch["answer"] >= 0)
    loss, m = classification.softmax_cross_entropy(
        logits=out["logits"], labels=jnp.maximum(batch["answer"], 0), weights=weights)
    return loss, ({"ce": loss, "accuracy": m["accuracy"]}, state)

  def predict(self, variables, batch):
    logits = self.model.apply(variables, batch, train=False)["logits"]
    return {"prediction": jnp.argmax(logits, -1).astype(jnp.int32), "answer": batch["answer"],
            "closed": batch["closed"]}

  def evaluate(self, outputs, *, bootstrap, seed):
    return vqa_eval.vqa_accuracy(outputs["prediction"], outputs["answer"], outputs["closed"],
                                 bootstrap=bootstrap, seed=seed)

  def metric_keys(self):
    return {"accuracy", "closed/accuracy", "open/accuracy", "open/out_of_vocabulary",
            "closed/out_of_vocabulary", "closed/n", "open/n"}


def make_task(ctx: base.TaskContext) -> base.Task:
  kind = ctx.stage.task
  if kind not in KINDS:
    raise ValueError(f"stage task {kind!r} is not a downstream task; valid: {KINDS}")
  if kind in ("linear", "finetune"):
    if (kind == "linear") != frozen(ctx.stage):
      raise ValueError(f"a {kind} stage needs freeze={'img/.*' if kind == 'linear' else ''!r}"
                       f" (has {ctx.stage.freeze!r})")
    return ClassifyTask(ctx)
  return {"segment": SegmentTask, "detect": DetectTask, "vqa": VqaTask}[kind](ctx)
