"""Random-access TFDS sources (ArrayRecord through tfds.data_source; no TensorFlow).

Each opened split is a `CheckedSource`: reading a corrupt or truncated ArrayRecord file raises
`builders.CorruptDatasetError` naming the dataset, the split, the file and the command that
rebuilds it, instead of the reader's bare Riegeli error. Opening reads the first record of
each file, so a truncated file is reported before training starts, not in a grain worker.
"""
from __future__ import annotations

import bisect
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from medguide_jax.data import builders, cxr, mixture

# Which record layout (and so which decoder, data/decoders.py) each dataset has.
LAYOUTS = {"synthetic_paired": "paired", "derm7pt": "paired", "synthetic_mammo": "mammo",
           "nyu_mammo": "mammo", "cbis_ddsm": "mammo", "nyu_glam_sample": "mammo",
           "nyu_bcc_sample": "mammo", "synthetic_bags": "bags", "bcnb": "bags",
           "wsi_folder": "bags", "tcga_lung_tiles": "bags", "ham10000_clinical": "bags",
           "bag_features": "feature_bags", "synthetic_cxr": "cxr_reports",
           "iu_xray": "cxr_reports", "iu_xray_text": "cxr_reports", "mimic_cxr": "cxr_reports",
           "mimic_cxr_text": "cxr_reports", "chexpert": "cxr_findings",
           "rsna_pneumonia": "cxr_findings", "siim_acr": "cxr_findings",
           "object_cxr": "cxr_findings", "covidx": "cxr_findings", "vqa_rad": "cxr_vqa",
           "synthetic_cxr_vqa": "cxr_vqa"}
DEFAULT_LAYOUT = "images"  # every other dataset: one image per record (data/images.py)


def layout(name: str) -> str:
  """The record layout of dataset `name` ('image_folder:<tag>' is an image_folder)."""
  return LAYOUTS.get(name.partition(":")[0], DEFAULT_LAYOUT)


# (id(source), key) -> (source, value); the source is kept so its id is never reused.
_PER_SOURCE: dict = {}


def once_per_source(source, key, compute):
  """`compute()` once per open source and key (e.g. labels, normalisation statistics, a
  subset): every stage of a run shares the open sources, and this work reads records.
  Keyed by identity: random-access sources need not be hashable."""
  cache_key = (id(source), key)
  if cache_key not in _PER_SOURCE:
    _PER_SOURCE[cache_key] = (source, compute())
  return _PER_SOURCE[cache_key][1]


def record_field(source, key: str) -> np.ndarray:
  """Every record's `key` stacked ([N] or [N, ...]), read once per open source: reading it
  means reading whole records (images too); labels for class weights and stratified subsets."""
  def read():
    try:
      return np.stack([np.asarray(source[i][key]) for i in range(len(source))])
    except KeyError:
      raise KeyError(key) from None
  return once_per_source(source, ("labels", key), read)


def _prepare(data: ml_collections.ConfigDict):
  """The builder, prepared once: process 0 first, then the others (the file lock only
  coordinates processes of one host; a gs:// data dir is shared by many)."""
  prepare = lambda: builders.prepare(data.name, data_dir=data.data_dir or None,
                                     manual_dir=data.manual_dir or None)
  if jax.process_count() == 1:
    return prepare()
  builder = prepare() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"prepared {data.name}")
  return builder or prepare()


def open_splits(data: ml_collections.ConfigDict, splits: tuple[str, ...]) -> dict:
  """{split: random-access source}; prepares the dataset on first use.

  `data.name='mixture'` mixes the datasets of `data.mixture` ('name:weight,...'; see
  data/mixture.py); each is prepared like a single dataset.
  """
  if data.name == "mixture":
    return _open_mixture(data, splits)
  return open_prepared(_prepare(data), data.name, splits, manual_dir=data.manual_dir or None)


def open_prepared(builder, name: str, splits: tuple[str, ...], manual_dir=None) -> dict:
  """{split: CheckedSource} of a prepared builder of dataset `name`; a CorruptDatasetError
  if a file of these splits is missing or truncated (the first record of each is read)."""
  missing = [s for s in splits if s not in builder.info.splits]
  if missing:
    raise ValueError(f"dataset {name!r} has no split(s) {missing}; "
                     f"it has {sorted(builder.info.splits)}")
  rebuild = builders.rebuild_command(name, builder, manual_dir=manual_dir)
  return {s: CheckedSource(builder.as_data_source(split=s), name=name, split=s,
                           rebuild=rebuild, folder=os.fspath(builder.data_path)).probe()
          for s in splits}


