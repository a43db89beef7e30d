"""Visual question answering: the 'cxr_vqa' layout and examples, synthetic_cxr_vqa (its images
are synthetic_cxr's, its answers the studies' labels, its closed answers balanced, and the
question-only baseline it leaves), VQA-RAD from a fake official release, VqaNet and
closed/open accuracy.

The answer checks and the baseline probe are independent of the generator: they read the
records (question and answer texts) and synthetic_cxr's record of the same study (its
impression, read by the report grammar `parse_labels`, and its findings text). Run as a
script to re-measure synthetic_vqa's docstring figures on the default config:

    python -m tests.test_vqa [--seed 0]     (from the repository root)
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from data_prep import build
from data_prep import cxr_vqa
from medguide_jax.data import builders
from medguide_jax.data import images
from medguide_jax.data import sources
from medguide_jax.data import synthetic_cxr as sc
from medguide_jax.data import synthetic_vqa as sv
from medguide_jax.data import tokenizer as tokenizer_lib
from medguide_jax.data import vqa
from medguide_jax.evaluation import vqa as vqa_eval
from medguide_jax.models import hybridmed
from medguide_jax.models import vqa as vqa_model

SPLITS = ("train", "validation", "test")
# The probe's in-memory config: questions only (no pixels), so it is fast.
PROBE_CONFIG = {"num_studies": (1500, 0, 800), "seed": 0}


def text_records(source) -> list[dict]:
  """The text fields of every record of a data source (bytes -> str)."""
  out = []
  for i in range(len(source)):
    r = source[i]
    out.append({k: (r[k] if k == "image" else images.text(r[k])) for k in r})
  return out


# --------------------------------------------------------------------------- the layout
def test_answers_are_normalised_for_comparison():
  assert vqa.normalise_answer("Yes") == "yes"
  assert vqa.normalise_answer("  Right   Lower lobe. ") == "right lower lobe"
  assert vqa.normalise_answer(b"No.") == "no"
  assert vqa.normalise_answer("3.5") == "3.5"   # only a trailing '.' goes
  assert vqa.normalise_answer("x ray .") == "x ray"


def test_the_vocabulary_is_most_frequent_first_and_ties_by_text():
  vocab = vqa.answer_vocabulary(["no", "Yes", "yes", "b", "a", "no ", "yes."])
  assert vocab == ["yes", "no", "a", "b"]
  assert vqa.answer_index({"answers": vocab}) == {"yes": 0, "no": 1, "a": 2, "b": 3}
  with pytest.raises(ValueError, match="answers"):
    vqa.answer_index({"tokenizer": "x"})


def test_a_record_with_a_bad_answer_type_names_it():
  with pytest.raises(ValueError, match=r"q7.*maybe"):
    vqa.record(image=b"", question="q", answer="a", answer_type="maybe", question_type="",
               image_id="i", patient="p", id="q7")


def test_both_builders_are_the_vqa_layout():
  for name in ("synthetic_cxr_vqa", "synthetic_cxr_vqa:tiny", "vqa_rad"):
    assert sources.layout(name) == vqa.LAYOUT


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def question_tokenizer():
  texts = ["is there a left pleural effusion?", "is the heart enlarged?",
           "where is the opacity?"] * 3
  return tokenizer_lib.ReportTokenizer(tokenizer_lib.train(texts), max_len=32)


def test_an_example_has_the_image_question_and_answer_class(question_tokenizer):
  image = np.zeros((40, 40), np.uint8)
  image[:, :20] = 200   # bright on the image's left
  rec = vqa.record(image=_png(image), question="Is the heart   enlarged?", answer="Yes.",
                   answer_type="closed", question_type="presence", image_id="i",
                   patient="p", id="i/q0")
  index = {"yes": 0, "no": 1}
  ex = vqa.vqa_example(rec, None, image_size=16, tokenizer=question_tokenizer,
                       answer_index=index, question_len=12)
  assert ex["image"].shape == (16, 16, 1) and ex["image"].dtype == np.float32
  assert ex["question_ids"].shape == (12,) and ex["question_ids"].dtype == np.int32
  assert ex["question_mask"].dtype == bool
  # [CLS] is / the / heart / enlarged / ? [SEP]: 7 real ids.
  assert ex["question_mask"].sum() == 7 and ex["question_ids"][0] == question_tokenizer.cls_id
  assert ex["answer"] == 0 and ex["answer"].dtype == np.int32 and ex["closed"]
  # DEFAULT_NORM (0.5, 0.25) of the pixels: 200/255 on the left, 0 on the right.
  np.testing.assert_allclose(ex["image"][8, 2, 0], (200 / 255 - 0.5) / 0.25, atol=1e-5)
  np.testing.assert_allclose(ex["image"][8, 13, 0], (0 - 0.5) / 0.25, atol=1e-5)
  # An answer outside the training vocabulary is class -1; an open question is not closed.
  other = {**rec, "answer": "maybe", "answer_type": "open"}
  ex = vqa.vqa_example(other, None, image_size=16, tokenizer=question_tokenizer,
                       answer_index=index, question_len=12)
  assert ex["answer"] == -1 and not ex["closed"]
  # Training augmentation never mirrors: the bright side stays on the image's left.
  for seed in range(12):
    ex = vqa.vqa_example(rec, np.random.default_rng(seed), image_size=16,
                         tokenizer=question_tokenizer, answer_index=index, question_len=12)
    assert ex["image"][:, :6].mean() > ex["image"][:, 10:].mean(), seed


# --------------------------------------------------------------------------- synthetic
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """synthetic_cxr_vqa:tiny and synthetic_cxr:tiny, built into one fresh data dir."""
  data_dir = tmp_path_factory.mktemp("vqa_data")
  qa = builders.prepare("synthetic_cxr_vqa:tiny", data_dir=data_dir)
  cxr = builders.prepare("synthetic_cxr:tiny", data_dir=data_dir)
  return ({s: text_records(qa.as_data_source(split=s)) for s in SPLITS},
          {s: text_records(cxr.as_data_source(split=s)) for s in SPLITS}, qa)


def test_synthetic_images_are_synthetic_cxrs_of_the_same_study(tiny):
  qa, cxr, builder = tiny
  for split in SPLITS:
    by_study = {r["study"]: r for r in cxr[split]}
    assert len(qa[split]) > 2 * len(by_study)   # several questions per study
    asked = {r["image_id"] for r in qa[split]}
    assert asked <= set(by_study) and len(asked) >= 0.85 * len(by_study)
    for r in qa[split]:
      assert r["image"] == by_study[r["image_id"]]["image"], r["id"]
      assert r["patient"] == r["image_id"] and r["id"].startswith(r["image_id"] + "/q")
  ids = [r["id"] for s in SPLITS for r in qa[s]]
  assert len(ids) == len(set(ids))
  meta = builder.info.metadata
  assert meta["image_size"] == 64 and meta["answers"][0] in ("yes", "no", "none")
  tok = tokenizer_lib.from_metadata(dict(meta))
  assert tok.sha256 == meta["tokenizer_sha256"]
  assert "[UNK]" not in tok.tokens(qa["train"][0]["question"])


# An independent reading of a question: (kind, side, zone) from its words.
_SIDE = re.compile(r"\b(right|left)\b")
_ZONE = {"upper": "upper", "mid": "middle", "middle": "middle", "lower": "lower",
         "lingula": "middle"}


def _cells(labels: frozenset) -> list[tuple[str, str]]:
  zones = ("upper", "middle", "lower")
  cells = [tuple(n.split("_")[1:]) for n in labels if n.startswith("opacity_")]
  return sorted(cells, key=lambda c: (zones.index(c[1]), ("right", "left").index(c[0])))


def _lobe(side: str, zone: str) -> str:
  return "lingula" if (side, zone) == ("left", "middle") else f"{side} {zone} lobe"


def _sides(labels: frozenset, kind: str) -> str:
  sides = [s for s in ("right", "left") if f"{kind}_{s}" in labels]
  return {0: "none", 1: sides[0] if sides else "", 2: "both"}[len(sides)]


def expected_answer(question: str, labels: frozenset, findings: str) -> str | None:
  """The answer a reader of the report gives: labels from the impression by the grammar,
  device words and size words from the findings; None when the report cannot say."""
  q, f = question.lower(), findings.lower()
  side = (_SIDE.search(q) or [None])[0] if _SIDE.search(q) else None
  tube, line = "endotracheal" in f or "et tube" in f, "catheter" in f or "central line" in f
  yes = lambda b: "yes" if b else "no"
  if q.startswith(("where is the opacity", "which lobe")):
    cells = _cells(labels)
    if len(cells) == 2 and cells[0][1] == cells[1][1] and cells[0][1] != "middle":
      return f"both {cells[0][1]} lobes"
    return " and ".join(_lobe(*c) for c in cells) or "none"
  if "which side" in q or q.startswith(("on which side", "where is the pneumothorax")):
    return _sides(labels, "pneumothorax" if "pneumothorax" in q else "effusion")
  if "support device" in q or "lines or tubes" in q:
    return "both" if tube and line else ("endotracheal tube" if tube else
                                         "central venous catheter" if line else "none")
  if q.startswith(("how large is the heart", "what is the heart size")):
    return "enlarged" if "cardiomegaly" in labels else "normal"
  if q.startswith("how large"):
    return None   # a size: checked against its finding's presence below
  if "opacity in" in q or "consolidation in" in q:
    zone = next(_ZONE[w] for w in re.findall(r"[a-z]+", q) if w in _ZONE)
    side = side or "left"   # 'the lingula'
    return yes(sc.opacity_label(side, zone) in labels)
  if "effusion" in q or "pleural space" in q:
    return yes(f"effusion_{side}" in labels)
  if "pneumothorax" in q:
    return yes(f"pneumothorax_{side}" in labels)
  if "enlarged" in q or "cardiomegaly" in q:
    return yes("cardiomegaly" in labels)
  if "normal size" in q or "size normal" in q:
    return yes("cardiomegaly" not in labels)
  if "endotracheal" in q:
    return yes(tube)
  if "central" in q:
    return yes(line)
  if "lungs" in q:
    return yes(not _cells(labels))
  if "costophrenic" in q:
    return yes(_sides(labels, "effusion") == "none")
  raise AssertionError(f"a question the test cannot read: {question!r}")


def test_synthetic_answers_agree_with_the_studys_report(tiny):
  qa, cxr, _ = tiny
  checked = 0
  for split in SPLITS:
    by_study = {r["study"]: r for r in cxr[split]}
    for r in qa[split]:
      study = by_study[r["image_id"]]
      labels = sc.parse_labels(study["impression"])
      want = expected_answer(r["question"], labels, study["findings"])
      got = r["answer"]
      assert r["answer_type"] == ("closed" if got in ("yes", "no") else "open"), r
      if want is None:   # how large is the <side> effusion / the pneumothorax
        kind = "pneumothorax" if "pneumothorax" in r["question"] else "effusion"
        side = _SIDE.search(r["question"])
        assert got in ("small", "moderate"), r
        assert (_sides(labels, kind) != "none" if side is None
                else f"{kind}_{side[0]}" in labels), r
      elif want == "enlarged":
        assert got in ("mildly enlarged", "moderately enlarged"), r
      else:
        assert got == want, (r, sorted(labels))
      checked += 1
  assert checked == sum(len(v) for v in qa.values())


def test_closed_answers_are_about_half_yes_over_a_split_and_per_question():
  records = sv.split_questions(PROBE_CONFIG, "train")
  closed = [r for r in records if r["answer_type"] == "closed"]
  yes = np.mean([r["answer"] == "yes" for r in closed])
  assert 0.46 < yes < 0.54, yes
  assert 0.4 < len(closed) / len(records) < 0.6
  # Per question text: no majority answer to learn without the image.
  by_text = collections.defaultdict(list)
  for r in closed:
    by_text[r["question"]].append(r["answer"] == "yes")
  shares = {q: np.mean(v) for q, v in by_text.items() if len(v) >= 50}
  assert len(shares) >= 20
  assert all(0.3 < s < 0.7 for s in shares.values()), shares


def test_the_tiny_summary_counts_the_records(tiny):
  qa, _, builder = tiny
  summary = builder.info.metadata["summary"]["splits"]
  for split in SPLITS:
    assert summary[split]["questions"] == len(qa[split])
    assert summary[split]["closed"] + summary[split]["open"] == len(qa[split])
  vocab = set(builder.info.metadata["answers"])
  assert vocab == {r["answer"] for r in qa["train"]}
  assert summary["test"]["out_of_vocabulary"]["count"] == sum(
      r["answer"] not in vocab for r in qa["test"])


def question_only_baseline(train: Sequence[Mapping], test: Sequence[Mapping]) -> dict:
  """The majority training answer of each question text (of its answer type when the text
  is new), scored on test: the accuracy a model gets without looking at the image."""
  by_text = collections.defaultdict(collections.Counter)
  by_type = collections.defaultdict(collections.Counter)
  for r in train:
    by_text[r["question"]][r["answer"]] += 1
    by_type[r["answer_type"]][r["answer"]] += 1
  top = lambda c: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
  pred = [top(by_text[r["question"]] if r["question"] in by_text else by_type[r["answer_type"]])
          for r in test]
  correct = np.asarray([p == r["answer"] for p, r in zip(pred, test)])
  closed = np.asarray([r["answer_type"] == "closed" for r in test])
  return {"closed": float(correct[closed].mean()), "open": float(correct[~closed].mean()),
          "all": float(correct.mean())}


def test_a_question_only_baseline_is_near_chance():
  train = sv.split_questions(PROBE_CONFIG, "train")
  test = sv.split_questions(PROBE_CONFIG, "test")
  base = question_only_baseline(train, test)
  # Closed: about a coin; open: 'none' for about half of each template's answers.
  assert 0.4 < base["closed"] < 0.6, base
  assert 0.3 < base["open"] < 0.6, base
  # The probe itself works: a 'baseline' told the answers would be exact.
  assert question_only_baseline(test, test)["closed"] > base["closed"]


# --------------------------------------------------------------------------- VQA-RAD
def _entry(qid, image, question, answer, kind, phrase, organ="CHEST", qtype="PRES"):
  return {"qid": qid, "image_name": image, "question": question, "answer": answer,
          "answer_type": kind, "question_type": qtype, "phrase_type": phrase,
          "image_organ": organ, "evaluation": "not evaluated"}


def hash_unit(key: str) -> float:
  """The documented split rule's number: SHA-256's first 8 bytes / 2**64."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0 ** 64


