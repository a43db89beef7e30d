"""The converted official GLAM weights reproduce the official PyTorch model's outputs.

tests/fixtures/glam_reference.npz holds what the reference `MILSingleImageModel` (nyukat/GLAM)
computed in eval mode at 512x320 with seeded weights (see tests/fixtures/glam_reference.py):
here those weights are redrawn from the stored names, shapes and seed, converted by
`glam_convert.convert_state_dict`, and our model must give the same predictions, patch
positions and saliency maps to 1e-4. No torch needed.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from medguide_jax.models import glam, glam_convert
from tests.fixtures import glam_reference

TOL = 1e-4


@pytest.fixture(scope="module")
def fixture():
  return glam_reference.load_fixture()


def _nhwc(a):  # reference [B, C, H, W] -> ours [B, H, W, C]
  return np.moveaxis(np.asarray(a), 1, -1)


def _run(fixture, num_patches: int):
  names = [n for n, _ in fixture["names_shapes"]]
  assert names == [n for n, _ in glam_convert.reference_state_dict_keys(34)], (
      "our list of the reference's state-dict keys differs from the official model's")
  state_dict = dict(fixture["state_dict"])
  state_dict["mil.mil_attn_V.weight"] = np.zeros((4, 4), np.float32)  # training-only heads
  state_dict["fusion_dnn.bias"] = np.zeros(2, np.float32)
  variables = glam_convert.convert_state_dict(state_dict, local_depth=34)
  model = glam.GLAM(crop_shape=(128, 128), num_patches=num_patches)
  x = np.asarray(fixture["input"], np.float32)[..., None]
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, local=True, fuse=True))
  return jax.tree.map(np.asarray, apply(variables, x))


@pytest.mark.parametrize("num_patches,prefix", [(1, ""), (2, "k2_")])
def test_converted_model_reproduces_the_reference(fixture, num_patches, prefix):
  out = _run(fixture, num_patches)
  # The k2_ case stores only what the second patch changes; the global outputs are shared.
  ref = lambda k: np.asarray(fixture[prefix + k] if prefix + k in fixture else fixture[k])
  np.testing.assert_array_equal(out["cam_positions"], ref("patch_locations_cam"))
  np.testing.assert_array_equal(out["patch_positions"], ref("patch_locations"))
  np.testing.assert_allclose(out["y_global"], ref("y_global"), atol=TOL)
  for ours, theirs in (("a1", "a1"), ("a2", "a2"), ("a3", "a3"),
                       ("saliency_global", "saliency_map_global")):
    np.testing.assert_allclose(out[ours], _nhwc(ref(theirs)), atol=TOL, err_msg=ours)
  local = np.moveaxis(ref("local_cams"), 2, -1)  # [B, n, 2, h, w] -> [B, n, h, w, 2]
  np.testing.assert_allclose(out["saliency_local_patches"], local, atol=TOL)
  np.testing.assert_allclose(out["y_local"], ref("y_local"), atol=TOL)
  np.testing.assert_allclose(out["saliency"], _nhwc(ref("saliency_map")), atol=TOL)


def test_an_unknown_key_is_an_error_naming_it(fixture):
  state_dict = dict(fixture["state_dict"])
  state_dict["global_network.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises((KeyError, ValueError), match="global_network.extra.weight"):
    glam_convert.convert_state_dict(state_dict, local_depth=34)
  state_dict = dict(fixture["state_dict"])
  missing = next(n for n in state_dict if n.startswith("detection_network."))
  del state_dict[missing]
  with pytest.raises((KeyError, ValueError), match=missing.replace(".", r"\.")):
    glam_convert.convert_state_dict(state_dict, local_depth=34)
