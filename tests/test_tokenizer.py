"""The report tokenizer (data/tokenizer.py) and the 'cxr_reports' record layout (data/cxr.py).

Expected ids are worked out by hand from WordPiece's rule (greedy longest match from the
start of each word, continuation pieces prefixed '##'), on vocabularies written here.
"""
from __future__ import annotations

import csv
import json
import os
import pickle

import ml_collections
import numpy as np
import pytest

from medguide_jax.data import cxr, images
from medguide_jax.data import tokenizer as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("MEDGUIDE_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")
IU_CSV = os.path.join(SHARED, "cxr_iu_xray_reports", "indiana_reports.csv")

# A BERT vocab.txt: ids are line numbers.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "lung", "##s", "are", "clear",
         ".", "no", "effusion", "heart", "size", "is", "normal", "pleural", "Heart"]
ID = {t: i for i, t in enumerate(VOCAB)}


def _vocab_file(tmp_path, vocab=VOCAB, lower=None):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
  if lower is not None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
  return path


def test_vocab_txt_ids_by_hand(tmp_path):
  tok = T.from_file(_vocab_file(tmp_path), max_len=12)
  ids, mask = tok.encode(["The lungs are clear.", "No pleural effusion, XXXX"])
  assert ids[0].tolist() == [ID["[CLS]"], ID["the"], ID["lung"], ID["##s"], ID["are"],
                             ID["clear"], ID["."], ID["[SEP]"], 0, 0, 0, 0]
  # ',' and 'xxxx' are not in the vocabulary: [UNK] each (lowercased first: the default).
  assert ids[1].tolist()[:7] == [ID["[CLS]"], ID["no"], ID["pleural"], ID["effusion"],
                                 ID["[UNK]"], ID["[UNK]"], ID["[SEP]"]]
  assert mask.sum(1).tolist() == [8, 7]
  assert (mask == (ids != 0)).all()
  assert tok.decode(ids[:1]) == ["the lungs are clear."]


def test_vocab_txt_without_deid_reads_it_as_unk(tmp_path):
  tok = T.from_file(_vocab_file(tmp_path))
  assert tok.deid_id == ID["[UNK]"]
  ids, _ = tok.encode([f"heart {T.DEID} normal"])
  assert ids[0, :5].tolist() == [ID["[CLS]"], ID["heart"], ID["[UNK]"], ID["normal"],
                                 ID["[SEP]"]]


def test_case_follows_tokenizer_config(tmp_path):
  cased = T.from_file(_vocab_file(tmp_path, lower=False))
  assert cased.encode(["Heart"])[0][0, 1] == ID["Heart"]
  lower = T.from_file(_vocab_file(tmp_path, lower=True))
  assert lower.encode(["Heart"])[0][0, 1] == ID["heart"]


def test_truncation_keeps_the_head_and_closes_with_sep(tmp_path):
  tok = T.from_file(_vocab_file(tmp_path), max_len=6)
  text = "the lungs are clear . no effusion"   # 8 pieces
  ids, mask = tok.encode([text, "normal"])
  assert ids[0].tolist() == [ID["[CLS]"], ID["the"], ID["lung"], ID["##s"], ID["are"],
                             ID["[SEP]"]]
  assert mask[0].all()
  assert tok.truncated([text, "normal", "the lungs are"]) == 1   # 'the lungs are': 4 pieces
  with pytest.raises(ValueError, match="max_len=2"):
    T.from_file(_vocab_file(tmp_path), max_len=2)


def test_trained_tokenizer_special_ids_and_deid_is_one_token():
  texts = [f"The lungs are clear. No {T.DEID} effusion.", "Heart size is normal.",
           f"Right lower lobe opacity {T.DEID}.", "No pneumothorax."] * 5
  tok = T.ReportTokenizer(T.train(texts, vocab_size=200, min_frequency=1))
  assert [tok.tok.token_to_id(t) for t in T.SPECIAL_TOKENS] == list(range(6))
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.deid_id) == (0, 1, 2, 3, 5)
  assert tok.tokens(f"opacity {T.DEID}.") == ["opacity", T.DEID, "."]
  ids, _ = tok.encode(texts[:2])
  assert tok.decode(ids) == ["the lungs are clear. no [DEID] effusion.",
                             "heart size is normal."]
  # A word unseen in training is split into known pieces or [UNK]; never an error.
  assert tok.encode(["zzzqx"])[0][0, 0] == tok.cls_id


def test_json_round_trip_pickle_and_sha(tmp_path):
  texts = ["the lungs are clear", "no pleural effusion", "heart size is normal"] * 3
  tok = T.ReportTokenizer(T.train(texts, vocab_size=100, min_frequency=1))
  path = tmp_path / "tokenizer.json"
  path.write_text(tok.to_json(), encoding="utf-8")
  again = T.from_file(path)
  assert again.sha256 == tok.sha256
  assert (again.encode(texts)[0] == tok.encode(texts)[0]).all()
  assert T.load(tmp_path).to_str() == T.load(path).to_str()   # a folder: tokenizer.json first
  copy = pickle.loads(pickle.dumps(tok))
  assert (copy.encode(texts)[0] == tok.encode(texts)[0]).all()
  other = T.ReportTokenizer(T.train(texts + ["pneumothorax"], vocab_size=100, min_frequency=1))
  assert other.sha256 != tok.sha256
  described = tok.describe()
  assert described["vocab_size"] == tok.vocab_size and described["max_len"] == T.MAX_LEN


