"""image_folder:<tag>: a user's own archive of medical images as a single-image TFDS dataset.

    python -m data_prep.build image_folder:my_archive --manual_dir=/data/my_archive

Each archive gets its own builder config (the tag) and so its own folder under
`<data_dir>/image_folder/<tag>/`. Records follow `medguide_jax.data.images` (PNG bytes at
native depth, int64 label, source, id). The archive may hold PNG, JPEG, TIFF, DICOM (also
without a suffix) and NIfTI files (`readers.file_kind`); hidden files and folders are ignored.

Labels, in this order:
  * `labels.csv` at the root, columns `path,label[,split][,source]`: `path` relative to the
    root; an empty label is unlabelled (-1). Only the listed files are used.
  * otherwise the first-level subfolder names are the classes (torchvision's ImageFolder
    convention); files directly at that level are unlabelled (-1). `folder_labels=False` turns
    this off (e.g. folders per patient).
  * no labels at all: every label is -1 and `class_names` is [].
  `class_names` are sorted (numerically when every class name is an integer), so label k is
  `class_names[k]`.

Splits: a `split` column, else top-level `train|validation|test` folders (also `training`,
`val`, `valid`, `testing`), else a deterministic hash of the relative path: 80% train, 10%
validation, 10% test. A volume (NIfTI, multi-frame DICOM) is one unit: all of its slices go to
one split, so no patient volume straddles train and test. Only non-empty splits are written.

NIfTI volumes give one record per kept slice (`readers.volume_slices`, axial, every
`slice_every`-th, empty ones skipped), id `path#z`; a multi-frame DICOM one per frame, id
`path#frame`. `source`: the CSV column, else the `source` kwarg, else the DICOM Modality
(`readers.DICOM_MODALITY_SOURCES`), else 'unknown'.

Errors name the file: an empty archive, a CSV row whose path does not exist, a bad split value,
an unreadable image (or, with `skip_unreadable=True`, a warning with the count and names).
Builder options are stored in the dataset's metadata: a prepared tag is reused with the options
it was built with, and asking for it with other options is an error (use a new tag), so stale
data is never reused silently.
"""
from __future__ import annotations

import collections
from concurrent import futures
import csv
import dataclasses
import hashlib
import os
import re
from typing import Callable, Iterable, Iterator, Mapping, TypeVar

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from medguide_jax.data import builders
from medguide_jax.data import images
from medguide_jax.data import readers

SPLITS = ("train", "validation", "test")
# Folder names / CSV values accepted for each split (compared lower-case).
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation",
                 "valid": "validation", "val": "validation", "test": "test",
                 "testing": "test"}
LABELS_CSV = "labels.csv"
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
image_folder:<tag> builds a dataset from a folder of your own images (PNG, JPEG, TIFF, DICOM,
NIfTI); the folder is the manual dir. Labels come from a labels.csv at its root (columns
path,label[,split][,source]) or from first-level class subfolders; splits from a split column,
train/validation/test folders, or an 80/10/10 hash of each file's path.
  python -m data_prep.build image_folder:<tag> --manual_dir=<folder> --data_dir=<data_dir>
"""


# ---------------------------------------------------------------------------------------------
# Helpers shared with the other single-image builders (data_prep/shared_samples.py).


def hash_unit(key: str) -> float:
  """A deterministic number in [0, 1) from `key` (SHA-256; the same on every machine)."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(key: str, validation: float = 0.1, test: float = 0.1) -> str:
  """'train', 'validation' or 'test' for `key`: test below `test`, then validation, then train."""
  u = hash_unit(key)
  if u < test:
    return "test"
  if u < test + validation:
    return "validation"
  return "train"


def stratified_holdout(groups_by_class: Mapping[object, Iterable[str]],
                       fraction: float) -> set[str]:
  """round(fraction * n) groups of each class, those with the smallest hash: a deterministic,
  class-stratified holdout whose size does not depend on luck."""
  held = set()
  for keys in groups_by_class.values():
    keys = sorted(set(keys), key=lambda k: (hash_unit(k), k))
    held.update(keys[:round(fraction * len(keys))])
  return held


