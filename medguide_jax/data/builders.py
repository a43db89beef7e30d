"""The dataset registry and the one way to get a prepared dataset: `prepare(name, ...)`.

Synthetic datasets are generated on first use; real ones are built from their manual download
(`python -m data_prep.build NAME --manual_dir=... --data_dir=...`) and then just reused.
Preparation runs under a file lock, so parallel processes on one host do not race: the first
prepares, the others wait and then reuse it. A build that fails leaves nothing behind: the
partly written version folder, and the folders above it that the build created, are removed.

    builder = builders.prepare("synthetic_paired")
    source = builder.as_data_source(split="train")  # random access, no TensorFlow
"""
from __future__ import annotations

import collections.abc
import hashlib
import importlib
import inspect
import json
import os
import shlex
import tempfile
import types
import typing

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
    "synthetic_bags": "medguide_jax.data.synthetic_bags:SyntheticBags",
    "bcnb": "data_prep.slide_cohorts:Bcnb",
    "wsi_folder": "data_prep.slide_cohorts:WsiFolder",
    "tcga_lung_tiles": "data_prep.bag_samples:TcgaLungTiles",
    "ham10000_clinical": "data_prep.bag_samples:Ham10000Clinical",
    "bag_features": "data_prep.features:BagFeatures",
    "synthetic_cxr": "medguide_jax.data.synthetic_cxr:SyntheticCxr",
    "iu_xray": "data_prep.cxr_reports:IuXray",
    "iu_xray_text": "data_prep.cxr_reports:IuXrayText",
    "mimic_cxr": "data_prep.cxr_reports:MimicCxr",
    "mimic_cxr_text": "data_prep.cxr_reports:MimicCxrText",
    # hybridmed's downstream sets (layout 'cxr_findings' / 'cxr_vqa').
    "chexpert": "data_prep.cxr_downstream:CheXpert",
    "rsna_pneumonia": "data_prep.cxr_downstream:RsnaPneumonia",
    "siim_acr": "data_prep.cxr_downstream:SiimAcr",
    "object_cxr": "data_prep.cxr_downstream:ObjectCxr",
    "covidx": "data_prep.cxr_downstream:Covidx",
    "vqa_rad": "data_prep.cxr_vqa:VqaRad",
    "synthetic_cxr_vqa": "medguide_jax.data.synthetic_vqa:SyntheticCxrVqa",
}


