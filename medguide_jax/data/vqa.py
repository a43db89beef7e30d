"""Visual question answering records of hybridmed's downstream tasks: the 'cxr_vqa' layout.

One TFDS schema for every VQA builder (synthetic_cxr_vqa, vqa_rad; `sources.LAYOUTS`). One
record per QUESTION; an image asked several questions is stored once per question.
  image:         encoded image bytes (8-bit grey PNG, as `cxr.features` stores them)
  question:      the question text (whitespace collapsed; the tokenizer lower-cases)
  answer:        the answer, normalised by `normalise_answer` (lower case, stripped,
                 whitespace collapsed, one trailing '.' dropped): VQA-RAD's evaluations
                 compare normalised strings, and so does `vqa_example`
  answer_type:   'closed' (yes/no and other fixed-choice questions) or 'open'
  question_type: what the question asks about: the release's (VQA-RAD: 'PRES', 'POS', ...,
                 upper case) or synthetic_cxr_vqa's ('presence', 'location', 'size', 'device')
  image_id:      the image the question is about (questions of one image share it)
  patient:       the patient (splits are by patient, so by image; see each builder)
  id:            unique in the dataset

Metadata (every builder, `VqaBuilder.set_metadata`):
  tokenizer, tokenizer_sha256: the WordPiece tokenizer (data/tokenizer.py) trained on the
                 TRAINING split's questions (as cxr.ReportBuilder trains on reports)
  answers:       the training split's answer vocabulary, most frequent first (ties by the
                 text): a classifier's classes; `answer_index(metadata)` maps an answer to
                 its class, and an answer outside it (only in validation/test) is class -1,
                 which `evaluation/vqa.vqa_accuracy` counts wrong
  summary:       per split questions, images, patients, closed / open, the yes share of the
                 closed questions, counts per question type, and for validation and test the
                 answers outside the training vocabulary (`summarise`)

`vqa_example` turns a record into model inputs: the image as `multicrop.single_image_example`
makes it (DEFAULT_NORM; training: cxr.CXR_AUGMENT, no flip: left and right matter), the
question's ids and mask, the answer's class and whether the question is closed.
"""
from __future__ import annotations

import collections
from typing import Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from medguide_jax.data import cxr
from medguide_jax.data import images
from medguide_jax.data import multicrop
from medguide_jax.data import tokenizer as tokenizer_lib

LAYOUT = "cxr_vqa"
CLOSED, OPEN = "closed", "open"
ANSWER_TYPES = (CLOSED, OPEN)
QUESTION_LEN = 32        # ids per question, [CLS] and [SEP] included (questions are short)
_TEXT_FIELDS = ("image", "question", "answer", "answer_type", "question_type", "image_id",
                "patient", "id")


def features() -> tfds.features.FeaturesDict:
  """TFDS features of a 'cxr_vqa' record (every field encoded bytes or text)."""
  return tfds.features.FeaturesDict({
      k: tfds.features.Tensor(shape=(), dtype=np.object_) for k in _TEXT_FIELDS})


def normalise_text(text) -> str:
  """Whitespace collapsed and stripped (bytes are read as UTF-8)."""
  return " ".join(images.text(text).split())


def normalise_answer(text) -> str:
  """The comparable form of an answer: lower case, whitespace collapsed, stripped, one
  trailing '.' dropped ('Yes.' -> 'yes', ' Right  Lower lobe ' -> 'right lower lobe')."""
  out = normalise_text(text).lower()
  if out.endswith("."):
    out = out[:-1].rstrip()
  return out


def record(*, image: bytes, question: str, answer: str, answer_type: str,
           question_type: str, image_id: str, patient: str, id: str) -> dict:  # pylint: disable=redefined-builtin
  """One 'cxr_vqa' record, its texts normalised (the answer by `normalise_answer`)."""
  kind = normalise_text(answer_type).lower()
  if kind not in ANSWER_TYPES:
    raise ValueError(f"{id}: answer_type {answer_type!r}; use one of {ANSWER_TYPES}")
  return {"image": bytes(image), "question": normalise_text(question),
          "answer": normalise_answer(answer), "answer_type": kind,
          "question_type": normalise_text(question_type), "image_id": str(image_id),
          "patient": str(patient), "id": str(id)}


# --------------------------------------------------------------------------- vocabulary
def answer_vocabulary(answers: Iterable[str]) -> list[str]:
  """Distinct normalised answers, most frequent first, ties by the text."""
  counts = collections.Counter(normalise_answer(a) for a in answers)
  return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def answer_index(metadata: Mapping | Sequence[str]) -> dict[str, int]:
  """{answer: class} of a dataset's metadata 'answers' (or of the list itself)."""
  answers = metadata.get("answers") if isinstance(metadata, Mapping) else metadata
  if not answers:
    raise ValueError("the dataset's metadata holds no 'answers' (was it built by a 'cxr_vqa' "
                     "builder?)")
  return {normalise_answer(a): i for i, a in enumerate(answers)}


