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


# -- local ResNet depth, read from the whole key set (issue 12) -----------------------------

SMALL_ARCH = dict(global_widths=(2, 3, 4, 5, 6), local_width=2)
RESNET34_ONLY_KEY = "detection_network.dn_resnet.layer3.5.conv1.weight"  # the old detector's


def _small_state_dict(local_depth: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {name: (np.array(7, np.int64) if name.endswith("num_batches_tracked")
                 else rng.random(shape).astype(np.float32) + 0.1)
          for name, shape in glam_convert.reference_state_dict_keys(local_depth, **SMALL_ARCH)}


def _required_local_keys(local_depth: int) -> list[str]:
  return [n for n, _ in glam_convert.reference_state_dict_keys(local_depth)
          if n.startswith("detection_network.") and not n.endswith("num_batches_tracked")]


def _assert_names_only_missing(error: pytest.ExceptionInfo, key: str) -> None:
  message = str(error.value)
  assert f"lacks 1 key(s): [{key!r}]" in message, message
  assert "unexpected" not in message, message


@pytest.mark.parametrize("local_depth", [18, 34])
def test_every_single_missing_local_key_is_named_without_unexpected_keys(local_depth):
  full = _small_state_dict(local_depth)
  keys = _required_local_keys(local_depth)
  assert len(keys) == {18: 101, 34: 181}[local_depth]
  for key in keys:
    state_dict = {k: v for k, v in full.items() if k != key}
    assert glam_convert.detect_local_depth(state_dict) == local_depth, key
    with pytest.raises(ValueError) as error:
      glam_convert.convert_state_dict(state_dict, local_depth=None, **SMALL_ARCH)
    _assert_names_only_missing(error, key)


@pytest.mark.parametrize("local_depth,key", [
    (34, RESNET34_ONLY_KEY),
    (34, "detection_network.dn_resnet.layer2.3.bn2.running_var"),
    (34, "detection_network.dn_resnet.layer4.0.downsample.0.weight"),
    (34, "detection_network.gn_conv_last.weight"),
    (18, "detection_network.dn_resnet.layer3.1.conv1.weight"),
    (18, "detection_network.dn_resnet.conv1.weight"),
])
def test_load_variables_and_command_line_name_the_missing_key(tmp_path, monkeypatch,
                                                              local_depth, key):
  # Without torch: the checkpoint reader is replaced by the state dict it would return.
  state_dict = _small_state_dict(local_depth)
  del state_dict[key]
  monkeypatch.setattr(glam_convert, "load_torch_checkpoint", lambda path: dict(state_dict))
  ckpt = tmp_path / "model.ckpt"
  ckpt.write_bytes(b"stand-in")
  with pytest.raises(ValueError) as error:
    glam_convert.load_variables(str(ckpt), like={})
  _assert_names_only_missing(error, key)
  with pytest.raises(ValueError) as error:
    glam_convert.main([f"--checkpoint={ckpt}", f"--output={tmp_path / 'w.npz'}"])
  _assert_names_only_missing(error, key)
  assert not (tmp_path / "w.npz").exists()


@pytest.mark.parametrize("local_depth", [18, 34])
@pytest.mark.parametrize("extra", [
    "detection_network.dn_resnet.layer5.0.conv1.weight",
    "detection_network.dn_resnet.layer3.6.conv1.weight",
    "global_network.extra.weight",
])
def test_an_extra_key_is_still_an_unexpected_key_naming_it(local_depth, extra):
  state_dict = {**_small_state_dict(local_depth), extra: np.zeros((2, 2, 1, 1), np.float32)}
  assert glam_convert.detect_local_depth(state_dict) == local_depth
  with pytest.raises(ValueError, match=r"has 1 unexpected key\(s\): \['" +
                     extra.replace(".", r"\.") + r"'\]"):
    glam_convert.convert_state_dict(state_dict, local_depth=None, **SMALL_ARCH)


@pytest.mark.parametrize("local_depth", [18, 34])
def test_valid_state_dicts_convert_as_with_the_depth_given(local_depth):
  state_dict = _small_state_dict(local_depth)
  assert glam_convert.detect_local_depth(state_dict) == local_depth
  # num_batches_tracked and the combine conv are optional and do not sway the depth.
  optional = {k: v for k, v in state_dict.items()
              if not k.endswith("num_batches_tracked") and "combine" not in k}
  assert glam_convert.detect_local_depth(optional) == local_depth
  given = glam_convert.convert_state_dict(state_dict, local_depth=local_depth, **SMALL_ARCH)
  detected = glam_convert.convert_state_dict(optional, local_depth=None, **SMALL_ARCH)
  assert jax.tree.structure(given) == jax.tree.structure(detected)
  jax.tree.map(np.testing.assert_array_equal, given, detected)


def test_load_variables_reads_the_released_depth_from_the_reference_keys(fixture, tmp_path,
                                                                         monkeypatch):
  state_dict = dict(fixture["state_dict"])
  assert glam_convert.detect_local_depth(state_dict) == 34
  expected = glam_convert.convert_state_dict(state_dict, local_depth=34)
  monkeypatch.setattr(glam_convert, "load_torch_checkpoint", lambda path: state_dict)
  ckpt = tmp_path / "model_sep.ckpt"
  ckpt.write_bytes(b"stand-in")
  loaded = glam_convert.load_variables(str(ckpt), like=expected)
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)


def test_a_key_set_between_the_depths_or_without_local_keys_is_an_error():
  resnet18 = _small_state_dict(18)
  resnet34 = _small_state_dict(34)
  only34 = sorted(set(_required_local_keys(34)) - set(_required_local_keys(18)))
  assert len(only34) == 80
  halfway = {**resnet18, **{k: resnet34[k] for k in only34[:40]}}
  with pytest.raises(ValueError, match=r"ResNet-18 and ResNet-34 equally well \(40 missing"):
    glam_convert.detect_local_depth(halfway)
  with pytest.raises(ValueError, match=r"ResNet-18 and ResNet-34"):
    glam_convert.convert_state_dict(halfway, local_depth=None, **SMALL_ARCH)
  global_only = {k: v for k, v in resnet34.items() if not k.startswith("detection_network.")}
  with pytest.raises(ValueError, match=r"no detection_network\.\* \(local module\) keys"):
    glam_convert.detect_local_depth(global_only)
