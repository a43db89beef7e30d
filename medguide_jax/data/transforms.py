"""Per-example decoding and augmentation, run inside grain (numpy and Pillow only)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from medguide_jax.data import images as images_lib


def decode_image(data: bytes, size: int, *, what: str = "image") -> np.ndarray:
  """Encoded PNG/JPEG bytes -> uint8 [size, size, 3] (16-bit sources are scaled to 8 bits)."""
  try:
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
      img.draft("RGB", (size, size))  # let libjpeg decode at reduced scale: much faster
    if img.mode in ("I;16", "I;16B", "I"):
      arr = np.asarray(img, dtype=np.float32)
      img = Image.fromarray((255.0 * arr / max(arr.max(), 1.0)).astype(np.uint8))
    img = img.convert("RGB")
  except Exception as e:  # PIL raises many types; name what failed
    raise ValueError(f"cannot decode {what}: {e}") from e
  if img.size != (size, size):
    img = img.resize((size, size), Image.BILINEAR)
  return np.asarray(img, dtype=np.uint8)


def random_flip_rotate(images: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
  """The same random dihedral transform (flips and 90-degree turns) for every image."""
  k, flip = int(rng.integers(4)), bool(rng.integers(2))
  out = []
  for im in images:
    im = np.rot90(im, k, axes=(0, 1))
    out.append(np.ascontiguousarray(im[:, ::-1] if flip else im))
  return out


def paired_example(record: dict, rng: np.random.Generator | None, *, image_size: int,
                   augment: bool) -> dict:
  """A paired-modality record -> {'image_inferior', 'image_superior', 'labels'}."""
  case = images_lib.text(record["case_id"])
  images = [decode_image(record[f"image_{m}"], image_size, what=f"image_{m} of case {case}")
            for m in ("inferior", "superior")]
  if augment and rng is not None:
    # Each modality gets its own transform: the pairing is by lesion, not by pixel.
    images = [random_flip_rotate([im], rng)[0] for im in images]
  return {"image_inferior": images[0], "image_superior": images[1],
          "labels": np.asarray(record["labels"], np.int32)}

