r"""Deep Multimodal Guidance (Mallya & Hamarneh, MICCAI 2022): C_I, C_S, G, G(I), G(I)+I.

Every size runs the six stages inferior (C_I), superior (C_S), multimodal, guidance (G),
guided (G(I)) and guided_plus (G(I)+I, the proposed model) on synthetic_paired or Derm7pt.

Smoke run on the embedded synthetic data (TinyCNN, 64 px; 2-4.5 minutes on 2 CPU cores, 1m47s
measured idle with data generation):

  python -m medguide_jax.main --config=configs/guidance.py:dataset=synthetic,smoke \
      --workdir=/tmp/guidance_smoke

  Expected (seed 0), test mean balanced accuracy [95% CI]: inferior 0.503 [0.480, 0.520],
  superior 0.666, guided 0.511, guided_plus 0.522 [0.500, 0.542], multimodal 0.679. The order
  C_I < G(I)+I < C_S <= multimodal held on seeds 0-3 (README, Results).

CPU size (ResNet-18, 64 px, batch 32; 150 steps for each encoder stage and G, 300 for each
head on frozen features): built to fit the 15-minute budget of a 2-core CPU for all six
stages, so that seeds are affordable:

  python -m medguide_jax.main --config=configs/guidance.py:dataset=synthetic,size=cpu \
      --workdir=/tmp/guidance_cpu
  python -m medguide_jax.main --config=configs/guidance.py:dataset=derm7pt,size=cpu \
      --workdir=/tmp/guidance_derm7pt_cpu

  Budget: measured once (synthetic, seed 0) at 947 CPU-seconds (783 user + 164 system) for
  the six stages; 25 minutes of wall time on a 2-core machine shared with ~12 other jobs (the
  run got 0.62 cores on average). On an idle 2-core machine that is under 15 minutes if the
  run uses more than 1.05 cores on average (XLA's CPU convolutions use both): about 10
  minutes at 1.6 cores. Sized from a timed run of the inferior stage alone (30 and 90 steps:
  0.77 CPU-seconds per ResNet-18 step, 46 per stage besides), counting a step of multimodal
  as 2 inferior steps, of G as 1.33 (frozen encoders, one of them back-propagated through)
  and of a head as 0.33 (frozen encoder forward). The previous CPU size (800 steps per
  stage) took 41m38s, and ResNet-18 at 64 px with 400 steps took more than 15 minutes on
  Derm7pt.
  Expected (synthetic, seed 0, measured), test mean balanced accuracy [95% CI]: inferior
  0.521 [0.500, 0.540], superior 0.756 [0.739, 0.773], guided 0.465 [0.447, 0.482],
  guided_plus 0.522 [0.503, 0.542], multimodal 0.800 [0.785, 0.815]: C_S and multimodal far
  above C_I, G(I)+I equal to C_I (+0.001) and G(I) below it. On Derm7pt (not run at this
  size: the release is not on the machine where this was written) the earlier 400-step run
  (413 training cases, before the drop below, one seed) had C_S 0.565 [0.539, 0.590] above
  C_I 0.472 [0.449, 0.497] and G(I)+I 0.466 not above C_I: expect C_S > C_I and no reliable
  gain of G(I)+I over C_I at this size.

Paper size (`size=paper`, the default): the reference's protocol on Derm7pt, for
accelerators (far beyond 15 minutes on a CPU: ResNet-50 at 512 px):

  python -m data_prep.build derm7pt --manual_dir=/path/to/release_v0 --data_dir=$MEDGUIDE_DATA_DIR
  python -m medguide_jax.main --config=configs/guidance.py:dataset=derm7pt,size=paper \
      --workdir=gs://bucket/guidance_derm7pt

  The build leaves out the 9 cases whose clinical image is the dermoscopic one
  (data_prep/derm7pt.py; `--option keep_replaced_clinic=true` keeps them). What follows the
  reference (../shared/reference/METHODS.md section 1) and what cannot:
  * Image size 512x512, pixels scaled to [-1, 1] (inception_v3.preprocess_input).
  * Encoder: ResNet-50, the encoder here closest to the reference's InceptionV3 (no
    InceptionV3 in models/), with the same 2048-d pooled latent. The reference took C_I and
    C_S from Kawahara et al.'s trained multi-task model; here they are trained (3000 steps,
    batch 32, Adam).
  * G: 1024-512-512-1024 hidden, 2048-d output, ReLU on the output, dropout 0.25; MSE; SGD
    lr 0.5, Nesterov momentum 0.9, Keras decay 1e-6; batch 100, 500 epochs, no early
    stopping.
  * Heads of G(I) and G(I)+I: dropout 0.25 then one linear softmax layer per task (the
    reference's Dense(100) branch is unconnected); class_weight 'balanced'; SGD Nesterov
    momentum 0.9, Keras decay 1e-6; batch 100, 500 epochs; early stopping on validation loss
    with patience 200 epochs (4 evaluations of one every 50 epochs), best weights kept.
  * Per-task learning rates: the reference trains one model per task at 1e-4 (1e-3 for VS,
    5e-4 for STR; STR for 1000 epochs with patience 300). Here one head trains the 8 tasks'
    layers at once on the mean of their losses, so each task's layer gets lr / 8 of its own
    loss's gradient (SGD is linear in it): lr 8e-4 gives every task the reference's 1e-4.
    VS and STR cannot get their own rate or epochs (optim.py has no per-parameter learning
    rate), and the stopping is one for all tasks, on their mean validation loss.
  * batch 100 needs a device count that divides it (1, 2, 4, 5...); on 8 devices pass
    --config.stages.S.batch_size=96 (or 104) for S in guidance, guided, guided_plus.
  Runtime and result: not measured (neither an accelerator nor the release was available
  where this was written). The work is 3 x 3000 ResNet-50 steps at 512 px, batch 32 (C_I,
  C_S, multimodal with two encoders), plus 2500 steps of batch 100 through both frozen
  encoders (G) and 2 x up to 2500 through one (the heads). The paper reports that G(I)+I
  improves on C_I on Derm7pt (its Table 1 values are not in METHODS.md); what this protocol
  gives is to be measured, over seeds, with the paired difference G(I)+I - C_I.

Selection warm-up (`select_after`) in the three classifier stages that train encoders
(inferior, superior, multimodal), at the cpu and paper sizes: they keep the parameters with
the lowest validation loss, and that loss (unweighted, as Keras reports it) can be lowest at
once and then rise while the class-balanced training loss falls: on real Derm7pt the
multimodal stage, which starts from the trained C_I and C_S encoders, kept its first
evaluation (step 40 of 400) for that reason. Its evaluations before a quarter of the steps
are logged but are no candidates. The heads keep the reference's early stopping, which has
no warm-up. If you lower a stage's num_steps below its select_after, lower select_after too
(the config error names it).

Arguments after ':' (comma-separated): dataset=synthetic|derm7pt, smoke (= size=smoke),
size=smoke|cpu|paper, encoder=<override the size's encoder>, stages=<names joined by '+'>
to run only some stages (e.g. stages=inferior+superior).
"""
from __future__ import annotations

