"""GLAM / GMIC mammogram preprocessing: exam lists, breast cropping, optimal centre, window.

A numpy port of the NYU reference pipeline (nyukat/GLAM, identical in nyukat/GMIC):
`src/cropping/crop_mammogram.py`, `src/optimal_centers/*.py`, `src/data_loading/{loading,
augmentations}.py`, `src/utilities/*.py`, driven by `run.sh` in three steps:

1. crop (offline; `crop_mammogram`): on the RAW image, `img > 0`; binary erosion with
   scipy's default cross (4-connected) structure, 100 iterations, border value 0 (so the
   image edge erodes too); the largest 4-connected component (ties: the lowest label); binary
   dilation, 100 iterations; its bounding box; 50 pixels of buffer above and below (clipped to
   the image) and on ONE side in x: the nipple side (the left for a breast pointing left, else
   the right). The cropped PNG is image[top:bottom, left:right], unflipped. The breast points
   'left' in the raw image for R views when horizontal_flip == 'NO' and for L views when it is
   'YES' (`image_orientation`). The step also records `rightmost_points` (from the lower 2/3
   of the dilated mask inside the crop: its extreme column towards the nipple, in the FLIPPED
   crop's coordinates, computed as `width - x` for a left-pointing breast, as the reference
   does) and `bottommost_points` (the last row of the mask, relative to the crop).
2. optimal centre (offline; `optimal_center`): on the flipped cropped image, with the window
   2944 x 1920 (`INPUT_SIZE_DICT`), step 1 and com = shape // 2:
   * CC: the centre column is pinned to `rightmost_x - 960 - 1`; the centre row ranges over
     [1472, H - 1472] (just `H // 2` when H <= 2944); the row whose window
     (clipped to the image) holds the most pixels > 0 wins, ties going to the candidate nearest
     to com (squared distance, first in row order);
   * MLO: one candidate, (min(bottommost_y, last non-zero row of the rightmost 1920 columns)
     - 1472 - 1, rightmost_x - 960 - 1).
3. loading (`run_model.py`): `load_image` reads the cropped PNG as float32 and flips it left-
   right when the view is R-* and horizontal_flip == 'NO' (L-* when 'YES'), so every breast
   points right (chest wall at column 0); `process_image` takes the window
   `random_augmentation_best_center(input_size=(2944, 1920), RandomState(0))` with no crop
   or size noise (`fit_window`): the window centred on the best centre (top = cy - 1472,
   left = cx - 960) and shifted inside the image; an image shorter than 2944 rows is zero-
   padded (CC: floor(pad / 2) rows on top and the rest below, MLO: all below) and one narrower
   than 1920 columns is zero-padded on the right, the window then starting at row / column 0.
   The padding value is 0 in raw intensity units, BEFORE standardisation (which therefore
   sees the padding). Finally `standard_normalize_single_image`: (x - mean) / max(std, 1e-5).

The NYU sample segmentations (`sample_data/segmentation/*.png`, 2944 x 1920 binary 0/255) are
already in the final geometry: `run_model.py` loads them with `load_image(...,
horizontal_flip=False)`, which neither flips (False is neither 'NO' nor 'YES') nor windows
them, and overlays them on the processed image: `mask_geometry='final'` reproduces that.

Deviations (none changes a pixel of the reference's output): the exam list is read with a
restricted unpickler (`load_exam_list`) instead of `pickle.load`; the reference's asserts
are ValueErrors; and the ignored random draws of the noise-free augmentation are not made.
"""
from __future__ import annotations

import builtins
import codecs
import collections
import dataclasses
import importlib
import io
import os
import pickle
from typing import Any, Mapping

import numpy as np
import scipy.ndimage

from medguide_jax.data import images, multicrop, readers

VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
# The reference's INPUT_SIZE_DICT: the same window for every view, (rows, columns).
WINDOW_SHAPE = (2944, 1920)
EROSION_ITERATIONS = 100  # crop_mammogram.py --num-iterations default
BUFFER_SIZE = 50  # crop_mammogram.py --buffer-size default
RIGHTMOST_FROM_RATIO = 1 / 3  # the top third is ignored when looking for the nipple column
HORIZONTAL_FLIPS = ("NO", "YES")
LABEL_KEYS = ("left_benign", "left_malignant", "right_benign", "right_malignant")
MASK_GEOMETRIES = ("raw", "final")