def options_config(config_cls: type, given: dict, *, canonical=None, name_part=None):
  """The builder config of the options `given` (a None value: the default's), or None when
  they are all the default's (the builder's default config). Any other value makes another
  config, named for the options changed (its own folder: two settings never share files).

  config_cls: a tfds BuilderConfig dataclass whose extra fields are the options.
  canonical: values -> values validated and in canonical form (an error names the option).
  name_part: (option, value) -> that option's part of the config name ('side256').
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  default = config_cls(name="default")
  fields = [f.name for f in dataclasses.fields(config_cls) if f.name not in base]
  unknown = set(given) - set(fields)
  if unknown:
    raise TypeError(f"unknown options {sorted(unknown)}; {config_cls.__name__} has {fields}")
  values = {k: getattr(default, k) if given.get(k) is None else given[k] for k in fields}
  values = canonical(values) if canonical else values
  changed = [k for k in fields if values[k] != getattr(default, k)]
  if not changed:
    return None
  name_part = name_part or (lambda k, v: f"{k}_{v}")
  name = "-".join(name_part(k, values[k]) for k in changed)
  description = ", ".join(f"{k}={values[k]}" for k in changed)
  return config_cls(name=name, description=f"Options {description}.", **values)


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


class ManualDirError(FileNotFoundError):
  """The manual dir of a real dataset is missing, not a folder, or holds no file."""


class CorruptDatasetError(RuntimeError, OSError):
  """A prepared dataset's file cannot be read (corrupt, truncated or missing): the message
  names the dataset, the split, the file and the command that rebuilds it.

  A RuntimeError like the reader's own error, so code that caught that still catches this;
  and an OSError (a file on disk that cannot be read), which the command line reports as one
  `error:` line, exit 1, rather than a traceback.
  """


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


def _build_command(name: str, data_dir, manual_dir=None, options: dict | None = None,
                   rebuild: bool = False) -> str:
  """The `python -m data_prep.build` line that builds `name` (a placeholder manual dir for a
  real dataset whose manual dir is not known)."""
  if manual_dir is None and _needs_manual_dir(DATASETS[name.partition(":")[0]]):
    manual_dir = f"/path/to/{name}/release"
  parts = ["python -m data_prep.build", shlex.quote(name)]
  if manual_dir is not None:
    parts.append(shlex.quote(f"--manual_dir={manual_dir}"))
  parts.append(shlex.quote(f"--data_dir={data_dir}"))
  for key, value in sorted((options or {}).items()):
    parts.append("--option " + shlex.quote(f"{key}={format_option(value)}"))
  if rebuild:
    parts.append("--rebuild")
  return " ".join(parts)


def rebuild_command(name: str, builder: tfds.core.DatasetBuilder, manual_dir=None) -> str:
  """The command that rebuilds `builder`'s dataset in place, with the options it was built
  with: those that select its config folder are spelled out; those a builder reads back
  from its folder (image_folder) `prepare(rebuild=True)` keeps by itself."""
  metadata = getattr(builder.info, "metadata", None) or {}
  # image_folder records the archive it was built from; others need the user's manual dir.
  manual_dir = manual_dir or metadata.get("archive")
  return _build_command(name, builder.data_dir_root, manual_dir,
                        _selecting_options(name, builder), rebuild=True)


def _selecting_options(name: str, builder: tfds.core.DatasetBuilder) -> dict:
  """`built_options` if `name` alone would select another folder, else none."""
  options = built_options(name, builder)
  if not options:
    return {}
  tag = name.partition(":")[2]
  try:
    plain = type(builder)(data_dir=os.fspath(builder.data_dir_root),
                          **({"tag": tag} if tag else {}))
  except (TypeError, ValueError):
    return options
  return {} if plain.data_path == builder.data_path else options


# ---------------------------------------------------------------------------------------------
# Builder options (`python -m data_prep.build NAME --option KEY=VALUE`)

# Keyword arguments of builders' __init__ that are not options: TFDS's own, and the tag
# (given as NAME:TAG).
_NOT_OPTIONS = {"self", "tag", "data_dir", "config", "version", "file_format"}


def builder_options(builder_cls: type[tfds.core.DatasetBuilder]) -> dict[str, object]:
  """{option: type} of a builder: the keyword arguments of its own __init__s, typed by the
  field of the same name of its config class where there is one."""
  options = {}
  for cls in reversed(builder_cls.__mro__):
    init = cls.__dict__.get("__init__")
    if init is None or cls.__module__.startswith("tensorflow_datasets"):
      continue
    hints = _type_hints(init)
    for p in inspect.signature(init).parameters.values():
      if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _NOT_OPTIONS:
        options[p.name] = hints.get(p.name, str)
  configs = getattr(builder_cls, "BUILDER_CONFIGS", None) or []
  fields = _field_types(type(configs[0])) if configs else {}
  return {k: fields.get(k, t) for k, t in sorted(options.items())}


def _type_hints(obj) -> dict:
  try:
    return typing.get_type_hints(obj)
  except Exception:  # pylint: disable=broad-except
    return {}  # an annotation that does not resolve: the option is read as text


def _field_types(config_cls: type) -> dict:
  """{field: type} of a config class's own fields (not TFDS's BuilderConfig ones, whose
  annotations need not resolve, which would make get_type_hints fail for all)."""
  out = {}
  for cls in reversed(config_cls.__mro__):
    if cls.__module__.startswith("tensorflow_datasets"):
      continue
    namespace = vars(importlib.import_module(cls.__module__))
    for key, hint in cls.__dict__.get("__annotations__", {}).items():
      try:
        out[key] = eval(hint, namespace) if isinstance(hint, str) else hint  # pylint: disable=eval-used
      except Exception:  # pylint: disable=broad-except
        out[key] = str
  return out


def built_options(name: str, builder: tfds.core.DatasetBuilder) -> dict:
  """The options whose value in `builder`'s config differs from the config that `name` alone
  selects (its tag's, else the default): what a rebuild must pass to get the same config."""
  configs = {c.name: c for c in getattr(type(builder), "BUILDER_CONFIGS", None) or []}
  if not configs or builder.builder_config is None:
    return {}
  tag = name.partition(":")[2]
  reference = configs.get(tag) or next(iter(configs.values()))
  out = {}
  for key in builder_options(type(builder)):
    value = getattr(builder.builder_config, key, None)
    if value is not None and value != getattr(reference, key, None):
      out[key] = value
  return out


def tagged_options(builder_cls: type[tfds.core.DatasetBuilder], data_dir, tag: str,
                   given: dict, defaults: dict) -> dict:
  """The options of a tagged builder (`name:<tag>`): `defaults`, then those the tag was
  built with (its metadata['options'], when prepared: so training, which passes none, reuses
  them), then `given`. An option given that differs from a prepared tag's is an error."""
  stored = None
  if data_dir:
    path = epath.Path(os.fspath(data_dir)) / builder_cls.name / tag / str(builder_cls.VERSION)
    if (path / "dataset_info.json").exists() and (path / "metadata.json").exists():
      stored = dict(json.loads((path / "metadata.json").read_text()).get("options") or {})
      # JSON has no tuples: a tuple option comes back a list, and must compare equal.
      stored = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
  if stored is not None:
    conflicts = {k: (stored.get(k), v) for k, v in given.items() if stored.get(k) != v}
    if conflicts:
      raise ValueError(
          f"{builder_cls.name}:{tag} is already prepared with other options "
          f"{{option: (prepared, asked)}} = {conflicts}; use another tag for other options "
          f"(or delete its folder under data_dir/{builder_cls.name}/).")
  return {**defaults, **(stored or {}), **given}


def _optional(hint) -> tuple[object, bool]:
  """(the type inside `X | None`, whether None is allowed)."""
  args = typing.get_args(hint)
  if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
    rest = [a for a in args if a is not type(None)]
    return (rest[0] if len(rest) == 1 else str), True
  return hint, False


def _is_sequence(hint) -> bool:
  return (typing.get_origin(hint) or hint) in (tuple, list, collections.abc.Sequence)


def describe_option_type(hint) -> str:
  """How a value of type `hint` is written on the command line, for --help and errors."""
  inner, optional = _optional(hint)
  args = typing.get_args(inner)
  if inner is bool:
    text = "true|false"
  elif _is_sequence(inner):
    element = args[0].__name__ if args and isinstance(args[0], type) else "value"
    fixed = typing.get_origin(inner) is tuple and args and Ellipsis not in args
    count = f"{len(args)} " if fixed else ""
    text = f"{count}{element}s, comma-separated"
  else:
    text = getattr(inner, "__name__", "text")
  return f"{text} or none" if optional else text


def parse_option(text: str, hint):
  """`text` from `--option KEY=TEXT` as a value of type `hint`; ValueError if it is not one."""
  inner, optional = _optional(hint)
  if optional and text.strip().lower() in ("", "none"):
    return None
  if inner is bool:
    word = text.strip().lower()
    if word in ("true", "1", "yes", "on"):
      return True
    if word in ("false", "0", "no", "off"):
      return False
    raise ValueError(f"{text!r} is not true or false")
  if _is_sequence(inner):
    args = [a for a in typing.get_args(inner) if a is not Ellipsis]
    element = args[0] if args else str
    items = [x for x in text.strip("()[] ").split(",") if x.strip()]
    fixed = typing.get_origin(inner) is tuple and args and Ellipsis not in typing.get_args(inner)
    if fixed and len(items) != len(args):
      raise ValueError(f"{text!r} is not {len(args)} comma-separated values")
    return tuple(parse_option(x.strip(), element) for x in items)
  if inner in (int, float):
    try:
      return inner(text)
    except ValueError:
      raise ValueError(f"{text!r} is not an {inner.__name__}") from None
  return text


def format_option(value) -> str:
  """A value as `parse_option` reads it back."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    return ",".join(map(str, value))
  return str(value)


def _checked_manual_dir(name: str, data_dir: epath.Path, manual_dir) -> str | None:
  """The manual dir to build from; an error that says what to run if it is needed and absent,
  and one naming it if it is missing or empty (TFDS would raise a bare AssertionError)."""
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
    raise ManualDirError(f"manual_dir {manual_dir} is not a directory.")
  if _needs_manual_dir(builder_cls) and not _holds_a_file(manual_dir):
    raise ManualDirError(f"manual_dir {manual_dir} is empty (no file in it): {name} is built "
                         "from the files of its manual download.")
  return manual_dir


def _holds_a_file(root: str) -> bool:
  """Whether `root` holds a visible file at any depth (stops at the first one)."""
  if "://" in root:  # a remote folder: one listing, no recursive walk
    return any(True for _ in epath.Path(root).iterdir())
  for _, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    if any(not f.startswith(".") for f in files):
      return True
  return False


def _absolute(data_dir) -> epath.Path:
  """A local data dir made absolute (a relative one cannot name its lock file); remote as is."""
  text = os.path.expanduser(os.fspath(data_dir))
  return epath.Path(text if "://" in text else os.path.abspath(text))


def prepare(name: str, *, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None, rebuild: bool = False,
            **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Returns the builder of dataset `name`, preparing it first if needed.

  A build that fails removes what it wrote (see `_build`), so a retry starts clean.

  Args:
    name: a key of `DATASETS`.
    data_dir: where TFDS datasets live (local or gs://); default `default_data_dir()`.
    manual_dir: the unpacked manual download of a real dataset; only needed to build it.
    rebuild: delete the prepared version first and build it again (e.g. a corrupt file),
      with the options it was built with unless `builder_kwargs` give others.
    **builder_kwargs: passed to the builder class, e.g. `num_examples=(40, 10, 20)` or
      `image_size=32` for synthetic_paired (a separate config, never the default's files).

  Raises:
    ValueError: unknown name.
    DatasetNotPreparedError: a real dataset that is not built and no manual_dir was given.
    ManualDirError (a FileNotFoundError): manual_dir is not a directory, or is empty.
  """
  base, _, tag = name.partition(":")
  if base not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; valid names: {sorted(DATASETS)} "
                     "(a folder of your own images: image_folder:<tag>)")
  if tag:  # 'image_folder:my_archive' -> ImageFolder(tag='my_archive')
    builder_kwargs["tag"] = tag
  data_dir = _absolute(data_dir or default_data_dir())
  builder_cls = DATASETS[base]
  builder = builder_cls(data_dir=os.fspath(data_dir), **builder_kwargs)
  if _is_prepared(builder) and not rebuild:
    return builder
  manual_dir = _checked_manual_dir(name, data_dir, manual_dir)
  tfds.disable_progress_bar()  # logs, not progress bars, in batch jobs
  with filelock.FileLock(_lock_path(data_dir, name)):
    # A fresh builder: another process may have finished preparing while we waited.
    builder = builder_cls(data_dir=os.fspath(data_dir), **builder_kwargs)
    if rebuild and builder.data_path.exists():
      # Its options first: some builders read them back from the folder about to go.
      kept = {k: v for k, v in built_options(name, builder).items() if k not in builder_kwargs}
      builder.data_path.rmtree()
      builder = builder_cls(data_dir=os.fspath(data_dir), **builder_kwargs, **kept)
    if not _is_prepared(builder):
      _build(builder, manual_dir)
  return builder


