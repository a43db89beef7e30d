"""The dataset registry and the one way to get a prepared dataset: `prepare(name, ...)`.

Synthetic datasets are generated on first use; real ones are built from their manual download
(`python -m data_prep.build NAME --manual_dir=... --data_dir=...`) and then just reused.
Preparation runs under a file lock, so parallel processes on one host do not race: the first
prepares, the others wait and then reuse it.

    builder = builders.prepare("synthetic_paired")
    source = builder.as_data_source(split="train")  # random access, no TensorFlow
"""
from __future__ import annotations

import hashlib
import importlib
import os
import tempfile

from etils import epath
import filelock
import tensorflow_datasets as tfds

# name -> 'module:Class', imported on first use (a registry entry costs no import time).
_REGISTRY = {
    "synthetic_paired": "medguide_jax.data.synthetic:SyntheticPaired",
    "derm7pt": "data_prep.derm7pt:Derm7pt",
    "synthetic_multimodality": "medguide_jax.data.synthetic_multimodality:SyntheticMultimodality",
    "synthetic_mammo": "medguide_jax.data.synthetic_mammo:SyntheticMammo",
    "brain_tumor_mri": "data_prep.shared_samples:BrainTumorMri",
    "ham10000": "data_prep.shared_samples:Ham10000",
    "breastmnist": "data_prep.shared_samples:BreastMnist",
    "pneumoniamnist": "data_prep.shared_samples:PneumoniaMnist",
    "medical_misc": "data_prep.shared_samples:MedicalMisc",
    "image_folder": "data_prep.image_folder:ImageFolder",
    "nyu_mammo": "data_prep.mammo_exams:NyuMammo",
    "nyu_glam_sample": "data_prep.mammo_exams:NyuGlamSample",
    "nyu_bcc_sample": "data_prep.mammo_exams:NyuBccSample",
    "cbis_ddsm": "data_prep.mammo_exams:CbisDdsm",
}


class _Registry(dict):
  """DATASETS[name] imports the builder class on first access."""

  def __missing__(self, name):
    if name not in _REGISTRY:
      raise KeyError(name)
    module, _, cls = _REGISTRY[name].partition(":")
    self[name] = getattr(importlib.import_module(module), cls)
    return self[name]

  def __contains__(self, name):
    return name in _REGISTRY

  def __iter__(self):
    return iter(_REGISTRY)

  def keys(self):
    return _REGISTRY.keys()


DATASETS: dict[str, type[tfds.core.DatasetBuilder]] = _Registry()


class DatasetNotPreparedError(RuntimeError):
  """A real dataset was asked for before it was built from its manual download."""


def default_data_dir() -> str:
  """`$MEDGUIDE_DATA_DIR`, else `~/medguide_data`."""
  return os.environ.get("MEDGUIDE_DATA_DIR") or os.path.expanduser("~/medguide_data")


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  """Same test as `builder.is_prepared()`, without its warning about a not-yet-built folder.

  TFDS writes a dataset into a temporary folder and renames it when complete, so these files
  in the final folder mean the dataset is fully prepared.
  """
  return all((builder.data_path / f).exists() for f in ("dataset_info.json", "features.json"))


def _needs_manual_dir(builder_cls: type[tfds.core.DatasetBuilder]) -> bool:
  return bool(getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))


def _lock_path(data_dir: epath.Path, name: str) -> str:
  """A local lock file: in data_dir when local; in the temp dir (per host) when remote."""
  if data_dir.as_uri().startswith("file://"):
    data_dir.mkdir(parents=True, exist_ok=True)
    return os.fspath(data_dir / f".{name}.lock")
  # gs:// and friends cannot hold an OS lock; this serialises processes on one host only.
  digest = hashlib.sha1(os.fspath(data_dir).encode()).hexdigest()[:12]
  return os.path.join(tempfile.gettempdir(), f"medguide_{digest}_{name}.lock")


def _build_command(name: str, data_dir: epath.Path) -> str:
  return (f"python -m data_prep.build {name} --manual_dir=/path/to/{name}/release "
          f"--data_dir={data_dir}")


def _checked_manual_dir(name: str, data_dir: epath.Path, manual_dir) -> str | None:
  """The manual dir to build from; an error that says what to run if it is needed and absent."""
  builder_cls = DATASETS[name.partition(":")[0]]
  if _needs_manual_dir(builder_cls) and manual_dir is None:
    raise DatasetNotPreparedError(
        f"Dataset {name!r} is not prepared in {data_dir}. Build it once from its manual "
        f"download:\n  {_build_command(name, data_dir)}\n"
        f"{builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  if manual_dir is None:
    return None
  manual_dir = os.path.expanduser(os.fspath(manual_dir))
  if not epath.Path(manual_dir).is_dir():
    raise FileNotFoundError(f"manual_dir {manual_dir} is not a directory.")
  return manual_dir


def prepare(name: str, *, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None,
            **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Returns the builder of dataset `name`, preparing it first if needed.

  Args:
    name: a key of `DATASETS`.
    data_dir: where TFDS datasets live (local or gs://); default `default_data_dir()`.
    manual_dir: the unpacked manual download of a real dataset; only needed to build it.
    **builder_kwargs: passed to the builder class, e.g. `num_examples=(40, 10, 20)` or
      `image_size=32` for synthetic_paired (a separate config, never the default's files).

  Raises:
    ValueError: unknown name.
    DatasetNotPreparedError: a real dataset that is not built and no manual_dir was given.
    FileNotFoundError: manual_dir is not a directory.
  """
  base, _, tag = name.partition(":")
  if base not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; valid names: {sorted(DATASETS)} "
                     "(a folder of your own images: image_folder:<tag>)")
  if tag:  # 'image_folder:my_archive' -> ImageFolder(tag='my_archive')
    builder_kwargs["tag"] = tag
  data_dir = epath.Path(os.path.expanduser(os.fspath(data_dir or default_data_dir())))
  builder_cls = DATASETS[base]
  builder = builder_cls(data_dir=os.fspath(data_dir), **builder_kwargs)
  if _is_prepared(builder):
    return builder
  manual_dir = _checked_manual_dir(name, data_dir, manual_dir)
  tfds.disable_progress_bar()  # logs, not progress bars, in batch jobs
  with filelock.FileLock(_lock_path(data_dir, name)):
    # A fresh builder: another process may have finished preparing while we waited.
    builder = builder_cls(data_dir=os.fspath(data_dir), **builder_kwargs)
    if not _is_prepared(builder):
      config = tfds.download.DownloadConfig(manual_dir=manual_dir)
      builder.download_and_prepare(download_config=config)
  return builder
