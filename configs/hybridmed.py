r"""hybridmed (Jiang et al., arXiv 2410.00448): chest X-ray pretraining from reports, FINDINGS and
IMPRESSION treated differently. Stages of one experiment (tasks/hybridmed.py):

  summariser         text only: findings -> impression (L_Sum)
  joint              l_cg L_CG (image <-> impression) + l_cl L_CL (image tokens <-> findings
                     words) + l_sum L_Sum + l_cap L_Cap (image -> impression) + l_dis L_Dis
                     (frozen summariser -> captioner, per-token T^2 KL); initialised from the
                     summariser (txt/, dec/), which is also its frozen teacher (teacher_from)
  joint_no_dis, joint_global_only, joint_concat   the ablations, initialised as joint is:
                     l_dis = 0; l_cl = 0; findings + impression as one text for both
                     alignments (MGCA's data treatment)
  probe              a linear probe of the frozen joint image tower on the label groups
                     (the shared supervised task; train_examples= for label fractions)

Each joint stage is evaluated on validation and test by the evaluators zero_shot (GLoRIA's
prompt-ensemble protocol on the global embeddings; AUC per label group), retrieval (image <->
impression Recall@1/5/10, identical impressions one group) and generation (greedy
impressions from the image: BLEU-1..4, ROUGE-L, CIDEr-D; on synthetic_cxr the clinical macro
F1 of the labels the generator's grammar reads back out of them). The summariser is scored
on impressions generated from the findings, with two baselines (the most frequent training
impression; the last findings sentence).

  python -m medguide_jax.main --config=configs/hybridmed.py:smoke --workdir=/tmp/hm_smoke
  python -m medguide_jax.main --config=configs/hybridmed.py --workdir=/tmp/hm     # CPU size

  Smoke (2 epochs a stage, about 9 minutes on 2 cores, seed 0; a run check): summariser
  ROUGE-L 0.424, BLEU-4 0.132; zero-shot mean AUC joint 0.559, joint_no_dis 0.562,
  joint_global_only 0.591, joint_concat 0.497; captioner ROUGE-L 0.220-0.225; probe 0.539.

  CPU size, about 20 minutes on an idle 2-core machine. Expected, test, mean over seeds 0-2
  (README: intervals and paired differences): zero-shot mean AUC joint 0.658, joint_no_dis
  0.661, joint_global_only 0.652, joint_concat 0.627; image -> impression R@5 0.077 / 0.066 /
  0.057 / 0.051; captioner ROUGE-L 0.231 / 0.226 / 0.248 / 0.239; summariser (findings ->
  impression) ROUGE-L 0.549, clinical F1 0.887 (baselines: most frequent impression 0.121,
  last findings sentence 0.091); probe mean AUC about 0.72.
  python -m medguide_jax.main --config=configs/hybridmed.py:dataset=synthetic_cxr:iu_text --workdir=W
  python -m medguide_jax.main --config=configs/hybridmed.py:dataset=iu_xray_text,stages=summariser --workdir=W
  python -m medguide_jax.main --config=configs/hybridmed.py:dataset=mimic_cxr,size=paper --workdir=W

Datasets (`dataset=`): synthetic_cxr (the embedded default, generated on first use; also
synthetic_cxr:iu_text, synthetic_cxr:tiny), iu_xray, mimic_cxr (build them first:
python -m data_prep.build NAME --manual_dir=...), iu_xray_text / mimic_cxr_text (text only:
stages=summariser).

What the paper leaves open (no code is public; METHODS.md 3(a), 7.3) and the defaults here:
  * L_CG: CLIP's symmetric InfoNCE on the [CLS] (text) and pooled (image) projections,
    learnable temperature from 0.07, logit scale capped at 100 (losses/alignment.py);
  * L_CL: MGCA's token-level loss (tau 0.1, words weighted by the text encoder's last-layer
    [CLS] attention, clipped to its 10th-90th percentile; [CLS]/[SEP] not words); hm.local=
    'gloria' for GLoRIA's (tau 4, 5, 10);
  * L_Sum, L_Cap: teacher-forced token cross-entropy, mean over the batch's real tokens;
    L_Dis: T^2 KL per token, T = hm.temperature (1);
  * all lambdas 1 (hm.lambda_*); the cross-attentions per branch (model.
    share_cross_attention=False); zero-shot on the global similarity only.
"""
from __future__ import annotations

import ml_collections

from configs import common

# dataset arg -> (data.name, image side fed to the network at the CPU sizes)
DATASETS = {
    "synthetic_cxr": "synthetic_cxr",
    "synthetic_cxr:tiny": "synthetic_cxr:tiny",
    "synthetic_cxr:iu_text": "synthetic_cxr:iu_text",
    "iu_xray": "iu_xray",
    "mimic_cxr": "mimic_cxr",
    "iu_xray_text": "iu_xray_text",
    "mimic_cxr_text": "mimic_cxr_text",
}
JOINT = ("joint", "joint_no_dis", "joint_global_only", "joint_concat")
STAGES = ("summariser",) + JOINT + ("probe",)

