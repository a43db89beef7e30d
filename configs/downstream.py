r"""hybridmed part 3: what a pretrained chest X-ray encoder is worth downstream, for ANY image
tower of this codebase (tasks/downstream.py): hybridmed's joint stage (or its ablations),
ssl's SwAV pretraining, or random init, compared in one table.

  source=hybridmed,pretrained=W/joint     init_params 'img/.*' (HybridMedNet's tower)
  source=swav,pretrained=W/pretrain       init_params 'img/(.*)=enc/\1' (SSLNet's encoder)
  source=random                           no init_from

The encoder (model.encoder, model.encoder_kwargs) must be the pretrained one: a path whose
run used another is exit 2 naming both. The defaults are hybridmed's CPU size (tiny_cnn
width 32 at 64 px, grey); the SwAV run for a fair comparison is
configs/ssl_pretrain.py:dataset=synthetic_cxr,size=cxr (same images, same tower).

Stages (dataset=synthetic_cxr, the embedded default; `stages=a+b` keeps some):
  linear_1, linear_10, linear_100        linear evaluation (frozen tower) on 1%, 10%, 100% of
                                         the training labels (nested, stratified)
  finetune_1, finetune_10, finetune_100  the same, fine-tuned
  segment_frozen, segment                U-Net over the frozen / fine-tuned tower (100%)
  detect                                 CenterNet over the fine-tuned tower (100%)
dataset=synthetic_cxr_vqa: vqa_frozen, vqa (question tower and fusion trained from scratch for
every source: the comparison is of image towers). dataset=pneumoniamnist: the six
classification stages (real chest X-rays; cross-domain transfer from synthetic_cxr).

  python -m medguide_jax.main --config=configs/downstream.py:source=random --workdir=/tmp/d_rn
  python -m medguide_jax.main \
      --config=configs/downstream.py:source=hybridmed,pretrained=/tmp/hm/joint --workdir=W
  python -m medguide_jax.main --config=configs/downstream.py:source=swav,pretrained=/tmp/sw/pretrain,dataset=synthetic_cxr_vqa --workdir=W

Expected (CPU size, test, mean over seeds 0-2; README "Results (hybridmed downstream)" has
the intervals and paired differences): synthetic_cxr mean AUC linear 1/10/100% hybridmed
0.626 / 0.601 / 0.598, SwAV 0.558 / 0.500 / 0.530, random 0.508 / 0.504 / 0.503; fine-tuned
0.607 / 0.630 / 0.657, 0.593 / 0.587 / 0.612, 0.591 / 0.594 / 0.617; Dice segment 0.394 /
0.205 / 0.148, segment_frozen 0.297 / 0.187 / 0.001; detect AP 0.186 / 0.165 / 0.164.
pneumoniamnist linear AUC 0.746 / 0.821 / 0.809 (hybridmed), 0.518 / 0.786 / 0.769 (SwAV),
0.29-0.30 (random); fine-tuned 0.90 / 0.94 / 0.94 for all three. synthetic_cxr_vqa: 0.50-0.51
accuracy for every source (the question-only baseline: 300 steps do not train the fusion).
A synthetic_cxr run takes 7-10 minutes on a busy 2-core machine, a PneumoniaMNIST run
2.5-4, a VQA run 3.5-4 (under the 20-minute budget). Smoke (:smoke, every stage, 40 steps,
random init; measured 2026-12-02): 2m41s on 2 idle cores, a run check, not a result (mean
AUC 0.49-0.56, Dice 0.05, AP 0.015).

Datasets: synthetic_cxr (labels: the 5 label groups; classes of the dense tasks: opacity,
effusion, pneumothorax), synthetic_cxr_vqa, pneumoniamnist (build: python -m data_prep.build
pneumoniamnist --manual_dir=../shared/data/medmnist_small), and the official releases once
built: chexpert (uncertain labels: uncertain=ones, the default, or zeros), chexpert with
--config.data.name=chexpert:<5x200 config> for zero-shot, rsna_pneumonia (classification,
segmentation from its boxes as MGCA does, detection with AP over IoU 0.40:0.05:0.75),
siim_acr, object_cxr, covidx, vqa_rad.

Arguments after ':': source, pretrained, dataset, size=smoke|cpu, stages, uncertain,
encoder, width.
"""
from __future__ import annotations

import ml_collections

from configs import common

# dataset arg -> (data.name, task kinds it has, subset stratification field, dense classes,
# detection IoU thresholds).
DATASETS = {
    "synthetic_cxr": ("synthetic_cxr", ("classify", "segment", "detect"), "labels",
                      "opacity,effusion,pneumothorax", "coco"),
    "synthetic_cxr:tiny": ("synthetic_cxr:tiny", ("classify", "segment", "detect"), "labels",
                           "opacity,effusion,pneumothorax", "coco"),
    "synthetic_cxr_vqa": ("synthetic_cxr_vqa", ("vqa",), "", "", "coco"),
    "synthetic_cxr_vqa:tiny": ("synthetic_cxr_vqa:tiny", ("vqa",), "", "", "coco"),
    "pneumoniamnist": ("pneumoniamnist", ("classify",), "label", "", "coco"),
    "chexpert": ("chexpert", ("classify",), "labels", "", "coco"),
    "rsna_pneumonia": ("rsna_pneumonia", ("classify", "segment", "detect"), "labels", "",
                       "rsna"),
    "siim_acr": ("siim_acr", ("classify", "segment"), "labels", "", "coco"),
    "object_cxr": ("object_cxr", ("classify", "detect"), "labels", "", "coco"),
    "covidx": ("covidx", ("classify",), "labels", "", "coco"),
    "vqa_rad": ("vqa_rad", ("vqa",), "", "", "coco"),
}
SOURCES = {"hybridmed": "img/.*", "swav": "img/(.*)=enc/\\1", "random": ""}
FRACTIONS = (1, 10, 100)

