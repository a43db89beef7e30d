"""Multi-task classification heads on top of pooled features.

DeepGuide's Derm7pt classifier (one per task) is, as the reference code actually wires it,
Dropout(0.25) followed by a single linear softmax layer: the Dense(100, relu) branch in that
code is never connected to the output. `MultiTaskHead(hidden=0)` reproduces that for all tasks
at once; `hidden > 0` adds a shared Dense+ReLU+Dropout trunk before the per-task layers.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

# Keras' Dense default (glorot_uniform kernel, zero bias), to match the reference models.
_dense_init = nn.initializers.xavier_uniform()


class MultiTaskHead(nn.Module):
  """One logits vector per task from a shared feature vector.

  Attributes:
    num_classes: classes per task, (C_0, C_1, ...). Per-task Dense layers are `task_<t>`.
    hidden: width of an optional shared hidden layer; 0 means none.
    dropout_rate: dropout on the input features (and after the hidden layer, if any).
      Uses the 'dropout' PRNG stream when train=True; inactive when train=False.
  """
  num_classes: Sequence[int]
  hidden: int = 0
  dropout_rate: float = 0.25

  @nn.compact
  def __call__(self, z: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, ...]:
    """Maps features z [B, D] to a tuple of float32 logits, one [B, C_t] per task."""
    # One shared dropout mask on the input: each task's Dense still sees inputs dropped
    # at rate p, which is what the per-task reference models see.
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(z)
    if self.hidden > 0:
      h = nn.relu(nn.Dense(self.hidden, kernel_init=_dense_init, name="hidden")(h))
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return tuple(
        nn.Dense(c, kernel_init=_dense_init, name=f"task_{t}")(h).astype(jnp.float32)
        for t, c in enumerate(self.num_classes))