class CheckedSource:
  """A split's random-access source whose read errors name what is broken (a
  `builders.CorruptDatasetError`); otherwise it reads and measures like the source it wraps.

  Picklable (grain workers get a copy), and the error it raises pickles too, so it reaches
  the trainer intact from a worker process.
  """

  # What the ArrayRecord/Riegeli reader raises for a corrupt, truncated or missing file
  # (RuntimeError), plus decoding errors of a record whose bytes are damaged.
  _READ_ERRORS = (RuntimeError, OSError, ValueError)

  def __init__(self, source, *, name: str, split: str, rebuild: str, folder: str):
    self.source = source
    self.dataset_info = source.dataset_info  # what images.class_names and run.json read
    self.name, self.split, self.rebuild, self.folder = name, split, rebuild, folder
    shards = [f for f in source.dataset_info.splits[split].file_instructions if f.take > 0]
    self.files = [os.fspath(f.filename) for f in shards]
    self._starts = [0]  # first record index of each file
    for f in shards[:-1]:
      self._starts.append(self._starts[-1] + f.take)

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:
    return f"CheckedSource({self.name!r}, split={self.split!r}, {len(self)} records)"

  def __getitem__(self, index):
    try:
      return self.source[index]
    except self._READ_ERRORS as e:
      if not self._in_range([index]):
        raise  # a caller's bad index, not a broken file
      raise self._error([index], e) from e

  def __getitems__(self, indices):
    indices = list(indices)
    try:
      if hasattr(self.source, "__getitems__"):
        return self.source.__getitems__(indices)
      return [self.source[i] for i in indices]
    except self._READ_ERRORS as e:
      if not self._in_range(indices):
        raise
      raise self._error(indices, e) from e

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def probe(self) -> "CheckedSource":
    """Reads the first record of every file (which opens it): a truncated or missing file
    fails here, in the main process, with the clear error."""
    for start in self._starts[:len(self.files)]:
      self[start]
    return self

  def file_of(self, index: int) -> str:
    """The ArrayRecord file that holds record `index`."""
    return self.files[bisect.bisect_right(self._starts, int(index)) - 1]

  def _in_range(self, indices) -> bool:
    return bool(self.files) and all(0 <= int(i) < len(self) for i in indices)

  def _error(self, indices, cause: Exception) -> builders.CorruptDatasetError:
    """The error for a failed read of `indices`: what, where, and how to rebuild it."""
    files = sorted({self.file_of(i) for i in indices})
    where = f"record {int(indices[0])}" if len(indices) == 1 else f"{len(indices)} records"
    return builders.CorruptDatasetError(
        f"dataset {self.name!r}, split {self.split!r}: cannot read {where} of the ArrayRecord "
        f"file{'s' if len(files) > 1 else ''} {', '.join(files)}: it is corrupt or truncated "
        f"({cause}). Rebuild the dataset (this deletes its folder {self.folder} and builds "
        f"it again):\n  {self.rebuild}")


def dataset_record(data: ml_collections.ConfigDict, sources: dict) -> dict:
  """Name, version and example counts (and a report dataset's tokenizer), for run.json
  (from the open sources: no I/O)."""
  info = next(iter(sources.values())).dataset_info
  out = {"name": data.name, "version": str(info.version),
         "examples": {s: len(src) for s, src in sources.items()}}
  # which vocabulary the run's texts (reports, VQA questions) were tokenised with
  if layout(data.name) in (cxr.LAYOUT, "cxr_vqa"):
    out["tokenizer"] = cxr.tokenizer_for(data, info.metadata).describe()
  return out


def _open_mixture(data: ml_collections.ConfigDict, splits: tuple[str, ...]) -> dict:
  parts = mixture.parse(data.get("mixture", ""))
  opened, offsets, class_names = [], [], []
  for name, _ in parts:
    one = ml_collections.ConfigDict(data.to_dict())
    one.name = name
    one.manual_dir = ""  # a mixture reuses prepared datasets; build each with data_prep
    opened.append(open_splits(one, splits))
    offsets.append(len(class_names))
    names = list((opened[-1]["train"].dataset_info.metadata or {}).get("class_names", []))
    class_names += [f"{name}/{c}" for c in names]
  info = mixture.MixtureInfo("mixture", "+".join(
      f"{n}@{o['train'].dataset_info.version}" for (n, _), o in zip(parts, opened)), class_names)
  out = {}
  for split in splits:
    srcs = [o[split] for o in opened]
    if split == "train":
      src = mixture.MixedSource(srcs, [w for _, w in parts], offsets=offsets,
                                seed=mixture.spec_seed(data.mixture))
    else:
      src = mixture.ConcatSource(srcs, offsets=offsets)
    src.dataset_info = info
    out[split] = src
  return out