def _names() -> tuple[list[str], list[str]]:
  """Image names hashing into validation (< 0.1) and out of it."""
  low, high = [], []
  for n in range(1000, 3000):
    name = f"synpic{n}.jpg"
    (low if hash_unit(f"vqa_rad:{name}") < 0.1 else high).append(name)
  return low, high


def write_release(root, entries: list[dict], images_present: Sequence[str]) -> None:
  os.makedirs(os.path.join(root, cxr_vqa.IMAGE_FOLDER), exist_ok=True)
  with open(os.path.join(root, cxr_vqa.JSON_NAME), "w") as f:
    json.dump(entries, f)
  rng = np.random.default_rng(0)
  for name in images_present:
    array = rng.integers(0, 255, (40, 30, 3)).astype(np.uint8)
    Image.fromarray(array).save(os.path.join(root, cxr_vqa.IMAGE_FOLDER, name), "JPEG")


@pytest.fixture()
def release(tmp_path):
  low, high = _names()
  a, b, c, v = high[0], high[1], high[2], low[0]   # v: a validation image
  entries = [
      _entry(1, a, "Is there a  pneumothorax?", "Yes", "CLOSED", "freeform"),
      _entry(2, a, "Is the lung collapsed?", "yes ", "closed ", "para"),
      _entry(3, b, "Where is the mass?", "Right upper lobe.", "OPEN", "freeform"),
      _entry(4, b, "Is there a mass?", "No", "CLOSED", "freeform"),
      _entry(5, c, "What organ is this?", "Brain", "OPEN", "freeform", organ="HEAD"),
      _entry(6, v, "Is the heart enlarged?", "no", "CLOSED", "freeform"),
      _entry(7, v, "What is abnormal?", "Right upper lobe", "open", "para"),
      # test: phrase_type test_*; one answer ('left lower lobe') not in the training answers.
      _entry(8, a, "Is there a pneumothorax present?", "YES", "CLOSED", "test_freeform"),
      _entry(9, b, "Where is the lesion?", "Left lower lobe", "OPEN", "test_para"),
      _entry(10, c, "Which organ?", "brain.", "OPEN", "test_freeform", organ="HEAD"),
  ]
  write_release(tmp_path / "release", entries, [a, b, c, v])
  return tmp_path / "release", entries, (a, b, c, v)


