"""missing_modality (Zhang et al., IEEE BIBM 2023; arXiv 2401.01553): predicting axillary lymph
node metastasis from a whole-slide image (a bag of tiles) and clinical data, robust when the
clinical data is missing at test time. One network (models/mil.py MissingModalityNet: a tile
encoder, an attention-MIL aggregator shared by both branches, a clinical encoder, a learnable
prompt, branch M on [WSI; clinical] and branch S on [WSI; prompt]) and seven stage tasks:

  clinical_only     CE of a clinical-only network (the clinical encoder and a head)
  wsi_only          CE(S): DL-CNB, the WSI alone (the prompt is a constant input)
  multimodal        CE(M) on complete data: DL-CNB+C; missing clinical data is filled at
                    inference (policies zero_fill and mean_fill, the training mean)
  modality_dropout  CE(M) with each example's clinical embedding replaced by the prompt with
                    probability mm.clinical_dropout: the baseline a reviewer asks for;
                    inference: M with the prompt for a patient without clinical data
  bd                bidirectional distillation, M and S trained together:
                      CE(M) + CE(S) + lambda_ms T^2 KL(softmax(sg z_M / T) || softmax(z_S / T))
                                    + lambda_sm d(f_M, sg f_S)
                    M->S distils the fused prediction into S; S->M pulls M's fused feature f
                    (the head's hidden layer; mm.feature_on='wsi': the bag embeddings, which
                    needs model.shared_aggregator=False) toward S's, so the clinical input
                    cannot dominate. Inference (mm.inference): 'route' (clinical present: M,
                    absent: S; the default), 's' (S for everyone), 'prompt' (M with the prompt
                    when absent)
  bd_m2s_only       bd with lambda_sm = 0 (ablation)
  bd_s2m_only       bd with lambda_ms = 0 (ablation)

The paper's losses, weights, temperature and fusion are not public (METHODS.md 2(a)): the
defaults are the formalisation there, each configurable in the config's `mm` block.

Per bag, `predict` gives the label, the positive-class... probabilities when the patient's
clinical data is present (`probs`) and, per inference policy, when it is absent
(`probs_absent/<policy>`); the missing-rate evaluator (evaluation/missing_rate.py) draws which
patients lose their clinical data, aggregates bags per patient and computes AUC and the
threshold metrics per rate. The task's own metrics are bag-level (complete data).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medguide_jax.data import sources
from medguide_jax.evaluation import metrics as metrics_lib
from medguide_jax.losses import classification, distillation
from medguide_jax.models import mil
from medguide_jax.tasks import base

KINDS = ("clinical_only", "wsi_only", "multimodal", "modality_dropout", "bd", "bd_m2s_only",
         "bd_s2m_only")
BD_KINDS = ("bd", "bd_m2s_only", "bd_s2m_only")
BD_INFERENCE = ("route", "s", "prompt")
FEATURE_ON = ("fused", "wsi")


def policies(kind: str, inference: str = "route") -> tuple[str, ...]:
  """The inference policies (for a patient without clinical data) a stage is reported under."""
  if kind == "multimodal":
    return ("zero_fill", "mean_fill")
  if kind == "clinical_only":
    return ("mean_fill",)
  if kind == "wsi_only":
    return ("wsi",)
  if kind == "modality_dropout":
    return ("prompt",)
  return (inference,)


class ClinicalOnlyNet(mil.nn.Module):
  """The clinical encoder and a head: the clinical-only baseline ({'logits'})."""
  num_classes: int
  clinical_encoder: dict | None = None
  head_hidden: int = 64

  @mil.nn.compact
  def __call__(self, batch: dict, *, train: bool = False, clinical_present=None,
               fills: dict | None = None) -> dict:
    del train, clinical_present
    encoder = mil.ClinicalEncoder(**dict(self.clinical_encoder or {}), name="clinical")
    head = mil.Branch(self.num_classes, "concat", self.head_hidden, name="branch_m")
    empty = jnp.zeros((batch["clinical"].shape[0], 0), jnp.float32)
    out = {"logits_m": head(empty, encoder(batch["clinical"]))[0]}
    for name, filled in (fills or {}).items():  # no prompt here: mean_fill only
      out[f"logits_m/{name}"] = head(empty, encoder(filled))[0]
    return out


def clinical_mean(train_source) -> np.ndarray:
  """The training split's mean clinical vector (mean_fill), once per open source."""
  return sources.once_per_source(train_source, "clinical_mean", lambda: np.mean(
      np.stack([np.asarray(train_source[i]["clinical"], np.float32)
                for i in range(len(train_source))]), axis=0).astype(np.float32))


