r"""SwAV (+ optional NT-Xent) pretraining over medical images of many modalities.

Ghesu et al. 2022 ("Self-supervised learning from 100 million medical images"): contrastive
learning and online feature clustering (SwAV) over radiography, CT, MR and ultrasound;
where the paper is silent this follows the SwAV reference (METHODS.md section 5).

Smoke run on the embedded synthetic data (TinyCNN, 2x32 + 2x16 crops, K=32; 23-33 s on 2 idle
CPU cores: 23 s measured including generating the data, 33 s earlier on a busier machine):

  python -m medguide_jax.main --config=configs/ssl_pretrain.py:smoke --workdir=/tmp/ssl_smoke

  Expected (measured on the earlier one-lesion default, synthetic_multimodality; the
  scattered default adds about 40 s to generate its data once): train/swav_loss falls from
  4.1 onto a plateau at ln 32 = 3.47 (steps 28-56; the collapse warning fires there), then
  leaves it and ends near 3.2-3.3; the features' leave-one-out kNN accuracy stays near
  chance (validation 0.252, test 0.234). A check that pretraining runs, not a result.

CPU size (TinyCNN at width 32, 2x64 + 4x32 crops, batch 64, K=100, LARS lr 0.6, 400 steps;
the pretraining of configs/ssl_finetune.py's cpu protocol) on synthetic_multimodality:scattered:

  python -m medguide_jax.main --config=configs/ssl_pretrain.py:size=cpu --workdir=/tmp/ssl_cpu

  Expected (seed 0, measured 2026-12-02): train/swav_loss from 4.9 (ln 100 = 4.61) to 4.04;
  leave-one-out 20-NN accuracy of the features on the test split 0.432 (random weights:
  0.325, chance 0.25).

Paper size (ResNet-50, 2x224 + 6x96, batch 4096, K=3000, LARS lr 4.8 with 10-epoch warmup
from 0.3 and cosine to 0.0048, wd 1e-6, prototypes held for 313 steps; for accelerators):

  python -m medguide_jax.main --config=configs/ssl_pretrain.py:dataset=mixture,model=resnet50 \
      --config.data.mixture=medical_misc:1,brain_tumor_mri:1,breastmnist:1 --workdir=gs://b/ssl

Pretraining on your own archive (PNG 8/16-bit, JPEG, DICOM, NIfTI; see data_prep/image_folder.py):

  python -m data_prep.build image_folder:my_archive --manual_dir=/path/to/archive
  python -m medguide_jax.main --config=configs/ssl_pretrain.py:dataset=image_folder:my_archive \
      --workdir=/tmp/ssl_mine

The stage writes `pretrain/variables` (encoder `enc/...`), which configs/ssl_finetune.py
loads with `pretrained=<workdir>/pretrain`. Watch `train/swav_loss` (from ~ln K down),
`train/code_entropy`, `train/prototype_usage`; a warning is logged if the loss sits at ln K.

Arguments after ':': dataset=synthetic|real|mixture|<dataset name>, model=resnet50|resnet18|
vit_s16|vit_b16|tiny_cnn (overrides the size's), size=smoke|cpu|cxr|paper, smoke (= size=smoke),
objective=swav|contrastive|both.
"""
from __future__ import annotations

import ml_collections

from configs import common

# dataset arg -> data.name (and data.mixture for 'real').
DATASETS = {"synthetic": "synthetic_multimodality:scattered", "real": "mixture", "mixture": "mixture"}
# Report datasets (no class labels): SwAV on their images, grey, the kNN monitor off.
CXR_DATASETS = ("synthetic_cxr", "iu_xray", "mimic_cxr")
REAL_MIXTURE = "medical_misc:1,brain_tumor_mri:1,breastmnist:1,pneumoniamnist:1,ham10000:1"

SIZES = {
    # Short CPU runs use the batch-4096 learning rate unscaled: at SwAV's batch-256 rate
    # (0.6 x 64/256) a 300-step run of the cpu size sat at ln K (collapse) by step 75, while
    # lr 4.8 left it (loss 4.6 -> 3.8 by step 210, K=100; README, SSL results).
    "smoke": dict(encoder="tiny_cnn", kw={"width": 16}, crops=(2, 32, 2, 16), batch=32,
                  steps=150, K=32, proj=(128, 32), queue=0, freeze=20, opt="lars", lr=4.8,
                  base_batch=0, warmup=-1),
    # The CPU protocol (configs/ssl_finetune.py, README SSL results): small enough that one
    # seed's pretraining and every downstream stage fit 15 minutes on 2 cores. Measured on
    # synthetic_multimodality:scattered (seed 0, 2026-12-02): LARS 0.6 takes the loss from 4.9
    # to 4.04 in 400 steps; `model=resnet18 --config.model.encoder_kwargs.width=16` is the
    # earlier CPU encoder (3x the cost per step).
    "cpu": dict(encoder="tiny_cnn", kw={"width": 32}, crops=(2, 64, 4, 32), batch=64, steps=400,
                K=100, proj=(256, 64), queue=0, freeze=50, opt="lars", lr=0.6, base_batch=0,
                warmup=-1),
    # Chest X-rays for hybridmed's downstream comparison (configs/downstream.py): hybridmed's
    # CPU-size image tower (tiny_cnn width 32 at 64 px, grey), pretrained by SwAV on the same
    # synthetic_cxr training images, labels unused.
    # Measured (seed 0, 2026-12-01): at lr 4.8 with the default augmentation the SwAV loss sat
    # at ln K from step 60 to 750 (and NT-Xent at chance with objective=both); lr 0.6 with
    # the X-ray augmentation below left it (swav 4.44, NT-Xent 4.41 by step 300).
    "cxr": dict(encoder="tiny_cnn", kw={"width": 32}, crops=(2, 64, 4, 32), batch=64,
                steps=1000, K=100, proj=(256, 64), queue=0, freeze=50, opt="lars", lr=0.6,
                base_batch=0, warmup=-1),
    # SwAV's batch-4096 recipe: 2x224 + 6x96, K=3000, queue off, LARS 4.8 for batch 4096.
    "paper": dict(encoder="resnet50", kw={}, crops=(2, 224, 6, 96), batch=4096, steps=31300,
                  K=3000, proj=(2048, 128), queue=0, freeze=313, opt="lars", lr=4.8,
                  base_batch=4096, warmup=3130),
}


