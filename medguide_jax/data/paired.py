"""Schema shared by every paired-modality dataset (guidance): Derm7pt and synthetic_paired.

A record holds one case: an image of the inferior modality (clinical photo), an image of the
superior modality (dermoscopy), both as encoded bytes (PNG or JPEG, decoded in grain), and the
multi-task labels in the order of `TASKS`.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

# Derm7pt tasks: the diagnosis and the 7-point checklist criteria, in the standard order.
TASKS = ("DIAG", "PN", "BWV", "VS", "PIG", "STR", "DaG", "RS")
CLASS_NAMES = {
    "DIAG": ("BCC", "NEV", "MEL", "MISC", "SK"),
    "PN": ("ABS", "TYP", "ATP"),
    "BWV": ("ABS", "PRS"),
    "VS": ("ABS", "REG", "IR"),
    "PIG": ("ABS", "REG", "IR"),
    "STR": ("ABS", "REG", "IR"),
    "DaG": ("ABS", "REG", "IR"),
    "RS": ("ABS", "PRS"),
}
NUM_CLASSES = tuple(len(CLASS_NAMES[t]) for t in TASKS)
MODALITIES = ("inferior", "superior")


def features() -> tfds.features.FeaturesDict:
  """TFDS features of a paired record. Images stay encoded bytes (no TensorFlow needed)."""
  return tfds.features.FeaturesDict({
      "case_id": tfds.features.Tensor(shape=(), dtype=np.object_),
      "image_inferior": tfds.features.Tensor(shape=(), dtype=np.object_),
      "image_superior": tfds.features.Tensor(shape=(), dtype=np.object_),
      "labels": tfds.features.Tensor(shape=(len(TASKS),), dtype=np.int32),
  })
