"""A weighted mixture of several single-image datasets as ONE random-access source.

`data.name = 'mixture'` with `data.mixture = 'synthetic_multimodality:1,medical_misc:0.5'`
pretrains on several TFDS datasets at once (the paper's archive spans radiography, CT, MR
and ultrasound). The mixture is itself a random-access source, so the trainer's pipeline
(global order from (seed, position), per-process rows, grain iterator checkpoints) works on
it unchanged: deterministic, checkpointable and independent of the process count.

Training split: one "epoch" of the mixture has sum(n_i) records; record j comes from
dataset `choice[j]` (drawn with the normalised weights from a generator seeded by the
mixture spec), and successive draws of dataset i walk through a fresh permutation of its
records each time they run out, so small datasets repeat and large ones are subsampled
exactly in proportion to their weights. Evaluation splits are the plain concatenation of
the datasets' splits (each example once). Labels of labelled datasets are offset so class
spaces do not collide (the class names are prefixed with the dataset name).
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np


def parse(spec: str) -> list[tuple[str, float]]:
  """'a:1,b:0.5' -> [('a', 1.0), ('b', 0.5)]; a missing weight is 1."""
  out = []
  for item in filter(None, (x.strip() for x in spec.split(","))):
    name, sep, weight = item.rpartition(":") if item.count(":") >= 1 else (item, "", "1")
    if not sep or not _is_number(weight):
      name, weight = item, "1"
    w = float(weight)
    if not w > 0:
      raise ValueError(f"data.mixture: weight of {name!r} must be > 0, got {weight}")
    out.append((name, w))
  if not out:
    raise ValueError("data.mixture is empty; expected e.g. 'synthetic_multimodality:1,"
                     "medical_misc:0.5'")
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise ValueError(f"data.mixture names a dataset twice: {names}")
  return out


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


class _Relabelled:
  """Base for sources that rewrite labels into the mixture's joint class space."""
  offsets: Sequence[int]

  def _relabel(self, record: dict, which: int) -> dict:
    record = dict(record)
    label = int(record["label"])
    record["label"] = np.int64(label + self.offsets[which] if label >= 0 else -1)
    return record


class MixedSource(_Relabelled):
  """Weighted, deterministic mixture of random-access sources (training split)."""

  def __init__(self, sources: Sequence, weights: Sequence[float], *, offsets: Sequence[int],
               seed: int = 0, length: int | None = None):
    if len(sources) != len(weights) or not sources:
      raise ValueError("need one weight per source")
    self.sources, self.offsets = list(sources), list(offsets)
    self.weights = np.asarray(weights, np.float64) / np.sum(weights)
    self._len = int(length or sum(len(s) for s in sources))
    rng = np.random.default_rng([seed, 7])
    self.choice = rng.choice(len(sources), size=self._len, p=self.weights).astype(np.int32)
    # The k-th draw of dataset i reads permutation (k // n_i) of it at k % n_i.
    self.rank = np.zeros(self._len, np.int64)
    for i in range(len(sources)):
      at = np.flatnonzero(self.choice == i)
      self.rank[at] = np.arange(at.size)
    self._seed = seed
    self._perms: dict[tuple[int, int], np.ndarray] = {}
    self.dataset_info = getattr(sources[0], "dataset_info", None)

  def __len__(self) -> int:
    return self._len

  def _perm(self, i: int, cycle: int) -> np.ndarray:
    key = (i, cycle)
    if key not in self._perms:
      if len(self._perms) > 64:
        self._perms.clear()
      self._perms[key] = np.random.default_rng([self._seed, 8, i, cycle]).permutation(
          len(self.sources[i]))
    return self._perms[key]

  def locate(self, index: int) -> tuple[int, int]:
    """(dataset, record index) of mixture record `index`."""
    i, k = int(self.choice[index]), int(self.rank[index])
    cycle, at = divmod(k, len(self.sources[i]))
    return i, int(self._perm(i, cycle)[at])

  def __getitem__(self, index: int) -> dict:
    i, j = self.locate(int(index))
    return self._relabel(self.sources[i][j], i)


class ConcatSource(_Relabelled):
  """Evaluation split: the datasets' records one after another."""

  def __init__(self, sources: Sequence, *, offsets: Sequence[int]):
    self.sources, self.offsets = list(sources), list(offsets)
    self._ends = np.cumsum([len(s) for s in sources])
    self.dataset_info = getattr(sources[0], "dataset_info", None)

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, index: int) -> dict:
    i = int(np.searchsorted(self._ends, index, side="right"))
    start = 0 if i == 0 else int(self._ends[i - 1])
    return self._relabel(self.sources[i][int(index) - start], i)


def spec_seed(spec: str) -> int:
  """A seed fixed by the mixture spec (not config.seed: the data stays put across seeds)."""
  return zlib.crc32(spec.encode())


class MixtureInfo:
  """What images.class_names and run.json read from a source's dataset_info."""

  def __init__(self, name: str, version: str, class_names: list[str]):
    self.name, self.version = name, version
    self.metadata = {"class_names": class_names}


class Subset:
  """A fixed labelled subset of `source` (independent of config.seed, so every seed and stage
  sees the same one): label-efficiency studies.

  Without `strata`: the first `n` records of a fixed permutation. With `strata` ([N] class
  ids, one per record): per class, the first max(1, round(n * share of the class)) records of
  a fixed permutation of that class, so a small subset of an imbalanced set keeps every
  class, and subsets are nested (every record of a smaller `n` is in a larger one: each
  class's count only grows with `n`). The size is then about `n` (the per-class roundings).
  """

  def __init__(self, source, n: int, strata: np.ndarray | None = None):
    if not 0 < n <= len(source):
      raise ValueError(f"train_examples={n}: the training split has {len(source)} examples")
    self.source = source
    if strata is None:
      order = np.random.default_rng([len(source), 11]).permutation(len(source))
      self.indices = np.sort(order[:n])
    else:
      strata = np.asarray(strata)
      if strata.shape != (len(source),):
        raise ValueError(f"strata: expected one class per record ({len(source)}), got shape "
                         f"{strata.shape}")
      keep = []
      for k, c in enumerate(np.unique(strata)):
        members = np.flatnonzero(strata == c)
        take = min(len(members), max(1, int(round(n * len(members) / len(source)))))
        keep.append(np.random.default_rng([len(source), 11, k]).permutation(members)[:take])
      self.indices = np.sort(np.concatenate(keep))
    self.dataset_info = getattr(source, "dataset_info", None)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[index])]


def label_strata(labels: np.ndarray) -> np.ndarray:
  """One stratum per record for `Subset`: the label itself for class labels [N] (negative:
  unlabelled, one stratum); for multi-label rows [N, L] (1 positive; 0, -1 uncertain or NaN
  otherwise) the index of the record's rarest positive label (by training prevalence), L for
  a record with none, so every label with a positive keeps one in a small subset."""
  labels = np.asarray(labels, np.float64)
  if labels.ndim == 1:
    return np.where(labels >= 0, labels, -1).astype(np.int64)
  positive = labels == 1
  prevalence = positive.sum(0).astype(np.float64)
  rarity = np.where(positive, prevalence[None, :], np.inf)
  return np.where(positive.any(1), rarity.argmin(1), labels.shape[1]).astype(np.int64)
