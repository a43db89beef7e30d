"""Readers for real medical image files: PNG/JPEG/TIFF, DICOM and NIfTI, into numpy arrays.

Every reader returns one of the three layouts the single-image record schema stores
(`images.encode_png`): uint8 [H,W] (8-bit grey), uint16 [H,W] (16-bit grey) or uint8 [H,W,3]
(RGB). Precision is kept: a 16-bit PNG (including mammograms that hold 12-bit values 0..4095 in
16 bits, e.g. the NYU screening samples) comes back with its stored values unchanged.

Facts from the DICOM standard that the DICOM reader follows:

* the modality LUT (Rescale Slope / Intercept, PS3.3 C.11.1) turns stored values into physical
  units (Hounsfield units for CT) before any windowing;
* the VOI window (Window Center / Width, PS3.3 C.11.2.1.2) maps that range to the display
  range with the LINEAR formula
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) clipped to [0, 1],
  or LINEAR_EXACT / SIGMOID when VOI LUT Function says so; without a window the full range of
  the rescaled values [min, max] is used (over all frames of a multi-frame image, so its frames
  share one grey scale). The result is stretched to 0..65535, so a 12-bit CT keeps every grey
  level;
* MONOCHROME1 means that the minimum value is displayed white: it is inverted after the VOI
  step, so every returned grey image shows high values bright;
* Pixel Padding Value marks pixels outside the scanned field of view (stored units): they are
  left out of [min, max] and become 0.

NIfTI volumes are reoriented to the closest canonical (RAS+) orientation, so axis 2 is always
axial; slices are mapped to uint16 with robust bounds (the 0.5th and 99.5th percentiles of the
whole volume, the usual MR normalisation that ignores a few extreme voxels) and shown with
anterior (axis 2), superior (axes 0, 1) at the top.

Anything that cannot be read, or is not one of these layouts, is a ValueError naming the file.
"""
from __future__ import annotations

import os
import numpy as np
from PIL import Image, ImageOps

# Suffixes read through Pillow, pydicom and nibabel (compared lower-case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES

# DICOM Modality (0008,0060) -> the `source` names of the record schema.
DICOM_MODALITY_SOURCES = {
    "CT": "ct", "MR": "mr", "CR": "xray", "DX": "xray", "RG": "xray", "XA": "xray",
    "RF": "xray", "MG": "mammo", "US": "us", "PT": "pet", "NM": "nm", "OP": "fundus",
    "XC": "photo", "SM": "histology",
}

