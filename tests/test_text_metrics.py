"""Tests of the generation, retrieval and zero-shot metrics (text_metrics.py, retrieval.py)
against hand examples and independent plain-Python implementations of the scores."""
import math
import statistics
import sys
from collections import Counter

import numpy as np
import pytest

from medguide_jax.evaluation import retrieval as rt
from medguide_jax.evaluation import text_metrics as tm

pytest.importorskip("pycocoevalcap")

NAN = float("nan")


def _same(a, b, tol=1e-6):
  """Equal floats, nan equal to nan."""
  if isinstance(a, float) and math.isnan(a):
    return isinstance(b, float) and math.isnan(b)
  return abs(a - b) <= tol


# ---------------------------------------------------------------------------------------------
# Independent implementations of the scores, written from their definitions as pycocoevalcap
# defines them (corpus BLEU with 'closest' reference length and its 1e-15 / 1e-9 guards;
# ROUGE-L from the LCS with beta = 1.2 and max P, max R over references; CIDEr-D as a clipped
# tf-idf cosine with a Gaussian length penalty, sigma = 6, x10).
# ---------------------------------------------------------------------------------------------

def _ngrams(tokens, n):
  return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _bleu(hyps, refss, max_n=4):
  tiny, small = 1e-15, 1e-9
  matched, total = [0] * max_n, [0] * max_n
  hyp_len = ref_len = 0
  for hyp, refs in zip(hyps, refss):
    hyp_len += len(hyp)
    # closest reference length; on equal distance the shorter one
    ref_len += sorted((abs(len(r) - len(hyp)), len(r)) for r in refs)[0][1]
    for n in range(1, max_n + 1):
      ref_max = Counter()
      for r in refs:
        for g, c in _ngrams(r, n).items():
          ref_max[g] = max(ref_max[g], c)
      matched[n - 1] += sum(min(c, ref_max[g]) for g, c in _ngrams(hyp, n).items())
      total[n - 1] += max(0, len(hyp) - n + 1)
  precisions = [(m + tiny) / (t + small) for m, t in zip(matched, total)]
  ratio = (hyp_len + tiny) / (ref_len + small)
  penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
  return [math.prod(precisions[:n]) ** (1 / n) * penalty for n in range(1, max_n + 1)]


def _lcs(a, b):
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
  return table[-1][-1]


def _rouge_l(hyps, refss, beta=1.2):
  scores = []
  for hyp, refs in zip(hyps, refss):   # non-empty texts only
    p = max(_lcs(hyp, r) / len(hyp) for r in refs)
    r = max(_lcs(hyp, r) / len(r) for r in refs)
    scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0)
  return sum(scores) / len(scores)


def _cider_d(hyps, refss, sigma=6.0):
  num_docs = len(hyps)
  df = Counter()
  for refs in refss:
    df.update({g for r in refs for n in range(1, 5) for g in _ngrams(r, n)})

  def tfidf(tokens, n):
    return {g: c * (math.log(num_docs) - math.log(max(1.0, df[g])))
            for g, c in _ngrams(tokens, n).items()}

  def norm(v):
    return math.sqrt(sum(x * x for x in v.values()))

  doc_scores = []
  for hyp, refs in zip(hyps, refss):
    per_order = []
    for n in range(1, 5):
      h, total = tfidf(hyp, n), 0.0
      for ref in refs:
        r = tfidf(ref, n)
        dot = sum(min(w, r.get(g, 0.0)) * r.get(g, 0.0) for g, w in h.items())  # clipped
        cos = dot / (norm(h) * norm(r)) if norm(h) and norm(r) else dot
        delta = len(hyp) - len(ref)
        total += cos * math.exp(-delta**2 / (2 * sigma**2))
      per_order.append(total / len(refs))
    doc_scores.append(10.0 * sum(per_order) / 4)
  return sum(doc_scores) / len(doc_scores)


PREDICTIONS = [
    "The heart size is normal. The lungs are clear.",
    "No acute cardiopulmonary process.",
    "Small right pleural effusion with adjacent atelectasis.",
    "Mild cardiomegaly, no pneumothorax.",
    "Left lower lobe opacity, may represent pneumonia.",
    "Heart size is normal.",
]
REFERENCES = [
    "Heart size is normal and the lungs are clear.",
    ["No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process."],
    ["Small right pleural effusion.", "Right pleural effusion with atelectasis at the base."],
    "Cardiomegaly without pneumothorax.",
    "Opacity in the left lower lobe may represent pneumonia or atelectasis.",
    # 4 prediction tokens, references of 5 and 3: equally close, 'closest' takes 3
    ["The heart size is normal.", "Heart size normal."],
]


