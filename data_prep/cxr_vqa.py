"""VQA-RAD (Lau et al., Scientific Data 2018) from its official OSF release, as 'cxr_vqa' records.

The release (https://osf.io/89kps/, CC0) is one JSON file and one image folder:
  VQA_RAD Dataset Public.json   a list of 2,248 question entries; the keys read here:
      image_name     the image's file name in the folder ('synpic54610.jpg')
      question       the question text
      answer         the answer (text; a few are numbers in the JSON, read as text)
      answer_type    'CLOSED' or 'OPEN' (some lower case or with stray spaces: normalised)
      question_type  'PRES', 'POS', 'ABN', 'SIZE', ... (optional: '' when absent)
      phrase_type    'freeform', 'para' (a paraphrase of a freeform question),
                     'test_freeform', 'test_para'
      qid            the question's id (optional: the entry's index when absent)
      image_organ    'CHEST', 'HEAD', 'ABD' (read only with the option organ)
  VQA_RAD Image Folder/<image_name>  315 radiographs, CTs and MRIs (JPEG)
Both may sit in the manual dir itself or in one folder below it (the unzipped download).

Records (data/vqa.py): one per question; image = the image as 8-bit grey PNG (Pillow's
luma for colour JPEGs), shrunk (area averaging) so its long side is at most `max_side`
(default 512; 0 keeps the native size), encoded once per image; question whitespace
collapsed; answer normalised (`vqa.normalise_answer`: lower case, stripped, whitespace
collapsed, a trailing '.' dropped), as VQA-RAD evaluations compare answers;
answer_type 'closed' / 'open'; question_type upper case, stripped; image_id = patient = the
image name (the release has no patient ids: one image = one patient); id = the qid (a qid
seen again gets '#2', '#3', ...).

Splits. test: the questions whose phrase_type starts with 'test' (the official test set,
451 questions). The rest are train, less a validation split carved by image: an image goes
to validation when `image_folder.hash_unit('vqa_rad:' + image_name)` < VALIDATION_FRACTION
(0.1), unless it also has a test question. So no image is in validation and another split.
The official test questions are asked of images that training questions are asked about
too (the release's design); the summary counts those images ('test_images_in_train').

Options (builder kwargs / `--option`): organ='' (all entries; 'CHEST' keeps only chest
images' questions, compared case-insensitively with image_organ, the others counted);
missing_files='error' (an image the JSON names that is not in the folder is an error naming
it and the entry) or 'skip' (its questions left out and counted); max_side=512. Options
other than the defaults make their own builder config (folder).

Errors name the file and the entry (its index and qid): a missing key, an answer_type that
is neither closed nor open, a JSON that is not a list of objects. Summary: entries read, per
split questions / images / closed / open / yes share / question types (vqa.summarise), the
test answers outside the training vocabulary (count, share of test questions and of the
open ones: the part a classifier cannot get right), entries left out by organ, missing
images, the split rule. Metadata as `vqa.VqaBuilder` (tokenizer trained on the training
questions, the training answers most frequent first).

    python -m data_prep.build vqa_rad --manual_dir=/data/vqa_rad --data_dir=~/medguide_data \\
        [--option organ=CHEST] [--option missing_files=skip] [--option max_side=512]
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Mapping, Sequence

import tensorflow_datasets as tfds

from data_prep import image_folder
from medguide_jax.data import builders
from medguide_jax.data import images
from medguide_jax.data import readers
from medguide_jax.data import vqa

SPLITS = ("train", "validation", "test")
JSON_NAME = "VQA_RAD Dataset Public.json"
IMAGE_FOLDER = "VQA_RAD Image Folder"
REQUIRED_KEYS = ("image_name", "question", "answer", "answer_type", "phrase_type")
MISSING_FILES = ("error", "skip")
VALIDATION_FRACTION = 0.1
LISTED = 50   # missing images named in the summary (all are counted)

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
VQA-RAD (Lau et al., Sci Data 2018; CC0), https://osf.io/89kps/: download and unzip the
files into the manual dir (or one folder below it):
  {JSON_NAME}
  {IMAGE_FOLDER}/synpic*.jpg
  python -m data_prep.build vqa_rad --manual_dir=<manual_dir> --data_dir=<data_dir> \\
      [--option organ=CHEST] [--option missing_files=skip] [--option max_side=512]
"""


class VqaRadFormatError(ValueError):
  """The release's JSON is not as expected; the message names the file and the entry."""


class MissingImageError(VqaRadFormatError, FileNotFoundError):
  """An image the JSON names is not in the image folder; names it and the entry."""


@dataclasses.dataclass(eq=False)
class VqaRadConfig(tfds.core.BuilderConfig):
  """The options (module docstring)."""
  organ: str = ""
  missing_files: str = "error"
  max_side: int = 512