_UINT16_MAX = 65535
# Pillow modes converted to RGB as they are (colour spaces, alpha or padding dropped).
_TO_RGB_MODES = ("RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def file_kind(path: str | os.PathLike) -> str | None:
  """'image', 'dicom' or 'nifti' by suffix; a file without a suffix is sniffed for DICOM.

  Returns None for anything else (text files, archives, unknown suffixes).
  """
  name = os.path.basename(os.fspath(path)).lower()
  if name.endswith(NIFTI_SUFFIXES):
    return "nifti"
  if name.endswith(DICOM_SUFFIXES):
    return "dicom"
  if name.endswith(IMAGE_SUFFIXES):
    return "image"
  if "." not in name and _has_dicom_magic(path):  # scanners often write 'IM0001', no suffix
    return "dicom"
  return None


def _has_dicom_magic(path) -> bool:
  """A DICOM Part 10 file has 'DICM' after its 128-byte preamble."""
  try:
    with open(path, "rb") as f:
      f.seek(128)
      return f.read(4) == b"DICM"
  except OSError:
    return False


def read_image(path: str | os.PathLike, *, frame: int | None = None) -> np.ndarray:
  """Reads one 2-D image: uint8 [H,W], uint16 [H,W] or uint8 [H,W,3].

  Args:
    path: a PNG, JPEG, TIFF or DICOM file (`file_kind`).
    frame: for a multi-frame DICOM, the 0-based frame to read (required there).

  Raises:
    ValueError: naming the file, when it is missing, unreadable, a volume (NIfTI: use
      `read_volume_slices`), a multi-frame DICOM without `frame`, or of an unsupported layout.
  """
  kind = file_kind(path)
  if kind == "dicom":
    return read_dicom(path, frame=frame)
  if kind == "nifti":
    raise ValueError(f"{os.fspath(path)} is a NIfTI volume, not a 2-D image; read it with "
                     "read_volume_slices().")
  if kind != "image":
    raise ValueError(f"{os.fspath(path)}: unsupported file type; supported suffixes: "
                     f"{SUPPORTED_SUFFIXES} (or a DICOM file without a suffix).")
  if frame not in (None, 0):
    raise ValueError(f"{os.fspath(path)}: frame={frame} asked of a single-frame image.")
  return _read_pillow(path)


def _read_pillow(path) -> np.ndarray:
  """PNG / JPEG / TIFF through Pillow, fully decoded (truncated files fail here)."""
  path = os.fspath(path)
  try:
    with Image.open(path) as image:
      image.load()
      if image.format == "JPEG":
        image = ImageOps.exif_transpose(image)  # camera photos carry their rotation in EXIF
  except Exception as e:  # Pillow raises OSError, SyntaxError, DecompressionBombError...
    raise ValueError(f"{path} cannot be decoded as an image: {e}") from e
  return _pillow_to_array(image, path)


def _pillow_to_array(image: Image.Image, path: str) -> np.ndarray:
  """A decoded Pillow image in one of the three schema layouts."""
  mode = image.mode
  if mode in ("L", "1", "LA"):
    return np.asarray(image.convert("L"), np.uint8)
  if mode in _UINT16_MODES:
    return np.asarray(image).astype(np.uint16)  # big-endian I;16B -> native order
  if mode == "RGB":
    return np.asarray(image, np.uint8)
  if mode in _TO_RGB_MODES:
    return np.asarray(image.convert("RGB"), np.uint8)
  if mode in ("P", "PA"):
    rgb = np.asarray(image.convert("RGB"), np.uint8)
    # A palette of greys (masks, many scanners' exports) is a grey image.
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
      return np.ascontiguousarray(rgb[..., 0])
    return rgb
  if mode == "I":  # 32-bit integers (some 16-bit TIFFs): fine if the values fit in uint16
    values = np.asarray(image)
    if values.size and (values.min() < 0 or values.max() > _UINT16_MAX):
      raise ValueError(f"{path}: 32-bit integer image with values {values.min()}.."
                       f"{values.max()} outside the uint16 range 0..{_UINT16_MAX}.")
    return values.astype(np.uint16)
  if mode == "F":  # float images: the full range onto uint16, as for DICOM
    values = np.asarray(image, np.float64)
    if not np.isfinite(values).all():
      raise ValueError(f"{path}: floating-point image with NaN or infinite values.")
    return _to_uint16(values, values.min(), values.max())
  raise ValueError(f"{path}: unsupported image mode {mode!r}.")


def _to_uint16(values: np.ndarray, low: float, high: float) -> np.ndarray:
  """Linear map of [low, high] onto 0..65535 (clipped, rounded); all 0 when high <= low."""
  if not high > low:
    return np.zeros(values.shape, np.uint16)
  unit = np.clip((np.asarray(values, np.float64) - low) / (high - low), 0.0, 1.0)
  return np.rint(unit * _UINT16_MAX).astype(np.uint16)


# ---------------------------------------------------------------------------------------------
# DICOM


def _dcmread(path, *, stop_before_pixels: bool):
  import pydicom  # pylint: disable=g-import-not-at-top
  from pydicom import errors  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  try:
    try:
      return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except errors.InvalidDicomError:
      # Valid DICOM written without the 128-byte preamble: retried with force.
      return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
  except Exception as e:
    raise ValueError(f"{path} cannot be read as DICOM: {e}") from e


def dicom_num_frames(path: str | os.PathLike) -> int:
  """Number of frames of a DICOM image (1 for a single-frame one), from the header only."""
  ds = _dcmread(path, stop_before_pixels=True)
  try:
    return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{os.fspath(path)}: bad NumberOfFrames "
                     f"{ds.get('NumberOfFrames')!r}") from e


def dicom_source(path: str | os.PathLike) -> str | None:
  """The schema `source` of a DICOM file from its Modality tag (None if absent or unknown)."""
  ds = _dcmread(path, stop_before_pixels=True)
  return DICOM_MODALITY_SOURCES.get(str(ds.get("Modality", "")).strip().upper())


def _first(value) -> float:
  """First value of a possibly multi-valued DICOM number (Window Center may hold several)."""
  if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
    value = value[0]
  return float(value)