def _independent(predictions, references):
  hyps = [tm.tokenize_for_scoring(p) for p in predictions]
  refss = [[tm.tokenize_for_scoring(r) for r in ([refs] if isinstance(refs, str) else refs)]
           for refs in references]
  bleu = _bleu(hyps, refss)
  return {"bleu_1": bleu[0], "bleu_2": bleu[1], "bleu_3": bleu[2], "bleu_4": bleu[3],
          "rouge_l": _rouge_l(hyps, refss), "cider": _cider_d(hyps, refss)}


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, tokens", [
    ("No acute cardiopulmonary process.", ["no", "acute", "cardiopulmonary", "process"]),
    ("Heart size is normal, lungs are clear!", ["heart", "size", "is", "normal", "lungs",
                                                "are", "clear"]),
    ("Right-sided effusion (small); x-ray and/or CT.",
     ["right-sided", "effusion", "small", "x-ray", "and/or", "ct"]),
    ("Nodule 2.5 cm, 1,000 at 10:30; 1/2 of T11-12.",
     ["nodule", "2.5", "cm", "1,000", "at", "10:30", "1/2", "of", "t11-12"]),
    ("5% >3cm + 2 = #4", ["5", "%", ">", "3cm", "+", "2", "=", "#", "4"]),
    ("The patient's heart isn't enlarged", ["the", "patient", "'s", "heart", "is", "n't",
                                             "enlarged"]),
    ("The patient\u2019s lungs", ["the", "patient", "'s", "lungs"]),
    ("Effusion \u2014 small \u201cquoted\u201d -- x- ...", ["effusion", "small", "quoted", "x"]),
    ("e.g. Dr. Smith", ["e", "g", "dr", "smith"]),
    ("", []), ("  ... ; -- ", []), (None, []),
])
def test_tokenize_for_scoring_hand_examples(text, tokens):
  assert tm.tokenize_for_scoring(text) == tokens


def test_deid_is_one_token_in_any_case_and_when_glued():
  assert tm.tokenize_for_scoring("Seen by [DEID] on [DEID].") == ["seen", "by", "[deid]", "on",
                                                                  "[deid]"]
  assert tm.tokenize_for_scoring("x-[DEID]. [deid] [Deid]") == ["x", "[deid]", "[deid]",
                                                                "[deid]"]
  # Not a word 'deid': the brackets are kept, and a bare 'deid' stays a word.
  assert tm.tokenize_for_scoring("deid [deid]") == ["deid", "[deid]"]
  # Stray brackets are punctuation.
  assert tm.tokenize_for_scoring("[ DEID ] [x]") == ["deid", "x"]


# ---------------------------------------------------------------------------------------------
# Caption scores
# ---------------------------------------------------------------------------------------------

def test_caption_scores_match_independent_implementation():
  got = tm.caption_scores(PREDICTIONS, REFERENCES)
  want = _independent(PREDICTIONS, REFERENCES)
  assert set(got) == set(want)
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-6), k
  assert 0 < got["bleu_4"] < got["bleu_1"] < 1 and got["cider"] > 0


def test_caption_scores_match_on_subsets_and_reordering():
  for idx in ([0, 1], [2, 3, 4], [5, 0, 3, 1]):
    preds = [PREDICTIONS[i] for i in idx]
    refs = [REFERENCES[i] for i in idx]
    got, want = tm.caption_scores(preds, refs), _independent(preds, refs)
    for k in want:
      assert got[k] == pytest.approx(want[k], abs=1e-6), (idx, k)


def test_caption_scores_hand_example():
  # 'the heart is normal' vs 'the heart size is normal' (c = 4, r = 5):
  # unigrams 4/4, bigrams 2/3 ('the heart', 'is normal'); BP = exp(1 - 5/4).
  got = tm.caption_scores(["The heart is normal."], ["The heart size is normal."])
  bp = math.exp(-0.25)
  assert got["bleu_1"] == pytest.approx(bp, abs=1e-6)
  assert got["bleu_2"] == pytest.approx(math.sqrt(2 / 3) * bp, abs=1e-6)
  # LCS 4: P = 1, R = 4/5, F = 2.44 * 0.8 / (0.8 + 1.44) = 0.87142857...
  assert got["rouge_l"] == pytest.approx(2.44 * 0.8 / 2.24, abs=1e-9)
  # One document: CIDEr's IDF is log(1) - log(1) = 0 for everything, so it is reported as nan.
  assert math.isnan(got["cider"])