# ---------------------------------------------------------------------------------------------
# Exam lists: a restricted unpickler


class UnsafePickleError(pickle.UnpicklingError, ValueError):
  """A pickle asked for a global outside the exam-list allowlist (nothing was executed)."""


_BUILTINS = frozenset(("set", "frozenset", "list", "dict", "tuple", "str", "bytes", "bytearray",
                       "int", "float", "bool", "complex"))
# numpy globals that arrays, scalars and dtypes pickle with, by submodule of numpy.core (numpy
# 1) / numpy._core (numpy 2).
_NUMPY_CORE = {("multiarray", "_reconstruct"), ("multiarray", "scalar"),
               ("numeric", "_frombuffer")}


def _numpy_core_attr(submodule: str, name: str):
  """numpy._core.<submodule>.<name> (numpy 2), else numpy.core.<submodule>.<name> (numpy 1)."""
  for package in ("numpy._core", "numpy.core"):
    try:
      return getattr(importlib.import_module(f"{package}.{submodule}"), name)
    except (ImportError, AttributeError):
      continue
  raise AttributeError(f"numpy has no core.{submodule}.{name}")


def _allowed_global(module: str, name: str):
  """The object for an allowlisted (module, name), else None."""
  if module in ("builtins", "__builtin__"):
    if name in _BUILTINS:
      return getattr(builtins, name)
    if module == "__builtin__" and name == "unicode":  # Python 2 pickles
      return str
    return None
  if (module, name) == ("_codecs", "encode"):  # bytes at protocols 0-2
    return codecs.encode
  if (module, name) == ("collections", "OrderedDict"):
    return collections.OrderedDict
  if module == "numpy" and name in ("ndarray", "dtype"):
    return getattr(np, name)
  for package in ("numpy.core.", "numpy._core."):
    if module.startswith(package) and (module[len(package):], name) in _NUMPY_CORE:
      return _numpy_core_attr(module[len(package):], name)
  return None


class _ExamListUnpickler(pickle.Unpickler):
  """Resolves only plain containers, scalars and numpy arrays / scalars / dtypes."""

  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path

  def find_class(self, module: str, name: str):
    found = _allowed_global(module, name)
    if found is None:
      raise UnsafePickleError(
          f"{self._path}: refused to load global '{module}.{name}' (an exam list may hold "
          "only dicts, lists, tuples, sets, strings, numbers and numpy arrays)")
    return found

  def persistent_load(self, pid):
    raise UnsafePickleError(f"{self._path}: refused a persistent id {pid!r}")


def safe_unpickle(path: str | os.PathLike) -> Any:
  """Unpickles `path` allowing only plain containers, str/bytes/numbers/None and numpy data.

  Raises:
    FileNotFoundError: if `path` does not exist.
    UnsafePickleError: (a ValueError and pickle.UnpicklingError) naming the file and the
      refused `module.name`, before anything is called.
    ValueError: naming the file, for a corrupt or truncated pickle.
  """
  name = os.fspath(path)
  if not os.path.isfile(name):
    raise FileNotFoundError(f"{name}: no such exam-list file")
  with open(name, "rb") as f:
    data = f.read()
  try:
    return _ExamListUnpickler(io.BytesIO(data), name).load()
  except UnsafePickleError:
    raise
  except Exception as e:  # EOFError, UnpicklingError, bad opcodes, ...
    raise ValueError(f"{name}: cannot unpickle: {type(e).__name__}: {e}") from e