def ssl_block(sz: dict, objective: str) -> ml_collections.ConfigDict:
  """The SwAV / NT-Xent / multi-crop settings (read by tasks/ssl.py)."""
  g, gs, l, ls = sz["crops"]
  return ml_collections.ConfigDict(dict(
      global_crops=g, global_size=gs, global_scale=(0.14, 1.0), local_crops=l, local_size=ls,
      local_scale=(0.05, 0.14), assign_crops=(0, 1),
      swav_weight=1.0 if objective in ("swav", "both") else 0.0,
      contrastive_weight=1.0 if objective in ("contrastive", "both") else 0.0,
      epsilon=0.05, sinkhorn_iters=3, temperature=0.1, stable=False,
      sinkhorn="global",             # 'global' (XLA reduces) | 'shard_map' (reference psums)
      contrastive_temperature=0.1,
      queue_length=sz["queue"], queue_start=0,  # steps; used once full, FIFO
      hybrid_lambda=1.0,
      # Per-crop augmentation (data/multicrop.AugmentConfig): SwAV's flip and blur, its colour
      # jitter as brightness/contrast/gamma for grey images (saturation/hue for colour only),
      # plus the paper's medical rotation, scaling (the crops) and noise.
      augment=dict(flip_p=0.5, rot90=False, rotate_p=0.5, rotate_degrees=15.0, jitter_p=0.8,
                   brightness=0.4, contrast=0.4, gamma=(0.7, 1.4), saturation=0.8, hue=0.2,
                   grey_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), blur_reference_size=224,
                   noise_p=0.2, noise_std=(0.0, 0.05))))


def model_block(sz: dict, model: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      encoder=model or sz["encoder"], encoder_kwargs=sz["kw"] if not model else {},
      proj_hidden=sz["proj"][0], proj_dim=sz["proj"][1], num_prototypes=sz["K"]))


def pretrain_stage(sz: dict) -> ml_collections.ConfigDict:
  return common.stage(
      "swav", num_steps=sz["steps"], batch_size=sz["batch"], eval_batch_size=256, bootstrap=0,
      evals={"knn_loo": {"k": 20, "prefix": ""}},  # knn_accuracy: the pretraining monitor
      opt=common.optimizer(sz["opt"], lr=sz["lr"], momentum=0.9, nesterov=False,
                           weight_decay=1e-6, schedule="cosine", warmup_steps=sz["warmup"],
                           warmup_start_factor=0.0625, end_lr_factor=0.001,
                           lr_base_batch=sz["base_batch"], freeze_steps=sz["freeze"],
                           freeze_steps_params="prototypes/.*"))


def data_block(c: ml_collections.ConfigDict, dataset: str, px: int) -> None:
  c.data.name = DATASETS.get(dataset, dataset)
  c.data.mixture = REAL_MIXTURE if dataset == "real" else ""
  c.data.image_size = px
  cxr = c.data.name.partition(":")[0] in CXR_DATASETS
  # grey images are repeated; 1 turns colour images into luma. Chest X-rays: one channel
  # and the fixed normalisation, as hybridmed's image tower sees them.
  c.data.channels = 1 if cxr else 3
  c.data.norm = "fixed" if cxr else "source"  # per-source mean/std; 'fixed' = (0.5, 0.25)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, dataset="synthetic", model="", size="cpu", smoke=False,
                         objective="swav")
  size = "smoke" if arg.smoke else arg.size
  if size not in SIZES:
    raise ValueError(f"size={size!r}; valid: {sorted(SIZES)}")
  if arg.objective not in ("swav", "contrastive", "both"):
    raise ValueError(f"objective={arg.objective!r}; valid: swav, contrastive, both")
  sz = SIZES[size]
  c = common.base_config()
  c.method = "ssl"
  c.default_stage = "pretrain"
  data_block(c, arg.dataset, sz["crops"][1])
  c.model = model_block(sz, arg.model)
  c.ssl = ssl_block(sz, arg.objective)
  c.stages = ml_collections.ConfigDict({"pretrain": pretrain_stage(sz)})
  if c.data.name.partition(":")[0] in CXR_DATASETS:
    c.stages.pretrain.evals = {}   # no class labels for the kNN monitor
    # hybridmed's X-ray augmentation (data/cxr.CXR_AUGMENT): no flip (a mirrored radiograph
    # swaps left and right), milder intensity jitter, no gamma, blur or noise.
    c.ssl.augment.update(flip_p=0.0, brightness=0.2, contrast=0.2, gamma=(1.0, 1.0),
                         blur_p=0.0, noise_p=0.0)
  return c