SIZES = {
    # A run check: a few dozen steps of every stage.
    "smoke": dict(image=64, encoder="tiny_cnn", width=32, batch=32, linear_steps=40,
                  finetune_steps=40, dense_steps=40, vqa_steps=40, bootstrap=50),
    # The README's table.
    "cpu": dict(image=64, encoder="tiny_cnn", width=32, batch=32, linear_steps=150,
                finetune_steps=150, dense_steps=250, vqa_steps=300, bootstrap=500),
}


def _stage(task: str, steps: int, lr: float, sz: dict, src: str, init_params: str, *,
           frozen: bool, fraction: float = 0.0, stratify: str = "", select: str = ""
           ) -> ml_collections.ConfigDict:
  opt = common.optimizer("adam", lr=lr, schedule="cosine", warmup_steps=-1)
  return common.stage(
      task, num_steps=steps, batch_size=sz["batch"], eval_batch_size=128, opt=opt,
      eval_every=max(steps // 3, 1), select=select, bootstrap=sz["bootstrap"],
      init_from=src, init_params=init_params if src else "",
      freeze="img/.*" if frozen else "", train_fraction=fraction / 100.0 if fraction else 0.0,
      train_stratify=stratify if fraction else "")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, source="random", pretrained="", dataset="synthetic_cxr",
                         size="cpu", smoke=False, stages="", uncertain="ones", encoder="",
                         width=0)
  size = "smoke" if arg.smoke else arg.size
  if size not in SIZES:
    raise ValueError(f"size={size!r}; valid: {sorted(SIZES)}")
  if arg.dataset not in DATASETS:
    raise ValueError(f"dataset={arg.dataset!r}; valid: {sorted(DATASETS)}")
  if arg.source not in SOURCES:
    raise ValueError(f"source={arg.source!r}; valid: {sorted(SOURCES)}")
  if (arg.source == "random") != (not arg.pretrained):
    raise ValueError(f"source={arg.source!r} with pretrained={arg.pretrained!r}: "
                     "hybridmed and swav need pretrained=<finished stage dir>, random none")
  if arg.pretrained and "/" not in arg.pretrained:
    raise ValueError(f"pretrained={arg.pretrained!r}: a path to a finished stage directory")
  sz = SIZES[size]
  name, kinds, stratify, classes, iou = DATASETS[arg.dataset]
  c = common.base_config()
  c.method = "downstream"
  c.data.name = name
  c.data.image_size = sz["image"]
  c.data.channels = 1
  c.data.tokenizer = ""   # VQA questions: '' = the dataset's tokenizer
  c.data.max_len = 24     # question tokens
  c.model = ml_collections.ConfigDict(dict(
      encoder=arg.encoder or sz["encoder"],
      encoder_kwargs={"width": arg.width or sz["width"]} if not arg.encoder or arg.width else {},
      text={"hidden": 128, "layers": 2, "heads": 4, "mlp": 256},
      fusion={"hidden": 128, "layers": 2, "heads": 4}))
  c.downstream = ml_collections.ConfigDict(dict(
      uncertain=arg.uncertain,   # CheXpert's -1: 'ones' (U-Ones) or 'zeros' (U-Zeros)
      classes=classes,           # dense tasks' classes: label groups / region names ('' all)
      iou_thresholds=iou,        # 'coco' (0.50:0.05:0.95) or 'rsna' (0.40:0.05:0.75)
      max_objects=16, top_k=50, nms_iou=0.5))
  src, rules = arg.pretrained, SOURCES[arg.source]
  stages = {}
  if "classify" in kinds:
    headline = "max:val/mean/auc" if stratify == "labels" else "max:val/auc"
    for f in FRACTIONS:
      stages[f"linear_{f}"] = _stage("linear", sz["linear_steps"], 1e-2, sz, src, rules,
                                     frozen=True, fraction=f, stratify=stratify,
                                     select=headline)
      stages[f"finetune_{f}"] = _stage("finetune", sz["finetune_steps"], 1e-3, sz, src, rules,
                                       frozen=False, fraction=f, stratify=stratify,
                                       select=headline)
  if "segment" in kinds:
    stages["segment_frozen"] = _stage("segment", sz["dense_steps"], 1e-3, sz, src, rules,
                                      frozen=True, select="max:val/dice")
    stages["segment"] = _stage("segment", sz["dense_steps"], 1e-3, sz, src, rules,
                               frozen=False, select="max:val/dice")
  if "detect" in kinds:
    stages["detect"] = _stage("detect", sz["dense_steps"], 1e-3, sz, src, rules,
                              frozen=False, select="max:val/map")
  if "vqa" in kinds:
    stages["vqa_frozen"] = _stage("vqa", sz["vqa_steps"], 1e-3, sz, src, rules, frozen=True,
                                  select="max:val/accuracy")
    stages["vqa"] = _stage("vqa", sz["vqa_steps"], 1e-3, sz, src, rules, frozen=False,
                           select="max:val/accuracy")
  c.stages = ml_collections.ConfigDict(stages)
  c.default_stage = next(iter(stages))
  common.keep_stages(c, arg.stages)
  return c