def test_vqa_rad_splits_normalises_and_counts_answers_outside_the_vocabulary(release,
                                                                             tmp_path):
  root, _, (a, b, c, v) = release
  builder = builders.prepare("vqa_rad", data_dir=tmp_path / "data", manual_dir=root)
  got = {s: text_records(builder.as_data_source(split=s)) for s in SPLITS}
  assert sorted(r["id"] for r in got["test"]) == ["10", "8", "9"]
  assert {r["image_id"] for r in got["validation"]} == {v}
  assert sorted(r["id"] for r in got["train"]) == ["1", "2", "3", "4", "5"]
  images_of = {s: {r["image_id"] for r in got[s]} for s in SPLITS}
  assert not images_of["validation"] & (images_of["train"] | images_of["test"])
  by_id = {r["id"]: r for s in SPLITS for r in got[s]}
  assert by_id["2"]["answer"] == "yes" and by_id["2"]["answer_type"] == "closed"
  assert by_id["3"]["answer"] == "right upper lobe" and by_id["3"]["answer_type"] == "open"
  assert by_id["1"]["question"] == "Is there a pneumothorax?"
  assert by_id["10"]["answer"] == "brain" and by_id["1"]["question_type"] == "PRES"
  assert by_id["1"]["patient"] == a
  # The stored image: 8-bit grey PNG at the release's size (40 x 30 < max_side).
  png = Image.open(io.BytesIO(by_id["1"]["image"]))
  assert png.mode == "L" and png.size == (30, 40)
  meta = builder.info.metadata
  assert meta["answers"] == ["yes", "brain", "no", "right upper lobe"]
  summary = meta["summary"]
  oov = summary["splits"]["test"]["out_of_vocabulary"]
  assert oov == {"count": 1, "share": 1 / 3, "open_count": 1, "open_share": 0.5}
  assert summary["splits"]["train"]["closed"] == 3 and summary["splits"]["train"]["open"] == 2
  assert summary["test_images_in_train"] == 3 and summary["entries_read"] == 10
  # Class -1 for the new answer, as vqa_example gives it.
  index = vqa.answer_index(meta)
  assert [index.get(r["answer"], -1) for r in sorted(got["test"], key=lambda r: r["id"])] == [
      1, 0, -1]


