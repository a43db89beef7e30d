"""Chest X-ray report records of hybridmed: an image and its report's sections.

The 'cxr_reports' layout (`sources.LAYOUTS`), one TFDS schema for every chest X-ray builder
(synthetic_cxr, iu_xray, mimic_cxr and their text-only variants). One record per image
(frontal views by default), its study's report beside it; a text-only dataset has one record
per study and an empty image.
  image:        encoded image bytes (PNG 8/16-bit grey, or the release's JPEG); b'' when
                the dataset is text-only (metadata 'text_only')
  findings, impression: the two sections the method treats differently (text, normalised by
                data/reports.py: whitespace collapsed, de-identification placeholders as
                the one token [DEID]; '' where the report lacks the section)
  indication, comparison: kept aside (text, '' when absent); no loss reads them
  labels:       float32 [L] per-study labels named by metadata 'label_names' (CheXpert's
                1 positive, 0 negative, -1 uncertain, NaN not mentioned; synthetic: 0/1;
                [] when the release has none)
  region_labels: int64 [K] index into label_names of each annotated finding region,
  region_boxes: float32 [K, 4] its box (x0, y0, x1, y1) in pixels of the stored image,
  region_masks: [K] PNG bytes of its binary mask at the image's size (K = 0 in releases
                without regions; synthetic_cxr has them, for part 3's detection/segmentation)
  view:         'PA', 'AP', 'LATERAL', ... (the release's projection, upper case; '' where
                the release does not say, e.g. Open-i without its projections table)
  study, patient, id: text (id unique in the dataset: '<study>/<image>'; text-only:
                '<study>')

Metadata (every builder): label_names, text_only, tokenizer (the JSON of the WordPiece
tokenizer trained on the training split's findings and impressions: data/tokenizer.py),
tokenizer_sha256, and a build summary: per split studies / images / records, the studies
lacking findings or impression (counted, up to 50 listed) and those left out for it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from medguide_jax.data import images, multicrop, tokenizer as tokenizer_lib

LAYOUT = "cxr_reports"
SECTIONS = ("findings", "impression", "indication", "comparison")
LISTED = 50   # studies named per reason in the build summary (all are counted)
# Training augmentation of the image: MGCA's and GLoRIA's, no flip (a mirrored radiograph
# contradicts its report's 'left' and 'right'): a crop of scale (0.8, 1), a rotation of up to
# 10 degrees, brightness and contrast jitter.
CXR_AUGMENT = multicrop.AugmentConfig(flip_p=0.0, rotate_degrees=10.0, jitter_p=0.8,
                                      brightness=0.2, contrast=0.2, gamma=(1.0, 1.0),
                                      grey_p=0.0, blur_p=0.0, noise_p=0.0)
CXR_CROP_SCALE = (0.8, 1.0)


def labelled_image_features(**sections) -> tfds.features.FeaturesDict:
  """TFDS features of a chest X-ray image record with labels and regions (bytes as
  np.object_ tensors: no TensorFlow), plus `sections`: the 'cxr_reports' layout's texts, or
  none for 'cxr_findings' (data/cxr_findings.py)."""
  text = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)
  return tfds.features.FeaturesDict({
      "image": text(),
      **sections,
      "labels": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      "region_labels": tfds.features.Tensor(shape=(None,), dtype=np.int64),
      "region_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
      "region_masks": tfds.features.Tensor(shape=(None,), dtype=np.object_),
      "view": text(), "study": text(), "patient": text(), "id": text(),
  })


def features() -> tfds.features.FeaturesDict:
  """TFDS features of a 'cxr_reports' record."""
  return labelled_image_features(
      **{s: tfds.features.Tensor(shape=(), dtype=np.object_) for s in SECTIONS})


def record(*, image: bytes, findings: str, impression: str, study: str, patient: str,
           view: str, id: str, indication: str = "", comparison: str = "",  # pylint: disable=redefined-builtin
           labels: Sequence[float] = (), region_labels: Sequence[int] = (),
           region_boxes=None, region_masks: Sequence[bytes] = ()) -> dict:
  """One 'cxr_reports' record; every field typed as the schema stores it."""
  k = len(region_labels)
  boxes = np.zeros((0, 4), np.float32) if region_boxes is None else np.asarray(
      region_boxes, np.float32).reshape(k, 4)
  if len(region_masks) != k:
    raise ValueError(f"{id}: {k} region labels but {len(region_masks)} masks")
  return {"image": bytes(image), "findings": str(findings), "impression": str(impression),
          "indication": str(indication), "comparison": str(comparison),
          "labels": np.asarray(labels, np.float32).reshape(-1),
          "region_labels": np.asarray(region_labels, np.int64).reshape(k),
          "region_boxes": boxes, "region_masks": np.asarray(list(region_masks), dtype=object),
          "view": str(view).upper(), "study": str(study), "patient": str(patient),
          "id": str(id)}


class Summary:
  """The build summary of report sections: per split counts, and the studies lacking a
  section (counted in full, the first LISTED named)."""

  def __init__(self):
    self.splits: dict[str, dict] = {}
    self.lacking: dict[str, dict] = {}

  def count(self, split: str, key: str, n: int = 1) -> None:
    counts = self.splits.setdefault(split, {})
    counts[key] = counts.get(key, 0) + n

  def lacks(self, section: str, study: str) -> None:
    entry = self.lacking.setdefault(section, {"count": 0, "studies": []})
    entry["count"] += 1
    if len(entry["studies"]) < LISTED:
      entry["studies"].append(study)

  def as_dict(self) -> dict:
    return {"splits": self.splits, "lacking": self.lacking}


class ReportBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared set-up of every 'cxr_reports' builder: ArrayRecord files (random access without
  TensorFlow), the schema above and its metadata. In `_split_generators` a builder calls
  `self.set_metadata(train_texts=..., label_names=..., summary=...)`, which trains the
  tokenizer on the training split's sections."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  TEXT_ONLY = False

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(), description=self.__doc__,
        metadata=tfds.core.MetadataDict(label_names=[], text_only=self.TEXT_ONLY,
                                        tokenizer="", tokenizer_sha256="", summary={}))

  def set_metadata(self, *, train_texts: Sequence[str], label_names: Sequence[str],
                   summary: Mapping, vocab_size: int = tokenizer_lib.VOCAB_SIZE, **extra):
    """Trains the WordPiece tokenizer on `train_texts` (each training study's findings and
    impression) and fills the metadata."""
    tok = tokenizer_lib.ReportTokenizer(tokenizer_lib.train(train_texts, vocab_size=vocab_size))
    self.info.metadata.update(label_names=list(label_names), text_only=self.TEXT_ONLY,
                              tokenizer=tok.to_json(), tokenizer_sha256=tok.sha256,
                              summary=dict(summary), **extra)
    return tok


def tokenizer_for(data, metadata: Mapping | None) -> tokenizer_lib.ReportTokenizer:
  """The run's tokenizer: the file `data.tokenizer` names (a user's tokenizer.json or BERT
  vocab.txt, e.g. a clinical BERT's), else the one the dataset was built with (`metadata`);
  `data.max_len` ids (default MAX_LEN)."""
  max_len = int(data.get("max_len", 0) or tokenizer_lib.MAX_LEN)  # of every section
  path = data.get("tokenizer", "")
  if path:
    return tokenizer_lib.from_file(path, max_len=max_len)
  return tokenizer_lib.from_metadata(dict(metadata or {}), max_len=max_len)


def report_example(record: Mapping, rng: np.random.Generator | None, *, image_size: int,
                   tokenizer: tokenizer_lib.ReportTokenizer, channels: int = 1,
                   impression_len: int | None = None) -> dict:
  """A record -> {'image' float32 [S, S, channels] (absent when text-only),
  'findings_ids'/'impression_ids' int32 [max_len], 'findings_mask'/'impression_mask' bool,
  'report_ids'/'report_mask' (findings then impression, one text), 'labels' float32 [L]}.
  Impressions are short: `impression_len` (default the tokenizer's max_len) ids.

  The image is resized (training: `CXR_AUGMENT` on a crop of `CXR_CROP_SCALE`: no flip);
  normalisation is DEFAULT_NORM's.
  """
  out = {}
  if record["image"]:
    out["image"] = multicrop.single_image_example(
        {"image": record["image"], "label": 0}, rng, image_size=image_size,
        channels=channels, norm={}, augment_cfg=CXR_AUGMENT,
        crop_scale=CXR_CROP_SCALE)["image"]
  texts = {s: images.text(record[s]) for s in ("findings", "impression")}
  # 'report': both sections as one text (the MGCA-style treatment hybridmed ablates).
  texts["report"] = f"{texts['findings']} {texts['impression']}".strip()
  for name, text in texts.items():
    ids, mask = tokenizer.encode([text], impression_len if name == "impression" else None)
    out[f"{name}_ids"], out[f"{name}_mask"] = ids[0], mask[0]
  out["labels"] = np.asarray(record["labels"], np.float32)
  return out