import ml_collections

from configs import common

DATASETS = {"synthetic": "synthetic_paired", "synthetic_paired": "synthetic_paired",
            "derm7pt": "derm7pt"}

# size -> encoder, its kwargs, image px; the encoder stages' (inferior, superior, multimodal)
# batch and steps, and the share of their steps before selection starts (select_after); for
# G and for the heads on frozen features (guided, guided_plus): batch, steps or epochs (> 0
# sets the steps from the training split's size), learning rate; G's hidden widths; the
# heads' patience in evaluations. See the module docstring for the paper size's sources.
SIZES = {
    "smoke": dict(encoder="tiny_cnn", kw={"width": 16}, px=64, batch=32, enc_steps=300,
                  warmup_share=0.0, g_batch=32, g_steps=300, g_epochs=0, head_batch=32,
                  head_steps=300, head_epochs=0, g_hidden=(128, 64, 64, 128), head_lr=0.01,
                  g_lr=0.05, patience=0),
    "cpu": dict(encoder="resnet18", kw={}, px=64, batch=32, enc_steps=150, warmup_share=0.25,
                g_batch=32, g_steps=150, g_epochs=0, head_batch=32, head_steps=300,
                head_epochs=0, g_hidden=(512, 256, 256, 512), head_lr=8e-3, g_lr=0.05,
                patience=4),
    "paper": dict(encoder="resnet50", kw={}, px=512, batch=32, enc_steps=3000,
                  warmup_share=0.25, g_batch=100, g_steps=0, g_epochs=500, head_batch=100,
                  head_steps=0, head_epochs=500, g_hidden=(1024, 512, 512, 1024),
                  head_lr=8 * 1e-4, g_lr=0.5, patience=4),
}


def _stages(size: dict, smoke: bool) -> ml_collections.ConfigDict:
  bootstrap = 200 if smoke else 1000
  enc = size["enc_steps"]
  # Each classifier keeps its test outputs; the models that see the inferior image at test
  # time (and multimodal) are also compared with C_I case by case: paired/inferior/<metric>,
  # the paired difference over the same test cases with its bootstrap interval
  # (evaluation/paired.py).
  paired = lambda against="": {"paired": {"against": against, "splits": "test"}}
  clf = lambda task, against="", **kw: common.stage(
      task, num_steps=enc, batch_size=size["batch"], select="min:val/loss",
      select_after=int(size["warmup_share"] * enc), bootstrap=bootstrap,
      evals=paired(against),
      opt=common.optimizer("adam", lr=1e-3, schedule="cosine", warmup_steps=-1), **kw)
  # G(I) and G(I)+I heads on frozen features: SGD-Nesterov with Keras' decay=1e-6, early
  # stopping on validation loss (the reference's patience 200 of 500 epochs = 4 evals).
  heads = lambda task: common.stage(
      task, num_steps=size["head_steps"], num_epochs=size["head_epochs"],
      batch_size=size["head_batch"], select="min:val/loss", patience=size["patience"],
      opt=common.optimizer("sgd", lr=size["head_lr"], schedule="keras_decay", decay=1e-6),
      init_from="inferior,guidance", init_params="(enc_inferior|guidance)/.*",
      freeze="(enc_inferior|guidance)/.*", bootstrap=bootstrap, evals=paired("inferior"))
  return ml_collections.ConfigDict({
      "inferior": clf("inferior"),
      "superior": clf("superior"),
      # G: MSE onto the frozen superior latents, SGD Nesterov, no early stopping.
      "guidance": common.stage(
          "guidance", num_steps=size["g_steps"], num_epochs=size["g_epochs"],
          batch_size=size["g_batch"], eval_every=0, bootstrap=0,
          opt=common.optimizer("sgd", lr=size["g_lr"], schedule="keras_decay", decay=1e-6),
          init_from="inferior,superior", init_params="enc_(inferior|superior)/.*",
          freeze="enc_(inferior|superior)/.*"),
      "guided": heads("guided"),
      "guided_plus": heads("guided_plus"),
      "multimodal": clf("multimodal", against="inferior", init_from="inferior,superior",
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