def test_vqa_rad_organ_keeps_one_organs_questions(release, tmp_path):
  root, _, (_, _, c, _) = release
  builder = builders.prepare("vqa_rad", data_dir=tmp_path / "data", manual_dir=root,
                             organ="chest")
  got = [r for s in SPLITS for r in text_records(builder.as_data_source(split=s))]
  assert len(got) == 8 and c not in {r["image_id"] for r in got}
  assert builder.info.metadata["summary"]["left_out_organ"] == 2
  assert builder.builder_config.name == "organ_chest"


def test_vqa_rad_errors_name_the_key_and_the_entry(tmp_path):
  low, high = _names()
  entries = [_entry(1, high[0], "Is it?", "yes", "CLOSED", "freeform"),
             _entry(77, high[0], "Is it not?", "no", "CLOSED", "freeform")]
  del entries[1]["answer"]
  write_release(tmp_path / "r1", entries, [high[0]])
  with pytest.raises(cxr_vqa.VqaRadFormatError, match=r"entry 1 \(qid 77\).*'answer'"):
    builders.prepare("vqa_rad", data_dir=tmp_path / "d1", manual_dir=tmp_path / "r1")
  entries[1]["answer"], entries[1]["answer_type"] = "no", "MAYBE"
  write_release(tmp_path / "r2", entries, [high[0]])
  with pytest.raises(cxr_vqa.VqaRadFormatError, match=r"entry 1 \(qid 77\).*MAYBE"):
    builders.prepare("vqa_rad", data_dir=tmp_path / "d2", manual_dir=tmp_path / "r2")
  assert not (tmp_path / "d2" / "vqa_rad").exists()   # a failed build leaves nothing


