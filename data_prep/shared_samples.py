"""Single-image TFDS builders over small real medical datasets (the project's shared samples).

Every builder writes the record schema of `medguide_jax.data.images` (PNG bytes at native depth,
int64 label, source, id = path relative to the manual dir) and needs a manual dir: the folder
named in its MANUAL_DOWNLOAD_INSTRUCTIONS (in this project: a folder of ../shared/data).

  brain_tumor_mri  Brain Tumor MRI (Nickparvar, Kaggle; CC0): 4 classes glioma / meningioma /
                   notumor / pituitary (sorted, as the release's folders). The release's
                   Testing images are the test split; its Training images are split into train
                   and a class-stratified 15% validation holdout (deterministic, by hash of the
                   path). Grey 'L' (the JPEGs are grey content saved as RGB). Source 'mr'.
  ham10000         HAM10000 (Tschandl et al., Sci Data 2018): 7 diagnoses akiec / bcc / bkl / df
                   / mel / nv / vasc (sorted, as HAM10000 lists them). Splits are by lesion_id
                   (several images of one lesion never straddle splits), 80/10/10 stratified by
                   diagnosis, ranked by hash of the lesion id. RGB. Source 'dermoscopy'.
  breastmnist      MedMNIST v2 BreastMNIST (Al-Dhabyani et al. ultrasound): the official
                   train/val/test arrays; labels as MedMNIST's INFO: 0 'malignant',
                   1 'normal, benign'. Source 'us'.
  pneumoniamnist   MedMNIST v2 PneumoniaMNIST (Kermany et al. paediatric CXR): 0 'normal',
                   1 'pneumonia'. Source 'xray'.
  medical_misc     an unlabelled (-1) multi-domain pretraining pool (Ghesu et al. pretrain on
                   many modalities at once) of every usable image in the shared samples folder:
                   mammograms (16-bit), NIH chest X-rays, CT / MR DICOM (source from Modality),
                   MNI152 and nibabel T1 NIfTI slices (every 4th axial), fundus, histology
                   tiles, HAM10000 dermoscopy and brain tumour MRI. Splits by hash of the id
                   (of the volume for NIfTI slices): 80/10/10.

Images whose long side exceeds the builder kwarg `max_side` are shrunk (area averaging, dtype
kept): medical_misc defaults to 1024 (the full-field mammograms are 3328 x 2560), the others
keep their native size unless asked. A non-default `max_side` is its own builder config
('max_side_<n>', 'native' for 0), so different settings never share files.

Every inconsistency in a release is an error that names the file, the CSV line or array key,
and the value; a missing image or volume names its path.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_prep import image_folder
from medguide_jax.data import images
from medguide_jax.data import readers

SPLITS = ("train", "validation", "test")


class SharedSamplesFormatError(ValueError):
  """The manual dir does not look like the expected release; the message says where."""


def _require_file(path: str, instructions: str) -> str:
  if not os.path.isfile(path):
    raise SharedSamplesFormatError(f"{path} not found.\n{instructions}")
  return path


@dataclasses.dataclass(eq=False)
class SharedSamplesConfig(tfds.core.BuilderConfig):
  """Largest image side kept (0: native size)."""
  max_side: int = 0


def _config_for(max_side: int) -> SharedSamplesConfig:
  name = "native" if max_side == 0 else f"max_side_{max_side}"
  return SharedSamplesConfig(name=name, max_side=max_side,
                             description=f"Images shrunk to a long side <= {max_side} px."
                             if max_side else "Images at native size.")


class _SharedSamplesBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared set-up: ArrayRecord files, the image schema, `class_names` metadata, `max_side`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  CLASS_NAMES: tuple[str, ...] = ()
  DEFAULT_MAX_SIDE = 0  # 0: native size
  HOMEPAGE = ""

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if cls.DEFAULT_MAX_SIDE:
      default = _config_for(cls.DEFAULT_MAX_SIDE)
      default.name = "default"
    else:
      default = SharedSamplesConfig(name="default", description="Images at native size.")
    cls.BUILDER_CONFIGS = [default]

  def __init__(self, *, max_side: int | None = None, **kwargs):
    """Usual TFDS kwargs, plus `max_side` (None: the builder's default; 0: native size)."""
    if max_side is not None:
      max_side = int(max_side)
      if max_side < 0:
        raise ValueError(f"max_side must be >= 0 (0: native size), got {max_side}")
      if max_side != self.DEFAULT_MAX_SIDE:
        kwargs["config"] = _config_for(max_side)
    # ArrayRecord: random access through tfds.data_source, no TensorFlow needed.
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=images.features(),
        description=self.__doc__,
        homepage=self.HOMEPAGE or None,
        metadata=tfds.core.MetadataDict(class_names=list(self.CLASS_NAMES)),
    )

  def _shrink(self, image: np.ndarray) -> np.ndarray:
    return readers.downsize(image, self.builder_config.max_side or None)


