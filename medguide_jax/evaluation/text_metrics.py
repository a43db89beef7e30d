"""Host-side metrics of generated report text: caption scores and clinical accuracy.

hybridmed generates the impression of a chest X-ray report from the image (captioning) and
from the findings (summarisation). Two families of numbers judge a generated impression:

* `caption_scores`: the n-gram scores of the MS-COCO caption evaluation, BLEU-1..4, ROUGE-L
  and CIDEr(-D), computed by the maintained scorers of the `pycocoevalcap` package (its
  `Bleu(4)`, `Rouge` and `Cider`, which are pure Python) on text tokenised by
  `tokenize_for_scoring` (the package's own PTBTokenizer needs Java and is not used).
* `clinical_accuracy`: precision, recall and F1 of the finding labels read out of the
  generated impressions (the synthetic dataset's grammar parses a text into a label set;
  this function receives the sets), per label, macro- and micro-averaged.

Both are pure functions of their inputs (no task wiring); the evaluators call them.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import numpy as np

from medguide_jax.evaluation import metrics as metrics_lib

DEID = "[deid]"   # the de-identification placeholder as it leaves tokenize_for_scoring
PIP_PACKAGE = "pycocoevalcap"

# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------

# Characters dropped as punctuation. pycocoevalcap's PTB step deletes the tokens
# '' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ; after tokenising; the square brackets
# (PTB's -LSB-/-RSB-, which that list misses) and the typographic dashes, quotes and ellipsis
# are dropped here too, as the same kind of mark.
_DROPPED = frozenset(".,;:!?()[]{}\"'`-_" "\u2010\u2011\u2012\u2013\u2014\u2015\u2026"
                     "\u2018\u2019\u201c\u201d\u00ab\u00bb")
_ALNUM = r"[^\W_]"   # a letter or digit (any script), not the underscore
_TOKEN = re.compile(
    r"\[deid\]"                                            # the placeholder, one token
    r"|n't|'(?:s|re|ve|ll|d|m)\b"                          # PTB's clitics (split off below)
    rf"|{_ALNUM}+(?:(?:[-/]|(?<=\d)[.,:](?=\d)){_ALNUM}+)*"  # words, x-ray, 1/2, 2.5, 10:30
    r"|\S")                                                # any other single character
_NEGATION = re.compile(rf"(?<={_ALNUM})n't\b")
_CLITIC = re.compile(rf"(?<={_ALNUM})'(s|re|ve|ll|d|m)\b")


def tokenize_for_scoring(text: str | None) -> list[str]:
  """The tokens of `text` that the caption scores compare (lower-cased, punctuation dropped).

  This mirrors, as far as is reasonable without Java, what the COCO caption evaluation does
  before scoring: Stanford's PTBTokenizer with `-lowerCase`, then deletion of punctuation
  tokens. The rules, in order:

  1. None is the empty text; the text is lower-cased (str.lower).
  2. '[DEID]' (any case), the project's one de-identification placeholder
     (data/reports.py writes it for IU X-ray's 'XXXX' and MIMIC-CXR's '___'), is ONE token,
     '[deid]', in predictions and references alike, also when glued to a neighbour
     ('x-[DEID].' -> 'x', '[deid]'). It stands for one removed word, so it counts as one word
     in the n-grams and lengths (brevity penalty, CIDEr's length penalty), and a generated
     placeholder matches a reference one. (PTB would make three tokens '-LSB-', 'deid',
     '-RSB-' of it, and the placeholder would weigh three words.)
  3. Words are runs of letters and digits, kept whole across an inner hyphen or slash
     ('well-defined', 'x-ray', 'and/or', '1/2', 't11-12') and across '.', ',' or ':' between
     two digits ('2.5', '1,000', '10:30'), as PTB keeps them.
  4. PTB's clitics are split off as their own tokens: "isn't" -> 'is', "n't";
     "patient's" -> 'patient', "'s" (also 're, 've, 'll, 'd, 'm); a typographic apostrophe
     counts as "'".
  5. Punctuation is DROPPED: . , ; : ! ? ( ) [ ] { } " ' ` - _ and the typographic dashes,
     quotes and the ellipsis (a hyphen or slash that does not join two word characters is
     punctuation too: 'x-' -> 'x'). This is the COCO evaluation's choice (it deletes these
     tokens after PTB), and the right one for impressions: nearly every impression ends in
     '.', and sentence punctuation would otherwise give every prediction free unigram and
     bigram matches ('normal .') that carry no clinical content, inflating BLEU-1/2 and
     ROUGE-L of any well-formed text.
  6. Every other non-space character is a token of its own and is kept, as PTB keeps it:
     '5%' -> '5', '%'; '>3cm' -> '>', '3cm'; '+', '=', '#', '&', '*', '/', '\u00b0', ...

  Checked against the real pipeline (Stanford PTBTokenizer 3.4.1 as shipped with
  pycocoevalcap 1.2, then its punctuation deletion) on report-like sentences: the tokens
  agree on commas, periods, colons, semicolons, dashes, quotes, clitics, numbers ('2.5',
  '1,000', '10:30', '1/2'), hyphenated words and symbols ('5 %'), and differ, deliberately,
  only in:
    * parentheses: PTB escapes them as -LRB-/-RRB-, which `-lowerCase` turns into
      '-lrb-'/'-rrb-', so pycocoevalcap's removal list (upper-case) misses them and they are
      scored as words; here they are dropped, as that list intends;
    * abbreviation periods: PTB keeps 'e.g.', 'dr.' and a capitalised word's final period
      ('CT.' -> 'ct.'); here 'e', 'g', 'dr', 'ct' (so 'ct.' at a sentence end matches 'ct');
    * '[DEID]': PTB gives '-lsb-', 'deid', '-rsb-'; here one '[deid]' (rule 2);
    * underscores: PTB keeps 'a_b' and '___'; here they are punctuation ('a', 'b').
    (MIMIC-CXR's '___' placeholders are already '[DEID]' in the project's report text.)

  Returns:
    The tokens, possibly none ('' and '...' give []).
  """
  if text is None:
    return []
  text = str(text).lower().replace("\u2019", "'")
  text = _NEGATION.sub(" n't", text)
  text = _CLITIC.sub(r" '\1", text)
  return [t for t in _TOKEN.findall(text) if t not in _DROPPED]


# ---------------------------------------------------------------------------------------------
# Caption scores
# ---------------------------------------------------------------------------------------------

def _scorers():
  """pycocoevalcap's Bleu, Rouge and Cider classes, imported on first use."""
  try:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
  except ImportError as e:
    raise ImportError(
        "caption_scores needs the COCO caption scorers: `python -m pip install "
        f"{PIP_PACKAGE}` (only its pure-Python Bleu, Rouge and Cider are used; no Java).") from e
  return Bleu, Rouge, Cider


def _reference_list(refs: str | Sequence[str] | None, i: int) -> list[str]:
  if refs is None or isinstance(refs, str):
    return [refs or ""]
  refs = list(refs)
  if not refs:
    raise ValueError(f"document {i} has no reference (give a string or a non-empty list).")
  return [r or "" for r in refs]


def caption_scores(predictions: Sequence[str | None],
                   references: Sequence[str | Sequence[str]]) -> dict[str, float]:
  """BLEU-1..4, ROUGE-L and CIDEr of generated texts against their references.

  Every text is tokenised by `tokenize_for_scoring` and handed to pycocoevalcap's scorers
  (space-joined tokens) with the definitions of those scorers, unchanged:

  * bleu_1..bleu_4 (`Bleu(4)`): CORPUS-level BLEU, not a mean of sentence BLEUs: the clipped
    n-gram matches and the n-gram counts of all documents are summed before the modified
    precisions p_n are formed; bleu_n = (p_1 ... p_n)^(1/n) * BP with the brevity penalty
    BP = exp(1 - r/c) when c < r (else 1), c the total prediction length and r the sum over
    documents of the reference length closest to the prediction's ('closest'; ties go to the
    shorter reference). pycocoevalcap guards its divisions with the constants 1e-15 and 1e-9,
    p_n = (matches + 1e-15) / (count + 1e-9), and these are reported as they are: a corpus
    with n-grams of order n but no match among them has p_n = 1e-15 / count, so bleu_n is
    small but not exactly 0; one with no n-gram of order n at all (every prediction shorter
    than n tokens) has p_n = 1e-6 (e.g. 'a b' predicted for 'a b': bleu_3 = 0.01).
    Identical predictions and references of at least 4 tokens give bleu_1..4 = 1 (to 1e-9).
  * rouge_l (`Rouge`): per document, P = LCS/len(prediction) and R = LCS/len(reference)
    with LCS the longest common subsequence of tokens; over several references the largest
    P and the largest R are taken (possibly from different references);
    F = (1 + b^2) P R / (R + b^2 P) with b = 1.2, 0 when P or R is 0; the mean over documents.
  * cider (`Cider`, which is CIDEr-D without stemming): per document, the 1..4-gram tf-idf
    vectors of prediction and each reference, IDF = log(N) - log(max(1, df)) with N the
    number of documents and df the number of documents whose references contain the n-gram;
    per order n the clipped cosine sum_g min(h_g, r_g) r_g / (|h| |r|) times the Gaussian
    length penalty exp(-d^2 / (2 * 6^2)), averaged over references, then over n = 1..4, x10;
    the mean over documents; d is the difference of the two lengths in tokens. (The code
    counts bigrams for the length, len - 1; the difference is the same wherever it matters,
    as an empty text has a zero vector and scores 0 anyway.)
    Since the IDF is estimated on the evaluated documents themselves, CIDEr needs several:
    with N = 1 every weight is log 1 - log 1 = 0 and CIDEr is 0 by construction, so for
    fewer than 2 documents 'cider' is nan here (not a misleading 0). In general an n-gram in
    every document's references weighs 0: a split whose references are all one text
    (e.g. 'no acute cardiopulmonary process') has CIDEr 0 whatever is predicted, and CIDEr
    of a subset differs from the subset's share of the whole.

  Empty texts (None, '', or text that is only punctuation) do not fail. An empty prediction
  contributes no n-grams but its reference length to BLEU (lowering BP), scores ROUGE-L 0
  (1 if its reference is empty too, since pycocoevalcap then compares two empty token
  strings) and CIDEr 0; all-empty predictions give bleu_n = 0. If no reference has any token,
  cider is 0.

  Args:
    predictions: N generated texts.
    references: N references, each a string or a non-empty sequence of strings (several
      references of one document; BLEU clips by and ROUGE-L/CIDEr compare with all of them).

  Returns:
    {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"} as floats.
  """
  if isinstance(predictions, str) or isinstance(references, str):
    raise TypeError("predictions and references are sequences of texts, not one string.")
  predictions, references = list(predictions), list(references)
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
  if not predictions:
    raise ValueError("caption_scores needs at least one document.")
  Bleu, Rouge, Cider = _scorers()
  res = {i: [" ".join(tokenize_for_scoring(p))] for i, p in enumerate(predictions)}
  gts = {i: [" ".join(tokenize_for_scoring(r)) for r in _reference_list(refs, i)]
         for i, refs in enumerate(references)}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  rouge, _ = Rouge().compute_score(gts, res)
  if len(predictions) < 2:
    cider = float("nan")
  elif not any(r for refs in gts.values() for r in refs):
    cider = 0.0   # no reference n-gram at all (pycocoevalcap would fail on an empty max())
  else:
    cider, _ = Cider().compute_score(gts, res)
  result = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
  result["rouge_l"] = float(rouge)
  result["cider"] = float(cider)
  return result


# ---------------------------------------------------------------------------------------------
# Clinical accuracy
# ---------------------------------------------------------------------------------------------

def _label_matrix(label_sets: Sequence[Iterable[str]], index: dict[str, int],
                  what: str) -> np.ndarray:
  """[N, L] bool indicator of N label sets over the named labels (unknown names: error)."""
  out = np.zeros((len(label_sets), len(index)), dtype=bool)
  for i, labels in enumerate(label_sets):
    if isinstance(labels, str):
      raise TypeError(f"{what}[{i}] is a string; give a set of label names.")
    for name in labels:
      if name not in index:
        raise ValueError(f"{what}[{i}] has unknown label {name!r}; known: {sorted(index)}.")
      out[i, index[name]] = True
  return out


def _ratio(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(den > 0, num / np.maximum(den, 1), zero_division)


def _nanmean(values: np.ndarray) -> float:
  finite = values[~np.isnan(values)]
  return float(finite.mean()) if finite.size else float("nan")


def _prf(pred: np.ndarray, true: np.ndarray, zero_division: float) -> np.ndarray:
  """[3L + 6]: per label (precision, recall, f1), then macro (p, r, f1), then micro (p, r, f1)
  of indicator matrices pred, true [N, L]."""
  tp = np.sum(pred & true, axis=0).astype(np.float64)
  fp = np.sum(pred & ~true, axis=0).astype(np.float64)
  fn = np.sum(~pred & true, axis=0).astype(np.float64)
  per_label = np.stack([_ratio(tp, tp + fp, zero_division), _ratio(tp, tp + fn, zero_division),
                        _ratio(2 * tp, 2 * tp + fp + fn, zero_division)], axis=1)  # [L, 3]
  macro = [_nanmean(per_label[:, k]) for k in range(3)]
  TP, FP, FN = (np.asarray(x.sum()) for x in (tp, fp, fn))
  micro = [float(_ratio(TP, TP + FP, zero_division)), float(_ratio(TP, TP + FN, zero_division)),
           float(_ratio(2 * TP, 2 * TP + FP + FN, zero_division))]
  return np.concatenate([per_label.ravel(), macro, micro])


def clinical_accuracy(predicted_labels: Sequence[Iterable[str]],
                      true_labels: Sequence[Iterable[str]], label_names: Sequence[str], *,
                      zero_division: float = float("nan"), bootstrap: int = 0,
                      seed: int = 0) -> dict[str, Any]:
  """Per-label and averaged precision, recall and F1 of predicted finding-label sets.

  Each document i has a predicted set (the labels parsed out of its generated impression)
  and a true set; a label is one binary decision per document. Per label, with TP, FP, FN
  counted over documents: precision = TP / (TP + FP), recall = TP / (TP + FN) and
  F1 = 2 TP / (2 TP + FP + FN) (equal to the harmonic mean of precision and recall where
  both are defined, and 0 where TP = 0 but FP + FN > 0: scikit-learn's definition).

  Undefined ratios (a zero denominator) take the value `zero_division`, with scikit-learn's
  meaning of its `zero_division` argument. The default, nan, is sklearn's
  `zero_division=np.nan`: such a value is EXCLUDED from the macro average. In particular a
  label never present in truth nor predicted has nan precision, recall and F1 and does not
  enter macro-F1: it carries no evidence either way, so counting it as 0 (sklearn's default)
  would penalise correctly never predicting it and make macro-F1 depend on which labels a
  split happens to lack, while counting it as 1 would reward it for free. A label present
  in truth but never predicted has recall 0 and F1 0 (its precision nan: left out of the
  macro precision only); one predicted but never true has precision 0, F1 0 (recall nan).
  Pass 0.0 or 1.0 for sklearn's other conventions (then included in the averages).

  Macro = the nan-ignoring mean of the per-label values (nan if none is defined); micro =
  the same ratios of TP, FP, FN pooled over labels.

  Args:
    predicted_labels: N sets (any iterables) of label names.
    true_labels: N sets of label names.
    label_names: the L labels scored, in the order of the keys; a name in a set that is
      not among them is an error.
    zero_division: the value of an undefined ratio (nan, 0.0 or 1.0).
    bootstrap: resamples of the documents for 95% CIs (0: none), through metrics.py.
    seed: bootstrap seed.

  Returns:
    "<label>/precision", "<label>/recall", "<label>/f1", "<label>/support" (number of
    documents where the label is true), "macro/precision", "macro/recall", "macro/f1",
    "micro/precision", "micro/recall", "micro/f1"; floats. With bootstrap > 0 also
    "<key>_ci95": [lo, hi] for every key but the supports (documents resampled jointly).
  """
  names = list(label_names)
  if len(set(names)) != len(names):
    raise ValueError(f"label_names has duplicates: {names}.")
  if not (math.isnan(zero_division) or zero_division in (0.0, 1.0)):
    raise ValueError(f"zero_division must be nan, 0.0 or 1.0, got {zero_division}.")
  predicted_labels, true_labels = list(predicted_labels), list(true_labels)
  if len(predicted_labels) != len(true_labels):
    raise ValueError(f"{len(predicted_labels)} predicted label sets but {len(true_labels)} "
                     "true ones.")
  index = {n: k for k, n in enumerate(names)}
  pred = _label_matrix(predicted_labels, index, "predicted_labels")
  true = _label_matrix(true_labels, index, "true_labels")
  keys = [f"{n}/{m}" for n in names for m in ("precision", "recall", "f1")]
  keys += [f"{a}/{m}" for a in ("macro", "micro") for m in ("precision", "recall", "f1")]
  fn = lambda p, t: _prf(p, t, zero_division)
  result = metrics_lib.with_intervals(keys, fn(pred, true), fn, [pred, true], bootstrap, seed)
  for n, support in zip(names, true.sum(axis=0)):
    result[f"{n}/support"] = float(support)
  return result
