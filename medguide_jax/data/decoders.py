"""One decoder path: each record layout declares its decoder; a task may replace it.

`for_dataset(config.data)` returns `fn(record, rng, *, augment) -> dict of numpy arrays`, the
per-example function grain runs (data/pipeline.py). Which layout a dataset has comes from
`sources.layout(name)`. A task with decoding of its own (ssl's multi-crop views, GLAM's
shape check) overrides `Task.example_fn`.
"""
from __future__ import annotations

import functools
from typing import Callable

import ml_collections

from medguide_jax.data import bags, builders, cxr, mammo, multicrop, sources, transforms

Decoder = Callable[..., dict]


def _paired(data: ml_collections.ConfigDict) -> Decoder:
  return functools.partial(transforms.paired_example, image_size=data.image_size)


def _images(data: ml_collections.ConfigDict) -> Decoder:
  """One image per record, resized to data.image_size, normalised with DEFAULT_NORM."""
  def decode(record, rng, *, augment):
    return multicrop.single_image_example(record, rng if augment else None,
                                          image_size=data.image_size,
                                          channels=data.get("channels", 3), norm={})
  return decode


def _mammo(data: ml_collections.ConfigDict) -> Decoder:
  del data
  return mammo.glam_example


def _bags(data: ml_collections.ConfigDict) -> Decoder:
  """Tiles resized to data.image_size (0: kept at their size)."""
  def decode(record, rng, *, augment):
    return bags.bag_example(record, rng if augment else None,
                            image_size=data.image_size or None)
  return decode


def _feature_bags(data: ml_collections.ConfigDict) -> Decoder:
  def decode(record, rng, *, augment):
    return bags.feature_bag_example(record, rng if augment else None,
                                    max_tiles=data.max_tiles)
  return decode


def _cxr_reports(data: ml_collections.ConfigDict) -> Decoder:
  """Image resized to data.image_size (grey unless data.channels); findings tokenised to
  data.max_len ids, impressions to data.impression_len (0: max_len), by data.tokenizer, else
  the dataset's own tokenizer."""
  builder = builders.prepare(data.name, data_dir=data.get("data_dir") or None,
                             manual_dir=data.get("manual_dir") or None)
  tok = cxr.tokenizer_for(data, builder.info.metadata)

  def decode(record, rng, *, augment):
    return cxr.report_example(record, rng if augment else None, image_size=data.image_size,
                              tokenizer=tok, channels=data.get("channels", 1),
                              impression_len=data.get("impression_len", 0) or None)
  return decode


DECODERS: dict[str, Callable[[ml_collections.ConfigDict], Decoder]] = {
    "paired": _paired, "images": _images, "mammo": _mammo, "bags": _bags,
    "feature_bags": _feature_bags, "cxr_reports": _cxr_reports}


def for_dataset(data: ml_collections.ConfigDict) -> Decoder:
  """The decoder of `data.name`'s record layout."""
  layout = sources.layout(data.name)
  if layout not in DECODERS:
    raise ValueError(f"dataset {data.name!r} has record layout {layout!r}, which has no "
                     f"decoder; known layouts: {sorted(DECODERS)}")
  return DECODERS[layout](data)