def test_vqa_rad_a_missing_image_is_an_error_or_skipped_and_counted(release, tmp_path, capsys):
  root, _, (a, b, c, v) = release
  os.remove(os.path.join(root, cxr_vqa.IMAGE_FOLDER, b))
  with pytest.raises(cxr_vqa.MissingImageError, match=rf"{b}.*qid 3"):
    builders.prepare("vqa_rad", data_dir=tmp_path / "data", manual_dir=root)
  assert build.main(["vqa_rad", f"--manual_dir={root}", f"--data_dir={tmp_path / 'd'}"]) == 1
  assert b in capsys.readouterr().err
  builder = builders.prepare("vqa_rad", data_dir=tmp_path / "data", manual_dir=root,
                             missing_files="skip")
  missing = builder.info.metadata["summary"]["missing_files"]
  assert missing["images"] == 1 and missing["questions"] == 3 and b in missing["listed"][0]
  got = [r for s in SPLITS for r in text_records(builder.as_data_source(split=s))]
  assert len(got) == 7 and b not in {r["image_id"] for r in got}


def test_vqa_rad_without_its_json_says_what_to_download(tmp_path):
  (tmp_path / "release").mkdir()
  (tmp_path / "release" / "readme.txt").write_text("x")
  with pytest.raises(builders.ManualDirError, match="VQA_RAD Dataset Public.json"):
    builders.prepare("vqa_rad", data_dir=tmp_path / "data", manual_dir=tmp_path / "release")