class MissingModalityTask(base.Task):
  """One stage of the method (module docstring)."""

  def __init__(self, ctx: base.TaskContext):
    super().__init__(ctx)
    c, kind = ctx.config, ctx.stage.task
    if kind not in KINDS:
      raise ValueError(f"task {kind!r}; valid: {KINDS}")
    self.kind, self.mm = kind, c.mm
    if self.mm.inference not in BD_INFERENCE:
      raise ValueError(f"mm.inference={self.mm.inference!r}; valid: {BD_INFERENCE}")
    if self.mm.feature_on not in FEATURE_ON:
      raise ValueError(f"mm.feature_on={self.mm.feature_on!r}; valid: {FEATURE_ON}")
    if self.mm.feature_on == "wsi" and c.model.shared_aggregator and kind in BD_KINDS:
      raise ValueError("mm.feature_on='wsi' distils S's bag embedding into M's, which are "
                       "one when the aggregator is shared: set model.shared_aggregator=False")
    info = getattr(ctx.train_source, "dataset_info", None)
    meta = dict(getattr(info, "metadata", None) or {})
    self.class_names = list(meta.get("class_names") or [])
    self.clinical_names = list(meta.get("clinical_names") or [])
    if len(self.class_names) < 2:
      raise ValueError(f"dataset {c.data.name!r} has class_names {self.class_names}; the "
                       "method needs >= 2 classes")
    wanted, made_by = c.data.get("encoder", ""), dict(meta.get("encoder") or {})
    if wanted and made_by and wanted not in (made_by.get("name"), made_by.get("sha256")):
      raise ValueError(f"data.encoder={wanted!r} but the features of {c.data.name!r} were made "
                       f"by {made_by.get('name')!r} (sha256 {made_by.get('sha256')}): rebuild "
                       "them with python -m data_prep.features, or name that encoder")
    if made_by and c.model.encoder:
      raise ValueError(f"dataset {c.data.name!r} holds features, not tiles: set "
                       "model.encoder='' (the config's :features)")
    expected = list(c.data.get("clinical_names") or [])
    if expected and expected != self.clinical_names:
      raise ValueError(f"data.clinical_names={expected} but dataset {c.data.name!r} has "
                       f"{self.clinical_names}")
    if kind != "wsi_only" and not self.clinical_names:
      raise ValueError(f"dataset {c.data.name!r} has no clinical data: only wsi_only runs on "
                       "it (stages=wsi_only)")
    n, cdim = len(self.class_names), max(len(self.clinical_names), 1)
    m = c.model
    if kind == "clinical_only":
      self.model = ClinicalOnlyNet(n, dict(m.clinical_encoder), m.head_hidden)
    else:
      self.model = mil.MissingModalityNet(
          num_classes=n, clinical_dim=cdim, encoder=m.encoder or None,
          encoder_kwargs=dict(m.encoder_kwargs), aggregator=dict(m.aggregator),
          shared_aggregator=m.shared_aggregator, clinical_encoder=dict(m.clinical_encoder),
          fusion=m.fusion, head_hidden=m.head_hidden)
    self.policies = policies(kind, self.mm.inference)
    self.mean_clinical = (clinical_mean(ctx.train_source) if self.clinical_names
                          else np.zeros((1,), np.float32))
    self.headline = "missing_0.8/auc"  # each row unprefixed: Task.table_rows
    self.columns = ("missing_0.0/auc", "missing_0.8/auc")

  # -- training ------------------------------------------------------------------------------
  def _inputs(self, batch: dict) -> dict:
    keys = ("features", "tile_mask", "tiles", "clinical")
    out = {k: batch[k] for k in keys if k in batch}
    if not self.clinical_names:  # no clinical data: a constant zero input
      out["clinical"] = jnp.zeros((batch["label"].shape[0], 1), jnp.float32)
    return out

  def init(self, rng, batch):
    return dict(self.model.init({"params": rng, "dropout": rng}, self._inputs(batch),
                                train=False))

  def loss(self, params, state, batch, rng):
    drop_rng, present_rng = jax.random.split(rng)
    weights = batch["mask"].astype(jnp.float32)
    present = None
    if self.kind == "modality_dropout":
      present = jax.random.uniform(present_rng, weights.shape) >= self.mm.clinical_dropout
    out, model_state = base.apply_mutable(
        self.model, {"params": params, **state.model_state}, list(state.model_state),
        self._inputs(batch), train=True, rngs={"dropout": drop_rng}, clinical_present=present)
    ce = lambda logits: classification.softmax_cross_entropy(
        logits=logits, labels=batch["label"], weights=weights)[0]
    metrics = {}
    if self.kind == "wsi_only":
      loss = metrics["ce_s"] = ce(out["logits_s"])
    elif self.kind in ("clinical_only", "multimodal", "modality_dropout"):
      loss = metrics["ce_m"] = ce(out["logits_m"])
    else:
      lambda_ms = 0.0 if self.kind == "bd_s2m_only" else float(self.mm.lambda_ms)
      lambda_sm = 0.0 if self.kind == "bd_m2s_only" else float(self.mm.lambda_sm)
      metrics["ce_m"], metrics["ce_s"] = ce(out["logits_m"]), ce(out["logits_s"])
      metrics["kd_m2s"], kd = distillation.logit_distillation(
          student_logits=out["logits_s"], teacher_logits=out["logits_m"],
          temperature=float(self.mm.temperature), weights=weights)
      key = "fused" if self.mm.feature_on == "fused" else "wsi"
      metrics["feat_s2m"], feat = distillation.feature_distillation(
          features=out[f"{key}_m"], target=out[f"{key}_s"], kind=self.mm.feature_kind,
          stop_gradient="target", weights=weights)
      metrics["kl_m2s"], metrics["cosine_s2m"] = kd["kl"], feat["cosine"]
      loss = (metrics["ce_m"] + metrics["ce_s"] + lambda_ms * metrics["kd_m2s"]
              + lambda_sm * metrics["feat_s2m"])
    return loss, (metrics, state.replace(model_state=model_state))

  # -- evaluation ----------------------------------------------------------------------------
  def predict(self, variables, batch):
    inputs = self._inputs(batch)
    apply = lambda x, **kw: self.model.apply(variables, x, train=False, **kw)
    softmax = lambda z: jax.nn.softmax(z.astype(jnp.float32))
    clinical = inputs["clinical"]
    # Every fill policy's input in one pass over the tiles (None: the prompt, in M).
    fills = {p: {"zero_fill": jnp.zeros_like(clinical), "prompt": None,
                 "mean_fill": jnp.broadcast_to(jnp.asarray(self.mean_clinical),
                                               clinical.shape)}[p]
             for p in self.policies if p in ("zero_fill", "mean_fill", "prompt")}
    full = apply(inputs, fills=fills)
    result = {"label": batch["label"]}
    if self.kind == "wsi_only":
      result["probs"] = result["probs_absent/wsi"] = softmax(full["logits_s"])
    elif self.kind in BD_KINDS and self.mm.inference == "s":
      result["probs"] = result["probs_absent/s"] = softmax(full["logits_s"])
    else:
      result["probs"] = softmax(full["logits_m"])
    for policy in self.policies:
      if policy in ("zero_fill", "mean_fill", "prompt"):
        result[f"probs_absent/{policy}"] = softmax(full[f"logits_m/{policy}"])
      elif policy == "route":
        result[f"probs_absent/{policy}"] = softmax(full["logits_s"])
    return result

  def evaluate(self, outputs, *, bootstrap, seed):
    """Bag-level metrics with complete clinical data (patient level: the missing-rate
    evaluator)."""
    out = metrics_lib.classification_metrics(np.asarray(outputs["label"]),
                                             np.asarray(outputs["probs"]),
                                             bootstrap=bootstrap, seed=seed)
    return {f"bag/{k}": v for k, v in out.items()}

  def metric_keys(self) -> set[str]:
    return {f"bag/{k}" for k in ("balanced_accuracy", "auc", "accuracy")}


  def table_rows(self) -> list[tuple[str, str]]:
    """One row per inference policy: 'multimodal/zero_fill', 'multimodal/mean_fill';
    a stage with one policy is one row under its own name ('bd')."""
    if len(self.policies) == 1:
      return [("", f"{self.policies[0]}/")]
    return [(f"/{p}", f"{p}/") for p in self.policies]


def make_task(ctx: base.TaskContext) -> base.Task:
  return MissingModalityTask(ctx)


def finish_run(config, workdir, results: dict) -> None:
  """W/auc_vs_missing_rate.png (and the same image in W's TensorBoard events) from every
  table row's missing-rate columns."""
  del config, results
  from medguide_jax import metric_writers  # pylint: disable=g-import-not-at-top
  from medguide_jax.evaluation import missing_rate  # pylint: disable=g-import-not-at-top
  curves = missing_rate.auc_curves(workdir)
  if not curves or not metric_writers.is_writer():
    return
  png = missing_rate.plot_auc_vs_missing_rate(curves, f"{workdir}/auc_vs_missing_rate.png")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(png)) as im:
    pixels = np.asarray(im.convert("RGB"))
  writer = SummaryWriter(str(workdir))
  writer.add_image("auc_vs_missing_rate", pixels, 0, dataformats="HWC")
  writer.close()