def test_identical_prediction_and_reference_score_one():
  texts = ["No acute cardiopulmonary process.", "Small right pleural effusion."]
  got = tm.caption_scores(texts, texts)
  for n in range(1, 5):
    assert got[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
  assert got["rouge_l"] == 1.0
  # Punctuation and case do not matter.
  assert tm.caption_scores(["no acute cardiopulmonary process"], [texts[0]])["bleu_4"] == \
      pytest.approx(1.0, abs=1e-6)


def test_cider_hand_values():
  # Two documents, disjoint vocabularies, prediction = reference: every n-gram has df 1, so
  # idf = log 2 for all; orders 1 and 2 have cosine 1, orders 3 and 4 no n-grams (0):
  # 10 * (1 + 1 + 0 + 0) / 4 = 5.
  got = tm.caption_scores(["a b", "c d"], ["a b", "c d"])
  assert got["cider"] == pytest.approx(5.0, abs=1e-9)
  # pycocoevalcap's guard with no trigram at all: p_3 = 1e-6, so bleu_3 = (1e-6)^(1/3).
  assert got["bleu_3"] == pytest.approx(0.01, abs=1e-6)
  # All references the same text: every reference n-gram is in every document (idf 0).
  same = tm.caption_scores(["no acute process", "acute process"],
                           ["No acute process.", "No acute process."])
  assert same["cider"] == 0.0


def test_empty_predictions_do_not_fail():
  got = tm.caption_scores(["", "..."], ["Heart normal.", "No effusion."])
  assert got == {"bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0, "rouge_l": 0.0,
                 "cider": 0.0}
  # One empty prediction among others: no n-grams, its reference length still counted.
  preds = PREDICTIONS[:3] + [None]
  got = tm.caption_scores(preds, REFERENCES[:4])
  hyps = [tm.tokenize_for_scoring(p) for p in preds]
  refss = [[tm.tokenize_for_scoring(r) for r in ([x] if isinstance(x, str) else x)]
           for x in REFERENCES[:4]]
  bleu = _bleu(hyps, refss)
  for n in range(4):
    assert got[f"bleu_{n + 1}"] == pytest.approx(bleu[n], abs=1e-6)
  assert got["rouge_l"] == pytest.approx(_rouge_l(hyps[:3], refss[:3]) * 3 / 4, abs=1e-6)
  assert got["cider"] == pytest.approx(_cider_d(hyps, refss), abs=1e-6)
  # Empty against empty: pycocoevalcap compares two empty strings (ROUGE-L 1); BLEU 0.
  both = tm.caption_scores(["", ""], ["", ""])
  assert both["rouge_l"] == 1.0 and both["bleu_1"] == 0.0 and both["cider"] == 0.0


def test_caption_scores_bad_inputs():
  with pytest.raises(ValueError, match="2 predictions but 1"):
    tm.caption_scores(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="no reference"):
    tm.caption_scores(["a", "b"], ["a", []])
  with pytest.raises(ValueError, match="at least one"):
    tm.caption_scores([], [])
  with pytest.raises(TypeError):
    tm.caption_scores("a b", "a b")


def test_missing_pycocoevalcap_names_the_pip_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)
  with pytest.raises(ImportError, match="pip install pycocoevalcap"):
    tm.caption_scores(["a"], ["a"])


# ---------------------------------------------------------------------------------------------
# Clinical accuracy
# ---------------------------------------------------------------------------------------------

PRED = [{"A"}, {"A", "B"}, set(), {"B", "C"}]
TRUE = [{"A"}, {"B"}, {"A"}, set()]
LABELS = ["A", "B", "C", "D"]


def test_clinical_accuracy_hand_example():
  got = tm.clinical_accuracy(PRED, TRUE, LABELS)
  # A: TP 1, FP 1, FN 1.  B: TP 1, FP 1, FN 0.  C: FP 1 only.  D: never anywhere.
  want = {"A/precision": 0.5, "A/recall": 0.5, "A/f1": 0.5, "A/support": 2.0,
          "B/precision": 0.5, "B/recall": 1.0, "B/f1": 2 / 3, "B/support": 1.0,
          "C/precision": 0.0, "C/recall": NAN, "C/f1": 0.0, "C/support": 0.0,
          "D/precision": NAN, "D/recall": NAN, "D/f1": NAN, "D/support": 0.0,
          "macro/precision": 1 / 3, "macro/recall": 0.75, "macro/f1": (0.5 + 2 / 3 + 0) / 3,
          # pooled: TP 2, FP 3, FN 1
          "micro/precision": 0.4, "micro/recall": 2 / 3, "micro/f1": 4 / 8}
  assert set(got) == set(want)
  for k, v in want.items():
    assert _same(got[k], v, 1e-12), (k, got[k], v)