def _is_name_list(value) -> bool:
  return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def load_exam_list(path: str | os.PathLike) -> list[dict]:
  """Reads a GLAM/GMIC exam list (`exam_list_before_cropping.pkl`, `data.pkl`) safely.

  Each exam is a dict; a view key ('L-CC', ...) or segmentation key ('L-CC_benign_seg', ...)
  holds a list of image names, `cancer_label` (if present) a dict, `horizontal_flip` (if
  present) 'NO' or 'YES'.

  Raises:
    FileNotFoundError, UnsafePickleError, ValueError: see `safe_unpickle`; a ValueError
      naming the file, exam index and key for a malformed exam list.
  """
  name = os.fspath(path)
  exams = safe_unpickle(name)
  if not isinstance(exams, (list, tuple)):
    raise ValueError(f"{name}: an exam list must be a list of dicts, got "
                     f"{type(exams).__name__}")
  for i, exam in enumerate(exams):
    if not isinstance(exam, dict):
      raise ValueError(f"{name}: exam {i} is a {type(exam).__name__}, not a dict")
    for key, value in exam.items():
      is_view = key in VIEWS or (isinstance(key, str) and key.endswith("_seg")
                                 and key.split("_", 1)[0] in VIEWS)
      if is_view and not _is_name_list(value):
        raise ValueError(f"{name}: exam {i} key {key!r} must be a list of image names, got "
                         f"{value!r}")
    if "cancer_label" in exam and not isinstance(exam["cancer_label"], dict):
      raise ValueError(f"{name}: exam {i} key 'cancer_label' must be a dict, got "
                       f"{type(exam['cancer_label']).__name__}")
    if "horizontal_flip" in exam and exam["horizontal_flip"] not in HORIZONTAL_FLIPS:
      raise ValueError(f"{name}: exam {i} key 'horizontal_flip' must be one of "
                       f"{HORIZONTAL_FLIPS}, got {exam['horizontal_flip']!r}")
  return list(exams)


# ---------------------------------------------------------------------------------------------
# Views and labels


def _check_view(view: str) -> str:
  if view not in VIEWS:
    raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
  return view


def side(view: str) -> str:
  """'left' for L-CC / L-MLO, 'right' for R-CC / R-MLO."""
  return "left" if _check_view(view)[0] == "L" else "right"


def view_type(view: str) -> str:
  """'CC' or 'MLO'."""
  return _check_view(view)[2:]


def view_labels(cancer_label: Mapping[str, Any], view: str) -> tuple[int, int]:
  """(benign, malignant) of the breast `view` shows (run_model.fetch_cancer_label_by_view)."""
  breast = side(view)
  keys = (f"{breast}_benign", f"{breast}_malignant")
  missing = [k for k in keys if k not in cancer_label]
  if missing:
    raise ValueError(f"cancer_label lacks {missing} (has {sorted(cancer_label)})")
  return int(cancer_label[keys[0]]), int(cancer_label[keys[1]])


def _check_flip(horizontal_flip: str) -> str:
  if horizontal_flip not in HORIZONTAL_FLIPS:
    raise ValueError(f"horizontal_flip must be one of {HORIZONTAL_FLIPS}, got "
                     f"{horizontal_flip!r}")
  return horizontal_flip


def needs_flip(view: str, horizontal_flip: str = "NO") -> bool:
  """Whether `load_image` flips the view left-right: R-* for 'NO', L-* for 'YES'."""
  if _check_flip(horizontal_flip) == "NO":
    return side(view) == "right"
  return side(view) == "left"


def breast_pointing(view: str, horizontal_flip: str = "NO") -> str:
  """Where the breast points in the raw image ('left' or 'right'): `image_orientation`."""
  return "left" if needs_flip(view, horizontal_flip) else "right"


def flip_image(image: np.ndarray, view: str, horizontal_flip: str = "NO") -> np.ndarray:
  """`loading.flip_image`: left-right flip so that every breast points right."""
  return np.fliplr(image) if needs_flip(view, horizontal_flip) else image


# ---------------------------------------------------------------------------------------------
# Reading


def read_mammogram(path: str | os.PathLike) -> np.ndarray:
  """A mammogram as uint16 [H,W] from a 16-bit / 8-bit grey PNG (values kept) or a DICOM file.

  DICOM goes through `readers.read_dicom` (modality LUT, VOI window or full range onto
  0..65535, MONOCHROME1 inverted), so the background reads as 0 as the cropping expects.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: naming the file, if it cannot be read or is not a grey 2-D image.
  """
  name = os.fspath(path)
  if not os.path.isfile(name):
    raise FileNotFoundError(f"{name}: no such mammogram file")
  image = readers.read_image(name)
  if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
    raise ValueError(f"{name}: a mammogram must be a grey 8- or 16-bit image, got dtype "
                     f"{image.dtype} and shape {image.shape}")
  return image.astype(np.uint16)


