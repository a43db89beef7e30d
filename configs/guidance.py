r"""Deep Multimodal Guidance (Mallya & Hamarneh, MICCAI 2022): C_I, C_S, G, G(I), G(I)+I.

Smoke run on the embedded synthetic data (CPU, about 3 minutes on 2 cores):

  python -m medguide_jax.main --config=configs/guidance.py:dataset=synthetic,smoke \
      --workdir=/tmp/guidance_smoke

  Expected (seed 0): a table whose test mean balanced accuracy is highest for multimodal and
  superior, lowest for inferior, with guided_plus between inferior and superior
  (see README "Results" for the measured numbers).

CPU size (ResNet-18 at 96 px; about 45 minutes on 2 cores):

  python -m medguide_jax.main --config=configs/guidance.py:dataset=synthetic,size=cpu \
      --workdir=/tmp/guidance_cpu

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

# size -> (encoder, encoder kwargs, image px, batch, steps of a classifier stage, of G,
#          guidance MLP hidden widths)
SIZES = {
    "smoke": ("tiny_cnn", {"width": 16}, 64, 32, 300, 300, (128, 64, 64, 128)),
    "cpu": ("resnet18", {}, 96, 32, 1500, 1500, (512, 256, 256, 512)),
    "paper": ("resnet50", {}, 512, 32, 20000, 5000, (1024, 512, 512, 1024)),
}


def _stages(batch: int, steps: int, g_steps: int, smoke: bool) -> ml_collections.ConfigDict:
  every = max(steps // 10, 1)
  clf = lambda task, lr, **kw: common.stage(
      task, num_steps=steps, batch_size=batch, eval_every=every, checkpoint_every=every,
      log_every=max(every // 2, 1), select="min:val/loss",
      opt=common.optimizer("adam", lr=lr, schedule="cosine", warmup_steps=min(100, steps // 10)),
      bootstrap=200 if smoke else 1000, **kw)
  # G(I) and G(I)+I heads on frozen features: SGD-Nesterov with Keras' decay=1e-6, early
  # stopping on validation loss (the reference's patience 200 of 500 epochs, here in evals).
  head = lambda task: common.stage(
      task, num_steps=steps, batch_size=batch, eval_every=every, checkpoint_every=every,
      log_every=max(every // 2, 1), select="min:val/loss", patience=0 if smoke else 4,
      opt=common.optimizer("sgd", lr=0.01 if smoke else 1e-3, schedule="keras_decay", decay=1e-6),
      init_from="inferior,guidance", init_params="(enc_inferior|guidance)/.*",
      freeze="(enc_inferior|guidance)/.*", bootstrap=200 if smoke else 1000)
  return ml_collections.ConfigDict({
      "inferior": clf("inferior", 1e-3),
      "superior": clf("superior", 1e-3),
      # G: MSE onto the frozen superior latents; the reference's SGD lr 0.5, Nesterov.
      "guidance": common.stage(
          "guidance", num_steps=g_steps, batch_size=batch, log_every=max(g_steps // 20, 1),
          eval_every=0, checkpoint_every=max(g_steps // 5, 1), bootstrap=0,
          opt=common.optimizer("sgd", lr=0.05 if smoke else 0.5, schedule="keras_decay",
                               decay=1e-6),
          init_from="inferior,superior", init_params="enc_(inferior|superior)/.*",
          freeze="enc_(inferior|superior)/.*"),
      "guided": head("guided"),
      "guided_plus": head("guided_plus"),
      "multimodal": clf("multimodal", 1e-3, init_from="inferior,superior",
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
  encoder, enc_kw, px, batch, steps, g_steps, g_hidden = SIZES[size]

  c = common.base_config()
  c.method = "guidance"
  c.default_stage = "guided_plus"
  c.data.name = DATASETS[arg.dataset]
  c.data.image_size = px
  c.model = ml_collections.ConfigDict(dict(
      encoder=arg.encoder or encoder, encoder_kwargs=enc_kw, head_hidden=0, head_dropout=0.25,
      guidance_hidden=g_hidden, guidance_dropout=0.25, class_balanced=True))
  c.stages = _stages(batch, steps, g_steps, smoke=size == "smoke")
  if arg.stages:
    keep = arg.stages.split("+")
    unknown = [s for s in keep if s not in c.stages]
    if unknown:
      raise ValueError(f"stages={arg.stages!r}: unknown {unknown}; valid: {list(c.stages)}")
    for name in list(c.stages):
      if name not in keep:
        del c.stages[name]
  return c