# --------------------------------------------------------------------------- the model
SMALL = dict(encoder="tiny_cnn", encoder_kwargs={"width": 4},
             text_kwargs={"hidden": 16, "layers": 1, "heads": 2, "mlp": 32, "dropout": 0.0},
             hidden=16, layers=1, heads=2, dropout=0.0)


def _batch(b=3, size=16, length=6, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(b, size, size, 1)), jnp.float32),
          "question_ids": jnp.asarray(rng.integers(4, 30, (b, length)), jnp.int32),
          "question_mask": jnp.asarray(np.arange(length)[None] < np.array([[6], [4], [3]])[:b])}


def _paths(tree) -> set[str]:
  return {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def test_vqanet_gives_answer_logits_and_keeps_img_and_txt_subtrees():
  model = vqa_model.VqaNet(vocab_size=30, max_len=8, num_answers=5, **SMALL)
  batch = _batch()
  variables = jax.jit(model.init)(jax.random.key(0), batch)
  apply = jax.jit(model.apply, static_argnames=("return_attention",))
  out = apply(variables, batch, return_attention=True)
  assert out["logits"].shape == (3, 5) and out["logits"].dtype == jnp.float32
  assert out["features"].shape == (3, 16)
  # tiny_cnn: three stride-2 layers, 16 -> 2 x 2 = 4 image tokens.
  assert out["attention"].shape == (3, 2, 6, 4)
  np.testing.assert_allclose(out["attention"].sum(-1), 1.0, rtol=1e-5)
  params = variables["params"]
  assert {"img", "txt", "fusion", "img_pos"} <= set(params)
  # txt/ is exactly HybridMedNet's text tower, so init_params 'txt/.*' loads it.
  hm = hybridmed.HybridMedNet(vocab_size=30, max_len=8, encoder="tiny_cnn",
                              encoder_kwargs={"width": 4}, text_kwargs=SMALL["text_kwargs"],
                              decoder_kwargs={"hidden": 16, "layers": 1, "heads": 2, "mlp": 32},
                              embed_dim=8)
  hm_batch = {"image": batch["image"], "findings_ids": batch["question_ids"],
              "findings_mask": batch["question_mask"],
              "impression_ids": batch["question_ids"], "impression_mask": batch["question_mask"]}
  hm_params = jax.eval_shape(hm.init, jax.random.key(1), hm_batch)["params"]
  shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
  assert shapes(hm_params["txt"]) == shapes(params["txt"])
  assert shapes(hm_params["img"]) == shapes(params["img"])
  # Padding is masked: changing a padded id does not change the answer.
  moved = {**batch, "question_ids": batch["question_ids"].at[2, 5].set(7)}
  np.testing.assert_allclose(apply(variables, moved)["logits"], out["logits"],
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(KeyError, match="question_mask"):
    model.apply(variables, {"image": batch["image"], "question_ids": batch["question_ids"]})


def test_freeze_image_stops_the_image_towers_gradient():
  batch = _batch()
  for freeze in (False, True):
    model = vqa_model.VqaNet(vocab_size=30, max_len=8, num_answers=5, freeze_image=freeze,
                             **SMALL)
    variables = jax.jit(model.init)(jax.random.key(0), batch)

    def loss(params):
      out, _ = model.apply({**variables, "params": params}, batch, train=True,
                           mutable=["batch_stats"])
      return out["logits"][:, 0].sum()

    grads = jax.jit(jax.grad(loss))(variables["params"])
    img = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["img"]))
    txt = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["txt"]))
    assert txt > 0
    assert (img == 0) == freeze, (freeze, img)


