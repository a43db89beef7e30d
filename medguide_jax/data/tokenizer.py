"""The report tokenizer of hybridmed: WordPiece (Hugging Face `tokenizers`), BERT's ids.

One `ReportTokenizer` turns report sections into fixed-length id arrays for the text encoder
and the decoders. It wraps a `tokenizers.Tokenizer` from one of:

* `train(texts)`: a WordPiece vocabulary trained on the TRAINING split's reports (findings
  and impression), as the chest X-ray builders do at build time; the tokenizer's JSON is
  stored in the dataset's metadata ('tokenizer'), so the dataset carries the vocabulary it
  was tokenised with, and a run records its sha256 in run.json.
* `load(path)`: a user's `tokenizer.json` (any `tokenizers` tokenizer with BERT's special
  tokens), or a BERT `vocab.txt` (e.g. a clinical BERT's: its `tokenizer_config.json` beside
  it, if present, says whether it lowercases; BertTokenizer's default, lowercase, otherwise).

Conventions (BERT's, so a clinical-BERT vocabulary drops in): [PAD] pads, [CLS] opens every
sequence and is the decoders' begin token, [SEP] closes it and is their end token, [UNK]
stands for a piece outside the vocabulary. A trained vocabulary has the ids
[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, [DEID]=5; a loaded one keeps its own ids.
`[DEID]` is the one token of a de-identification placeholder (IU X-ray's 'XXXX', MIMIC-CXR's
'___'; data/reports.py writes it into the section text); a vocabulary without it (a clinical
BERT's) reads it as its [UNK].

Length: `max_len` ids including [CLS] and [SEP] (112 by default, MGCA's). A longer text is
truncated from the END: its first max_len - 2 pieces are kept, then [SEP], so every sequence
is closed; `truncated(texts)` counts the texts that lose pieces. Shorter ones are padded with
[PAD] after [SEP]; the mask is True on [CLS] .. [SEP].
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, UNK, CLS, SEP, MASK, DEID = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEID]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK, DEID)   # in this order: ids 0..5 when trained
MAX_LEN = 112            # MGCA's max_length for Bio_ClinicalBERT
VOCAB_SIZE = 8000        # upper bound: a small corpus yields fewer pieces (IU X-ray: ~1.9k)
MIN_FREQUENCY = 2        # a piece seen once in the training reports is left to [UNK]/pieces


class TokenizerError(ValueError):
  """A tokenizer file that cannot be read or lacks BERT's special tokens (names the file)."""


def _bert_pipeline(tok: tokenizers.Tokenizer, lowercase: bool) -> tokenizers.Tokenizer:
  """BERT's normaliser, pre-tokeniser, [CLS] .. [SEP] template and WordPiece decoder."""
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  tok.post_processor = processors.TemplateProcessing(
      single=f"{CLS} $A {SEP}",
      special_tokens=[(CLS, tok.token_to_id(CLS)), (SEP, tok.token_to_id(SEP))])
  return tok


def train(texts: Iterable[str], *, vocab_size: int = VOCAB_SIZE,
          min_frequency: int = MIN_FREQUENCY, lowercase: bool = True) -> tokenizers.Tokenizer:
  """A WordPiece tokenizer trained on `texts` (the training split's sections)."""
  tok = tokenizers.Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS),
                                      continuing_subword_prefix="##", show_progress=False)
  tok.train_from_iterator((t for t in texts if t), trainer=trainer)
  return _bert_pipeline(tok, lowercase)


