r"""What SSL pretraining buys downstream: probe, kNN, fine-tuning, hybrid, vs random init,
at each labelled fraction.

Stages, for every labelled fraction f of `fractions` (percent of the training split, a fixed
nested stratified subset, the same for every seed; stage names end in _<f>):
  pretrain        SwAV on the dataset's training images, labels unused (skipped when
                  `pretrained=<dir>` names a finished pretraining stage of another run)
  probe_f         linear classifier on the frozen SSL encoder | probe_random_f: same, random
  knn_f           weighted 20-NN over the SSL features        | knn_random_f:   random
  finetune_f      whole network from the SSL encoder          | scratch_f:      from random
  hybrid_f        L_sup + lambda * L_SwAV on the labelled images, from the SSL encoder

Every classifier is evaluated on the clean test set and under test-time intensity, gamma,
contrast, rotation, scaling and noise changes (robust/<kind>/... in results.json), and the
SSL-initialised ones against their random-init twin on the same test cases
(paired/<twin>/<metric> with a paired bootstrap interval). Over seeds:

  python -m medguide_jax.report --workdirs=W0,W1,W2,W3,W4 --metrics=balanced_accuracy,auc \
      --pairs=probe_1:probe_random_1,probe_10:probe_random_10,finetune_1:scratch_1,\
finetune_10:scratch_10,hybrid_1:scratch_1,hybrid_10:scratch_10
  python -m medguide_jax.ssl_report --workdirs=W0,W1,W2,W3,W4   # convergence, robustness

Smoke run on the embedded synthetic data (fraction 10% only; a check that every stage runs,
not a result):

  python -m medguide_jax.main --config=configs/ssl_finetune.py:smoke --workdir=/tmp/ssl_ft_smoke

  3m02s on 2 cores with the data built (generating it first adds about 40 s). Expected (seed
  0, measured 2026-12-02), test balanced accuracy: every stage 0.23-0.34 (scratch_10 0.338,
  finetune_10 0.310, probe_10 0.229, knn_10 0.330): a check that all stages run.

CPU size, the seeds protocol of the README's SSL results (synthetic_multimodality:scattered,
TinyCNN width 32 at 64 px; 400 SwAV steps, then 200 steps per downstream stage at 1% and 10%
of the 4000 labels; one seed, pretraining included, within the 15-minute budget of 2 cores:
see the README for the measured CPU time):

  python -m medguide_jax.main --config=configs/ssl_finetune.py:size=cpu --config.seed=S \
      --workdir=/tmp/ssl_ft_S

  Expected over seeds 0-4: the README's SSL results table.

Real labelled sets (build once from ../shared/data, then pretrain on them or pass a
pretraining run with pretrained=):

  python -m data_prep.build brain_tumor_mri --manual_dir=../shared/data/brain_tumor_mri_small
  python -m medguide_jax.main --config=configs/ssl_finetune.py:dataset=brain_tumor_mri,size=cpu,\
fractions=10+100 --workdir=/tmp/ssl_brain

Arguments after ':': dataset=synthetic|<labelled dataset>, size=smoke|cpu|paper, smoke,
model=<encoder>, pretrained=<path to a finished pretraining stage dir>, fractions=<labelled
percentages joined by '+', e.g. 1+10>, stages=<names joined by '+'>.
"""
from __future__ import annotations

import ml_collections

from configs import common
from configs import ssl_pretrain

# size -> downstream steps, batch, lr (Adam), labelled fractions (% of the training split),
# eval points.
DOWNSTREAM = {
    "smoke": dict(steps=120, batch=32, lr=1e-3, probe_lr=1e-2, fractions="10"),
    "cpu": dict(steps=200, batch=32, lr=1e-3, probe_lr=1e-2, fractions="1+10"),
    "paper": dict(steps=20000, batch=256, lr=1e-4, probe_lr=0.1, fractions="1+10+100"),
}


# Every classifier is also evaluated under test-time perturbations (the paper's robustness
# claims); the knn stages' metrics are the k-NN vote's (DINO's k=20, T=0.07).
ROBUST = {"robust": {"type": "robustness"}}
KNN = {"knn": {"k": 20, "temperature": 0.07, "prefix": ""}}