def test_a_tiny_vqanet_learns_a_question_that_needs_the_image():
  """'is the spot on the left?' / '... on the right?' over images with a bright spot on one
  side: the answer is yes exactly when the question names the spot's side, so neither the
  question nor the image alone beats chance (0.5)."""
  rng = np.random.default_rng(0)
  n, size, n_train = 1280, 16, 1024
  side = rng.integers(0, 2, n)             # 0: the spot is on the image's left
  asks = rng.integers(0, 2, n)             # 0: the question asks 'left'
  img = rng.normal(0, 0.3, (n, size, size, 1)).astype(np.float32)
  for i in range(n):
    x0 = 2 if side[i] == 0 else 10
    img[i, 6:10, x0:x0 + 4] += 2.0
  ids = np.stack([[2, 10, 11, 12 + a, 3, 0] for a in asks]).astype(np.int32)
  data = {"image": img, "question_ids": ids, "question_mask": ids != 0}
  answer = (side == asks).astype(np.int32)  # 1 = yes
  model = vqa_model.VqaNet(vocab_size=16, max_len=8, num_answers=2, **SMALL)
  variables = jax.jit(model.init)(jax.random.key(0), {k: v[:4] for k, v in data.items()})
  opt = optax.adam(3e-3)
  state = (variables["params"], variables["batch_stats"], opt.init(variables["params"]))

  @jax.jit
  def step(state, batch, labels):
    params, stats, opt_state = state

    def loss(p):
      out, new = model.apply({"params": p, "batch_stats": stats}, batch, train=True,
                             mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels).mean(), new

    (_, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new["batch_stats"], opt_state

  for k in range(300):
    rows = np.random.default_rng(k).choice(n_train, 64, replace=False)
    state = step(state, {key: v[rows] for key, v in data.items()}, answer[rows])
  out = jax.jit(model.apply)({"params": state[0], "batch_stats": state[1]},
                             {k: v[n_train:] for k, v in data.items()})
  accuracy = float(np.mean(np.argmax(out["logits"], -1) == answer[n_train:]))
  assert accuracy > 0.9, accuracy


# --------------------------------------------------------------------------- accuracy
def test_vqa_accuracy_by_hand():
  pred = np.array([0, 1, 1, 2, 3, -1, 0, 4])
  answer = np.array([0, 0, 1, 2, -1, -1, 0, 5])
  closed = np.array([True, True, True, False, False, False, False, False])
  out = vqa_eval.vqa_accuracy(pred, answer, closed)
  # Correct: rows 0, 2 (closed), 3, 6 (open); row 5 predicts -1 = -1: out of vocabulary,
  # still wrong.
  assert out["accuracy"] == pytest.approx(4 / 8)
  assert out["closed/accuracy"] == pytest.approx(2 / 3)
  assert out["open/accuracy"] == pytest.approx(2 / 5)
  assert out["closed/n"] == 3 and out["open/n"] == 5
  assert out["open/out_of_vocabulary"] == 2 and out["closed/out_of_vocabulary"] == 0
  assert "accuracy_ci95" not in out
  boot = vqa_eval.vqa_accuracy(pred, answer, closed, bootstrap=200, seed=3)
  for key in vqa_eval.KEYS:
    lo, hi = boot[f"{key}_ci95"]
    assert 0.0 <= lo <= boot[key] <= hi <= 1.0, key
  assert boot == vqa_eval.vqa_accuracy(pred, answer, closed, bootstrap=200, seed=3)
  only_open = vqa_eval.vqa_accuracy(pred[3:], answer[3:], closed[3:])
  assert np.isnan(only_open["closed/accuracy"]) and only_open["closed/n"] == 0


def test_vqa_accuracy_rejects_bad_input_by_name():
  with pytest.raises(ValueError, match="closed"):
    vqa_eval.vqa_accuracy([0, 1], [0, 1], [1, 0])
  with pytest.raises(ValueError, match="one length"):
    vqa_eval.vqa_accuracy([0, 1], [0], [True, False])
  with pytest.raises(ValueError, match="answer"):
    vqa_eval.vqa_accuracy([0], [-2], [True])
  with pytest.raises(ValueError, match="pred"):
    vqa_eval.vqa_accuracy([[0]], [[0]], [[True]])


# --------------------------------------------------------------------------- re-measuring
def main(argv: Sequence[str] | None = None) -> None:
  """Builds synthetic_cxr_vqa's default config (through the builder) and prints the figures
  of synthetic_vqa's docstring: records, closed share, yes share, vocabulary, question texts
  and the question-only baseline on test."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_dir", default=None, help="where to build (kept); default: a "
                                                       "temporary folder, removed")
  args = parser.parse_args(argv)
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="synthetic_vqa_probe_")
  seed = {} if args.seed == 0 else {"seed": args.seed}   # seed 0: the default config itself
  builder = builders.prepare("synthetic_cxr_vqa", data_dir=data_dir, **seed)
  got = {s: text_records(builder.as_data_source(split=s)) for s in SPLITS}
  for split in SPLITS:
    closed = [r for r in got[split] if r["answer_type"] == "closed"]
    print(f"{split}: {len(got[split])} records, studies asked "
          f"{len({r['image_id'] for r in got[split]})}, closed share "
          f"{len(closed) / len(got[split]):.3f}, yes share "
          f"{np.mean([r['answer'] == 'yes' for r in closed]):.3f}")
  train = got["train"]
  vocab = set(builder.info.metadata["answers"])
  kinds = {k: {r["answer"] for r in train if r["answer_type"] == k} for k in ("closed", "open")}
  texts = {k: {r["question"] for r in train if r["answer_type"] == k} for k in kinds}
  words = [len(r["question"].split()) for r in train]
  print(f"answers {len(vocab)} (closed {len(kinds['closed'])}, open {len(kinds['open'])}); "
        f"test outside: {sum(r['answer'] not in vocab for r in got['test'])}")
  print(f"question texts {len(texts['closed']) + len(texts['open'])} (closed "
        f"{len(texts['closed'])}, open {len(texts['open'])}); words {min(words)}-{max(words)}")
  print("question-only baseline on test:", question_only_baseline(train, got["test"]))
  if not args.data_dir:
    shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
  main(sys.argv[1:])