def _check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 2 or 0 in image.shape:
    raise ValueError(f"{what} must be a non-empty 2-D array, got shape {image.shape}")
  if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
    raise ValueError(f"{what} must be numeric, got dtype {image.dtype}")
  return image


# ---------------------------------------------------------------------------------------------
# Step 1: cropping around the largest connected component


@dataclasses.dataclass(frozen=True)
class CropWindow:
  """What `crop_img_from_largest_connected` returns.

  Attributes:
    top, bottom, left, right: the crop in the raw image (bottom / right exclusive).
    rightmost_points: ((y_first, y_last), x) of the nipple-side column, in the flipped crop.
    bottommost_points: (y, (x_first, x_last)) of the last mask row, in the (flipped) crop.
    distance_from_starting_side: empty columns between the chest-wall edge of the raw image
      and the mask (the reference rejects images where it is not 0; recorded only).
    pointing: where the breast points in the raw image, 'left' or 'right'.
  """
  top: int
  bottom: int
  left: int
  right: int
  rightmost_points: tuple[tuple[int, int], int]
  bottommost_points: tuple[int, tuple[int, int]]
  distance_from_starting_side: int
  pointing: str

  @property
  def window(self) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), the reference's `window_location`."""
    return self.top, self.bottom, self.left, self.right

  @property
  def shape(self) -> tuple[int, int]:
    return self.bottom - self.top, self.right - self.left

  def apply(self, array: np.ndarray) -> np.ndarray:
    """array[top:bottom, left:right]."""
    return array[self.top:self.bottom, self.left:self.right]


def largest_component(mask: np.ndarray) -> np.ndarray:
  """The largest 4-connected component of a boolean mask (ties: the lowest scipy label).

  Raises:
    ValueError: if the mask is empty.
  """
  labels, count = scipy.ndimage.label(mask)
  if count == 0:
    raise ValueError("no foreground left to find a connected component in")
  sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
  return labels == int(np.argmax(sizes)) + 1


def crop_mammogram(image: np.ndarray, view: str, horizontal_flip: str = "NO", *,
                   iterations: int = EROSION_ITERATIONS, buffer_size: int = BUFFER_SIZE,
                   find_rightmost_from_ratio: float = RIGHTMOST_FROM_RATIO) -> CropWindow:
  """`crop_img_from_largest_connected` on a raw mammogram (see the module docstring).

  Args:
    image: the raw image [H,W]; background must be 0.
    view: one of VIEWS.
    horizontal_flip: the exam's 'NO' / 'YES'.
    iterations: erosion and dilation iterations; 0 skips both (erode_dialate=False).
    buffer_size: extra rows above / below and columns on the nipple side.
    find_rightmost_from_ratio: the top fraction of the crop ignored for `rightmost_points`.

  Raises:
    ValueError: bad arguments, or no breast (nothing survives the erosion).
  """
  image = _check_image(image)
  pointing = breast_pointing(view, horizontal_flip)
  if iterations < 0 or buffer_size < 0:
    raise ValueError(f"iterations and buffer_size must be >= 0, got {iterations}, "
                     f"{buffer_size}")
  height, width = image.shape
  mask = image > 0
  if iterations:
    mask = scipy.ndimage.binary_erosion(mask, iterations=iterations)
  try:
    largest = largest_component(mask)
  except ValueError as e:
    raise ValueError(f"no breast found in a {height}x{width} {view} image: nothing is left "
                     f"of the foreground (> 0) after {iterations} erosion iterations") from e
  if iterations:
    largest = scipy.ndimage.binary_dilation(largest, iterations=iterations)
  rows = np.flatnonzero(largest.any(axis=1))
  cols = np.flatnonzero(largest.any(axis=0))
  top, bottom = int(rows[0]), int(rows[-1]) + 1
  left, right = int(cols[0]), int(cols[-1]) + 1
  bottom_y = bottom - 1
  bottom_x = np.flatnonzero(largest[bottom_y])
  # Buffers: both sides in y, the nipple side only in x.
  top -= min(top, buffer_size)
  bottom += min(height - bottom, buffer_size)
  distance = width - right if pointing == "left" else left
  if pointing == "left":
    left -= min(left, buffer_size)
  else:
    right += min(width - right, buffer_size)
  # Bottommost points relative to the crop, mirrored (as `right - x`) for a left-pointing one.
  bottom_y -= top
  bottom_x = np.flip(right - bottom_x) if pointing == "left" else bottom_x - left
  # Rightmost points: the nipple-side column of the lower part of the cropped mask.
  cropped = largest[top:bottom, left:right]
  ignore = int(cropped.shape[0] * find_rightmost_from_ratio)
  area = cropped[ignore:]
  area_cols = np.flatnonzero(area.any(axis=0))
  if area_cols.size == 0:
    raise ValueError(f"no breast below the top {find_rightmost_from_ratio:.3g} of the "
                     f"{height}x{width} {view} crop to find its nipple column in")
  right_x = int(area_cols[-1] if pointing == "right" else area_cols[0])
  right_y = np.flatnonzero(area[:, right_x]) + ignore
  if pointing == "left":
    right_x = cropped.shape[1] - right_x
  return CropWindow(top=top, bottom=bottom, left=left, right=right,
                    rightmost_points=((int(right_y[0]), int(right_y[-1])), right_x),
                    bottommost_points=(int(bottom_y), (int(bottom_x[0]), int(bottom_x[-1]))),
                    distance_from_starting_side=int(distance), pointing=pointing)