def example(image: np.ndarray, label: int, source: str, record_id: str) -> dict:
  """One record of the single-image schema."""
  return {"image": images.encode_png(image), "label": np.int64(label),
          "source": source.encode(), "id": record_id.encode()}


def sort_class_names(names: Iterable[str]) -> list[str]:
  """Sorted class names: numerically if all are integers ('2' before '10'), else as text."""
  names = sorted(set(names))
  if names and all(re.fullmatch(r"[+-]?\d+", n) for n in names):
    return sorted(names, key=int)
  return names


def read_csv(path: str, required: tuple[str, ...]) -> list[dict[str, str]]:
  """Rows of a CSV (BOM-tolerant) as dicts, after checking the `required` columns exist."""
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      reader = csv.DictReader(f)
      rows = list(reader)
      columns = [c.strip() for c in reader.fieldnames or []]
  except OSError as e:
    raise FileNotFoundError(f"{path} cannot be read: {e}") from e
  missing = [c for c in required if c not in columns]
  if missing:
    raise ValueError(f"{path}: missing columns {missing}; found {columns}")
  return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]


_T = TypeVar("_T")
_R = TypeVar("_R")


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T],
                workers: int | None = None) -> Iterator[_R]:
  """`map(fn, items)` on a thread pool, in order, with a bounded number of items in flight.

  Decoding and PNG encoding (zlib) release the GIL, so threads give close to a core each;
  the bound keeps memory flat for large images. An exception in `fn` is raised here, at its
  item.
  """
  workers = workers or min(8, os.cpu_count() or 1)
  if workers <= 1:
    yield from map(fn, items)
    return
  with futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 2 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------
# Scanning an archive


@dataclasses.dataclass(frozen=True)
class Entry:
  """One file of the archive: where it goes and what it is labelled."""
  path: str  # absolute
  relative: str  # posix path relative to the archive root: the id (and split key)
  kind: str  # readers.file_kind: 'image', 'dicom' or 'nifti'
  split: str
  label_name: str | None  # None: unlabelled
  source: str | None = None  # from labels.csv