def test_clinical_accuracy_zero_division_conventions():
  zero = tm.clinical_accuracy(PRED, TRUE, LABELS, zero_division=0.0)
  assert zero["D/f1"] == 0.0 and zero["C/recall"] == 0.0
  assert zero["macro/f1"] == pytest.approx((0.5 + 2 / 3 + 0 + 0) / 4)
  assert zero["macro/recall"] == pytest.approx((0.5 + 1 + 0 + 0) / 4)
  one = tm.clinical_accuracy(PRED, TRUE, LABELS, zero_division=1.0)
  assert one["D/f1"] == 1.0 and one["C/f1"] == 0.0   # C has FP: its F1 is 0, not undefined
  assert one["macro/f1"] == pytest.approx((0.5 + 2 / 3 + 0 + 1) / 4)
  with pytest.raises(ValueError, match="zero_division"):
    tm.clinical_accuracy(PRED, TRUE, LABELS, zero_division=0.5)


def test_clinical_accuracy_perfect_and_errors():
  got = tm.clinical_accuracy([{"A"}, set()], [{"A"}, set()], ["A", "B"])
  assert got["A/f1"] == 1.0 and got["macro/f1"] == 1.0 and math.isnan(got["B/f1"])
  with pytest.raises(ValueError, match="unknown label 'Z'"):
    tm.clinical_accuracy([{"Z"}], [set()], ["A"])
  with pytest.raises(ValueError, match="2 predicted label sets but 1"):
    tm.clinical_accuracy([set(), set()], [set()], ["A"])
  with pytest.raises(TypeError):
    tm.clinical_accuracy(["A"], [{"A"}], ["A"])


def test_clinical_accuracy_bootstrap_intervals():
  rng = np.random.default_rng(0)
  pred = [{n for n in LABELS if rng.random() < 0.4} for _ in range(40)]
  true = [{n for n in LABELS if rng.random() < 0.4} for _ in range(40)]
  got = tm.clinical_accuracy(pred, true, LABELS, bootstrap=50, seed=3)
  again = tm.clinical_accuracy(pred, true, LABELS, bootstrap=50, seed=3)
  assert got == again
  assert "macro/f1_ci95" in got and "A/support_ci95" not in got
  lo, hi = got["macro/f1_ci95"]
  assert lo <= got["macro/f1"] <= hi


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------

SIM = np.array([[0.9, 0.1, 0.5],
                [0.8, 0.7, 0.2],
                [0.1, 0.3, 0.2]])


def test_recall_at_k_hand_example():
  got = rt.recall_at_k(SIM, ks=(1, 2, 5))
  # i2t ranks: image 0 -> 1; image 1 -> 2 (text 0 scores 0.8 > 0.7); image 2 -> 2 (text 1).
  # t2i ranks: text 0 -> 1; text 1 -> 1; text 2 -> 3 (image 0 at 0.5, image 1 TIES at 0.2
  # and is put first).
  assert got == {"i2t/recall@1": pytest.approx(1 / 3), "i2t/recall@2": 1.0,
                 "i2t/recall@5": 1.0, "i2t/median_rank": 2.0,
                 "t2i/recall@1": pytest.approx(2 / 3), "t2i/recall@2": pytest.approx(2 / 3),
                 "t2i/recall@5": 1.0, "t2i/median_rank": 1.0}


def test_recall_at_k_groups_make_duplicates_correct():
  # Texts 1 and 2 identical: image 1 and image 2 each accept text 1 or text 2.
  got = rt.recall_at_k(SIM, ks=(1,), groups=[0, 1, 1])
  # i2t: image 0 -> 1; image 1 -> best correct 0.7, text 0 above -> 2; image 2 -> 0.3 -> 1.
  # t2i: text 0 -> 1; text 1 -> best correct 0.7 -> 1; text 2 -> best 0.2, image 0 (0.5) -> 2.
  assert got["i2t/recall@1"] == pytest.approx(2 / 3)
  assert got["t2i/recall@1"] == pytest.approx(2 / 3)
  texts = ["Heart normal.", "No acute process.", "no acute process"]
  by_text = rt.recall_at_k(SIM, ks=(1,), groups=rt.identical_text_groups(texts))
  assert by_text == got
  np.testing.assert_array_equal(rt.identical_text_groups(texts), [0, 1, 1])
  # The same through an explicit mask.
  mask = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 1]], bool)
  assert rt.recall_at_k(SIM, ks=(1,), correct=mask) == got


