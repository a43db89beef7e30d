"""run.json: what ran, on what, with which code and data."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

import jax

from medguide_jax.data import sources as sources_lib

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
            "ml-collections", "chex", "numpy", "Pillow")


def git_commit() -> str:
  """The repository's HEAD commit (with '-dirty' if the tree has changes), or 'unknown'."""
  root = Path(__file__).resolve().parent.parent
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return head + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def versions() -> dict[str, str]:
  out = {"python": sys.version.split()[0]}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def collect(config, sources: dict) -> dict:
  kinds = sorted({d.device_kind for d in jax.devices()})
  return {"git_commit": git_commit(), "versions": versions(), "platform": platform.platform(),
          "backend": jax.default_backend(), "device_kinds": kinds,
          "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
          "process_count": jax.process_count(),
          "datasets": [sources_lib.dataset_record(config.data, sources)]}