def make_config(*, organ: str | None = None, missing_files: str | None = None,
                max_side: int | None = None) -> VqaRadConfig | None:
  """The config of the options given (None: the default's); None when all are the
  default's. The name lists the changed ones ('organ_chest-missing_skip-side256')."""
  default = VqaRadConfig(name="default")
  organ = default.organ if organ is None else str(organ).strip().upper()
  missing_files = default.missing_files if missing_files is None else str(
      missing_files).strip().lower()
  if missing_files not in MISSING_FILES:
    raise ValueError(f"missing_files={missing_files!r}: use one of {list(MISSING_FILES)}")
  max_side = default.max_side if max_side is None else int(max_side)
  if max_side < 0:
    raise ValueError(f"max_side={max_side}: use 0 (native size) or a size >= 1")
  parts = []
  if organ != default.organ:
    parts.append(f"organ_{''.join(c for c in organ.lower() if c.isalnum())}")
  if missing_files != default.missing_files:
    parts.append(f"missing_{missing_files}")
  if max_side != default.max_side:
    parts.append("native" if max_side == 0 else f"side{max_side}")
  if not parts:
    return None
  return VqaRadConfig(name="-".join(parts), organ=organ, missing_files=missing_files,
                      max_side=max_side, description=f"Options {', '.join(parts)}.")