def _voi_unit(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
  """The VOI window of PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID) onto [0, 1]."""
  if function == "SIGMOID":
    return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
  if function == "LINEAR_EXACT":
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)
  if width <= 1.0:  # LINEAR with width 1 is a threshold at c - 0.5
    return (values > center - 0.5).astype(np.float64)
  return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def read_dicom(path: str | os.PathLike, *, frame: int | None = None) -> np.ndarray:
  """One DICOM frame: uint16 [H,W] for grey images (see the module docstring), uint8 [H,W,3]
  for 8-bit colour ones.

  Raises:
    ValueError: naming the file: not DICOM, no or undecodable pixel data (e.g. a compressed
      transfer syntax without its decoder plugin), a multi-frame image without `frame`, a frame
      out of range, or an unsupported photometric interpretation.
  """
  from pydicom import pixels  # pylint: disable=g-import-not-at-top
  name = os.fspath(path)
  ds = _dcmread(path, stop_before_pixels=False)
  if "PixelData" not in ds:
    raise ValueError(f"{name}: DICOM file without pixel data (Modality "
                     f"{ds.get('Modality', '?')}, SOP class {ds.get('SOPClassUID', '?')}).")
  num_frames = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
  if num_frames > 1 and frame is None:
    raise ValueError(f"{name}: multi-frame DICOM ({num_frames} frames); ask for one with "
                     "frame=<index>.")
  if frame is not None and not 0 <= frame < num_frames:
    raise ValueError(f"{name}: frame {frame} out of range (the file has {num_frames}).")
  try:
    stored = ds.pixel_array
  except Exception as e:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    raise ValueError(f"{name}: cannot decode the pixel data (transfer syntax "
                     f"{getattr(syntax, 'name', syntax)}): {e}") from e
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
  samples = int(ds.get("SamplesPerPixel", 1) or 1)
  if samples == 3:
    # pydicom returns YBR_* data converted to RGB.
    if num_frames > 1:
      stored = stored[frame]
    if stored.ndim != 3 or stored.shape[-1] != 3 or stored.dtype != np.uint8:
      raise ValueError(f"{name}: colour DICOM with {ds.get('BitsAllocated')} bits per sample "
                       f"and shape {stored.shape}; only 8-bit RGB is supported.")
    return np.ascontiguousarray(stored)
  if photometric not in ("MONOCHROME1", "MONOCHROME2") or stored.ndim != 2 + (num_frames > 1):
    raise ValueError(f"{name}: unsupported photometric interpretation {photometric!r} "
                     f"(pixel array shape {stored.shape}).")
  padding = ds.get("PixelPaddingValue")
  inside = np.ones(stored.shape, bool) if padding is None else stored != padding
  # [min, max] over every frame, so the frames of one series share one grey scale.
  values = np.asarray(pixels.apply_modality_lut(stored, ds), np.float64)
  if not inside.any():
    return np.zeros(stored.shape[-2:], np.uint16)
  center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
  if center is not None and width is not None and _first(width) > 0:
    function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
    unit = _voi_unit(values, _first(center), _first(width), function)
    out = np.rint(unit * _UINT16_MAX).astype(np.uint16)
  else:
    out = _to_uint16(values, values[inside].min(), values[inside].max())
  if photometric == "MONOCHROME1":
    out = _UINT16_MAX - out
  out[~inside] = 0
  return out[frame] if num_frames > 1 else out


# ---------------------------------------------------------------------------------------------
# NIfTI


