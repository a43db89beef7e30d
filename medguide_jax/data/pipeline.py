"""grain pipelines whose global batches depend on the seed alone.

The order of examples is a function of (seed, global position): epoch e of the training
stream is the permutation `default_rng([seed, e]).permutation(N)`, and the global batch b
holds positions [b*B, (b+1)*B). Each process reads only the rows of each global batch that
its devices hold, so the sequence of global batches is the same for 1 or 64 processes, and
every random augmentation draws from `default_rng([seed, position])`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import grain
import numpy as np


@dataclasses.dataclass
class GlobalOrder:
  """Maps this process's local index to a record, in the seed-determined global order.

  Training (`shuffle=True`): an endless stream of epochs, each a fresh permutation.
  Evaluation (`shuffle=False`): every example once, in order, padded to whole global
  batches; padding rows repeat record 0 and carry mask=False.
  """
  source: object
  global_batch_size: int
  rows: tuple[int, int]
  seed: int
  shuffle: bool
  num_batches: int

  def __post_init__(self):
    self._n = len(self.source)
    if self._n == 0:
      raise ValueError("the dataset split is empty")
    self._local = self.rows[1] - self.rows[0]
    self._perm_cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self.num_batches * self._local

  def position(self, index: int) -> int:
    batch, row = divmod(index, self._local)
    return batch * self.global_batch_size + self.rows[0] + row

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perm_cache:
      self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self._n)}
    return self._perm_cache[epoch]

  def __getitem__(self, index: int) -> tuple[int, bool, dict]:
    pos = self.position(index)
    if self.shuffle:
      epoch, k = divmod(pos, self._n)
      return pos, True, self.source[int(self._permutation(epoch)[k])]
    valid = pos < self._n
    return pos, valid, self.source[pos if valid else 0]


def _to_example(item, *, example_fn: Callable, seed: int, augment: bool) -> dict:
  pos, valid, record = item
  rng = np.random.default_rng([seed, 1, pos]) if augment else None
  example = example_fn(record, rng)
  example["mask"] = np.bool_(valid)
  return example


def make_dataset(source, *, example_fn: Callable, global_batch_size: int,
                 rows: tuple[int, int], seed: int, train: bool, num_batches: int | None = None,
                 num_workers: int = 0, num_threads: int = 8,
                 prefetch: int = 2) -> grain.IterDataset:
  """A grain IterDataset of this process's rows of each global batch (numpy dicts)."""
  if not train:
    num_batches = -(-len(source) // global_batch_size)
  order = GlobalOrder(source, global_batch_size, rows, seed, train, num_batches)
  ds = grain.MapDataset.source(order).map(
      functools.partial(_to_example, example_fn=example_fn, seed=seed, augment=train))
  ds = ds.batch(rows[1] - rows[0], drop_remainder=True)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8 * prefetch)
  iter_ds = ds.to_iter_dataset(options)
  if num_workers > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter_ds
