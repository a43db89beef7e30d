"""Host-side (numpy) image<->text retrieval and zero-shot classification metrics.

hybridmed's image encoder is judged, without any training on labels, by

* retrieval (`recall_at_k`): given a similarity matrix between N_img images and N_txt texts
  (e.g. cosine of the global image vector and the impression embedding), how often the
  right text is among an image's k most similar texts, and vice versa;
* zero-shot classification with prompt ensembles, following GLoRIA's protocol
  (`zero_shot_scores`, then `zero_shot_metrics`): every class is described by several
  prompts; an image's score for a class comes from its similarity to the class's prompts.

The similarities themselves are the model's business (its global and local heads); these
functions only rank, pool and score them. AUCs, balanced accuracy and bootstrap intervals
come from `metrics.py`, the project's one metrics path.
"""
from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np

from medguide_jax.evaluation import metrics as metrics_lib
from medguide_jax.evaluation import text_metrics

# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------


def _group_ids(groups: Sequence[Hashable], what: str) -> np.ndarray:
  """[N] int ids of hashable group keys (equal keys, equal ids)."""
  if isinstance(groups, (str, bytes)):
    raise TypeError(f"{what} is one string; give one group key per item.")
  ids: dict[Hashable, int] = {}
  return np.asarray([ids.setdefault(g, len(ids)) for g in list(groups)], dtype=np.int64)


def identical_text_groups(texts: Sequence[str]) -> np.ndarray:
  """[N] int group ids under which texts that score alike share a group.

  Two texts are in one group when their `text_metrics.tokenize_for_scoring` tokens are
  equal: case, punctuation and spacing are ignored, so 'No acute cardiopulmonary process.'
  and 'no acute cardiopulmonary process' are one text. Pass the result as `groups` of
  `recall_at_k` to count retrieving an identical impression as a hit.
  """
  return _group_ids([" ".join(text_metrics.tokenize_for_scoring(t)) for t in texts], "texts")


def _ranks(similarity: np.ndarray, correct: np.ndarray) -> np.ndarray:
  """[Q] 1-based rank of the best-scored correct item per row (query), ties pessimistic.

  rank = 1 + the number of INCORRECT items whose similarity is >= the best correct one's:
  on a tie the incorrect items are ranked first. Other correct items never push a correct
  one down.
  """
  best = np.max(np.where(correct, similarity, -np.inf), axis=1)
  return 1 + np.sum(~correct & (similarity >= best[:, None]), axis=1)


def recall_at_k(similarity: np.ndarray, ks: Sequence[int] = (1, 5, 10), *,
                groups: Sequence[Hashable] | None = None,
                text_groups: Sequence[Hashable] | None = None,
                correct: np.ndarray | None = None) -> dict[str, float]:
  """Image->text and text->image recall@k and median rank of a similarity matrix.

  Which texts are correct for an image (and images for a text) is, in order of precedence:
    * `correct` [N_img, N_txt] bool, given explicitly (e.g. 'same study OR identical text':
      the OR of two group comparisons);
    * groups: image i and text j match when their group keys are equal. `groups` [N_img]
      are the images' keys and `text_groups` [N_txt] the texts' (default: `groups`, which
      needs a square matrix where text i belongs with image i). Use study ids, so that
      several images of one study all match its report; or `identical_text_groups(texts)`
      of the texts, so that identical impressions count as one: 'No acute cardiopulmonary
      process.' is the report of many studies, and retrieving another study's identical
      text is not an error a model could avoid;
    * neither: square matrix, image i matches text i only (the strict protocol: an
      identical text of another study counts as a miss; since a duplicate text has exactly
      the true text's similarity, the pessimistic ties below put it first, so with repeated
      texts this protocol caps recall: use groups then).
  Every image must have a correct text and every text a correct image.

  A query is a hit at k when some correct item is among its k most similar items. Ties are
  broken AGAINST the query: the rank of the best-scored correct item is 1 + the number of
  incorrect items at least as similar, so a degenerate model (e.g. a constant similarity
  matrix, collapsed embeddings) gets no credit from ties (recall@k = 0 until k exceeds the
  incorrect items), and the result does not depend on the order of the items. Other correct
  items (duplicates) never count against it.

  Args:
    similarity: [N_img, N_txt] finite scores, higher = more similar (rows: images).
    ks: the cut-offs k >= 1 (k above the gallery size gives recall 1).
    groups, text_groups, correct: see above.

  Returns:
    "i2t/recall@<k>" and "t2i/recall@<k>" for each k (fractions in [0, 1], the mean over
    queries: images for i2t, texts for t2i), "i2t/median_rank" and "t2i/median_rank"
    (1 = the correct item first).
  """
  sim = np.asarray(similarity, dtype=np.float64)
  if sim.ndim != 2 or sim.size == 0:
    raise ValueError(f"similarity must be a non-empty [N_img, N_txt] matrix, got {sim.shape}.")
  if not np.all(np.isfinite(sim)):
    raise ValueError("similarity has non-finite values.")
  ks = [int(k) for k in ks]
  if any(k < 1 for k in ks):
    raise ValueError(f"every k must be >= 1, got {ks}.")
  n_img, n_txt = sim.shape
  if correct is not None:
    if groups is not None or text_groups is not None:
      raise ValueError("give either correct or groups/text_groups, not both.")
    mask = np.asarray(correct, dtype=bool)
  elif groups is None:
    if text_groups is not None:
      raise ValueError("text_groups needs groups (the images' keys).")
    if n_img != n_txt:
      raise ValueError(f"a {sim.shape} matrix needs groups (image i matches text i only "
                       "in a square one).")
    mask = np.eye(n_img, dtype=bool)
  else:
    img_ids = _group_ids(groups, "groups")
    if text_groups is None:
      if n_img != n_txt:
        raise ValueError(f"a {sim.shape} matrix needs text_groups as well as groups.")
      txt_ids = img_ids
    else:
      # Common ids for both sides: one dictionary over the images' then the texts' keys.
      both = _group_ids(list(groups) + list(text_groups), "groups")
      img_ids, txt_ids = both[:len(img_ids)], both[len(img_ids):]
    if img_ids.size != n_img or txt_ids.size != n_txt:
      raise ValueError(f"{img_ids.size} image and {txt_ids.size} text group keys for a "
                       f"{sim.shape} matrix.")
    mask = img_ids[:, None] == txt_ids[None, :]
  if mask.shape != sim.shape:
    raise ValueError(f"correct has shape {mask.shape}, similarity {sim.shape}.")
  for what, axis in (("image", 1), ("text", 0)):
    lonely = int(np.sum(~mask.any(axis=axis)))
    if lonely:
      raise ValueError(f"{lonely} {what}(s) have no correct match.")
  result: dict[str, float] = {}
  for direction, s, m in (("i2t", sim, mask), ("t2i", sim.T, mask.T)):
    ranks = _ranks(s, m)
    for k in ks:
      result[f"{direction}/recall@{k}"] = float(np.mean(ranks <= k))
    result[f"{direction}/median_rank"] = float(np.median(ranks))
  return result


