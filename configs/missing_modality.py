r"""missing_modality (Zhang et al., IEEE BIBM 2023): ALN metastasis from a WSI bag and clinical
data, with bidirectional distillation (BD) so that missing clinical data at test time costs
little. Seven stages of one experiment (tasks/missing_modality.py): the baselines
clinical_only, wsi_only (BALNMP's DL-CNB), multimodal (DL-CNB+C, filled with zeros or the
training mean when clinical data is missing), modality_dropout, and bd with its ablations
bd_m2s_only and bd_s2m_only. Each stage keeps its best step by patient-level validation AUC
with complete data; the test split is then swept over missing rates 0, 0.2, ..., 1.0 (5
seeded masks per rate, the same patients for every stage: evaluation/missing_rate.py).

Smoke run on the embedded synthetic_bags (3 epochs a stage; 2m17s on 2 CPU cores, data
generation included):

  python -m medguide_jax.main --config=configs/missing_modality.py:smoke --workdir=/tmp/mm

  Expected (seed 0), test AUC at missing rate 0 / 0.8: bd 0.680 / 0.676, multimodal/zero_fill
  0.687 / 0.690, wsi_only 0.670 / 0.670, clinical_only 0.590 / 0.529 (a run check).

CPU size, the default (20 epochs a stage, about 12 minutes):

  python -m medguide_jax.main --config=configs/missing_modality.py --workdir=/tmp/mm_cpu

  Expected, test AUC at rate 0 / 0.8 / 1.0, mean over seeds 0-2 (README: intervals, paired
  differences): multimodal/zero_fill 0.816 / 0.785 / 0.773, wsi_only 0.770 (every rate),
  bd 0.782 / 0.773 / 0.770, bd_m2s_only 0.803 / 0.791 / 0.788, bd_s2m_only 0.799 / 0.782 /
  0.777, modality_dropout 0.765 / 0.776 / 0.777, clinical_only 0.599 / 0.527 / 0.500.

Datasets (`dataset=`): synthetic (the embedded synthetic_bags, generated on first use),
bcnb (build it first: python -m data_prep.build bcnb --manual_dir=<BCNB>), ham10000_clinical
(python -m data_prep.build ham10000_clinical --manual_dir=../shared/data/derm_ham10000_small),
tcga (tcga_lung_tiles: 4 slide regions, no clinical data: stages=wsi_only only). `features`
trains on per-slide feature bags instead of tiles (feature mode): make them once with

  python -m data_prep.features --dataset=synthetic_bags --encoder=random:tiny_cnn \
      --tag=synthetic_bags_random_tiny_cnn

and run with `:features` (the tag is data.name's, `--config.data.name=bag_features:<tag>`
for another; `data.encoder` names the encoder the features must come from).

What the paper leaves open (its code is not public; METHODS.md 2(a)) and the defaults here:
  * M->S is logit distillation T^2 KL(softmax(sg z_M / T) || softmax(z_S / T)), T = 2
    (mm.temperature), weight mm.lambda_ms = 1;
  * S->M is feature distillation of the fused hidden layer, MSE (mm.feature_kind='mse' or
    'cosine'), stop-gradient on S's side, weight mm.lambda_sm = 1 (mm.feature_on='wsi'
    distils the bag embeddings instead, with model.shared_aggregator=False);
  * fusion is BALNMP's concatenation (model.fusion='attention' for one self-attention layer);
  * M and S share the tile encoder and the aggregator (model.shared_aggregator);
  * inference routes a patient with clinical data to M and one without to S (mm.inference:
    'route', 's' for S for everyone, 'prompt' for M with the prompt).

Training per BALNMP (size=paper): VGG16-BN tiles at 224 px, its D=1 aggregator, the clinical
vector tiled 10 times, batch 1, SGD lr 1e-4, momentum 0.3 (no Nesterov), weight decay 1e-3,
cosine warm restarts T_0 = 20 epochs, T_mult = 2 (stepped at the start of each epoch, as
BALNMP), 200 epochs, and BALNMP's early stop once the training AUC exceeds 0.98 (stop_when,
every size). The CPU sizes (smoke, cpu: the default) use a CPU network, gated attention, a
clinical MLP and Adam at the same schedule's shape (SIZES below says why).
"""
from __future__ import annotations

import ml_collections

from configs import common

# dataset arg -> (data.name, the side tiles are resized to before the network)
DATASETS = {
    "synthetic": ("synthetic_bags", 32),
    "bcnb": ("bcnb", 224),
    "ham10000_clinical": ("ham10000_clinical", 64),
    "tcga": ("tcga_lung_tiles", 64),
}
STAGES = ("clinical_only", "wsi_only", "multimodal", "modality_dropout", "bd", "bd_m2s_only",
          "bd_s2m_only")
# The inference policy a stage is selected (and headlined) by: tasks/missing_modality.policies.
SELECT_POLICY = {"clinical_only": "mean_fill", "wsi_only": "wsi", "multimodal": "zero_fill",
                 "modality_dropout": "prompt", "bd": "route", "bd_m2s_only": "route",
                 "bd_s2m_only": "route"}