def load(path: str | os.PathLike, *, lowercase: bool | None = None) -> tokenizers.Tokenizer:
  """A tokenizer from `tokenizer.json`, a BERT `vocab.txt`, or a folder holding either
  (tokenizer.json first). `lowercase` applies to a vocab.txt only (default: the folder's
  tokenizer_config.json 'do_lower_case', else True)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in ("tokenizer.json", "vocab.txt"):
      if os.path.isfile(os.path.join(path, name)):
        return load(os.path.join(path, name), lowercase=lowercase)
    raise TokenizerError(f"{path}: holds neither tokenizer.json nor vocab.txt")
  if not os.path.isfile(path):
    raise TokenizerError(f"{path}: no such tokenizer file (tokenizer.json or vocab.txt; "
                         "nothing is downloaded: place the file there)")
  if path.endswith(".json"):
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise TokenizerError(f"{path}: not a tokenizers JSON file: {e}") from e
  else:
    if lowercase is None:
      config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
      lowercase = True
      if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
          lowercase = bool(json.load(f).get("do_lower_case", True))
    try:
      model = models.WordPiece.from_file(path, unk_token=UNK)
    except Exception as e:  # pylint: disable=broad-except
      raise TokenizerError(f"{path}: not a WordPiece vocab.txt: {e}") from e
    tok = tokenizers.Tokenizer(model)
    missing = [t for t in (PAD, UNK, CLS, SEP) if tok.token_to_id(t) is None]
    if missing:
      raise TokenizerError(f"{path}: the vocabulary lacks BERT's special tokens {missing}")
    tok.add_special_tokens([t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None])
    tok = _bert_pipeline(tok, lowercase)
  missing = [t for t in (PAD, UNK, CLS, SEP) if tok.token_to_id(t) is None]
  if missing:
    raise TokenizerError(f"{path}: the tokenizer lacks BERT's special tokens {missing}")
  return tok


class ReportTokenizer:
  """Fixed-length encoding of report texts (see the module docstring).

  Picklable (grain workers get a copy): the state is the tokenizer's JSON.
  """

  def __init__(self, tok: tokenizers.Tokenizer, *, max_len: int = MAX_LEN,
               source: str = "trained"):
    if max_len < 3:
      raise ValueError(f"max_len={max_len}: needs room for [CLS], a piece and [SEP]")
    self.tok, self.max_len, self.source = tok, int(max_len), source
    self._configure()

  def _configure(self):
    self.tok.no_padding()
    self.tok.no_truncation()
    ids = {t: self.tok.token_to_id(t) for t in SPECIAL_TOKENS}
    self.pad_id, self.unk_id, self.cls_id, self.sep_id = (ids[t] for t in (PAD, UNK, CLS, SEP))
    # A vocabulary without [DEID] (a clinical BERT's) reads the placeholder as [UNK].
    self.deid_id = ids[DEID] if ids[DEID] is not None else self.unk_id
    self._deid_text = DEID if ids[DEID] is not None else UNK

  def __getstate__(self):
    return {"json": self.tok.to_str(), "max_len": self.max_len, "source": self.source}

  def __setstate__(self, state):
    self.tok = tokenizers.Tokenizer.from_str(state["json"])
    self.max_len, self.source = state["max_len"], state["source"]
    self._configure()

  @classmethod
  def from_json(cls, text: str, **kwargs) -> "ReportTokenizer":
    return cls(tokenizers.Tokenizer.from_str(text), **kwargs)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def to_json(self) -> str:
    return self.tok.to_str()

  @property
  def sha256(self) -> str:
    """Of the vocabulary (token -> id, sorted), so two files with one vocabulary agree."""
    vocab = sorted(self.tok.get_vocab(with_added_tokens=True).items())
    return hashlib.sha256(json.dumps(vocab).encode("utf-8")).hexdigest()

  def describe(self) -> dict:
    """What run.json records about the tokenizer."""
    return {"source": self.source, "vocab_size": self.vocab_size, "sha256": self.sha256,
            "max_len": self.max_len, "truncation": "from the end, [SEP] kept"}

  def _pieces(self, texts: Sequence[str]) -> list[list[int]]:
    texts = [str(t).replace(DEID, self._deid_text) for t in texts]
    # The template adds [CLS] and [SEP]; the pieces are the ids between them.
    return [e.ids[1:-1] for e in self.tok.encode_batch(texts)]

  def encode(self, texts: Sequence[str], max_len: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, L], mask bool [N, L]) of `texts`, L = `max_len` (default the
    tokenizer's; a shorter one for short sections, truncated the same way)."""
    length = self.max_len if max_len is None else int(max_len)
    if not 3 <= length <= self.max_len:
      raise ValueError(f"max_len={length} must be in [3, {self.max_len}]")
    ids = np.full((len(texts), length), self.pad_id, np.int32)
    for i, pieces in enumerate(self._pieces(texts)):
      row = [self.cls_id] + pieces[:length - 2] + [self.sep_id]
      ids[i, :len(row)] = row
    return ids, ids != self.pad_id

  def truncated(self, texts: Sequence[str]) -> int:
    """How many of `texts` are longer than max_len ids (and so lose their tail)."""
    return sum(len(p) > self.max_len - 2 for p in self._pieces(texts))

  def tokens(self, text: str) -> list[str]:
    """The pieces of one text (no [CLS]/[SEP]), for inspection."""
    return [self.tok.id_to_token(i) for i in self._pieces([text])[0]]

  def decode(self, ids) -> list[str]:
    """Texts of id rows: up to the first [SEP] (a leading [CLS] and pads dropped)."""
    out = []
    for row in np.asarray(ids).reshape(-1, np.shape(ids)[-1]).tolist():
      if row and row[0] == self.cls_id:
        row = row[1:]
      if self.sep_id in row:
        row = row[:row.index(self.sep_id)]
      out.append(self.tok.decode([i for i in row if i != self.pad_id],
                                 skip_special_tokens=False).replace(UNK, "[UNK]"))
    return out


def from_metadata(metadata: dict, *, max_len: int = MAX_LEN) -> ReportTokenizer:
  """The tokenizer a dataset was built with (its metadata 'tokenizer')."""
  text = (metadata or {}).get("tokenizer")
  if not text:
    raise TokenizerError("the dataset's metadata holds no tokenizer (was it built by a "
                         "chest X-ray report builder?)")
  return ReportTokenizer.from_json(text, max_len=max_len, source="dataset")


def from_file(path: str | os.PathLike, *, max_len: int = MAX_LEN) -> ReportTokenizer:
  return ReportTokenizer(load(path), max_len=max_len, source=os.fspath(path))