def test_recall_at_k_strict_protocol_penalises_exact_duplicates():
  # Two identical texts (identical embeddings, identical similarities): without groups the
  # duplicate ties with the true text and is ranked first (pessimistic ties).
  sim = np.array([[0.9, 0.9, 0.1], [0.9, 0.9, 0.1], [0.1, 0.1, 0.8]])
  strict = rt.recall_at_k(sim, ks=(1, 2))
  assert strict["i2t/recall@1"] == pytest.approx(1 / 3)
  assert strict["i2t/recall@2"] == 1.0
  grouped = rt.recall_at_k(sim, ks=(1,), groups=["a", "a", "b"])
  assert grouped["i2t/recall@1"] == 1.0 and grouped["t2i/recall@1"] == 1.0


def test_recall_at_k_constant_similarity_gets_no_credit():
  got = rt.recall_at_k(np.zeros((4, 4)), ks=(1, 3, 4))
  assert got["i2t/recall@1"] == 0.0 and got["i2t/recall@3"] == 0.0
  assert got["i2t/recall@4"] == 1.0 and got["t2i/median_rank"] == 4.0


def test_recall_at_k_rectangular_study_groups():
  # Three images of two studies, one report per study.
  sim = np.array([[0.2, 0.9],    # image of study s1, closer to s2's report: rank 2
                  [0.8, 0.1],    # s1 -> rank 1
                  [0.3, 0.6]])   # s2 -> rank 1
  got = rt.recall_at_k(sim, ks=(1,), groups=["s1", "s1", "s2"], text_groups=["s1", "s2"])
  assert got["i2t/recall@1"] == pytest.approx(2 / 3)
  # t2i: report s1 -> best correct image 0.8, incorrect 0.3 -> 1; report s2 -> 0.6, but
  # image 0 (s1) has 0.9 -> 2.
  assert got["t2i/recall@1"] == 0.5
  assert got["i2t/median_rank"] == 1.0 and got["t2i/median_rank"] == 1.5


def test_recall_at_k_bad_inputs():
  with pytest.raises(ValueError, match="needs groups"):
    rt.recall_at_k(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="no correct match"):
    rt.recall_at_k(np.zeros((2, 2)), groups=["a", "b"], text_groups=["a", "a"])
  with pytest.raises(ValueError, match="non-finite"):
    rt.recall_at_k(np.array([[np.nan]]))
  with pytest.raises(ValueError, match=">= 1"):
    rt.recall_at_k(np.eye(2), ks=(0,))
  with pytest.raises(ValueError, match="not both"):
    rt.recall_at_k(np.eye(2), groups=[0, 1], correct=np.eye(2))


# ---------------------------------------------------------------------------------------------
# Zero-shot classification
# ---------------------------------------------------------------------------------------------

def _z(values):
  mean, std = statistics.fmean(values), statistics.pstdev(values)
  return [(v - mean) / std for v in values]


def test_zero_shot_scores_hand_example():
  glob = np.array([[0.2, 0.4, 0.1],
                   [0.5, 0.3, 0.6],
                   [0.1, 0.0, 0.3]])
  got = rt.zero_shot_scores(glob, None, np.array([0, 0, 1]))
  # Class 0 = max of prompts 0, 1: (0.4, 0.5, 0.1); class 1 = prompt 2: (0.1, 0.6, 0.3);
  # each column standardised over the images with the population std.
  want = np.stack([_z([0.4, 0.5, 0.1]), _z([0.1, 0.6, 0.3])], axis=1)
  np.testing.assert_allclose(got, want, atol=1e-12)
  np.testing.assert_allclose(got.mean(0), 0, atol=1e-12)
  np.testing.assert_allclose(got.std(0), 1, atol=1e-12)