# ---------------------------------------------------------------------------------------------
# Step 2: the optimal centre


def _window_sums(integral: np.ndarray, centers: np.ndarray, image_shape: np.ndarray,
                 window: np.ndarray) -> np.ndarray:
  """Pixels > 0 in windows at `centers` [N,2], clipped as `get_candidate_topleft_bottomright`
  (a window hanging over the top / left is shifted in, one over the bottom / right clipped)."""
  half = window // 2
  tl = centers - half
  offset = np.clip(-tl, 0, None)
  tl = np.clip(tl, 0, None)
  br = np.minimum(centers + (window - half) + offset, image_shape)
  if (br < tl).any():
    raise ValueError(f"candidate centres {centers.tolist()} put the window outside the "
                     f"{image_shape.tolist()} image")
  return (integral[br[:, 0], br[:, 1]] - integral[tl[:, 0], br[:, 1]]
          - integral[br[:, 0], tl[:, 1]] + integral[tl[:, 0], tl[:, 1]])


def optimal_center(cropped_image: np.ndarray, view: str, crop: CropWindow,
                   horizontal_flip: str = "NO", *,
                   window_shape: tuple[int, int] = WINDOW_SHAPE) -> tuple[int, int]:
  """`get_optimal_centers.extract_center`: the window centre (row, col) in the flipped crop.

  Args:
    cropped_image: crop.apply(raw image), NOT flipped (flipped here, as the reference does).
    view: one of VIEWS.
    crop: the `crop_mammogram` result for this image (its rightmost / bottommost points).
    horizontal_flip: the exam's 'NO' / 'YES'.
    window_shape: the reference's INPUT_SIZE_DICT entry.
  """
  image = flip_image(_check_image(cropped_image, "cropped_image"), view, horizontal_flip)
  kind = view_type(view)
  dims = np.array(image.shape)
  window = np.array(window_shape)
  half = window // 2
  com = dims // 2
  # get_candidate_center_topleft_bottomright with step 1 (br exclusive).
  tl, br = half.copy(), dims - (window - half)
  for axis in (0, 1):
    if tl[axis] >= br[axis]:
      tl[axis] = br[axis] = com[axis]
  br = br + 1
  rightmost_x = int(crop.rightmost_points[1])
  if kind == "CC":  # get_rightmost_pixel_constraint (its `tl[1] == br[1]` early exit never
    # triggers, br being exclusive): the column is pinned.
    tl[1], br[1] = rightmost_x - half[1] - 1, rightmost_x - half[1]
  else:  # get_bottomrightmost_pixel_constraint
    bottommost_y = int(crop.bottommost_points[0])
    rows = np.flatnonzero((image[:, -int(window[1]):] != 0).any(axis=1))
    if rows.size:
      bottommost_y = min(int(rows[-1]), bottommost_y)
    br = np.array([bottommost_y, rightmost_x]) - half
    tl = br - 1
  ys, xs = np.arange(tl[0], br[0]), np.arange(tl[1], br[1])
  centers = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
  if len(centers) == 0:
    raise ValueError(f"no candidate centre for the {dims.tolist()} {view} crop")
  integral = np.zeros(dims + 1, np.int64)
  integral[1:, 1:] = np.cumsum(np.cumsum(image > 0, axis=0), axis=1)
  sums = _window_sums(integral, centers, dims, window)
  if len(centers) == 1:
    best = centers[0]
  else:
    ties = centers[sums == sums.max()]
    best = ties[np.argmin(((ties - com) ** 2).sum(axis=1))]
  return int(best[0]), int(best[1])


