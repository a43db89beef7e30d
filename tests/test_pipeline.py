"""The grain pipeline: global order from the seed alone, per-process rows, exact restore."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from medguide_jax.data import pipeline

N = 23  # not a multiple of any batch size below: epochs straddle batches


def _example(record, rng):
  """The record's id and one augmentation draw (what a transform would use)."""
  return {"id": np.int64(record["id"]),
          "draw": np.float64(rng.random() if rng is not None else -1.0)}


SOURCE = [{"id": i} for i in range(N)]


def _batches(rows, *, global_bs=8, seed=3, train=True, num_batches=9, workers=0):
  ds = pipeline.make_dataset(SOURCE, example_fn=_example, global_batch_size=global_bs,
                             rows=rows, seed=seed, train=train, num_batches=num_batches,
                             num_workers=workers)
  return list(ds)


def _ids(batches):
  return np.concatenate([b["id"] for b in batches])


def test_each_epoch_is_a_permutation_and_epochs_differ():
  ids = _ids(_batches((0, 8), num_batches=6))  # 48 positions = 2 epochs + 2
  first, second = ids[:N], ids[N:2 * N]
  assert sorted(first) == list(range(N)) and sorted(second) == list(range(N))
  assert not np.array_equal(first, second)


def test_global_batches_do_not_depend_on_the_process_count():
  one = _batches((0, 8))
  halves = [_batches((0, 4)), _batches((4, 8))]
  quarters = [_batches((r, r + 2)) for r in range(0, 8, 2)]
  for b, batch in enumerate(one):
    for parts in (halves, quarters):
      for key in ("id", "draw"):
        joined = np.concatenate([p[b][key] for p in parts])
        np.testing.assert_array_equal(joined, batch[key])


def test_seed_changes_order():
  assert not np.array_equal(_ids(_batches((0, 8), seed=3)), _ids(_batches((0, 8), seed=4)))


def test_evaluation_sees_every_example_once_across_processes():
  parts = [_batches((r, r + 4), train=False) for r in (0, 4)]
  ids = np.concatenate([np.concatenate([p[b]["id"][p[b]["mask"]] for p in parts])
                        for b in range(len(parts[0]))])
  assert sorted(ids) == list(range(N))
  assert sum(p[b]["mask"].sum() for p in parts for b in range(len(p))) == N
  assert len(parts[0]) == -(-N // 8)  # padded to whole global batches


def test_worker_processes_give_the_same_batches():
  a, b = _batches((0, 8), workers=0), _batches((0, 8), workers=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["id"], y["id"])
    np.testing.assert_array_equal(x["draw"], y["draw"])


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_restores_exactly(workers):
  make = functools.partial(pipeline.make_dataset, SOURCE, example_fn=_example,
                           global_batch_size=8, rows=(0, 8), seed=3, train=True,
                           num_batches=9, num_workers=workers)
  it = iter(make())
  for _ in range(4):
    next(it)
  state = it.get_state()
  rest = [next(it)["id"] for _ in range(5)]
  fresh = iter(make())
  fresh.set_state(state)
  for want in rest:
    np.testing.assert_array_equal(next(fresh)["id"], want)


def test_empty_split_is_a_clear_error():
  with pytest.raises(ValueError, match="empty"):
    pipeline.make_dataset([], example_fn=_example, global_batch_size=8, rows=(0, 8), seed=0,
                          train=True, num_batches=1)