def fractions(text: str) -> list[int]:
  """'1+10' -> [1, 10]: labelled shares of the training split in percent, each in 1..100."""
  try:
    out = [int(f) for f in text.split("+") if f.strip()]
  except ValueError:
    out = []
  if not out or any(not 1 <= f <= 100 for f in out) or len(set(out)) != len(out):
    raise ValueError(f"fractions={text!r}: expected distinct integer percentages in 1..100 "
                     "joined by '+', e.g. fractions=1+10")
  return sorted(out)


def _downstream(ds: dict, task: str, *, init: str, fraction: int, freeze: str = "",
                lr: float | None = None, bootstrap: int = 1000, steps: int | None = None,
                against: str = "", **kw) -> ml_collections.ConfigDict:
  steps = ds["steps"] if steps is None else steps
  evals = dict(KNN if task == "knn" else ROBUST)
  if task != "knn":
    # Every classifier keeps its test outputs; an SSL-initialised one is also compared, case
    # by case, with its random-init twin (paired/<twin>/...: a paired bootstrap).
    evals["paired"] = {"against": against, "splits": "test"}
  return common.stage(
      task, num_steps=steps, batch_size=ds["batch"], eval_batch_size=256,
      eval_every=max(steps // 10, 1) if steps else 0, select="max:val/balanced_accuracy" if steps
      else "", bootstrap=bootstrap, init_from=init, init_params="enc/.*" if init else "",
      freeze=freeze, train_fraction=0.0 if fraction == 100 else fraction / 100.0,
      train_stratify="label" if fraction < 100 else "", evals=evals,
      opt=common.optimizer("adam", lr=lr or ds["lr"], schedule="cosine" if steps else "constant",
                           warmup_steps=-1), **kw)


def downstream_stages(ds: dict, src: str, fraction: int, bootstrap: int) -> dict:
  """The stages at one labelled fraction, named <kind>_<fraction>."""
  f, kw = f"_{fraction}", dict(fraction=fraction, bootstrap=bootstrap)
  return {
      "probe" + f: _downstream(ds, "probe", init=src, freeze="enc/.*", lr=ds["probe_lr"],
                               against="probe_random" + f, **kw),
      "probe_random" + f: _downstream(ds, "probe", init="", freeze="enc/.*", lr=ds["probe_lr"],
                                      **kw),
      "knn" + f: _downstream(ds, "knn", init=src, steps=0, **kw),
      "knn_random" + f: _downstream(ds, "knn", init="", steps=0, **kw),
      "finetune" + f: _downstream(ds, "finetune", init=src, against="scratch" + f, **kw),
      "scratch" + f: _downstream(ds, "finetune", init="", **kw),
      "hybrid" + f: _downstream(ds, "hybrid", init=src, against="scratch" + f, **kw),
  }


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, dataset="synthetic", model="", size="cpu", smoke=False,
                         pretrained="", fractions="", stages="")
  size = "smoke" if arg.smoke else arg.size
  if size not in ssl_pretrain.SIZES:
    raise ValueError(f"size={size!r}; valid: {sorted(ssl_pretrain.SIZES)}")
  sz, ds = ssl_pretrain.SIZES[size], DOWNSTREAM[size]
  bootstrap = 200 if size == "smoke" else 1000

  labelled = fractions(arg.fractions or ds["fractions"])

  c = common.base_config()
  c.method = "ssl"
  c.default_stage = f"finetune_{labelled[-1]}"
  ssl_pretrain.data_block(c, arg.dataset, sz["crops"][1])
  c.model = ssl_pretrain.model_block(sz, arg.model)
  c.ssl = ssl_pretrain.ssl_block(sz, "swav")
  src = arg.pretrained or "pretrain"
  stages = {}
  for fraction in labelled:
    stages.update(downstream_stages(ds, src, fraction, bootstrap))
  if not arg.pretrained:
    stages["pretrain"] = ssl_pretrain.pretrain_stage(sz)
  c.stages = ml_collections.ConfigDict(stages)
  common.keep_stages(c, arg.stages)
  return c
