"""Schema shared by every single-image dataset (ssl, and later glam): one image per record.

A record holds
  image:  encoded PNG bytes at the source's native depth: mode 'L' (8-bit grey), 'I;16'
          (16-bit grey, e.g. mammograms, CT windows) or 'RGB' (dermoscopy, fundus). Decoding
          happens in grain (transforms / multicrop), never in TensorFlow.
  label:  int64 class index into the builder's `metadata['class_names']`; -1 = unlabelled.
  source: the origin of the image, e.g. 'ct', 'mr', 'xray', 'us', 'dermoscopy', 'mammo'
          (a mixture normalises per source and reports per source).
  id:     a stable identifier (file path relative to the release, or generator index).

Builders put `class_names` (a list, [] when unlabelled) in their DatasetInfo metadata:

    tfds.core.MetadataDict(class_names=[...])
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds


def features() -> tfds.features.FeaturesDict:
  """TFDS features of an image record (encoded bytes: no TensorFlow needed to read)."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),
      "label": tfds.features.Tensor(shape=(), dtype=np.int64),
      "source": tfds.features.Tensor(shape=(), dtype=np.object_),
      "id": tfds.features.Tensor(shape=(), dtype=np.object_),
  })


def encode_png(array: np.ndarray) -> bytes:
  """uint8 [H,W] / [H,W,1] -> 8-bit grey PNG, uint16 [H,W] -> 16-bit grey PNG,
  uint8 [H,W,3] -> RGB PNG. Anything else is a ValueError naming the dtype and shape."""
  a = np.asarray(array)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.dtype == np.uint8 and a.ndim == 2:
    img = Image.fromarray(a, mode="L")
  elif a.dtype == np.uint16 and a.ndim == 2:
    img = Image.fromarray(a.astype("<u2"))  # mode 'I;16' (newer Pillow rejects mode=)
  elif a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3:
    img = Image.fromarray(a, mode="RGB")
  else:
    raise ValueError(f"cannot encode an image of dtype {a.dtype} and shape {a.shape} as PNG "
                     "(want uint8 [H,W], uint16 [H,W] or uint8 [H,W,3])")
  buf = io.BytesIO()
  img.save(buf, format="PNG", compress_level=1)  # ~6x faster than the default, ~12% larger
  return buf.getvalue()


def text(value) -> str:
  """A record field stored as bytes or str, as str."""
  return value.decode() if isinstance(value, bytes) else str(value)


def gaussian_blur(x: np.ndarray, sigma: float, *, border: str) -> np.ndarray:
  """Separable Gaussian blur over the first two axes of [H, W, ...], radius ceil(3 sigma),
  taps computed in x's dtype; border 'reflect' (numpy's; the radius is cut to fit the
  image: multi-crop augmentation) or 'edge' (the synthetic generators). The sums run in a
  fixed order (rows, then columns; tap by tap), so the result is deterministic."""
  if border not in ("reflect", "edge"):
    raise ValueError(f"border={border!r}; valid: 'reflect', 'edge'")
  h, w = x.shape[:2]
  r = int(np.ceil(3 * sigma))
  if border == "reflect":
    r = min(r, h - 1, w - 1)
  if r < 1:
    return x
  dtype = x.dtype.type
  taps = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=dtype) / dtype(sigma)) ** 2)
  taps /= taps.sum()
  for axis, n in ((0, h), (1, w)):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode=border)
    window = lambda k: tuple(slice(k, k + n) if a == axis else slice(None)
                             for a in range(x.ndim))
    out = taps[0] * padded[window(0)]
    for k in range(1, 2 * r + 1):  # one vectorised pass per tap
      out += taps[k] * padded[window(k)]
    x = out
  return x


def class_names(source) -> list[str]:
  """The class names of an open data source ([] for an unlabelled dataset)."""
  metadata = source.dataset_info.metadata or {}
  return list(metadata.get("class_names", []))