def test_bad_tokenizer_files_are_named(tmp_path):
  with pytest.raises(T.TokenizerError, match="nothing is downloaded"):
    T.load(tmp_path / "absent.json")
  with pytest.raises(T.TokenizerError, match="neither tokenizer.json nor vocab.txt"):
    T.load(tmp_path)
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json", encoding="utf-8")
  with pytest.raises(T.TokenizerError, match="tokenizer.json: not a tokenizers JSON"):
    T.load(bad)
  sub = tmp_path / "v"
  sub.mkdir()
  with pytest.raises(T.TokenizerError, match=r"lacks BERT's special tokens \['\[CLS\]'"):
    T.load(_vocab_file(sub, vocab=["[PAD]", "[UNK]", "the"]))
  with pytest.raises(T.TokenizerError, match="metadata holds no tokenizer"):
    T.from_metadata({})


@pytest.mark.skipif(not os.path.isfile(IU_CSV), reason=f"IU X-ray reports not at {IU_CSV}")
def test_iu_reports_vocabulary():
  """Trained on the real IU X-ray reports: every word of them encodes without [UNK]."""
  with open(IU_CSV, encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  texts = [f"{r['findings']} {r['impression']}".replace("XXXX", T.DEID) for r in rows]
  tok = T.ReportTokenizer(T.train(texts))
  assert 1000 < tok.vocab_size < T.VOCAB_SIZE
  ids, mask = tok.encode(texts)
  assert not (ids == tok.unk_id).any()
  assert (ids[:, 0] == tok.cls_id).all()
  lengths = mask.sum(1)
  assert (ids[np.arange(len(ids)), lengths - 1] == tok.sep_id).all()
  assert 0 < tok.truncated(texts) < len(texts) // 10


def _png(size=(20, 16)):
  return images.encode_png(np.arange(size[0] * size[1], dtype=np.uint8).reshape(size[::-1]))


def test_cxr_record_and_example(tmp_path):
  texts = ["the lungs are clear", "no pleural effusion", "heart size is normal"] * 3
  tok = T.ReportTokenizer(T.train(texts, vocab_size=100, min_frequency=1), max_len=8)
  mask = images.encode_png(np.zeros((16, 20), np.uint8))
  rec = cxr.record(image=_png(), findings="the lungs are clear", impression="heart size is "
                   "normal", study="s1", patient="p1", view="pa", id="s1/a", labels=[1, 0],
                   region_labels=[0], region_boxes=[[1, 2, 5, 6]], region_masks=[mask])
  assert rec["view"] == "PA" and rec["region_boxes"].shape == (1, 4)
  assert rec["labels"].dtype == np.float32 and rec["region_labels"].dtype == np.int64
  with pytest.raises(ValueError, match="s1/b: 1 region labels but 0 masks"):
    cxr.record(image=b"", findings="", impression="", study="s1", patient="p1", view="pa",
               id="s1/b", region_labels=[0], region_boxes=[[0, 0, 1, 1]])
  out = cxr.report_example(rec, None, image_size=12, tokenizer=tok)
  assert out["image"].shape == (12, 12, 1) and out["image"].dtype == np.float32
  assert out["findings_ids"].shape == (8,) and out["findings_ids"][0] == tok.cls_id
  assert tok.decode(out["impression_ids"][None]) == ["heart size is normal"]
  text_only = dict(rec, image=b"")
  assert "image" not in cxr.report_example(text_only, None, image_size=12, tokenizer=tok)
  # The run's tokenizer: a user's file wins over the dataset's own.
  path = tmp_path / "tokenizer.json"
  path.write_text(tok.to_json(), encoding="utf-8")
  data = ml_collections.ConfigDict({"tokenizer": "", "max_len": 8})
  assert cxr.tokenizer_for(data, {"tokenizer": tok.to_json()}).source == "dataset"
  data.tokenizer = str(path)
  assert cxr.tokenizer_for(data, {}).source == str(path)


def test_a_shorter_length_per_call_truncates_the_same_way(tmp_path):
  tok = T.from_file(_vocab_file(tmp_path), max_len=12)
  ids, mask = tok.encode(["the lungs are clear . no effusion"], 5)
  assert ids.shape == (1, 5) and mask.all()
  assert ids[0].tolist() == [ID["[CLS]"], ID["the"], ID["lung"], ID["##s"], ID["[SEP]"]]
  with pytest.raises(ValueError, match=r"max_len=13 must be in \[3, 12\]"):
    tok.encode(["the"], 13)
