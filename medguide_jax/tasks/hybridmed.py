"""hybridmed (Jiang et al., arXiv 2410.00448): chest X-ray pretraining from reports whose two
sections are treated differently. One network (models/hybridmed.py HybridMedNet: img, txt,
dec, the alignment heads) and these stage tasks:

  summariser         text only: the findings encoder and the shared decoder on L_Sum
                     (findings -> impression, teacher-forced token cross-entropy)
  joint              L = l_cg L_CG + l_cl L_CL + l_sum L_Sum + l_cap L_Cap + l_dis L_Dis:
                       L_CG  symmetric InfoNCE, global image <-> IMPRESSION (learnable scale)
                       L_CL  token-level image tokens <-> FINDINGS words (MGCA by default,
                             hm.local='gloria' for GLoRIA's)
                       L_Sum findings -> impression (the summariser keeps training)
                       L_Cap image tokens -> impression (the captioner)
                       L_Dis T^2 KL per impression token from the FROZEN summariser (the
                             stage's teacher, `teacher_from`) to the captioner
  joint_no_dis       joint with l_dis = 0 (no teacher)
  joint_global_only  joint with l_cl = 0
  joint_concat       joint with findings and impression concatenated into one text for both
                     alignments (the MGCA-style data treatment HybridMED argues against)
  probe              a linear classifier on the frozen image tower: tasks/downstream.py's
                     linear evaluation (the shared supervised task; labels: the dataset's
                     label groups as binary tasks). configs/downstream.py runs every
                     downstream task on any tower (part 3)

The paper pins down neither the forms nor the weights (METHODS.md 3(a), 7.3): the defaults are
METHODS.md's faithful forms, each configurable in the config's `hm` block. `predict` gives
the normalised global embeddings (image, impression), the generated impressions (greedy, from
the captioner; from the summariser in its own stage) and the references; the evaluators in
evaluation/hybridmed.py turn them into zero-shot, retrieval and generation figures.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from medguide_jax.data import cxr
from medguide_jax.losses import alignment, contrastive, distillation, generation
from medguide_jax.models import hybridmed as hm_model, text
from medguide_jax.tasks import base, downstream

KINDS = ("summariser", "joint", "joint_no_dis", "joint_global_only", "joint_concat", "probe")
JOINT_KINDS = ("joint", "joint_no_dis", "joint_global_only", "joint_concat")
LOCAL = ("mgca", "gloria")


def tokenizer(ctx: base.TaskContext):
  """The run's tokenizer (data.tokenizer, else the dataset's), once per stage."""
  info = getattr(ctx.train_source, "dataset_info", None)
  return cxr.tokenizer_for(ctx.config.data, getattr(info, "metadata", None))


def network(config, vocab_size: int, max_len: int) -> hm_model.HybridMedNet:
  m = config.model
  return hm_model.HybridMedNet(
      vocab_size=vocab_size, max_len=max_len, encoder=m.encoder,
      encoder_kwargs=dict(m.encoder_kwargs), text_kwargs=dict(m.text),
      decoder_kwargs=dict(m.decoder), embed_dim=m.embed_dim,
      share_cross_attention=m.share_cross_attention, dtype=jnp.dtype(config.compute_dtype))


def word_mask(ids: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """The words the local alignment reads: real tokens but [CLS] and [SEP] (METHODS.md: GLoRIA's
  inference span; BERT's last layers park attention on [SEP])."""
  return mask & (ids != text.BOS_ID) & (ids != text.EOS_ID)


class HybridMedTask(base.Task):
  """One pretraining stage (module docstring)."""

  def __init__(self, ctx: base.TaskContext):
    super().__init__(ctx)
    self.kind, self.hm = ctx.stage.task, ctx.config.hm
    if self.hm.local not in LOCAL:
      raise ValueError(f"hm.local={self.hm.local!r}; valid: {LOCAL}")
    meta = dict(getattr(getattr(ctx.train_source, "dataset_info", None), "metadata", None)
                or {})
    self.text_only = bool(meta.get("text_only"))
    if self.text_only and self.kind != "summariser":
      raise ValueError(f"dataset {ctx.config.data.name!r} is text-only (no images): only the "
                       "summariser stage runs on it (stages=summariser)")
    self.tok = tokenizer(ctx)
    self.model = network(ctx.config, self.tok.vocab_size, self.tok.max_len)
    self.decoders = hm_model.decoders(self.model)
    self.weights = {k: float(self.hm[f"lambda_{k}"]) for k in ("cg", "cl", "sum", "cap", "dis")}
    if self.kind == "joint_no_dis":
      self.weights["dis"] = 0.0
    if self.kind == "joint_global_only":
      self.weights["cl"] = 0.0
    if self.kind == "summariser":
      self.weights = {"sum": 1.0}
    self.branch = "summariser" if self.kind == "summariser" else "captioner"
    # Generated impressions: up to hm.gen_len tokens (0: as long as a stored impression).
    stored = int(ctx.config.data.get("impression_len", 0) or self.tok.max_len)
    self.gen_len = min(int(self.hm.gen_len) or stored - 1, self.tok.max_len - 1)
    self.headline = ("generation/summariser/rouge_l" if self.kind == "summariser"
                     else "zero_shot/mean/auc")
    self.columns = ((self.headline, "generation/summariser/bleu_4") if self.kind == "summariser"
                    else ("zero_shot/mean/auc", "retrieval/i2t/recall@5",
                          "generation/captioner/rouge_l", "generation/captioner/bleu_4"))

  @property
  def parts(self) -> tuple[str, ...]:
    return ("summariser",) if self.kind == "summariser" else hm_model.PARTS

  # -- training ------------------------------------------------------------------------------
  def init(self, rng, batch):
    return dict(self.model.init({"params": rng, "dropout": rng}, batch, train=False,
                                parts=self.parts))

  def init_teacher(self, rng, batch):
    """The frozen summariser (the summariser stage's variables) for L_Dis."""
    if self.kind not in JOINT_KINDS or self.weights["dis"] == 0.0:
      return None
    return jax.eval_shape(lambda: dict(self.model.init(
        {"params": rng, "dropout": rng}, batch, train=False, parts=("summariser",))))

  def _alignment_text(self, batch: dict) -> str:
    return "report" if self.kind == "joint_concat" else "impression"

  def loss(self, params, state, batch, rng):
    weights = batch["mask"].astype(jnp.float32)
    out, model_state = base.apply_mutable(
        self.model, {"params": params, **state.model_state}, list(state.model_state), batch,
        train=True, parts=self.parts, concat=self.kind == "joint_concat",
        rngs={"dropout": rng})
    inputs, targets, target_mask = generation.shift_for_teacher_forcing(
        batch["impression_ids"], batch["impression_mask"])
    target_mask = target_mask & (weights[:, None] > 0)
    ce = lambda logits: generation.token_cross_entropy(
        logits=logits, targets=targets, mask=target_mask,
        label_smoothing=float(self.hm.label_smoothing))
    terms, metrics = {}, {}
    terms["sum"], m = ce(out["summariser"])
    metrics["summariser_token_accuracy"] = m["token_accuracy"]
    if self.kind in JOINT_KINDS:
      terms["cap"], m = ce(out["captioner"])
      metrics["captioner_token_accuracy"] = m["token_accuracy"]
      key = self._alignment_text(batch)
      terms["cg"], m = alignment.global_alignment(
          image=out["image"]["global"], text=out[key]["global"], logit_scale=params["logit_scale"])
      metrics["contrastive_accuracy"], metrics["logit_scale"] = (m["contrastive_accuracy"],
                                                                 m["logit_scale"])
      words_key = "report" if key == "report" else "findings"
      ids, mask = batch[f"{words_key}_ids"], batch[f"{words_key}_mask"]
      words = word_mask(ids, mask) & (weights[:, None] > 0)
      if self.weights["cl"] > 0:
        if self.hm.local == "mgca":
          terms["cl"], _ = alignment.mgca_local_alignment(
              patches=out["image"]["tokens"], words=out[words_key]["tokens"], word_mask=words,
              word_weights=alignment.attention_word_weights(out[words_key]["attention"], words),
              temperature=float(self.hm.local_temperature))
        else:
          terms["cl"], _ = alignment.gloria_local_alignment(
              regions=out["image"]["tokens"], words=out[words_key]["tokens"], word_mask=words)
      if self.weights["dis"] > 0:
        teacher = self.model.apply(state.teacher, batch, train=False, parts=("summariser",))
        terms["dis"], m = distillation.token_distillation(
            student_logits=out["captioner"], teacher_logits=teacher["summariser"],
            mask=target_mask, temperature=float(self.hm.temperature))
    loss = sum(self.weights[k] * v for k, v in terms.items() if self.weights.get(k, 0) > 0)
    metrics.update({f"L_{k}": v for k, v in terms.items()})
    return loss, (metrics, state.replace(model_state=model_state))

  # -- evaluation ----------------------------------------------------------------------------
  def embed_texts(self, variables, ids, mask):
    """Normalised global text embeddings [N, E] (zero-shot prompts)."""
    out = self.model.apply(variables, ids, mask, method=hm_model.HybridMedNet.encode_text)
    return contrastive.l2_normalize(out["global"])

  def predict(self, variables, batch):
    # Only what the outputs read: a joint stage's summariser logits would be discarded.
    parts = self.parts if self.kind == "summariser" else ("alignment", "captioner")
    out = self.model.apply(variables, batch, train=False, parts=parts)
    inputs, targets, target_mask = generation.shift_for_teacher_forcing(
        batch["impression_ids"], batch["impression_mask"])
    ce, _ = generation.token_cross_entropy(logits=out[self.branch], targets=targets,
                                           mask=target_mask, reduction="none")
    result = {"loss": ce.sum(1) / jnp.maximum(target_mask.sum(1), 1),
              "impression_ids": batch["impression_ids"], "labels": batch["labels"]}
    dec = variables["params"]["dec"]
    if self.kind == "summariser":
      memory, memory_mask = out["findings"]["memory"], batch["findings_mask"]
    else:
      memory, memory_mask = out["image"]["memory"], None
      result["image_emb"] = contrastive.l2_normalize(out["image"]["global"])
      result["text_emb"] = contrastive.l2_normalize(out["impression"]["global"])
    result[f"generated/{self.branch}"] = text.greedy_decode(
        self.decoders, dec, memory, memory_mask, branch=self.branch, max_len=self.gen_len)
    return result

  def evaluate(self, outputs, *, bootstrap, seed):
    del bootstrap, seed
    return {"loss": float(np.mean(outputs["loss"]))}

  def metric_keys(self) -> set[str]:
    return {"loss"}


class ProbeTask(downstream.ClassifyTask):
  """probe: downstream's linear evaluation (tasks/downstream.py) of this run's frozen joint
  tower: one binary task per label group (a study is positive for a group when any of its
  labels is), the dataset's `label_groups` metadata or each label alone."""


def make_task(ctx: base.TaskContext) -> base.Task:
  if ctx.stage.task not in KINDS:
    raise ValueError(f"stage task {ctx.stage.task!r} is not a hybridmed task; valid: {KINDS}")
  if ctx.stage.task == "probe":
    return ProbeTask(ctx)
  return HybridMedTask(ctx)