def summarise(splits: Mapping[str, Sequence[Mapping]], vocabulary: Sequence[str]) -> dict:
  """Per split counts of records (dicts with the layout's text fields): questions, images,
  patients, closed / open, yes share of closed, per question type; and outside `vocabulary`
  (the training answers): count, share of the split and of its open questions."""
  known = set(vocabulary)
  out = {}
  for split, records in splits.items():
    closed = [r for r in records if r["answer_type"] == CLOSED]
    opened = [r for r in records if r["answer_type"] == OPEN]
    entry = {"questions": len(records), "images": len({r["image_id"] for r in records}),
             "patients": len({r["patient"] for r in records}), "closed": len(closed),
             "open": len(opened),
             "closed_yes_share": (sum(r["answer"] == "yes" for r in closed) / len(closed)
                                  if closed else None),
             "question_types": dict(sorted(collections.Counter(
                 r["question_type"] for r in records).items()))}
    if split != "train":
      oov = [r for r in records if r["answer"] not in known]
      open_oov = sum(r["answer_type"] == OPEN for r in oov)
      entry["out_of_vocabulary"] = {
          "count": len(oov), "share": len(oov) / len(records) if records else None,
          "open_count": open_oov, "open_share": open_oov / len(opened) if opened else None}
    out[split] = entry
  return out


# --------------------------------------------------------------------------- the builder
class VqaBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared set-up of every 'cxr_vqa' builder: ArrayRecord files (random access without
  TensorFlow), the schema above and its metadata. In `_split_generators` a builder calls
  `self.set_metadata(train_questions=..., train_answers=..., summary=...)`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(), description=self.__doc__,
        metadata=tfds.core.MetadataDict(tokenizer="", tokenizer_sha256="", answers=[],
                                        summary={}))

  def set_metadata(self, *, train_questions: Sequence[str], train_answers: Sequence[str],
                   summary: Mapping, vocab_size: int = tokenizer_lib.VOCAB_SIZE,
                   **extra) -> tokenizer_lib.ReportTokenizer:
    """Trains the WordPiece tokenizer on the training questions, sets the answer vocabulary
    of the training answers and fills the metadata; returns the tokenizer."""
    if not train_questions:
      raise ValueError(f"{self.name}: no training question to train the tokenizer on")
    tok = tokenizer_lib.ReportTokenizer(tokenizer_lib.train(train_questions,
                                                            vocab_size=vocab_size))
    self.info.metadata.update(tokenizer=tok.to_json(), tokenizer_sha256=tok.sha256,
                              answers=answer_vocabulary(train_answers), summary=dict(summary),
                              **extra)
    return tok


# --------------------------------------------------------------------------- examples
def vqa_example(record: Mapping, rng: np.random.Generator | None, *, image_size: int,
                tokenizer: tokenizer_lib.ReportTokenizer, answer_index: Mapping[str, int],  # pylint: disable=redefined-outer-name
                question_len: int = QUESTION_LEN, channels: int = 1) -> dict:
  """A record -> {'image' float32 [S, S, channels], 'question_ids' int32 [question_len],
  'question_mask' bool [question_len], 'answer' int32 (class in the training vocabulary;
  -1 when outside it), 'closed' bool}.

  The image: training (`rng` given) a crop of cxr.CXR_CROP_SCALE with cxr.CXR_AUGMENT (no
  flip: 'left' and 'right' are in the questions); evaluation (`rng=None`) the whole image
  resized; DEFAULT_NORM. A question longer than question_len ids loses its tail (the
  tokenizer's rule: [SEP] kept).
  """
  image = multicrop.single_image_example(
      {"image": record["image"], "label": 0, "id": record.get("id", "?")}, rng,
      image_size=image_size, channels=channels, norm={}, augment_cfg=cxr.CXR_AUGMENT,
      crop_scale=cxr.CXR_CROP_SCALE)["image"]
  ids, mask = tokenizer.encode([normalise_text(record["question"])], question_len)
  answer = answer_index.get(normalise_answer(record["answer"]), -1)
  kind = images.text(record["answer_type"])
  if kind not in ANSWER_TYPES:
    raise ValueError(f"record {images.text(record.get('id', '?'))}: answer_type {kind!r}; "
                     f"expected one of {ANSWER_TYPES}")
  return {"image": image, "question_ids": ids[0], "question_mask": mask[0],
          "answer": np.int32(answer), "closed": np.bool_(kind == CLOSED)}

