"""The mesh, multi-host start-up, sharding rules and host-to-device batch placement.

One 1-D mesh over every device of every process, axis 'data'. Batches are sharded
on their leading axis over 'data'; parameters are replicated unless a regex in
`config.mesh.fsdp_rules` shards them (big_vision's FSDP rule: the largest dimension
that the device count divides).
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medguide_jax import paths

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Joins a multi-process run, if this is one.

  Explicit flags win; else a TPU pod, SLURM (SLURM_NTASKS > 1) or `MEDGUIDE_DISTRIBUTED=1`
  lets JAX detect the cluster; else this is a single-process run and nothing happens.
  With JAX_PLATFORMS=cpu, cross-process collectives go through gloo.
  """
  # Decide from the environment only: asking JAX for its backend would start it, and
  # jax.distributed.initialize must come before anything starts the backend.
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif (os.environ.get("MEDGUIDE_DISTRIBUTED") == "1"
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0):
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_size(batch_size: int, what: str = "batch_size") -> None:
  """The global batch must split evenly over devices (and so over processes)."""
  n = jax.device_count()
  if batch_size % n:
    raise ValueError(f"{what}={batch_size} is not divisible by the {n} devices; "
                     f"use a multiple of {n}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], n: int, min_size_mb: float, itemsize: int) -> P:
  if np.prod(shape, dtype=np.int64) * itemsize < min_size_mb * 2**20:
    return P()
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return P(*spec)
  return P()


def _param_path(path: str, names: set[str] | None) -> str:
  """The parameter path a leaf of a bigger tree stands for: the longest suffix of its path
  that is a name in `names` ('opt_state/0/mu/enc/conv/kernel' -> 'enc/conv/kernel'), or
  the whole path without `names`; '' for leaves that mirror no parameter (step counters)."""
  if names is None:
    return path
  parts = path.split("/")
  return next(("/".join(parts[i:]) for i in range(len(parts)) if "/".join(parts[i:]) in names),
              "")


def param_shardings(mesh: Mesh, tree, fsdp_rules: str = "", min_size_mb: float = 4.0, *,
                    param_paths: list[str] | None = None):
  """Shardings for a pytree of arrays or ShapeDtypeStructs (params, optimiser state, a
  whole TrainState).

  A leaf whose parameter path (see `_param_path`; `param_paths` names the parameters when
  the tree is more than a parameter tree) fully matches the regex `fsdp_rules` is sharded
  over 'data' on its largest divisible dimension; everything else is replicated. A rule
  that matches no parameter is a ValueError showing real paths.
  """
  n = mesh.devices.size
  names = None if param_paths is None else set(param_paths)
  if fsdp_rules:
    paths.check_matches(param_paths or paths.paths(tree), fsdp_rules, "mesh.fsdp_rules")
  pattern = re.compile(fsdp_rules) if fsdp_rules else None

  def rule(path, leaf):
    name = _param_path(paths.path_str(path), names)
    if pattern is None or not name or not hasattr(leaf, "shape") or not pattern.fullmatch(name):
      return replicated(mesh)
    return NamedSharding(mesh, _fsdp_spec(tuple(leaf.shape), n, min_size_mb,
                                          np.dtype(leaf.dtype).itemsize))

  return jax.tree_util.tree_map_with_path(rule, tree)


def to_global(batch, mesh: Mesh):
  """Host-local numpy rows of a global batch -> global jax.Arrays sharded on 'data'."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def process_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
  """[start, stop) of this process's rows in every global batch, as the mesh lays them out."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_batch_size if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  start, stop = min(starts), max(stops)
  if stop - start != global_batch_size // jax.process_count():
    raise ValueError("this process's devices do not hold one contiguous block of the batch")
  return start, stop
