"""DeepGuide guidance model G: a regression MLP from inferior to superior latents.

Derm7pt reference (Keras): Dense(1024,relu) -> Drop(.25) -> Dense(512,relu) -> Drop(.25)
-> Dense(512,relu) -> Drop(.25) -> Dense(1024,relu) -> Drop(.25) -> Dense(2048,relu),
trained with MSE against the superior encoder's 2048-d GAP features.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

# Keras' Dense default (glorot_uniform kernel, zero bias), to match the reference model.
_dense_init = nn.initializers.xavier_uniform()


class GuidanceMLP(nn.Module):
  """G: z_I [B, D_I] -> predicted superior latent [B, out_dim].

  Attributes:
    hidden: widths of the hidden layers; each is Dense -> ReLU -> Dropout (`dense_<i>`).
    out_dim: output width (the superior latent dim, 2048 for InceptionV3/ResNet-50 GAP).
    dropout_rate: dropout after each hidden layer ('dropout' PRNG stream when training).
    output_relu: ReLU on the output (`out`), since GAP-after-ReLU targets are non-negative.
  """
  hidden: Sequence[int] = (1024, 512, 512, 1024)
  out_dim: int = 2048
  dropout_rate: float = 0.25
  output_relu: bool = True

  @nn.compact
  def __call__(self, z: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Maps z [B, D_I] to float32 predictions [B, out_dim]."""
    h = z
    for i, width in enumerate(self.hidden):
      h = nn.relu(nn.Dense(width, kernel_init=_dense_init, name=f"dense_{i}")(h))
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    out = nn.Dense(self.out_dim, kernel_init=_dense_init, name="out")(h)
    if self.output_relu:
      out = nn.relu(out)
    return out.astype(jnp.float32)
