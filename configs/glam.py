r"""GLAM (Liu et al., MIDL 2021): weakly supervised high-resolution segmentation of mammograms.

Three stages, trained from image-level labels only (benign, malignant): `global_net` (the
global module), `local_net` (the local module on the patches chosen by the frozen global
module: the released `model_sep`), then `joint` (both: `model_joint`). Masks are used for evaluation
only: Dice of the global-only map (the GMIC-style baseline) and of the fused GLAM map.

Smoke run on the embedded synthetic mammograms (368x240, small widths; 2-4 minutes on 2
CPU cores: 2m12s measured idle including building the data, 3m03s-3m47s earlier on a busier
machine with the data already built):

  python -m medguide_jax.main --config=configs/glam.py:smoke --workdir=/tmp/glam_smoke

  Expected (seed 0), test AUC mean [95% CI]: global_net 0.747 [0.718, 0.777], joint 0.793
  [0.769, 0.817]; every Dice is near 0.01 (a run check, not a result), and every threshold
  chosen on validation is the grid's lowest, 0.01 (Dice there about 0.015; the maps do not
  localise yet).

Beside the soft Dice and the Dice at 0.5 (dice_<map>_hard/<class>), every stage reports the
hard Dice at the threshold chosen on validation from 0.01 .. 0.99 (dice_<map>_at_val_threshold
/<class>, the threshold in dice_<map>_val_threshold/<class>) and the fused map's relative gain
over the global one for each (dice_gain, dice_gain_hard, dice_gain_at_val_threshold /<class>);
evaluation/segmentation.py says how.

CPU size, the seeds protocol (README, GLAM results): the smoke networks, 600/300/300 steps;
13.3 CPU-minutes for the three stages (11m14s user + 2m04s system; 20m38s wall on 2 cores
shared with two other runs), so under the 15-minute budget alone:

  python -m medguide_jax.main --config=configs/glam.py:size=cpu --config.seed=S --workdir=/tmp/glam_cpu_S
  python -m medguide_jax.report --workdirs=/tmp/glam_cpu_0,/tmp/glam_cpu_1,/tmp/glam_cpu_2 \
      --metrics=dice_gain_at_val_threshold/benign,dice_gain_at_val_threshold/malignant

  Expected: see the README's GLAM results (seeds 0-2).

Longer CPU size (368x240 = 2944x1920 / 8, the reference's widths for the global module,
ResNet-18 local module on 64x64 patches; about 45 minutes):

  python -m medguide_jax.main --config=configs/glam.py:size=cpu_long --workdir=/tmp/glam_long

  Expected (seed 0), test AUC mean: global_net 0.910 [0.889, 0.930], joint 0.975 [0.963,
  0.985]; soft Dice global -> fused, benign / malignant: local_net 0.049 -> 0.075 /
  0.039 -> 0.026, joint 0.101 -> 0.090 / 0.070 -> 0.112.

Full resolution (2944x1920, ResNet-22 global + ResNet-34 local on one 512x512 patch; for
accelerators; `bf16`, `remat` and `accumulate=N` trade speed for memory):

  python -m medguide_jax.main --config=configs/glam.py:size=full,bf16,remat --workdir=W

Real data: build first (`python -m data_prep.build nyu_mammo --manual_dir=...`; tags pick
the resolution, see data_prep/mammo_exams.py), then `dataset=nyu` or `dataset=cbis_ddsm`.
Evaluation only, with parameters from elsewhere (a stage of a finished run, or the official
PyTorch weights converted by `python -m medguide_jax.models.glam_convert`):

  ...:dataset=nyu_glam_sample,size=cpu_long,pretrained=/tmp/glam_long/joint
  ...:dataset=nyu_glam_sample,size=full,weights=/path/model_sep.npz

Arguments after ':' (comma-separated): dataset=synthetic|synthetic_mammo|nyu|cbis_ddsm|
nyu_glam_sample|nyu_bcc_sample, smoke (= size=smoke), size=smoke|cpu|cpu_long|full,
stages=<names joined by '+'>, pretrained=<a stage dir>, weights=<converted .npz or .ckpt>,
bf16, remat, accumulate=<micro-batches per step>.
"""
from __future__ import annotations

import ml_collections

from configs import common

# dataset arg -> (TFDS name at reduced resolution, at full resolution).
DATASETS = {
    "synthetic": ("synthetic_mammo", "synthetic_mammo:full"),
    "synthetic_mammo": ("synthetic_mammo", "synthetic_mammo:full"),
    "nyu": ("nyu_mammo:x8", "nyu_mammo"),
    "cbis_ddsm": ("cbis_ddsm:x8", "cbis_ddsm"),
    "nyu_glam_sample": ("nyu_glam_sample:x8", "nyu_glam_sample"),
    "nyu_bcc_sample": ("nyu_bcc_sample:x8", "nyu_bcc_sample"),
}