def find_release(root: str) -> tuple[str, str]:
  """(the JSON's path, the image folder) in `root` or in one folder below it."""
  candidates = [root] + sorted(os.path.join(root, d) for d in os.listdir(root)
                               if os.path.isdir(os.path.join(root, d)))
  for folder in candidates:
    if os.path.isfile(os.path.join(folder, JSON_NAME)):
      return os.path.join(folder, JSON_NAME), os.path.join(folder, IMAGE_FOLDER)
  raise builders.ManualDirError(f"{root}: no '{JSON_NAME}' in it or in a folder below it.\n"
                               f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")


def read_entries(path: str) -> list[dict]:
  """The JSON's list of question entries (each a dict)."""
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise VqaRadFormatError(f"{path}: not valid JSON: {e}") from e
  if not isinstance(data, list):
    raise VqaRadFormatError(f"{path}: expected a list of question entries, got "
                            f"{type(data).__name__}")
  for i, entry in enumerate(data):
    if not isinstance(entry, dict):
      raise VqaRadFormatError(f"{path}: entry {i} is a {type(entry).__name__}, not an object")
  return data


def _where(path: str, index: int, entry: Mapping) -> str:
  qid = entry.get("qid")
  return f"{path}: entry {index}" + (f" (qid {qid})" if qid is not None else "")


def _value(path: str, index: int, entry: Mapping, key: str) -> str:
  value = entry.get(key)
  if value is None:
    raise VqaRadFormatError(f"{_where(path, index, entry)}: missing key {key!r} (keys: "
                            f"{sorted(entry)})")
  return str(value)


def parse_entry(path: str, index: int, entry: Mapping) -> dict:
  """One entry -> {image_name, question, answer (normalised), answer_type ('closed' /
  'open'), question_type, split ('test' or 'train'), qid, organ}; errors name the entry."""
  values = {k: _value(path, index, entry, k) for k in REQUIRED_KEYS}
  kind = values["answer_type"].strip().lower()
  if kind not in vqa.ANSWER_TYPES:
    raise VqaRadFormatError(f"{_where(path, index, entry)}: answer_type "
                            f"{values['answer_type']!r} is neither CLOSED nor OPEN")
  qid = entry.get("qid")
  return {"image_name": values["image_name"].strip(),
          "question": vqa.normalise_text(values["question"]),
          "answer": vqa.normalise_answer(values["answer"]), "answer_type": kind,
          "question_type": vqa.normalise_text(entry.get("question_type") or "").upper(),
          "split": "test" if values["phrase_type"].strip().lower().startswith("test")
                   else "train",
          "qid": str(index if qid is None else qid).strip(),
          "organ": None if entry.get("image_organ") is None
                   else str(entry["image_organ"]).strip().upper()}


def assign_splits(questions: Sequence[dict]) -> None:
  """Moves the training questions of validation images (module docstring) to 'validation'."""
  in_test = {q["image_name"] for q in questions if q["split"] == "test"}
  for q in questions:
    name = q["image_name"]
    if (q["split"] == "train" and name not in in_test
        and image_folder.hash_unit(f"vqa_rad:{name}") < VALIDATION_FRACTION):
      q["split"] = "validation"


class VqaRad(vqa.VqaBuilder):
  """VQA-RAD questions about radiology images, from the official release (module
  docstring); option organ='CHEST' for chest X-rays' (and chest CTs') questions only."""

  name = "vqa_rad"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [VqaRadConfig(name="default", description="All organs; missing images "
                                  "are an error; PNG with long side <= 512.")]

  def __init__(self, *, organ: str | None = None, missing_files: str | None = None,
               max_side: int | None = None, **kwargs):
    """Usual TFDS kwargs, plus the options of VqaRadConfig (None: the default's)."""
    config = make_config(organ=organ, missing_files=missing_files, max_side=max_side)
    if config is not None:
      kwargs["config"] = config
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    path, folder = find_release(os.fspath(dl_manager.manual_dir))
    options = self.builder_config
    entries = read_entries(path)
    questions, left_out_organ, seen = [], 0, {}
    for i, entry in enumerate(entries):
      q = parse_entry(path, i, entry)
      if options.organ:
        if q["organ"] is None:
          _value(path, i, entry, "image_organ")   # the error naming the entry
        if q["organ"] != options.organ:
          left_out_organ += 1
          continue
      q["where"] = _where(path, i, entry)
      seen[q["qid"]] = seen.get(q["qid"], 0) + 1   # ids unique over the whole dataset
      q["id"] = q["qid"] if seen[q["qid"]] == 1 else f"{q['qid']}#{seen[q['qid']]}"
      questions.append(q)
    questions, missing = self._with_images(questions, folder)
    assign_splits(questions)
    by_split = {s: [q for q in questions if q["split"] == s] for s in SPLITS}
    self._set_metadata(by_split, entries=len(entries), left_out_organ=left_out_organ,
                       missing=missing, path=path)
    self._png: dict[str, bytes] = {}   # each image encoded once, for all its questions
    return {s: self._generate_examples(v, folder) for s, v in by_split.items() if v}

  def _with_images(self, questions: list[dict], folder: str) -> tuple[list[dict], dict]:
    """The questions whose image is in the folder; missing ones an error, or (skip)
    left out and counted."""
    kept, absent, lost = [], [], 0
    for q in questions:
      image = os.path.join(folder, q["image_name"])
      if os.path.isfile(image):
        kept.append(q)
        continue
      if self.builder_config.missing_files == "error":
        raise MissingImageError(
            f"{image}: image named by {q['where']} is not in the image folder (build with "
            "the option missing_files=skip to leave its questions out, counted)")
      lost += 1
      if image not in absent:
        absent.append(image)
    return kept, {"policy": self.builder_config.missing_files, "images": len(absent),
                  "questions": lost, "listed": absent[:LISTED]}

  def _set_metadata(self, by_split: Mapping[str, list[dict]], *, entries: int,
                    left_out_organ: int, missing: dict, path: str) -> None:
    train = by_split["train"]
    if not train:
      raise VqaRadFormatError(f"{path}: no training question (after the options organ="
                              f"{self.builder_config.organ!r}, missing_files="
                              f"{self.builder_config.missing_files!r})")
    records = {s: [{**q, "image_id": q["image_name"], "patient": q["image_name"]} for q in v]
               for s, v in by_split.items()}
    vocabulary = vqa.answer_vocabulary(q["answer"] for q in train)
    train_images = {q["image_name"] for q in train}
    self.set_metadata(
        train_questions=[q["question"] for q in train],
        train_answers=[q["answer"] for q in train],
        summary={"splits": vqa.summarise(records, vocabulary), "entries_read": entries,
                 "organ": self.builder_config.organ or "all",
                 "left_out_organ": left_out_organ, "missing_files": missing,
                 "test_images_in_train": len({q["image_name"] for q in by_split["test"]}
                                             & train_images),
                 "split": f"test: phrase_type test_*; validation: images with "
                          f"hash_unit('vqa_rad:' + image_name) < {VALIDATION_FRACTION} "
                          "and no test question; train: the rest",
                 "max_side": self.builder_config.max_side, "json": os.path.basename(path)})

  def _image(self, folder: str, name: str) -> bytes:
    if name not in self._png:
      array = readers.read_image(os.path.join(folder, name))
      max_side = self.builder_config.max_side or None
      self._png[name] = images.encode_png(readers.downsize(readers.to_grey(array), max_side))
    return self._png[name]

  def _generate_examples(self, questions: Sequence[dict], folder: str
                         ) -> Iterator[tuple[str, dict]]:
    for q in questions:
      yield q["id"], vqa.record(image=self._image(folder, q["image_name"]),
                            question=q["question"], answer=q["answer"],
                            answer_type=q["answer_type"], question_type=q["question_type"],
                            image_id=q["image_name"], patient=q["image_name"], id=q["id"])