def test_zero_shot_scores_average_local_and_global_before_the_max():
  glob = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  local = np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
  # Per prompt (l + g) / 2: image 0 (0.5, 1.0, 0.0), image 1 (0.0, 0.0, 2.0); class 0 =
  # max of prompts 0, 1 -> (1.0, 0.0) (max-then-average would give 1.5 for image 0).
  got = rt.zero_shot_scores(glob, local, np.array([0, 0, 1]))
  np.testing.assert_allclose(got, [[1.0, -1.0], [-1.0, 1.0]])   # z of (1, 0) and (0, 2)
  one = rt.zero_shot_scores(glob[:1], local[:1], np.array([0, 0, 1]))
  np.testing.assert_allclose(one, [[1.0, 0.0]])   # one image: not normalised (GLoRIA)


def test_zero_shot_scores_constant_column_and_errors():
  glob = np.array([[0.3, 0.1], [0.3, 0.5]])
  got = rt.zero_shot_scores(glob, None, np.array([0, 1]))
  np.testing.assert_allclose(got, [[0.0, -1.0], [0.0, 1.0]])
  with pytest.raises(ValueError, match="no prompt"):
    rt.zero_shot_scores(glob, None, np.array([0, 2]))
  with pytest.raises(ValueError, match="no prompt"):
    rt.zero_shot_scores(glob, None, np.array([0, 0]), num_classes=2)
  with pytest.raises(ValueError, match="differ in shape"):
    rt.zero_shot_scores(glob, np.zeros((2, 3)), np.array([0, 1]))
  with pytest.raises(ValueError, match="ints"):
    rt.zero_shot_scores(glob, None, np.array([0.0, 1.0]))


def test_zero_shot_metrics_multiclass_hand_example():
  scores = np.array([[3, 1, 0], [1, 2, 0], [0, 1, 2], [2, 0, 0], [0, 0, 9]], float)
  labels = np.array([0, 1, 2, 2, -1])   # the last image is unlabelled: left out
  got = rt.zero_shot_metrics(scores, labels, ["a", "b", "c"], multilabel=False)
  # AUC a: positive 3 vs 1, 0, 2 -> 1. b: 2 vs 1, 1, 0 -> 1.
  # c: positives 2, 0 vs negatives 0, 0 -> (1 + 1 + 0.5 + 0.5) / 4 = 0.75.
  # argmax (0, 1, 2, 0): accuracy 3/4; recalls a 1, b 1, c 1/2 -> balanced 5/6.
  assert got == {"a/auc": 1.0, "b/auc": 1.0, "c/auc": 0.75,
                 "mean/auc": pytest.approx(2.75 / 3), "accuracy": 0.75,
                 "balanced_accuracy": pytest.approx(5 / 6)}


def test_zero_shot_metrics_multilabel_hand_example():
  scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.3], [0.6, 0.5]])
  labels = np.array([[1, 0], [0, 0], [-1, 0], [0, 0]])
  got = rt.zero_shot_metrics(scores, labels, ["x", "y"], multilabel=True)
  # x over rows 0, 1, 3: positive 0.9 vs 0.2, 0.6 -> 1. y: no positive -> nan, not in mean.
  assert got["x/auc"] == 1.0 and math.isnan(got["y/auc"]) and got["mean/auc"] == 1.0
  assert set(got) == {"x/auc", "y/auc", "mean/auc"}


def test_zero_shot_metrics_bootstrap_and_pipeline():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=60)
  glob = rng.normal(size=(60, 6)) + 0.8 * np.repeat(np.eye(3)[labels], 2, axis=1)
  scores = rt.zero_shot_scores(glob, glob[:, ::-1] * 0.1, np.array([0, 0, 1, 1, 2, 2]))
  got = rt.zero_shot_metrics(scores, labels, ["a", "b", "c"], multilabel=False,
                             bootstrap=40, seed=1)
  assert got == rt.zero_shot_metrics(scores, labels, ["a", "b", "c"], multilabel=False,
                                     bootstrap=40, seed=1)
  for key in ("a/auc", "mean/auc", "accuracy", "balanced_accuracy"):
    lo, hi = got[f"{key}_ci95"]
    assert lo <= got[key] <= hi
  assert got["mean/auc"] > 0.6
  with pytest.raises(ValueError, match=r"must be \[60\]"):
    rt.zero_shot_metrics(scores, labels[:, None], ["a", "b", "c"], multilabel=False)
  with pytest.raises(ValueError, match="0, 1 or -1"):
    rt.zero_shot_metrics(scores, np.full((60, 3), 2), ["a", "b", "c"], multilabel=True)