_CPU_TEXT = {"hidden": 128, "layers": 2, "heads": 4, "mlp": 256}
SIZES = {
    # A run check: a few hundred steps of every stage.
    "smoke": dict(image=64, encoder="tiny_cnn", width=16, text=_CPU_TEXT, dec_layers=2,
                  embed=64, max_len=80, impression_len=32, batch=32, sum_epochs=2,
                  joint_epochs=2, lr=1e-3, probe_epochs=2, bootstrap=100),
    # The embedded default's results (README).
    "cpu": dict(image=64, encoder="tiny_cnn", width=32, text=_CPU_TEXT, dec_layers=2,
                embed=64, max_len=80, impression_len=32, batch=32, sum_epochs=8,
                joint_epochs=8, lr=1e-3, probe_epochs=10, bootstrap=1000),
    # MGCA's settings where HybridMED's are unknown: ResNet-50 at 224 px, BERT-base,
    # a 6-layer decoder, batch 144, AdamW lr 2e-5 (wd 0.05), 50 epochs.
    "paper": dict(image=224, encoder="resnet50", width=64,
                  text={"hidden": 768, "layers": 12, "heads": 12, "mlp": 3072}, dec_layers=6,
                  embed=128, max_len=112, impression_len=112, batch=144, sum_epochs=10,
                  joint_epochs=50, lr=2e-5, probe_epochs=50, bootstrap=1000),
}


def _stage(task: str, sz: dict, **kw) -> ml_collections.ConfigDict:
  epochs = sz["sum_epochs"] if task == "summariser" else (
      sz["probe_epochs"] if task == "probe" else sz["joint_epochs"])
  opt = common.optimizer("adamw", lr=sz["lr"] * (10 if task == "probe" else 1),
                         weight_decay=0.05 if task != "probe" else 0.0,
                         weight_decay_mask=r"(?!.*(norm|bias|logit_scale)).*",
                         schedule="cosine", warmup_steps=-1, grad_clip_norm=1.0)
  kw.setdefault("eval_every", 0)   # 0: one evaluation, of the last parameters
  return common.stage(task, num_steps=0, num_epochs=epochs, batch_size=sz["batch"],
                      eval_batch_size=128, opt=opt, bootstrap=sz["bootstrap"], **kw)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, dataset="synthetic_cxr", smoke=False, size="cpu", stages="",
                         train_examples=0)
  size = "smoke" if arg.smoke else arg.size
  if size not in SIZES:
    raise ValueError(f"size={size!r}; valid: {sorted(SIZES)}")
  if arg.dataset not in DATASETS:
    raise ValueError(f"dataset={arg.dataset!r}; valid: {sorted(DATASETS)}")
  sz = SIZES[size]
  c = common.base_config()
  c.method = "hybridmed"
  c.data.name = DATASETS[arg.dataset]
  c.data.image_size = sz["image"]
  c.data.channels = 1
  c.data.tokenizer = ""          # '' = the dataset's; or a tokenizer.json / vocab.txt
  c.data.max_len = sz["max_len"]        # findings (and the concatenated report)
  c.data.impression_len = sz["impression_len"]
  c.model = ml_collections.ConfigDict(dict(
      encoder=sz["encoder"], encoder_kwargs={"width": sz["width"]}, text=dict(sz["text"]),
      decoder={"hidden": sz["text"]["hidden"], "layers": sz["dec_layers"],
               "heads": sz["text"]["heads"], "mlp": sz["text"]["mlp"]},
      embed_dim=sz["embed"], share_cross_attention=False))
  c.hm = ml_collections.ConfigDict(dict(
      lambda_cg=1.0, lambda_cl=1.0, lambda_sum=1.0, lambda_cap=1.0, lambda_dis=1.0,
      temperature=1.0, local="mgca", local_temperature=0.1, label_smoothing=0.0,
      gen_len=0))   # 0: up to data.impression_len - 1 generated tokens
  # The probe is downstream's linear evaluation (tasks/downstream.py): its label policy.
  c.downstream = ml_collections.ConfigDict(dict(uncertain="ones"))   # CheXpert's -1: U-Ones
  gen = {"generation": {"splits": "validation,test"}}
  joint_evals = {"zero_shot": {"classes": ""}, "retrieval": {}, **gen}   # "": the label groups
  stages = {"summariser": _stage("summariser", sz, select="min:val/loss", eval_every=-1,
                                 evals={"generation": {"baselines": True}})}
  for name in JOINT:
    stages[name] = _stage(name, sz, init_from="summariser", init_params="txt/.*;dec/.*",
                          teacher_from="" if name == "joint_no_dis" else "summariser",
                          evals=joint_evals)
  stages["probe"] = _stage("probe", sz, init_from="joint", init_params="img/.*",
                           freeze="img/.*", train_examples=arg.train_examples,
                           select="max:val/mean/auc", eval_every=-1)
  c.stages = ml_collections.ConfigDict(stages)
  c.default_stage = "joint"
  if arg.dataset.endswith("_text") and not arg.stages:
    arg.stages = "summariser"   # text only: the summariser alone
  common.keep_stages(c, arg.stages)
  return c
