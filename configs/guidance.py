r"""Deep Multimodal Guidance (Mallya & Hamarneh, MICCAI 2022): C_I, C_S, G, G(I), G(I)+I.

Smoke run on the embedded synthetic data (TinyCNN, 64 px; 2-4.5 minutes on 2 CPU cores, 1m47s
measured idle with data generation):

  python -m medguide_jax.main --config=configs/guidance.py:dataset=synthetic,smoke \
      --workdir=/tmp/guidance_smoke

  Expected (seed 0), test mean balanced accuracy [95% CI]: inferior 0.503 [0.480, 0.520],
  superior 0.666, guided 0.511, guided_plus 0.522 [0.500, 0.542], multimodal 0.679. The order
  C_I < G(I)+I < C_S <= multimodal held on seeds 0-3 (README, Results).

CPU size (ResNet-18, 64 px; about 40 minutes on 2 CPU cores):

  python -m medguide_jax.main --config=configs/guidance.py:dataset=synthetic,size=cpu \
      --workdir=/tmp/guidance_cpu

  Expected (seed 0), test mean balanced accuracy: inferior 0.590 [0.569, 0.611], superior
  0.868, guided 0.608, guided_plus 0.607 [0.584, 0.627], multimodal 0.884.

Paper size on Derm7pt (ResNet-50 at 512 px, SGD as the reference; for accelerators):

  python -m data_prep.build derm7pt --manual_dir=/path/to/release_v0 --data_dir=$MEDGUIDE_DATA_DIR
  python -m medguide_jax.main --config=configs/guidance.py:dataset=derm7pt \
      --workdir=gs://bucket/guidance_derm7pt

Arguments after ':' (comma-separated): dataset=synthetic|derm7pt, smoke (= size=smoke),
size=smoke|cpu|paper, encoder=<override the size's encoder>, stages=<names joined by '+'>
to run only some stages (e.g. stages=inferior+superior).
"""
from __future__ import annotations

import ml_collections

from configs import common

DATASETS = {"synthetic": "synthetic_paired", "synthetic_paired": "synthetic_paired",
            "derm7pt": "derm7pt"}

# size -> encoder, its kwargs, image px, batch, steps of the encoder stages (inferior,
# superior, multimodal), of the heads on frozen features (guided, guided_plus), of G, and
# G's hidden widths. Paper: 500 epochs of Derm7pt's 413 training cases at batch 32 is about
# 6500 steps, the reference's budget for G and for the G(I)+I heads; its learning rates are
# 0.5 for G and 1e-4 for the heads (1e-3 for VS and 5e-4 for STR: one head trains all
# tasks here, at 1e-4). Smaller sizes train for fewer steps, so they use larger rates.
SIZES = {
    "smoke": dict(encoder="tiny_cnn", kw={"width": 16}, px=64, batch=32, enc_steps=300,
                  head_steps=300, g_steps=300, g_hidden=(128, 64, 64, 128), head_lr=0.01,
                  g_lr=0.05),
    "cpu": dict(encoder="resnet18", kw={}, px=64, batch=32, enc_steps=800, head_steps=800,
                g_steps=800, g_hidden=(512, 256, 256, 512), head_lr=1e-3, g_lr=0.05),
    "paper": dict(encoder="resnet50", kw={}, px=512, batch=32, enc_steps=3000,
                  head_steps=6500, g_steps=6500, g_hidden=(1024, 512, 512, 1024),
                  head_lr=1e-4, g_lr=0.5),
}


def _stages(size: dict, smoke: bool) -> ml_collections.ConfigDict:
  batch, bootstrap = size["batch"], 200 if smoke else 1000
  enc, head, g = size["enc_steps"], size["head_steps"], size["g_steps"]
  clf = lambda task, **kw: common.stage(
      task, num_steps=enc, batch_size=batch, select="min:val/loss", bootstrap=bootstrap,
      opt=common.optimizer("adam", lr=1e-3, schedule="cosine", warmup_steps=-1), **kw)
  # G(I) and G(I)+I heads on frozen features: SGD-Nesterov with Keras' decay=1e-6, early
  # stopping on validation loss (the reference's patience 200 of 500 epochs = 4 evals).
  heads = lambda task: common.stage(
      task, num_steps=head, batch_size=batch, select="min:val/loss", patience=0 if smoke else 4,
      opt=common.optimizer("sgd", lr=size["head_lr"], schedule="keras_decay", decay=1e-6),
      init_from="inferior,guidance", init_params="(enc_inferior|guidance)/.*",
      freeze="(enc_inferior|guidance)/.*", bootstrap=bootstrap)
  return ml_collections.ConfigDict({
      "inferior": clf("inferior"),
      "superior": clf("superior"),
      # G: MSE onto the frozen superior latents; the reference's SGD lr 0.5, Nesterov.
      "guidance": common.stage(
          "guidance", num_steps=g, batch_size=batch, eval_every=0, bootstrap=0,
          opt=common.optimizer("sgd", lr=size["g_lr"], schedule="keras_decay", decay=1e-6),
          init_from="inferior,superior", init_params="enc_(inferior|superior)/.*",
          freeze="enc_(inferior|superior)/.*"),
      "guided": heads("guided"),
      "guided_plus": heads("guided_plus"),
      "multimodal": clf("multimodal", init_from="inferior,superior",
                        init_params="enc_(inferior|superior)/.*"),
  })


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, dataset="synthetic", smoke=False, size="paper", encoder="",
                         stages="")
  size = "smoke" if arg.smoke else arg.size
  if size not in SIZES:
    raise ValueError(f"size={size!r}; valid: {sorted(SIZES)}")
  if arg.dataset not in DATASETS:
    raise ValueError(f"dataset={arg.dataset!r}; valid: {sorted(DATASETS)}")
  sz = SIZES[size]

  c = common.base_config()
  c.method = "guidance"
  c.default_stage = "guided_plus"
  c.data.name = DATASETS[arg.dataset]
  c.data.image_size = sz["px"]
  c.model = ml_collections.ConfigDict(dict(
      encoder=arg.encoder or sz["encoder"], encoder_kwargs=sz["kw"], head_hidden=0,
      head_dropout=0.25, guidance_hidden=sz["g_hidden"], guidance_dropout=0.25,
      class_balanced=True))
  c.stages = _stages(sz, smoke=size == "smoke")
  common.keep_stages(c, arg.stages)
  return c