def volume_slices(path: str | os.PathLike, *, axis: int = 2, every: int = 1,
                  volume: int | None = None,
                  min_foreground: float = 0.01) -> list[tuple[int, np.ndarray]]:
  """(index, uint16 [H,W] slice) pairs of a NIfTI volume; see `read_volume_slices`."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  name = os.fspath(path)
  if axis not in (0, 1, 2):
    raise ValueError(f"{name}: axis must be 0, 1 or 2, got {axis}.")
  if every < 1:
    raise ValueError(f"{name}: every must be >= 1, got {every}.")
  try:
    image = nib.as_closest_canonical(nib.load(name))
    data = np.asarray(image.dataobj, np.float32)  # applies scl_slope / scl_inter
  except Exception as e:
    raise ValueError(f"{name} cannot be read as NIfTI: {e}") from e
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  elif data.ndim == 4:
    if volume is None:
      raise ValueError(f"{name}: 4-D NIfTI with {data.shape[3]} volumes; ask for one with "
                       "volume=<index>.")
    if not 0 <= volume < data.shape[3]:
      raise ValueError(f"{name}: volume {volume} out of range (the file has "
                       f"{data.shape[3]}).")
    data = data[..., volume]
  if data.ndim != 3:
    raise ValueError(f"{name}: expected a 3-D volume, got shape {data.shape}.")
  finite = np.isfinite(data)
  if not finite.any():
    return []
  low, high = np.percentile(data[finite], [0.5, 99.5])
  if not high > low:
    low, high = float(data[finite].min()), float(data[finite].max())
  if not high > low:
    return []  # a constant volume: every slice is empty
  data = np.where(finite, data, low)
  kept = []
  for index in range(0, data.shape[axis], every):
    plane = data[(slice(None),) * axis + (index,)]  # a view (np.take copies, slowly)
    if np.mean(plane > low) < min_foreground:
      continue  # background only (or nearly): no image content
    kept.append((index, np.ascontiguousarray(np.flipud(_to_uint16(plane, low, high).T))))
  return kept


def read_volume_slices(path: str | os.PathLike, axis: int = 2, every: int = 1, *,
                       volume: int | None = None,
                       min_foreground: float = 0.01) -> list[np.ndarray]:
  """Every `every`-th slice along `axis` of a NIfTI volume (.nii / .nii.gz), as uint16 [H,W].

  The volume is reoriented to RAS+ first (axis 2 = axial), mapped to 0..65535 between its 0.5th
  and 99.5th percentiles, and slices with fewer than `min_foreground` of their pixels above
  the lower bound (background only) are skipped.

  Args:
    path: the NIfTI file.
    axis: 0 sagittal, 1 coronal, 2 axial.
    every: keep slices 0, every, 2*every, ... (before skipping empty ones).
    volume: the volume of a 4-D file with several (required there).
    min_foreground: a slice with a smaller fraction of non-background pixels is empty.

  Raises:
    ValueError: naming the file, if it is not a readable 3-D (or single-volume 4-D) NIfTI.
  """
  return [plane for _, plane in volume_slices(path, axis=axis, every=every, volume=volume,
                                              min_foreground=min_foreground)]


# ---------------------------------------------------------------------------------------------
# Array helpers for builders


def downsize(image: np.ndarray, max_side: int | None) -> np.ndarray:
  """Shrinks `image` so its long side is at most `max_side` (area averaging), keeping dtype.

  uint16 images are averaged in float32 and rounded, so they stay 16-bit. Images already small
  enough, or max_side None, come back unchanged.
  """
  if max_side is None or max(image.shape[:2]) <= max_side:
    return image
  if max_side < 1:
    raise ValueError(f"max_side must be >= 1, got {max_side}.")
  height, width = image.shape[:2]
  scale = max_side / max(height, width)
  size = (max(1, round(width * scale)), max(1, round(height * scale)))
  if image.dtype == np.uint16:
    resized = Image.fromarray(image.astype(np.float32)).resize(size, Image.Resampling.BOX)
    return np.clip(np.rint(np.asarray(resized)), 0, _UINT16_MAX).astype(np.uint16)
  if image.dtype == np.uint8 and image.ndim in (2, 3):
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX), np.uint8)
  raise ValueError(f"cannot downsize an image of dtype {image.dtype} and shape {image.shape}.")


def to_grey(image: np.ndarray) -> np.ndarray:
  """RGB uint8 [H,W,3] -> uint8 [H,W] (ITU-R 601 luma, as Pillow's 'L'); grey passes through."""
  if image.ndim == 2:
    return image
  if image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8:
    return np.asarray(Image.fromarray(image).convert("L"), np.uint8)
  raise ValueError(f"cannot make a grey image of dtype {image.dtype} and shape {image.shape}.")


def check_layout(image: np.ndarray, name: str | os.PathLike) -> np.ndarray:
  """`image` if it is uint8 [H,W], uint16 [H,W] or uint8 [H,W,3]; else a ValueError."""
  ok = ((image.ndim == 2 and image.dtype in (np.uint8, np.uint16))
        or (image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8))
  if not ok or 0 in image.shape:
    raise ValueError(f"{os.fspath(name)}: image of dtype {image.dtype} and shape {image.shape}"
                     " (want uint8 [H,W], uint16 [H,W] or uint8 [H,W,3]).")
  return image