# ---------------------------------------------------------------------------------------------
# Brain Tumor MRI


BRAIN_TUMOR_INSTRUCTIONS = """\
Brain Tumor MRI Dataset (M. Nickparvar, Kaggle, CC0; merges figshare (Cheng et al.), SARTAJ and
Br35H): 7,023 axial MRI slices in Training/<class>/*.jpg and Testing/<class>/*.jpg, classes
glioma, meningioma, notumor, pituitary. The project's 300-image subset is
../shared/data/brain_tumor_mri_small (from github.com/KomalChaudhari8/BRAIN_TUMOR_APP, 224x224,
with labels.csv image,split,label). The manual dir is the folder holding Training/ and Testing/
(and labels.csv if present; without it the class folders give the labels).
  python -m data_prep.build brain_tumor_mri --manual_dir=<manual_dir> --data_dir=<data_dir>
"""
_BRAIN_RELEASE_SPLITS = {"training": "Training", "testing": "Testing"}


class BrainTumorMri(_SharedSamplesBuilder):
  """Brain tumour MRI slices, 4 classes (module docstring: brain_tumor_mri)."""

  name = "brain_tumor_mri"
  CLASS_NAMES = ("glioma", "meningioma", "notumor", "pituitary")
  MANUAL_DOWNLOAD_INSTRUCTIONS = BRAIN_TUMOR_INSTRUCTIONS
  HOMEPAGE = "https://www.kaggle.com/datasets/masoudnickparvar/brain-tumor-mri-dataset"
  VALIDATION_FRACTION = 0.15

  def rows(self, root: str) -> list[tuple[str, str, str]]:
    """(relative image path, release split 'training'|'testing', class) of every image."""
    csv_path = os.path.join(root, "labels.csv")
    rows = []
    if os.path.isfile(csv_path):
      for line, row in enumerate(image_folder.read_csv(csv_path, ("image", "split", "label")),
                                 start=2):
        where = f"{csv_path} line {line}"
        if row["split"] not in _BRAIN_RELEASE_SPLITS:
          raise SharedSamplesFormatError(f"{where}: unknown value {row['split']!r} in column "
                                         f"'split'; known: {sorted(_BRAIN_RELEASE_SPLITS)}")
        if row["label"] not in self.CLASS_NAMES:
          raise SharedSamplesFormatError(f"{where}: unknown value {row['label']!r} in column "
                                         f"'label'; known: {list(self.CLASS_NAMES)}")
        if not os.path.isfile(os.path.join(root, row["image"])):
          raise SharedSamplesFormatError(f"{where}: image {os.path.join(root, row['image'])} "
                                         "not found.")
        rows.append((row["image"], row["split"], row["label"]))
    else:
      for split, folder in _BRAIN_RELEASE_SPLITS.items():
        if not os.path.isdir(os.path.join(root, folder)):
          raise SharedSamplesFormatError(
              f"{os.path.join(root, folder)} not found (and no labels.csv).\n"
              f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        for label in sorted(os.listdir(os.path.join(root, folder))):
          if label.startswith("."):
            continue
          if label not in self.CLASS_NAMES:
            raise SharedSamplesFormatError(f"{os.path.join(root, folder, label)}: unknown "
                                           f"class folder; known: {list(self.CLASS_NAMES)}")
          for name in sorted(os.listdir(os.path.join(root, folder, label))):
            if readers.file_kind(name) == "image":
              rows.append((f"{folder}/{label}/{name}", split, label))
    seen = set()
    for image, _, _ in rows:
      if image in seen:
        raise SharedSamplesFormatError(f"{csv_path}: image {image!r} is listed twice.")
      seen.add(image)
    if not rows:
      raise SharedSamplesFormatError(f"{root}: no images found.\n"
                                     f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return rows

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    rows = self.rows(root)
    by_class = {}
    for image, split, label in rows:
      if split == "training":
        by_class.setdefault(label, []).append(image)
    holdout = image_folder.stratified_holdout(by_class, self.VALIDATION_FRACTION)
    splits = {s: [] for s in SPLITS}
    for image, split, label in rows:
      target = "test" if split == "testing" else (
          "validation" if image in holdout else "train")
      splits[target].append((image, self.CLASS_NAMES.index(label)))
    return {s: self._generate_examples(root, items) for s, items in splits.items() if items}

  def _generate_examples(self, root: str, items) -> Iterator[tuple[str, dict]]:
    def encode(item):
      image, label = item
      grey = readers.to_grey(readers.read_image(os.path.join(root, image)))
      return image, image_folder.example(self._shrink(grey), label, "mr", image)
    yield from image_folder.ordered_map(encode, items)


# ---------------------------------------------------------------------------------------------
# HAM10000


HAM10000_INSTRUCTIONS = """\
HAM10000 (Tschandl et al., "The HAM10000 dataset...", Sci Data 2018; CC BY-NC 4.0, ISIC archive /
Harvard Dataverse doi:10.7910/DVN/DBW86T): 10,015 dermoscopic images of 7 diagnoses.
The project's 671-image subset (one image per lesion, <= 100 lesions per diagnosis, 200x150) is
../shared/data/derm_ham10000_small (from github.com/mmalek06/bounding-box-detection-ham1000).
The manual dir holds metadata_subset.csv (or the release's HAM10000_metadata.csv; columns
lesion_id,image_id,dx) and the images as images/<image_id>.jpg (or the release's
HAM10000_images_part_1/ and HAM10000_images_part_2/).
  python -m data_prep.build ham10000 --manual_dir=<manual_dir> --data_dir=<data_dir>
"""
HAM_METADATA = ("metadata_subset.csv", "HAM10000_metadata.csv")
_HAM_IMAGE_DIRS = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2")


class Ham10000(_SharedSamplesBuilder):
  """HAM10000 dermoscopy, 7 diagnoses, lesion-level splits (module docstring: ham10000)."""

  name = "ham10000"
  CLASS_NAMES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
  MANUAL_DOWNLOAD_INSTRUCTIONS = HAM10000_INSTRUCTIONS
  HOMEPAGE = "https://doi.org/10.7910/DVN/DBW86T"
  VALIDATION_FRACTION = 0.1
  TEST_FRACTION = 0.1

  @classmethod
  def rows(cls, root: str) -> list[tuple[str, str, int]]:
    """(relative image path, lesion_id, label) of every image in the metadata file."""
    metadata = next((os.path.join(root, m) for m in HAM_METADATA
                     if os.path.isfile(os.path.join(root, m))), None)
    if metadata is None:
      raise SharedSamplesFormatError(f"{root}: none of {list(HAM_METADATA)} found.\n"
                                     f"{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    rows, lesion_dx, seen = [], {}, {}
    for line, row in enumerate(image_folder.read_csv(metadata, ("lesion_id", "image_id", "dx")),
                               start=2):
      where = f"{metadata} line {line}"
      if row["dx"] not in cls.CLASS_NAMES:
        raise SharedSamplesFormatError(f"{where}: unknown value {row['dx']!r} in column 'dx'; "
                                       f"known: {list(cls.CLASS_NAMES)}")
      lesion, image_id = row["lesion_id"], row["image_id"]
      if not lesion or not image_id:
        raise SharedSamplesFormatError(f"{where}: empty lesion_id or image_id.")
      if lesion_dx.setdefault(lesion, row["dx"]) != row["dx"]:
        raise SharedSamplesFormatError(f"{where}: lesion {lesion} has dx {row['dx']!r} here "
                                       f"but {lesion_dx[lesion]!r} on another row.")
      if image_id in seen:
        raise SharedSamplesFormatError(f"{where}: image_id {image_id} also on line "
                                       f"{seen[image_id]}.")
      seen[image_id] = line
      relative = next((f"{d}/{image_id}.jpg" for d in _HAM_IMAGE_DIRS
                       if os.path.isfile(os.path.join(root, d, f"{image_id}.jpg"))), None)
      if relative is None:
        raise SharedSamplesFormatError(
            f"{where}: image {os.path.join(root, 'images', image_id + '.jpg')} not found.")
      rows.append((relative, lesion, cls.CLASS_NAMES.index(row["dx"])))
    if not rows:
      raise SharedSamplesFormatError(f"{metadata}: no rows.")
    return rows

  @classmethod
  def lesion_splits(cls, rows) -> dict[str, str]:
    """lesion_id -> split: per diagnosis, lesions ranked by hash; the first round(10%) test,
    the next round(10%) validation, the rest train."""
    lesions_by_label = {}
    for _, lesion, label in rows:
      lesions_by_label.setdefault(label, set()).add(lesion)
    split_of = {}
    for lesions in lesions_by_label.values():
      ranked = sorted(lesions, key=lambda k: (image_folder.hash_unit(k), k))
      n_test = round(cls.TEST_FRACTION * len(ranked))
      n_val = round(cls.VALIDATION_FRACTION * len(ranked))
      for i, lesion in enumerate(ranked):
        split_of[lesion] = ("test" if i < n_test else
                            "validation" if i < n_test + n_val else "train")
    return split_of

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    rows = self.rows(root)
    split_of = self.lesion_splits(rows)
    splits = {s: [] for s in SPLITS}
    for relative, lesion, label in rows:
      splits[split_of[lesion]].append((relative, label))
    return {s: self._generate_examples(root, items) for s, items in splits.items() if items}

  def _generate_examples(self, root: str, items) -> Iterator[tuple[str, dict]]:
    def encode(item):
      relative, label = item
      image = readers.read_image(os.path.join(root, relative))
      if image.ndim != 3:
        raise SharedSamplesFormatError(f"{os.path.join(root, relative)}: expected an RGB "
                                       f"image, got shape {image.shape}.")
      return relative, image_folder.example(self._shrink(image), label, "dermoscopy", relative)
    yield from image_folder.ordered_map(encode, items)


# ---------------------------------------------------------------------------------------------
# MedMNIST


MEDMNIST_INSTRUCTIONS = """\
MedMNIST v2 (Yang et al., Sci Data 2023; CC BY 4.0): {npz} from https://zenodo.org/records/10519652
(or `pip install medmnist` and its download), arrays train/val/test _images and _labels. The
project's copy is ../shared/data/medmnist_small/{npz}. The manual dir is the folder holding {npz}.
  python -m data_prep.build {name} --manual_dir=<manual_dir> --data_dir=<data_dir>
"""
_MEDMNIST_SPLITS = {"train": "train", "val": "validation", "test": "test"}


class _MedMnist(_SharedSamplesBuilder):
  """A MedMNIST npz file: the official splits; labels [N] or [N, 1]."""

  NPZ = ""
  SOURCE = ""

  def arrays(self, path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MedMNIST split name -> (images uint8 [N,H,W(,3)], labels int64 [N]), all checked."""
    _require_file(path, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    try:
      with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        wanted = [f"{s}_{k}" for s in _MEDMNIST_SPLITS for k in ("images", "labels")]
        missing = [k for k in wanted if k not in keys]
        if missing:
          raise SharedSamplesFormatError(f"{path}: missing arrays {missing}; found "
                                         f"{sorted(keys)}")
        data = {k: npz[k] for k in wanted}
    except SharedSamplesFormatError:
      raise
    except Exception as e:
      raise SharedSamplesFormatError(f"{path} cannot be read as an npz file: {e}") from e
    out = {}
    for split in _MEDMNIST_SPLITS:
      x, y = data[f"{split}_images"], data[f"{split}_labels"]
      if x.dtype != np.uint8 or not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise SharedSamplesFormatError(f"{path}: {split}_images has dtype {x.dtype} and shape "
                                       f"{x.shape}; want uint8 [N,H,W] or [N,H,W,3].")
      if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
      if y.ndim != 1 or len(y) != len(x):
        raise SharedSamplesFormatError(f"{path}: {split}_labels has shape "
                                       f"{data[f'{split}_labels'].shape}; want [{len(x)}] or "
                                       f"[{len(x)}, 1].")
      bad = (y < 0) | (y >= len(self.CLASS_NAMES))
      if bad.any():
        i = int(np.argmax(bad))
        raise SharedSamplesFormatError(f"{path}: {split}_labels[{i}] = {y[i]} is not a class "
                                       f"0..{len(self.CLASS_NAMES) - 1} {self.CLASS_NAMES}.")
      out[split] = (x, y.astype(np.int64))
    return out

  def _split_generators(self, dl_manager):
    path = os.path.join(os.fspath(dl_manager.manual_dir), self.NPZ)
    arrays = self.arrays(path)
    return {_MEDMNIST_SPLITS[s]: self._generate_examples(s, *arrays[s])
            for s in _MEDMNIST_SPLITS if len(arrays[s][0])}

  def _generate_examples(self, split: str, x: np.ndarray,
                         y: np.ndarray) -> Iterator[tuple[str, dict]]:
    def encode(i):
      record_id = f"{self.NPZ}/{split}/{i:05d}"
      return record_id, image_folder.example(self._shrink(x[i]), int(y[i]), self.SOURCE,
                                             record_id)
    yield from image_folder.ordered_map(encode, range(len(x)))


class BreastMnist(_MedMnist):
  """MedMNIST BreastMNIST: breast ultrasound, malignant vs normal/benign (28x28)."""

  name = "breastmnist"
  NPZ = "breastmnist.npz"
  SOURCE = "us"
  CLASS_NAMES = ("malignant", "normal, benign")  # MedMNIST INFO['breastmnist']['label']
  MANUAL_DOWNLOAD_INSTRUCTIONS = MEDMNIST_INSTRUCTIONS.format(npz=NPZ, name=name)
  HOMEPAGE = "https://medmnist.com"


class PneumoniaMnist(_MedMnist):
  """MedMNIST PneumoniaMNIST: paediatric chest X-ray, normal vs pneumonia (28x28)."""

  name = "pneumoniamnist"
  NPZ = "pneumoniamnist.npz"
  SOURCE = "xray"
  CLASS_NAMES = ("normal", "pneumonia")  # MedMNIST INFO['pneumoniamnist']['label']
  MANUAL_DOWNLOAD_INSTRUCTIONS = MEDMNIST_INSTRUCTIONS.format(npz=NPZ, name=name)
  HOMEPAGE = "https://medmnist.com"


# ---------------------------------------------------------------------------------------------
# The multi-domain pretraining pool


@dataclasses.dataclass(frozen=True)
class PoolPart:
  """One kind of image in the pool: glob patterns under the root and how to read them."""
  patterns: tuple[str, ...]
  source: str | None  # None: from the DICOM Modality
  grey: bool = False  # convert RGB to 8-bit grey ('L')
  slice_every: int = 1  # NIfTI: keep every k-th axial slice


# The shared samples folder's images (../shared/data/README.md). Not used: lesion masks, the
# Aperio .svs whole-slide image (a pyramid, read by WSI tiling code), report text.
MISC_PARTS = (
    PoolPart(("mammo_nyu_glam_sample/images/*.png",), "mammo"),
    PoolPart(("mammo_nyu_bcc_cc_views/images/*.png",), "mammo"),
    PoolPart(("misc_public_medical_samples/cxr_nih/*.png",), "xray"),
    PoolPart(("misc_public_medical_samples/dicom/*.dcm",), None),
    PoolPart(("misc_public_medical_samples/brain_mri/*.nii",
              "misc_public_medical_samples/brain_mri/*.nii.gz"), "mr", slice_every=4),
    PoolPart(("misc_public_medical_samples/fundus/*.png",
              "misc_public_medical_samples/fundus/*.jpg"), "fundus"),
    PoolPart(("histo_samples/tiles/*.tif", "histo_samples/tiles/*/*.jpg",
              "histo_samples/*.png"), "histology"),
    PoolPart(("derm_ham10000_small/images/*.jpg",), "dermoscopy"),
    PoolPart(("brain_tumor_mri_small/Training/*/*.jpg",
              "brain_tumor_mri_small/Testing/*/*.jpg"), "mr", grey=True),
)

MEDICAL_MISC_INSTRUCTIONS = """\
medical_misc pools every image of the project's shared samples folder (../shared/data, see its
README.md and each folder's SOURCE.txt for origins and licences): NYU mammograms
(mammo_nyu_glam_sample, mammo_nyu_bcc_cc_views), misc_public_medical_samples (NIH chest X-rays,
pydicom CT/MR, nilearn MNI152 and nibabel NIfTI, scikit-image fundus), histo_samples tiles,
derm_ham10000_small and brain_tumor_mri_small. The manual dir is that folder's root.
  python -m data_prep.build medical_misc --manual_dir=<shared/data> --data_dir=<data_dir>
"""


class MedicalMisc(_SharedSamplesBuilder):
  """Unlabelled multi-modality pretraining pool (module docstring: medical_misc)."""

  name = "medical_misc"
  CLASS_NAMES = ()
  DEFAULT_MAX_SIDE = 1024
  MANUAL_DOWNLOAD_INSTRUCTIONS = MEDICAL_MISC_INSTRUCTIONS
  PARTS: Sequence[PoolPart] = MISC_PARTS
  VALIDATION_FRACTION = 0.1
  TEST_FRACTION = 0.1

  def files(self, root: str) -> list[tuple[str, PoolPart]]:
    """(relative path, part) of every file of the pool; a part that matches nothing is an
    error naming its patterns."""
    found = []
    for part in self.PARTS:
      matches = sorted({os.path.relpath(p, root).replace(os.sep, "/")
                        for pattern in part.patterns
                        for p in glob.glob(os.path.join(root, pattern))
                        if os.path.isfile(p) and readers.file_kind(p) is not None})
      if not matches:
        raise SharedSamplesFormatError(
            f"{root}: no file matches {list(part.patterns)} ({part.source or 'DICOM'} images)."
            f"\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
      found.extend((m, part) for m in matches)
    return found

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    splits = {s: [] for s in SPLITS}
    for relative, part in self.files(root):
      # One key per file: all slices of a volume land in the same split.
      split = image_folder.hash_split(relative, self.VALIDATION_FRACTION, self.TEST_FRACTION)
      splits[split].append((relative, part))
    return {s: self._generate_examples(root, items) for s, items in splits.items() if items}

  def _encode_file(self, root: str, relative: str, part: PoolPart) -> list[tuple[str, dict]]:
    """The (id, example) records of one file of the pool (a NIfTI volume gives several)."""
    path = os.path.join(root, relative)
    if readers.file_kind(path) == "nifti":
      records = [(f"{relative}#{z}", plane) for z, plane in
                 readers.volume_slices(path, axis=2, every=part.slice_every)]
      if not records:
        raise SharedSamplesFormatError(f"{path}: no non-empty slice.")
    else:
      records = [(relative, readers.read_image(path))]
    source = part.source
    if source is None:
      source = readers.dicom_source(path)
      if source is None:
        raise SharedSamplesFormatError(
            f"{path}: DICOM Modality not one of {sorted(readers.DICOM_MODALITY_SOURCES)}.")
    out = []
    for record_id, image in records:
      if part.grey:
        image = readers.to_grey(image)
      out.append((record_id, image_folder.example(self._shrink(image), -1, source, record_id)))
    return out

  def _generate_examples(self, root: str, items) -> Iterator[tuple[str, dict]]:
    for records in image_folder.ordered_map(lambda item: self._encode_file(root, *item), items):
      yield from records