# ---------------------------------------------------------------------------------------------
# Zero-shot classification
# ---------------------------------------------------------------------------------------------


def zero_shot_scores(global_sim: np.ndarray, local_sim: np.ndarray | None,
                     prompt_class: np.ndarray, *, num_classes: int | None = None) -> np.ndarray:
  """Class scores [N_img, C] from image-prompt similarities, GLoRIA's zero-shot protocol.

  GLoRIA (marshuang80/gloria, gloria.py `zero_shot_classification` with utils.py
  `normalize`) scores an image for a class in three steps, reproduced here:
    1. similarity to each prompt = (local + global) / 2 (an unweighted mean of the two
       scores on their own scales; `global_sim` alone when `local_sim` is None);
    2. max over the class's prompts (the prompt ensemble; GLoRIA samples 5 per CheXpert
       class);
    3. z-normalisation of each class column OVER THE IMAGES: (x - mean) / std with the mean
       and the population std (numpy's default ddof=0) of that class's scores across the
       N_img evaluated images (`normalize(method="norm")` is
       `(s - s.mean(axis=0)) / s.std(axis=0)` on the [N_img, C] array). Despite GLoRIA's
       comment ('normalize across class') nothing is normalised across classes within an
       image: each class is standardised across the evaluated images, so the scores depend
       on the whole evaluated set (transductive) and put classes whose raw similarities
       sit on different levels on one scale before the argmax. Per-class AUCs are unchanged
       by it (a positive affine map of one column); the argmax accuracy is not.
  As in GLoRIA, a single image (N_img = 1) is not normalised. A column with zero std (every
  image scored alike for that class) becomes 0 here; GLoRIA would divide by 0 (nan).

  Inputs (computed by the model, not here):
    global_sim: [N_img, N_prompts], e.g. the cosine of the global image embedding and each
      prompt's global text embedding (GLoRIA: sklearn cosine_similarity).
    local_sim: [N_img, N_prompts] or None, the model's token-level image-prompt score
      (GLoRIA at inference: 5 * max over the prompt's words of cos(word, attended image
      context), on [-5, 5], so it dominates the mean of step 1 as it does in GLoRIA).
    prompt_class: [N_prompts] int class of each prompt in [0, C).
    num_classes: C (default: max(prompt_class) + 1); every class needs a prompt.

  Returns:
    [N_img, C] float64 class scores (higher = more likely).
  """
  sim = np.asarray(global_sim, dtype=np.float64)
  if sim.ndim != 2:
    raise ValueError(f"global_sim must be [N_img, N_prompts], got {sim.shape}.")
  if local_sim is not None:
    local = np.asarray(local_sim, dtype=np.float64)
    if local.shape != sim.shape:
      raise ValueError(f"local_sim {local.shape} and global_sim {sim.shape} differ in shape.")
    sim = (local + sim) / 2.0
  if not np.all(np.isfinite(sim)):
    raise ValueError("the similarities have non-finite values.")
  prompt_class = np.asarray(prompt_class).ravel()
  if prompt_class.size != sim.shape[1] or not np.issubdtype(prompt_class.dtype, np.integer):
    raise ValueError(f"prompt_class must be [{sim.shape[1]}] ints, got {prompt_class.shape} "
                     f"{prompt_class.dtype}.")
  if prompt_class.size == 0:
    raise ValueError("no prompts.")
  num_classes = int(prompt_class.max()) + 1 if num_classes is None else int(num_classes)
  if prompt_class.min() < 0 or prompt_class.max() >= num_classes:
    raise ValueError(f"prompt_class must lie in [0, {num_classes}).")
  missing = sorted(set(range(num_classes)) - set(prompt_class.tolist()))
  if missing:
    raise ValueError(f"classes {missing} have no prompt.")
  scores = np.stack([sim[:, prompt_class == c].max(axis=1) for c in range(num_classes)],
                    axis=1)
  if scores.shape[0] > 1:
    centred = scores - scores.mean(axis=0)
    std = scores.std(axis=0)
    scores = np.where(std > 0, centred / np.where(std > 0, std, 1.0), 0.0)
  return scores