def _build(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> None:
  """download_and_prepare; on any failure (or Ctrl-C), removes the folders it created."""
  created, partials = _new_paths(builder), set(_partials(builder))
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except BaseException:
    _remove(created + [p for p in _partials(builder) if p not in partials], builder)
    raise


def _partials(builder: tfds.core.DatasetBuilder) -> list[epath.Path]:
  """TFDS's temporary copies of the version folder ('incomplete.<random>_<version>')."""
  version = epath.Path(builder.data_path)
  return list(version.parent.glob(f"incomplete.*{version.name}")) if version.parent.exists() \
      else []


def _new_paths(builder: tfds.core.DatasetBuilder) -> list[epath.Path]:
  """The folders a build of `builder` may create that do not exist yet, deepest first: its
  version folder, the dataset/config folders above it, TFDS's `.config` and downloads/."""
  root, path = epath.Path(builder.data_dir_root), epath.Path(builder.data_path)
  candidates = [path]
  while path.parent != path and path.parent != root:
    path = path.parent
    candidates.append(path)
  candidates.insert(len(candidates) - 1, candidates[-1] / ".config")
  candidates += [root / "downloads" / "extracted", root / "downloads"]
  return [p for p in candidates if not p.exists()]


def _remove(created: list[epath.Path], builder: tfds.core.DatasetBuilder) -> None:
  """Removes what a failed build wrote: its version folder, TFDS's temporary copies of it
  and `.config` in full; the other `created` folders only if still empty, so a concurrent
  build of another config that shares a parent is never touched."""
  version = epath.Path(builder.data_path)
  for path in sorted(created, key=lambda p: -len(p.parts)):  # deepest first
    try:
      if path == version or path.name == ".config" or path.name.startswith("incomplete."):
        path.rmtree(missing_ok=True)
      elif path.exists() and not any(True for _ in path.iterdir()):
        path.rmdir()
    except OSError:
      pass  # best effort: never hide the build's own error