def walk_files(root: str) -> list[tuple[str, str, str]]:
  """(absolute path, posix relative path, kind) of every readable-looking file, sorted."""
  found = []
  for directory, dirs, files in os.walk(root, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
    for name in sorted(files):
      if name.startswith("."):
        continue
      path = os.path.join(directory, name)
      kind = readers.file_kind(path)
      if kind is not None:
        found.append((path, os.path.relpath(path, root).replace(os.sep, "/"), kind))
  return found


def _split_of_value(value: str, where: str) -> str:
  split = SPLIT_ALIASES.get(value.strip().lower())
  if split is None:
    raise ValueError(f"{where}: unknown split {value!r}; use one of "
                     f"{sorted(SPLIT_ALIASES)}")
  return split


def scan_csv(root: str, csv_path: str) -> tuple[list[Entry], int]:
  """Entries listed in labels.csv (and how many image files it leaves out)."""
  rows = read_csv(csv_path, ("path", "label"))
  has_split = bool(rows) and "split" in rows[0]
  entries, seen = [], {}
  for line, row in enumerate(rows, start=2):  # line 1 is the header
    where = f"{csv_path} line {line}"
    relative = row["path"].replace("\\", "/").lstrip("/")
    if not relative or ".." in relative.split("/"):
      raise ValueError(f"{where}: path {row['path']!r} must be a file inside {root}.")
    path = os.path.join(root, *relative.split("/"))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{where}: {relative!r} does not exist ({path}).")
    kind = readers.file_kind(path)
    if kind is None:
      raise ValueError(f"{where}: {relative!r} is not a supported image file "
                       f"({readers.SUPPORTED_SUFFIXES} or DICOM).")
    if relative in seen:
      raise ValueError(f"{where}: {relative!r} is listed twice (also line {seen[relative]}).")
    seen[relative] = line
    split = _split_of_value(row["split"], where) if has_split else hash_split(relative)
    entries.append(Entry(path=path, relative=relative, kind=kind, split=split,
                         label_name=row["label"] or None, source=row.get("source") or None))
  listed = set(seen)
  unlisted = sum(1 for _, rel, _ in walk_files(root) if rel not in listed)
  return entries, unlisted


def scan_folders(root: str, folder_labels: bool = True) -> list[Entry]:
  """Entries of every image file, labelled by class folder, split by folder or hash."""
  files = walk_files(root)
  top = {rel.split("/")[0] for _, rel, _ in files if "/" in rel}
  split_layout = any(name.lower() in SPLIT_ALIASES for name in top)
  entries = []
  for path, relative, kind in files:
    parts = relative.split("/")
    if split_layout:
      if len(parts) < 2 or parts[0].lower() not in SPLIT_ALIASES:
        split_folders = sorted(t for t in top if t.lower() in SPLIT_ALIASES)
        raise ValueError(
            f"{path}: the archive has split folders {split_folders} but this file is in none "
            "of them; move it, or list the files in a labels.csv.")
      split, parts = SPLIT_ALIASES[parts[0].lower()], parts[1:]
    else:
      split = hash_split(relative)
    label = parts[0] if folder_labels and len(parts) >= 2 else None
    entries.append(Entry(path=path, relative=relative, kind=kind, split=split,
                         label_name=label))
  return entries


def scan_archive(root: str, folder_labels: bool = True) -> tuple[list[Entry], list[str]]:
  """(entries, class_names) of an archive; a ValueError if it holds no image file."""
  csv_path = os.path.join(root, LABELS_CSV)
  if os.path.isfile(csv_path):
    entries, unlisted = scan_csv(root, csv_path)
    if unlisted:
      logging.info("%s: %d image files not listed in %s are not used.", root, unlisted,
                   LABELS_CSV)
  else:
    entries = scan_folders(root, folder_labels)
  if not entries:
    raise ValueError(f"{root}: no image files found (supported: {readers.SUPPORTED_SUFFIXES} "
                     f"and DICOM without a suffix).")
  class_names = sort_class_names(e.label_name for e in entries if e.label_name is not None)
  return entries, class_names


# ---------------------------------------------------------------------------------------------
# The builder


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """One user archive (name = tag) and how to read it."""
  source: str | None = None
  max_side: int | None = None
  skip_unreadable: bool = False
  folder_labels: bool = True
  slice_every: int = 1

  def options(self) -> dict:
    return {"source": self.source, "max_side": self.max_side,
            "skip_unreadable": self.skip_unreadable, "folder_labels": self.folder_labels,
            "slice_every": self.slice_every}


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """A user's folder of medical images (see the module docstring)."""

  name = "image_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [ImageFolderConfig(name="default", description="An untagged archive.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, tag: str | None = None, source: str | None = None,
               max_side: int | None = None, skip_unreadable: bool | None = None,
               folder_labels: bool | None = None, slice_every: int | None = None, **kwargs):
    """Usual TFDS kwargs plus the archive's tag and reading options.

    Options left at None take their default when building, and whatever the tag was built
    with when it is already prepared (so training, which passes no options, reuses it);
    an option given explicitly must match a prepared tag's.

    Args:
      tag: the archive's name: its config name and folder (letters, digits, '_', '-', '.').
      source: the `source` of records without one in labels.csv (default: per format).
      max_side: shrink images whose long side is larger (default: native size).
      skip_unreadable: skip files that cannot be read, with a warning (default: fail).
      folder_labels: label by first-level subfolder when there is no labels.csv (default
        True).
      slice_every: keep every k-th axial slice of NIfTI volumes (default 1).
      **kwargs: data_dir, version... for `tfds.core.GeneratorBasedBuilder`.
    """
    name = "default" if tag is None else str(tag)
    if not _TAG_RE.match(name):
      raise ValueError(f"image_folder tag {name!r}: use letters, digits, '_', '-' and '.' "
                       "(it names a folder).")
    if max_side is not None and int(max_side) < 1:
      raise ValueError(f"max_side must be >= 1 or None, got {max_side}")
    if slice_every is not None and int(slice_every) < 1:
      raise ValueError(f"slice_every must be >= 1, got {slice_every}")
    given = {"source": source, "max_side": None if max_side is None else int(max_side),
             "skip_unreadable": None if skip_unreadable is None else bool(skip_unreadable),
             "folder_labels": None if folder_labels is None else bool(folder_labels),
             "slice_every": None if slice_every is None else int(slice_every)}
    given = {k: v for k, v in given.items() if v is not None}
    options = builders.tagged_options(type(self), kwargs.get("data_dir"), name, given,
                                      ImageFolderConfig(name=name).options())
    kwargs["config"] = ImageFolderConfig(name=name, description=f"User archive {name!r}.",
                                         **options)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=images.features(),
        description=__doc__,
        metadata=tfds.core.MetadataDict(class_names=[],
                                        options=self.builder_config.options()),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    entries, class_names = scan_archive(root, self.builder_config.folder_labels)
    self.info.metadata["class_names"] = class_names
    self.info.metadata["archive"] = root
    if self.builder_config.skip_unreadable:
      entries = self._readable(root, entries)
    by_split = {split: [e for e in entries if e.split == split] for split in SPLITS}
    index = {name: i for i, name in enumerate(class_names)}
    return {split: self._generate_examples(split, split_entries, index)
            for split, split_entries in by_split.items() if split_entries}

  def _records(self, entry: Entry) -> Iterator[tuple[str, np.ndarray]]:
    """(id, image) of each record of one file."""
    config = self.builder_config
    if entry.kind == "nifti":
      for z, plane in readers.volume_slices(entry.path, axis=2, every=config.slice_every):
        yield f"{entry.relative}#{z}", plane
    elif entry.kind == "dicom" and readers.dicom_num_frames(entry.path) > 1:
      for f in range(readers.dicom_num_frames(entry.path)):
        yield f"{entry.relative}#{f}", readers.read_dicom(entry.path, frame=f)
    else:
      yield entry.relative, readers.read_image(entry.path)

  def _source(self, entry: Entry) -> str:
    if entry.source:
      return entry.source
    if self.builder_config.source:
      return self.builder_config.source
    if entry.kind == "dicom":
      return readers.dicom_source(entry.path) or "unknown"
    return "unknown"

  def _readable(self, root: str, entries: list[Entry]) -> list[Entry]:
    """The entries whose files decode (a first pass, so no split ends up empty after
    skipping); the others are logged with their count and names."""
    def probe(entry: Entry):
      try:
        self._source(entry)
        for _, image in self._records(entry):
          readers.check_layout(image, entry.path)
      except ValueError as e:
        return e
      return None
    readable, skipped = [], []
    for entry, error in zip(entries, ordered_map(probe, entries)):
      if error is None:
        readable.append(entry)
      else:
        skipped.append(entry.relative)
        logging.warning("Skipping unreadable file: %s", error)
    if skipped:
      logging.warning("image_folder:%s: skipped %d unreadable file(s): %s%s",
                      self.builder_config.name, len(skipped), ", ".join(skipped[:10]),
                      " ..." if len(skipped) > 10 else "")
    if not readable:
      raise ValueError(f"{root}: none of its {len(entries)} image files can be read.")
    return readable

  def _generate_examples(self, split: str, entries: list[Entry],
                         index: Mapping[str, int]) -> Iterator[tuple[str, dict]]:
    del split  # one generator per split
    config = self.builder_config

    def encode(entry: Entry) -> list[tuple[str, dict]]:
      label = -1 if entry.label_name is None else index[entry.label_name]
      source = self._source(entry)
      return [(record_id, example(
          readers.downsize(readers.check_layout(image, entry.path), config.max_side),
          label, source, record_id)) for record_id, image in self._records(entry)]

    def encode_or_explain(entry: Entry) -> list[tuple[str, dict]]:
      try:
        return encode(entry)
      except ValueError as e:
        raise ValueError(f"{e}\n(to skip unreadable files, prepare with "
                         "skip_unreadable=True)") from e

    for records in ordered_map(encode_or_explain, entries):
      yield from records