# CPU sizes: Ilse et al.'s gated attention and a clinical MLP, Adam (BALNMP's SGD at lr 1e-4
# and its D=1 aggregator with dropout 0.5 barely move a CPU network in 20 epochs: wsi_only
# 0.724, multimodal 0.708 at seed 0, against 0.761 and 0.827 with these); the restarts
# schedule keeps BALNMP's shape (T_mult 2) at a CPU length.
_CPU_MODEL = dict(aggregator={"kind": "gated", "hidden": 128, "attention_dim": 64,
                              "dropout": 0.0},
                  clinical_encoder={"kind": "mlp", "dim": 32, "repeats": 10})
SIZES = {
    # A run check: a few epochs of every stage, one evaluation at the end, no training-AUC
    # stop.
    "smoke": dict(encoder="tiny_cnn", width=8, batch=16, epochs=3, eval_every=0, stop=False,
                  opt="adam", lr=1e-3, momentum=0.9, restart=2, bootstrap=100, masks=2,
                  **_CPU_MODEL),
    # The embedded default's results (README).
    "cpu": dict(encoder="tiny_cnn", width=16, batch=16, epochs=20, eval_every=-1, stop=True,
                opt="adam", lr=1e-3, momentum=0.9, restart=10, bootstrap=1000, masks=5,
                **_CPU_MODEL),
    # BALNMP as published: VGG16-BN, its aggregator (L 256, D 1, dropout 0.5 before the ReLU
    # and on the attention logits), the clinical vector tiled 10 times, batch 1, 200 epochs,
    # SGD(1e-4, momentum 0.3).
    "paper": dict(encoder="vgg16_bn", width=64, batch=1, epochs=200, eval_every=-1, stop=True,
                  opt="sgd", lr=1e-4, momentum=0.3, restart=20, bootstrap=1000, masks=5,
                  aggregator={"kind": "balnmp", "hidden": 256, "attention_dim": 1,
                              "dropout": 0.5},
                  clinical_encoder={"kind": "tile", "dim": 32, "repeats": 10}),
}
def _stage(task: str, sz: dict) -> ml_collections.ConfigDict:
  opt = common.optimizer(sz["opt"], lr=sz["lr"], momentum=sz["momentum"], nesterov=False,
                         weight_decay=1e-3, schedule="cosine_restarts",
                         restart_period=sz["restart"], restart_mult=2, restart_offset=1)
  policy = SELECT_POLICY[task]
  # Epochs become steps at run time, from the training split's size (train.resolve_stage);
  # evaluations (and checkpoints) every tenth of the run.
  return common.stage(
      task, num_steps=0, num_epochs=sz["epochs"], batch_size=sz["batch"], eval_batch_size=64,
      opt=opt, eval_every=sz["eval_every"],
      select=f"max:val/{policy}/missing_0.0/auc", bootstrap=sz["bootstrap"],
      # BALNMP's early stop, on the bag-level training AUC
      stop_when="eval/train/bag/auc>0.98" if sz["stop"] else "",
      evals={"missing_rate": {"every_eval": True, "masks": sz["masks"],
                              "rates": "0,0.2,0.4,0.6,0.8,1.0", "aggregate": "mean"}})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, dataset="synthetic", smoke=False, size="cpu", stages="",
                         features=False)
  size = "smoke" if arg.smoke else arg.size
  if size not in SIZES:
    raise ValueError(f"size={size!r}; valid: {sorted(SIZES)}")
  if arg.dataset not in DATASETS:
    raise ValueError(f"dataset={arg.dataset!r}; valid: {sorted(DATASETS)}")
  sz = SIZES[size]
  name, tile = DATASETS[arg.dataset]

  c = common.base_config()
  c.method = "missing_modality"
  c.data.name = f"bag_features:{name}_random_tiny_cnn" if arg.features else name
  c.data.image_size = tile
  c.data.max_tiles = 256            # feature mode: tiles per slide fed to the aggregator
  c.data.encoder = ""               # feature mode: the encoder the features must come from
  c.data.clinical_names = ()        # () = whatever the dataset has; else checked against it
  c.model = ml_collections.ConfigDict(dict(
      encoder="" if arg.features else sz["encoder"],
      encoder_kwargs={"width": sz["width"]},
      # kind 'ilse' | 'gated' (Ilse et al., attention_dim D) | 'balnmp' (D = 1, its dropout).
      aggregator=dict(sz["aggregator"]),
      shared_aggregator=True,
      # 'mlp' (a learned embedding of `dim`) | 'tile' (BALNMP: the vector repeated 10 times).
      clinical_encoder=dict(sz["clinical_encoder"]),
      fusion="concat", head_hidden=64))
  c.mm = ml_collections.ConfigDict(dict(
      lambda_ms=1.0, lambda_sm=1.0, temperature=2.0, feature_kind="mse", feature_on="fused",
      inference="route", clinical_dropout=0.5))
  c.stages = ml_collections.ConfigDict({t: _stage(t, sz) for t in STAGES})
  c.default_stage = "bd"
  if arg.dataset == "tcga" and not arg.stages:
    arg.stages = "wsi_only"  # no clinical data: the WSI-only plumbing run
  common.keep_stages(c, arg.stages)
  return c
