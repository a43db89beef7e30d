"""Random-access TFDS sources (ArrayRecord through tfds.data_source; no TensorFlow)."""
from __future__ import annotations

import jax
import ml_collections
from jax.experimental import multihost_utils

from medguide_jax.data import builders, mixture

# Which record layout (and so which decoder, data/decoders.py) each dataset has.
LAYOUTS = {"synthetic_paired": "paired", "derm7pt": "paired", "synthetic_mammo": "mammo",
           "nyu_mammo": "mammo", "cbis_ddsm": "mammo", "nyu_glam_sample": "mammo",
           "nyu_bcc_sample": "mammo"}
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
  builder = _prepare(data)
  missing = [s for s in splits if s not in builder.info.splits]
  if missing:
    raise ValueError(f"dataset {data.name!r} has no split(s) {missing}; "
                     f"it has {sorted(builder.info.splits)}")
  return {s: builder.as_data_source(split=s) for s in splits}


def dataset_record(data: ml_collections.ConfigDict, sources: dict) -> dict:
  """Name, version and example counts, for run.json (from the open sources: no I/O)."""
  info = next(iter(sources.values())).dataset_info
  return {"name": data.name, "version": str(info.version),
          "examples": {s: len(src) for s, src in sources.items()}}


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