def _zero_shot_multiclass(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """[C + 3]: per-class one-vs-rest AUC, mean AUC, accuracy, balanced accuracy."""
  aucs = np.asarray([metrics_lib.roc_auc_ovr((labels == c).astype(np.int64), scores[:, c])
                     for c in range(scores.shape[1])])
  finite = aucs[~np.isnan(aucs)]
  preds = np.argmax(scores, axis=1)
  return np.concatenate([aucs, [finite.mean() if finite.size else np.nan,
                                np.mean(preds == labels),
                                metrics_lib.balanced_accuracy(labels, preds)]])


def _zero_shot_multilabel(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """[C + 1]: per-class AUC over the rows where that class is known (>= 0), mean AUC."""
  aucs = []
  for c in range(scores.shape[1]):
    known = labels[:, c] >= 0
    aucs.append(metrics_lib.roc_auc_ovr(labels[known, c], scores[known, c]))
  aucs = np.asarray(aucs, dtype=np.float64)
  finite = aucs[~np.isnan(aucs)]
  return np.concatenate([aucs, [finite.mean() if finite.size else np.nan]])


def zero_shot_metrics(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
                      multilabel: bool, bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
  """Per-class AUC and (multi-class) accuracy of zero-shot class scores, with bootstrap CIs.

  Args:
    scores: [N, C] class scores, e.g. from `zero_shot_scores` (only their order within a
      column matters for the AUCs; the argmax across a row gives the multi-class prediction).
    labels: multi-class: [N] int in [0, C), -1 = unlabelled (the row is left out);
      multi-label: [N, C] 0/1, -1 = unknown (left out of that class's AUC only).
    class_names: the C names, for the keys.
    multilabel: which of the two label layouts, and metrics, apply.
    bootstrap: resamples of the images for 95% CIs (0: none); all keys share one index set
      per resample (metrics.py). seed: bootstrap seed.

  Returns:
    "<class>/auc": one-vs-rest AUC of scores[:, c] for class c (multi-label: label c
    positive), nan when the class has no positives or no negatives; "mean/auc": the mean of
    the defined per-class AUCs. Multi-class only: "accuracy" (argmax of a row == label, as
    GLoRIA's 5x200 accuracy) and "balanced_accuracy" (mean per-class recall of the argmax).
    Multi-label has no accuracy: the scores are not calibrated (z-scores) and there is no
    threshold the protocol defines. With bootstrap > 0 also "<key>_ci95": [lo, hi].
  """
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  names = list(class_names)
  if scores.ndim != 2 or scores.shape[1] != len(names):
    raise ValueError(f"scores must be [N, {len(names)}], got {scores.shape}.")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores have non-finite values.")
  if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(labels.dtype, np.bool_):
    if not np.all(labels == np.round(labels)):
      raise ValueError("labels must be integers.")
  labels = labels.astype(np.int64)
  if multilabel:
    if labels.shape != scores.shape:
      raise ValueError(f"multi-label labels must be {scores.shape}, got {labels.shape}.")
    if np.any((labels < -1) | (labels > 1)):
      raise ValueError("multi-label labels must be 0, 1 or -1 (unknown).")
    keys, fn = [f"{n}/auc" for n in names] + ["mean/auc"], _zero_shot_multilabel
    arrays = [labels, scores]
  else:
    if labels.shape != (scores.shape[0],):
      raise ValueError(f"multi-class labels must be [{scores.shape[0]}], got {labels.shape}.")
    if np.any((labels < -1) | (labels >= len(names))):
      raise ValueError(f"multi-class labels must lie in [0, {len(names)}) or be -1.")
    keep = labels >= 0
    keys = [f"{n}/auc" for n in names] + ["mean/auc", "accuracy", "balanced_accuracy"]
    fn, arrays = _zero_shot_multiclass, [labels[keep], scores[keep]]
  if len(arrays[0]) == 0:
    raise ValueError("no labelled images.")
  return metrics_lib.with_intervals(keys, fn(*arrays), fn, arrays, bootstrap, seed)