# size -> model, patch and training budget. Reduced sizes divide every length by 8 (the
# 512 px patch becomes 64 px: the same field of view). Steps: global, local, joint.
SIZES = {
    "smoke": dict(full=False, widths=(8, 16, 32, 64, 128), local_depth=18, local_width=16,
                  crop=(64, 64), batch=16, steps=(120, 60, 60), lr=(1e-3, 1e-3, 3e-4),
                  eval_batch=48, pictures=4, eval_every=(60, 30, 30), bootstrap=200),
    # The seeds protocol (README, GLAM results): the smoke networks trained 5x longer, so
    # that one seed's three stages fit 15 minutes on 2 CPU cores (13.3 CPU-minutes measured).
    "cpu": dict(full=False, widths=(8, 16, 32, 64, 128), local_depth=18, local_width=16,
                crop=(64, 64), batch=16, steps=(600, 300, 300), lr=(1e-3, 1e-3, 3e-4),
                eval_batch=48, pictures=4, eval_every=(150, 100, 100), bootstrap=200),
    # The reference's global widths and a wider local module: about 45 minutes on 2 cores.
    "cpu_long": dict(full=False, widths=(16, 32, 64, 128, 256), local_depth=18, local_width=32,
                     crop=(64, 64), batch=16, steps=(1200, 600, 600), lr=(1e-3, 1e-3, 3e-4),
                     eval_batch=48, pictures=16, eval_every=(-1, -1, -1), bootstrap=1000),
    # GMIC's released learning rates lie in [3.5e-6, 3.2e-5] (nyukat/GMIC#4).
    "full": dict(full=True, widths=(16, 32, 64, 128, 256), local_depth=34, local_width=64,
                 crop=(512, 512), batch=8, steps=(20000, 10000, 10000), lr=(3e-5, 3e-5, 1e-5),
                 eval_batch=8, pictures=16, eval_every=(-1, -1, -1), bootstrap=1000),
}


def _stages(sz: dict, arg) -> ml_collections.ConfigDict:
  (g_steps, l_steps, j_steps), (g_lr, l_lr, j_lr) = sz["steps"], sz["lr"]
  g_every, l_every, j_every = sz["eval_every"]
  adam = lambda lr: common.optimizer("adam", lr=lr, schedule="cosine", warmup_steps=-1,
                                     accumulate_steps=arg.accumulate)
  # Smoke runs evaluate twice per stage (the 200 validation images cost more than 30 steps).
  # The test split's predictions.csv (the reference's columns) and pictures of its first
  # images (input with mask outlines, patch, benign and malignant maps); hard Dice at the
  # threshold of the grid 0.01 .. 0.99 chosen on validation, per map and class
  # (evaluation/segmentation.py: dice_<map>_at_val_threshold/<class> and the threshold).
  evals = {"predictions": {"type": "predictions_csv", "splits": "test"},
           "pictures": {"count": sz["pictures"], "splits": "test"},
           "dice_val_threshold": {"steps": 100}}
  def stage(task, steps, lr, eval_every, select="max:val/auc/mean", **kw):
    return common.stage(
        task, num_steps=steps, batch_size=sz["batch"], eval_batch_size=sz["eval_batch"],
        eval_every=eval_every, select=select, bootstrap=sz["bootstrap"], opt=adam(lr),
        evals=evals, **kw)
  if arg.pretrained or arg.weights:  # evaluation only
    return ml_collections.ConfigDict({"inference": common.stage(
        "inference", num_steps=0, batch_size=sz["batch"], eval_batch_size=sz["eval_batch"],
        opt=common.optimizer("adam", lr=0.0), init_from=arg.pretrained, bootstrap=200,
        evals=evals)})
  # Stage names are not 'global' / 'local': `global` is a Python keyword, so an override
  # --config.stages.global.num_steps=... could not be parsed.
  return ml_collections.ConfigDict({
      "global_net": stage("global", g_steps, g_lr, g_every),
      # model_sep: the local module learns on the frozen global module's patches. Its best
      # step is chosen by the local prediction's AUC (the global one cannot change).
      "local_net": stage("local", l_steps, l_lr, l_every, init_from="global_net",
                         freeze="global_net/.*",
                         select="max:val/auc_local/mean"),
      "joint": stage("joint", j_steps, j_lr, j_every, init_from="local_net"),
  })


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, dataset="synthetic", smoke=False, size="cpu", stages="",
                         pretrained="", weights="", bf16=False, remat=False, accumulate=1)
  size = "smoke" if arg.smoke else arg.size
  arg.smoke = size == "smoke"
  if size not in SIZES:
    raise ValueError(f"size={size!r}; valid: {sorted(SIZES)}")
  if arg.dataset not in DATASETS:
    raise ValueError(f"dataset={arg.dataset!r}; valid: {sorted(DATASETS)}")
  if arg.pretrained and arg.weights:
    raise ValueError("give pretrained=<stage dir> or weights=<file>, not both")
  sz = SIZES[size]

  c = common.base_config()
  c.method = "glam"
  c.data.name = DATASETS[arg.dataset][1 if sz["full"] else 0]
  c.compute_dtype = "bfloat16" if arg.bf16 else "float32"
  c.model = ml_collections.ConfigDict(dict(
      global_widths=sz["widths"], local_depth=sz["local_depth"], local_width=sz["local_width"],
      crop_shape=sz["crop"], num_patches=1,
      percent_t_global=0.03, percent_t_local=0.3,  # the released inference values
      sparsity=1.0,            # lambda on the mean |saliency| (tasks/glam.py docstring)
      dice_threshold=0.5, remat=arg.remat, weights=arg.weights))
  c.stages = _stages(sz, arg)
  c.default_stage = "inference" if "inference" in c.stages else "joint"
  common.keep_stages(c, arg.stages)
  return c
