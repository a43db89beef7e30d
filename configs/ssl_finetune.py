r"""What SSL pretraining buys downstream: probe, kNN, fine-tuning, hybrid, vs random init.

Stages (all on the labelled dataset; `train_examples` labelled training images):
  pretrain      SwAV on the dataset's training images, labels unused (skipped when
                `pretrained=<dir>` names a finished pretraining stage of another run)
  probe         linear classifier on the frozen SSL encoder      | probe_random: same, random
  knn           weighted 20-NN over the SSL features             | knn_random:   random
  finetune      whole network from the SSL encoder               | scratch:      from random
  hybrid        L_sup + lambda * L_SwAV on the labelled images, from the SSL encoder

Every classifier is evaluated on the clean test set and under test-time intensity, gamma,
contrast, rotation, scaling and noise changes (robust/<kind>/... in results.json). The
convergence report (steps to reach a target validation metric, SSL init vs scratch) and
the multi-seed summary come from

  python -m medguide_jax.ssl_report --workdirs=/tmp/ssl_ft_s0,/tmp/ssl_ft_s1,...

Smoke run on the embedded synthetic data (every stage; 79 s on 2 idle CPU cores once the data
exists, 3m02s measured earlier on a busier machine):

  python -m medguide_jax.main --config=configs/ssl_finetune.py:smoke --workdir=/tmp/ssl_ft_smoke

  Expected (seed 0): every stage at chance, test balanced accuracy 0.24-0.27 (finetune
  0.249 [0.227, 0.270], knn 0.238, scratch 0.268; measured 2026-12-01): a check that all
  stages run, not a result.

CPU size on synthetic_multimodality (ResNet-18 width 16, 64 px, 400 labelled images):

  python -m medguide_jax.main --config=configs/ssl_finetune.py:size=cpu --workdir=/tmp/ssl_ft

  Expected over seeds 0-2 (README, SSL results): every stage at chance (test balanced
  accuracy 0.24-0.25; 64 px lesions are too small for 400 labels and 300 steps). On
  brain_tumor_mri: finetune 0.689 ± 0.079 vs scratch 0.656 ± 0.092, probe 0.494 vs
  probe_random 0.472; on breastmnist (synthetic pretraining): finetune 0.675 vs scratch 0.702.
  No SSL benefit at this scale.

Real labelled sets (build once from ../shared/data, then pretrain on them or pass a
pretraining run with pretrained=):

  python -m data_prep.build brain_tumor_mri --manual_dir=../shared/data/brain_tumor_mri_small
  python -m medguide_jax.main --config=configs/ssl_finetune.py:dataset=brain_tumor_mri,size=cpu \
      --workdir=/tmp/ssl_brain

Arguments after ':': dataset=synthetic|<labelled dataset>, size=smoke|cpu|paper, smoke,
model=<encoder>, pretrained=<path to a finished pretraining stage dir>, train_examples=N
(0 = all), stages=<names joined by '+'>.
"""
from __future__ import annotations

import ml_collections

from configs import common
from configs import ssl_pretrain

# size -> downstream steps, batch, lr (Adam), labelled examples, eval points.
DOWNSTREAM = {
    "smoke": dict(steps=120, batch=32, lr=1e-3, probe_lr=1e-2, examples=200),
    "cpu": dict(steps=300, batch=32, lr=1e-3, probe_lr=1e-2, examples=400),
    "paper": dict(steps=20000, batch=256, lr=1e-4, probe_lr=0.1, examples=0),
}


# Every classifier is also evaluated under test-time perturbations (the paper's robustness
# claims); the knn stages' metrics are the k-NN vote's (DINO's k=20, T=0.07).
ROBUST = {"robust": {"type": "robustness"}}
KNN = {"knn": {"k": 20, "temperature": 0.07, "prefix": ""}}


def _downstream(ds: dict, task: str, *, init: str, freeze: str = "",
                lr: float | None = None, bootstrap: int = 1000, steps: int | None = None,
                examples: int = 0, **kw) -> ml_collections.ConfigDict:
  steps = ds["steps"] if steps is None else steps
  kw.setdefault("evals", KNN if task == "knn" else ROBUST)
  return common.stage(
      task, num_steps=steps, batch_size=ds["batch"], eval_batch_size=256,
      eval_every=max(steps // 20, 1) if steps else 0, select="max:val/balanced_accuracy" if steps
      else "", bootstrap=bootstrap, init_from=init, init_params="enc/.*" if init else "",
      freeze=freeze, train_examples=examples,
      opt=common.optimizer("adam", lr=lr or ds["lr"], schedule="cosine" if steps else "constant",
                           warmup_steps=-1), **kw)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, dataset="synthetic", model="", size="cpu", smoke=False,
                         pretrained="", train_examples=-1, stages="")
  size = "smoke" if arg.smoke else arg.size
  if size not in ssl_pretrain.SIZES:
    raise ValueError(f"size={size!r}; valid: {sorted(ssl_pretrain.SIZES)}")
  sz, ds = ssl_pretrain.SIZES[size], DOWNSTREAM[size]
  examples = ds["examples"] if arg.train_examples < 0 else arg.train_examples
  bootstrap = 200 if size == "smoke" else 1000

  c = common.base_config()
  c.method = "ssl"
  c.default_stage = "finetune"
  ssl_pretrain.data_block(c, arg.dataset, sz["crops"][1])
  c.model = ssl_pretrain.model_block(sz, arg.model)
  c.ssl = ssl_pretrain.ssl_block(sz, "swav")
  src = arg.pretrained or "pretrain"
  stages = {
      "probe": _downstream(ds, "probe", init=src, freeze="enc/.*", lr=ds["probe_lr"],
                           bootstrap=bootstrap, examples=examples),
      "probe_random": _downstream(ds, "probe", init="", freeze="enc/.*", lr=ds["probe_lr"],
                                  bootstrap=bootstrap, examples=examples),
      "knn": _downstream(ds, "knn", init=src, steps=0, bootstrap=bootstrap, examples=examples),
      "knn_random": _downstream(ds, "knn", init="", steps=0, bootstrap=bootstrap,
                                examples=examples),
      "finetune": _downstream(ds, "finetune", init=src, bootstrap=bootstrap, examples=examples),
      "scratch": _downstream(ds, "finetune", init="", bootstrap=bootstrap, examples=examples),
      "hybrid": _downstream(ds, "hybrid", init=src, bootstrap=bootstrap, examples=examples),
  }
  if not arg.pretrained:
    stages["pretrain"] = ssl_pretrain.pretrain_stage(sz)
  c.stages = ml_collections.ConfigDict(stages)
  common.keep_stages(c, arg.stages)
  return c