# ---------------------------------------------------------------------------------------------
# Step 3: the window around the best centre


def window_offsets(image_shape: tuple[int, int], best_center: tuple[int, int], view: str,
                   out_shape: tuple[int, int] = WINDOW_SHAPE) -> tuple[int, int]:
  """(row, col) offsets of the noise-free `random_augmentation_best_center` window:
  window[r, c] = image[r + row, c + col] where that is inside the image, else 0 (padding)."""
  kind = view_type(view)
  height, width = (int(s) for s in image_shape)
  win_h, win_w = (int(s) for s in out_shape)
  center_y, center_x = (int(c) for c in best_center)
  top = center_y - win_h // 2
  left = center_x - win_w // 2
  pad_top = pad_bottom = pad_right = 0
  if height < win_h:  # zero_pad_and_align_window: the window starts at row 0 of the padding
    top = 0
    pad = win_h - height
    if kind == "CC":
      pad_top, pad_bottom = pad // 2, pad - pad // 2
    else:
      pad_bottom = pad
  if width < win_w:
    left, pad_right = 0, win_w - width
  padded_h, padded_w = height + pad_top + pad_bottom, width + pad_right
  # shift_window_inside_image
  top = 0 if top < 0 else min(top, padded_h - win_h)
  left = 0 if left < 0 else min(left, padded_w - win_w)
  return top - pad_top, left


def _take_window(array: np.ndarray, offsets: tuple[int, int],
                 out_shape: tuple[int, int]) -> np.ndarray:
  """array[r + row, c + col] for the window, 0 outside `array`."""
  out = np.zeros(out_shape, array.dtype)
  row, col = offsets
  src_r0, src_c0 = max(row, 0), max(col, 0)
  src_r1 = min(row + out_shape[0], array.shape[0])
  src_c1 = min(col + out_shape[1], array.shape[1])
  if src_r1 > src_r0 and src_c1 > src_c0:
    out[src_r0 - row:src_r1 - row, src_c0 - col:src_c1 - col] = array[src_r0:src_r1,
                                                                     src_c0:src_c1]
  return out


def fit_window(image: np.ndarray, best_center: tuple[int, int], view: str,
               out_shape: tuple[int, int] = WINDOW_SHAPE) -> np.ndarray:
  """The test-time `random_augmentation_best_center` (no noise) of a flipped cropped image.

  Args:
    image: the flipped cropped image [H,W] (any dtype; kept).
    best_center: (row, col) from `optimal_center`.
    view: one of VIEWS (CC pads short images on both ends, MLO at the bottom only).
    out_shape: the window, the reference's input_size (no resizing is ever needed).
  """
  image = _check_image(image)
  return _take_window(image, window_offsets(image.shape, best_center, view, out_shape),
                      tuple(int(s) for s in out_shape))


# ---------------------------------------------------------------------------------------------
# Normalisation and downsampling


def standardize(image: np.ndarray) -> np.ndarray:
  """`standard_normalize_single_image`: (x - mean) / max(std, 1e-5) over the image, in
  float32 as the reference (which loads the image as float32 and normalises it in place)."""
  values = np.asarray(image, np.float32)
  return (values - values.mean()) / np.float32(max(float(values.std()), 1e-5))


