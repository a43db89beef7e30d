"""Random-access TFDS sources (ArrayRecord through tfds.data_source; no TensorFlow)."""
from __future__ import annotations

import jax
import ml_collections
from jax.experimental import multihost_utils

from medguide_jax.data import builders

# Which record layout (transforms.EXAMPLE_FNS) each dataset has.
LAYOUTS = {"synthetic_paired": "paired", "derm7pt": "paired"}
DEFAULT_LAYOUT = "images"  # every other dataset: one image per record (data/images.py)


def layout(name: str) -> str:
  """The record layout of dataset `name` ('image_folder:<tag>' is an image_folder)."""
  return LAYOUTS.get(name.partition(":")[0], DEFAULT_LAYOUT)


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
  """{split: random-access source}; prepares the dataset on first use."""
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
