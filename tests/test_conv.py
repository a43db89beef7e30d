"""The CPU im2col convolution equals lax.conv_general_dilated, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from medguide_jax.models import conv


def _lax(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("hw, k, stride, padding", [
    (2, 3, 1, "SAME"), (1, 3, 1, "SAME"), (4, 3, 2, ((1, 1), (1, 1))), (3, 1, 2, "VALID"),
    (5, 3, 1, "VALID"), (4, 3, 2, "SAME"),
])
def test_im2col_matches_lax(hw, k, stride, padding):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (3, hw, hw, 5))
  w = jax.random.normal(kw, (k, k, 5, 7))
  pads = lax.padtype_to_pads((hw, hw), (k, k), (stride, stride), padding) if isinstance(
      padding, str) else padding
  ours = lambda x, w: conv.im2col_conv(x, w, (stride, stride), tuple(map(tuple, pads)))
  np.testing.assert_allclose(ours(x, w), _lax(x, w, (stride, stride), padding),
                             rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(lambda x, w: jnp.sum(ours(x, w) ** 2), argnums=(0, 1))(x, w)
  g_lax = jax.grad(lambda x, w: jnp.sum(_lax(x, w, (stride, stride), padding) ** 2),
                   argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_lax):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_dispatch_uses_im2col_only_for_small_outputs(monkeypatch):
  calls = []
  real = conv.im2col_conv
  monkeypatch.setattr(conv, "im2col_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
  dn = lax.conv_dimension_numbers((1, 2, 2, 4), (3, 3, 4, 4), ("NHWC", "HWIO", "NHWC"))
  conv.conv_general_dilated(jnp.ones((1, 2, 2, 4)), jnp.ones((3, 3, 4, 4)), (1, 1), "SAME",
                            dimension_numbers=dn)
  assert calls == [1]
  dn = lax.conv_dimension_numbers((1, 8, 8, 4), (3, 3, 4, 4), ("NHWC", "HWIO", "NHWC"))
  conv.conv_general_dilated(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), (1, 1), "SAME",
                            dimension_numbers=dn)
  assert calls == [1]