def _check_factor(factor: int, shape: tuple[int, ...], what: str) -> int:
  if isinstance(factor, bool) or not float(factor).is_integer() or factor < 1:
    raise ValueError(f"{what}: the downsampling factor must be a positive integer, got "
                     f"{factor!r}")
  factor = int(factor)
  if len(shape) != 2 or shape[0] % factor or shape[1] % factor:
    raise ValueError(f"{what}: shape {tuple(shape)} is not divisible by the factor {factor}")
  return factor


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
  """Mean pooling over factor x factor blocks; integer images are rounded (half to even)."""
  image = np.asarray(image)
  factor = _check_factor(factor, image.shape, "downsample")
  if factor == 1:
    return image
  h, w = image.shape
  means = image.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3),
                                                                       dtype=np.float64)
  if np.issubdtype(image.dtype, np.integer):
    info = np.iinfo(image.dtype)
    return np.clip(np.rint(means), info.min, info.max).astype(image.dtype)
  return means.astype(image.dtype)


def downsample_mask(mask: np.ndarray, factor: int, rule: str = "majority") -> np.ndarray:
  """uint8 {0,1} mask pooled over factor x factor blocks.

  rule='majority' (default) keeps a block when at least half of its pixels are set (the
  nearest-neighbour-like choice, unbiased for Dice); rule='any' keeps it when one is.
  """
  mask = np.asarray(mask) > 0
  factor = _check_factor(factor, mask.shape, "downsample_mask")
  if rule not in ("majority", "any"):
    raise ValueError(f"downsample_mask: rule must be 'majority' or 'any', got {rule!r}")
  h, w = mask.shape
  blocks = mask.reshape(h // factor, factor, w // factor, factor)
  if rule == "any":
    kept = blocks.any(axis=(1, 3))
  else:
    kept = 2 * blocks.sum(axis=(1, 3)) >= factor * factor
  return kept.astype(np.uint8)


def downsample_factor(out_shape: tuple[int, int],
                      window_shape: tuple[int, int] = WINDOW_SHAPE) -> int:
  """The integer factor f with window_shape == f * out_shape, else a ValueError."""
  out_h, out_w = (int(s) for s in out_shape)
  win_h, win_w = window_shape
  if out_h < 1 or out_w < 1 or win_h % out_h or win_w % out_w or win_h // out_h != win_w // out_w:
    raise ValueError(f"out_shape {tuple(out_shape)} must be {tuple(window_shape)} divided by "
                     "one integer factor (e.g. (1472, 960), (736, 480))")
  return win_h // out_h


# ---------------------------------------------------------------------------------------------
# The whole pipeline for one view


@dataclasses.dataclass
class PreprocessedView:
  """One view after the reference preprocessing (before standardisation).

  Attributes:
    image: [out_shape], the input's dtype, not standardised (call `standardize`).
    masks: name -> uint8 {0,1} [out_shape].
    crop: the step-1 crop of the raw image.
    best_center: (row, col) of the window centre in the flipped crop.
    flipped: whether the crop was flipped left-right.
    offsets: (row, col) with window[r, c] = flipped_crop[r + row, c + col] (0 outside), at
      the reference's 2944 x 1920 resolution.
    factor: the downsampling factor from 2944 x 1920 to out_shape.
  """
  image: np.ndarray
  masks: dict[str, np.ndarray]
  crop: CropWindow
  best_center: tuple[int, int]
  flipped: bool
  offsets: tuple[int, int]
  factor: int


def preprocess_view(image: np.ndarray, *, view: str, horizontal_flip: str = "NO",
                    out_shape: tuple[int, int] = WINDOW_SHAPE,
                    masks: Mapping[str, np.ndarray] | None = None,
                    mask_geometry: str = "raw") -> PreprocessedView:
  """Crop, flip, best-centre window of a raw mammogram (and its masks), then downsample.

  Args:
    image: the raw mammogram [H,W] (background 0), e.g. from `read_mammogram`.
    view: one of VIEWS.
    horizontal_flip: the exam's 'NO' / 'YES'.
    out_shape: 2944 x 1920 divided by an integer factor; the reference geometry is computed at
      2944 x 1920 and then mean-pooled (image) / majority-pooled (masks).
    masks: name -> binary mask (> 0 is foreground).
    mask_geometry: 'raw': each mask has the raw image's shape and gets exactly the image's
      crop, flip and window; 'final': each mask is already in the reference's output geometry
      (2944 x 1920, or out_shape itself), as the NYU sample segmentations, and is used as
      `run_model.py` uses them: neither flipped nor windowed.

  Raises:
    ValueError: bad view / flip / out_shape / geometry, no breast found, or a mask whose
      shape does not fit (the message names the mask).
  """
  image = _check_image(image)
  factor = downsample_factor(out_shape)
  if mask_geometry not in MASK_GEOMETRIES:
    raise ValueError(f"mask_geometry must be one of {MASK_GEOMETRIES}, got {mask_geometry!r}")
  masks = dict(masks or {})
  for name, mask in masks.items():
    mask = np.asarray(mask)
    if mask_geometry == "raw" and mask.shape != image.shape:
      raise ValueError(f"mask {name!r}: shape {mask.shape} differs from the raw image's "
                       f"{image.shape} (mask_geometry='raw')")
    if mask_geometry == "final" and mask.shape not in (WINDOW_SHAPE, tuple(out_shape)):
      raise ValueError(f"mask {name!r}: shape {mask.shape} is neither the reference output "
                       f"{WINDOW_SHAPE} nor out_shape {tuple(out_shape)} "
                       "(mask_geometry='final')")
  crop = crop_mammogram(image, view, horizontal_flip)
  cropped = crop.apply(image)
  center = optimal_center(cropped, view, crop, horizontal_flip)
  flipped = needs_flip(view, horizontal_flip)
  oriented = flip_image(cropped, view, horizontal_flip)
  offsets = window_offsets(oriented.shape, center, view, WINDOW_SHAPE)
  out_image = downsample(_take_window(oriented, offsets, WINDOW_SHAPE), factor)
  out_masks = {}
  for name, mask in masks.items():
    mask = np.asarray(mask) > 0
    if mask_geometry == "raw":
      mask = _take_window(flip_image(crop.apply(mask), view, horizontal_flip), offsets,
                          WINDOW_SHAPE)
    if mask.shape == WINDOW_SHAPE:
      mask = downsample_mask(mask, factor)
    out_masks[name] = mask.astype(np.uint8)
  return PreprocessedView(image=out_image, masks=out_masks, crop=crop, best_center=center,
                          flipped=flipped, offsets=offsets, factor=factor)


# --------------------------------------------------------------------------- decoding
GLAM_CLASSES = ("benign", "malignant")


def decode_mask(data: bytes, shape: tuple[int, int], what: str) -> np.ndarray:
  """A {0,255} PNG -> uint8 {0,1} [H,W]; b'' (no mask file) -> zeros."""
  if not data:
    return np.zeros(shape, np.uint8)
  mask = multicrop.decode(data, what=what)[..., 0] > 0.5
  if mask.shape != tuple(shape):
    raise ValueError(f"{what}: mask shape {mask.shape} differs from the image's {tuple(shape)}")
  return mask.astype(np.uint8)


def glam_example(record: Mapping, rng=None, *, augment: bool) -> dict:
  """A mammogram record -> standardised image [H,W,1], labels [2]; for evaluation also the
  masks [H,W,2] (uint8) and which classes have one [2]. No augmentation: the reference's
  only training-time augmentation is noise in the crop window, which the stored views have
  already fixed."""
  del rng
  name = images.text(record.get("id", "?"))
  image = multicrop.decode(record["image"], what=f"image {name}")[..., 0]
  out = {"image": standardize(image)[..., None],
         "labels": np.array([record["benign"], record["malignant"]], np.float32)}
  if not augment:
    out["seg"] = np.stack([decode_mask(record[f"{c}_mask"], image.shape, f"{c}_mask of {name}")
                           for c in GLAM_CLASSES], axis=-1)
    out["has_seg"] = np.array([record[f"has_{c}_mask"] for c in GLAM_CLASSES], np.float32)
  return out
