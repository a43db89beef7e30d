"""SwAV multi-crop and medical augmentations: decoding, crop geometry, invariances, goldens."""
from __future__ import annotations

import colorsys
import dataclasses
import functools
import io

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

from medguide_jax.data import images
from medguide_jax.data import multicrop as mc

OFF = mc.AugmentConfig(flip_p=0, rotate_p=0, jitter_p=0, grey_p=0, blur_p=0, noise_p=0)
SMALL = (mc.CropSpec(2, 32, (0.14, 1.0)), mc.CropSpec(3, 16, (0.05, 0.14)))


def _record(array: np.ndarray, source: str = "xray", label: int = 3) -> dict:
  data = _png16(array) if array.dtype == np.uint16 else images.encode_png(array)
  return {"image": data, "label": np.int64(label),
          "source": source.encode(), "id": b"case-7"}


def _png16(array: np.ndarray) -> bytes:
  """A 16-bit grey PNG (Pillow >= 12 refuses `images.encode_png`'s mode='I;16' argument)."""
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array.astype("<u2"))).save(buf, format="PNG")
  return buf.getvalue()


def _grey8(n=64, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, n), dtype=np.uint8)


def _rgb(n=64, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, n, 3), dtype=np.uint8)


def _ramp(h=256, w=256):
  """RGB image whose red channel is the column index and green the row index."""
  y, x = np.mgrid[:h, :w]
  return np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)


def _down2(a: np.ndarray) -> np.ndarray:
  """Halves axis 0 with Pillow-style antialiased bilinear weights [1, 3, 3, 1] / 8."""
  n = a.shape[0]
  out = []
  for i in range(n // 2):
    idx = np.arange(2 * i - 1, 2 * i + 3)
    w = np.asarray([1, 3, 3, 1], np.float64)[(idx >= 0) & (idx < n)]
    out.append(np.tensordot(w / w.sum(), a[idx[(idx >= 0) & (idx < n)]], 1))
  return np.stack(out)


# ----------------------------------------------------------------------------- decode


def test_decode_scales_each_depth():
  g = _grey8(8)
  np.testing.assert_allclose(mc.decode(images.encode_png(g))[..., 0], g / 255, atol=1e-7)
  rgb = mc.decode(images.encode_png(_rgb(8)))
  assert rgb.shape == (8, 8, 3) and rgb.dtype == np.float32
  twelve = np.random.default_rng(1).integers(0, 4096, (8, 8)).astype(np.uint16)
  twelve[0, 0] = 4000  # max <= 4095: 12-bit content
  twelve[0, 1] = 0
  out = mc.decode(_png16(twelve))
  assert out.shape == (8, 8, 1) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 0], twelve / 4095, rtol=1e-6)
  full = twelve.copy()
  full[0, 0] = 60000  # a 16-bit value: the whole 16-bit range
  np.testing.assert_allclose(mc.decode(_png16(full))[..., 0], full / 65535,
                             rtol=1e-6)


def test_decode_error_names_what():
  with pytest.raises(ValueError, match="image of record case-9"):
    mc.decode(b"not an image", what="image of record case-9")
  with pytest.raises(ValueError, match="case-7"):
    mc.multicrop_example({**_record(_grey8()), "image": b"junk"}, None, crops=SMALL,
                         channels=1, norm=None, augment_cfg=OFF)


# ----------------------------------------------------------------------------- config


def test_augment_config_from_config_rejects_unknown_keys():
  cfg = mc.AugmentConfig.from_config({"flip_p": 0.1, "gamma": [0.8, 1.2]})
  assert cfg.flip_p == 0.1 and cfg.gamma == (0.8, 1.2)
  with pytest.raises(ValueError, match="roation_p"):
    mc.AugmentConfig.from_config({"flip_p": 0.1, "roation_p": 0.3})
  with pytest.raises(ValueError, match="blur_p"):
    mc.AugmentConfig(blur_p=1.5)
  with pytest.raises(ValueError, match="scale"):
    mc.CropSpec(2, 32, (0.5, 0.2))


# ----------------------------------------------------------------------------- examples


@pytest.mark.parametrize("kind", ["grey8", "grey16", "rgb"])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_dtypes(kind, channels):
  array = {"grey8": _grey8(), "rgb": _rgb(),
           "grey16": (_grey8().astype(np.uint16) * 257)}[kind]
  rec = _record(array)
  for rng in (np.random.default_rng(0), None):
    out = mc.multicrop_example(rec, rng, crops=SMALL, channels=channels,
                               norm={"xray": (0.4, 0.2)}, augment_cfg=mc.AugmentConfig())
    assert set(out) == {"crops_0", "crops_1", "label"}
    assert out["crops_0"].shape == (2, 32, 32, channels)
    assert out["crops_1"].shape == (3, 16, 16, channels)
    assert out["crops_0"].dtype == out["crops_1"].dtype == np.float32
    assert out["label"].dtype == np.int32 and out["label"] == 3
    assert np.isfinite(out["crops_0"]).all() and np.isfinite(out["crops_1"]).all()
  with pytest.raises(ValueError, match="channels"):
    mc.multicrop_example(rec, None, crops=SMALL, channels=2, norm=None, augment_cfg=OFF)


def test_same_seed_same_crops_other_seed_other_crops():
  fn = functools.partial(mc.multicrop_example, _record(_rgb()), crops=SMALL, channels=3,
                         norm={}, augment_cfg=mc.AugmentConfig())
  a, b, c = (fn(np.random.default_rng(s)) for s in ([4, 1], [4, 1], [4, 2]))
  for key in ("crops_0", "crops_1"):
    np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a[key], c[key])
  # The views of one example differ from each other.
  assert not np.array_equal(a["crops_1"][0], a["crops_1"][1])


def _extent(view: np.ndarray, channel: int) -> float:
  """Width in pixels of the source interval a ramp-channel view covers."""
  v = view[..., channel] * 255
  return float(v.max() - v.min() + 1)


def test_crop_area_and_aspect_follow_scale_and_ratio():
  ramp = _ramp()
  crops = (mc.CropSpec(4, 256, (0.3, 0.6)), mc.CropSpec(6, 128, (0.05, 0.14)))
  for seed in range(6):
    out = mc.multicrop_example(_record(ramp, "ramp"), np.random.default_rng(seed), crops=crops,
                               channels=3, norm={"ramp": (0.0, 1.0)}, augment_cfg=OFF)
    for spec, key in zip(crops, ("crops_0", "crops_1")):
      for view in out[key]:
        w, h = _extent(view, 0), _extent(view, 1)
        # Upsampled bilinear views recover the box to within one pixel a side.
        assert spec.scale[0] - 0.01 <= w * h / 256**2 <= spec.scale[1] + 0.01, (w, h)
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05, (w, h)


def test_crop_falls_back_to_a_centred_box_of_the_widest_allowed_ratio():
  ramp = _ramp(10, 100).astype(np.float32) / 255
  crop = mc.random_resized_crop(ramp, np.random.default_rng(0), size=26, scale=(1.0, 1.0))
  x = crop[..., 0] * 255
  # No 100%-area box with aspect <= 4/3 fits a 10 x 100 image: columns 43..55 (13 = 10*4/3).
  assert abs(x.min() - 43) <= 0.5 and abs(x.max() - 55) <= 0.5
  y = crop[..., 1] * 255
  assert abs(y.min() - 0) <= 0.5 and abs(y.max() - 9) <= 0.5


def test_evaluation_views_are_the_whole_image_resized():
  g = _grey8(64)
  crops = (mc.CropSpec(2, 32, (0.14, 1.0)), mc.CropSpec(3, 64, (0.05, 0.14)))
  out = mc.multicrop_example(_record(g), None, crops=crops, channels=1,
                             norm={"xray": (0.4, 0.2)}, augment_cfg=mc.AugmentConfig())
  again = mc.multicrop_example(_record(g), None, crops=crops, channels=1,
                               norm={"xray": (0.4, 0.2)}, augment_cfg=mc.AugmentConfig())
  half = _down2(_down2(g / 255).T).T
  for view in out["crops_0"]:
    np.testing.assert_allclose(view[..., 0], (half - 0.4) / 0.2, atol=1e-4)
  for view in out["crops_1"]:
    np.testing.assert_allclose(view[..., 0], (g / 255 - 0.4) / 0.2, atol=1e-5)
  for key in ("crops_0", "crops_1"):
    np.testing.assert_array_equal(out[key], again[key])


def test_normalisation_without_augmentation():
  g = _grey8(48)
  x = g.astype(np.float64) / 255
  full = [mc.CropSpec(2, 48, (1.0, 1.0))]
  run = functools.partial(mc.multicrop_example, crops=full, channels=3, augment_cfg=OFF)
  cases = [("xray", {"xray": (0.3, 0.1)}, (x - 0.3) / 0.1),
           ("mr", {"xray": (0.3, 0.1)}, (x - 0.5) / 0.25),  # unnamed source: DEFAULT_NORM
           ("xray", None, (x - x.mean()) / x.std())]
  for source, norm, want in cases:
    out = run(_record(g, source), np.random.default_rng(1), norm=norm)["crops_0"]
    np.testing.assert_allclose(out, np.broadcast_to(want[None, ..., None], out.shape),
                               atol=1e-4)
  # Colour to one channel is luma (ITU-R 601).
  rgb = _rgb(48)
  out = mc.multicrop_example(_record(rgb), np.random.default_rng(1), crops=full, channels=1,
                             norm={"xray": (0.0, 1.0)}, augment_cfg=OFF)["crops_0"]
  luma = rgb @ np.asarray([0.299, 0.587, 0.114]) / 255
  np.testing.assert_allclose(out[0, ..., 0], luma, atol=1e-5)


def test_grey_images_never_get_colour_changes():
  strong = mc.AugmentConfig(jitter_p=1.0, saturation=0.9, hue=0.5, grey_p=0.0, noise_p=1.0,
                            noise_std=(0.05, 0.05))
  rec = _record(_grey8())
  for seed in range(5):
    out = mc.multicrop_example(rec, np.random.default_rng(seed), crops=SMALL, channels=3,
                               norm=None, augment_cfg=strong)
    for key in ("crops_0", "crops_1"):
      assert np.array_equal(out[key][..., 0], out[key][..., 1])
      assert np.array_equal(out[key][..., 0], out[key][..., 2])
  # Called directly on three equal channels with colour=False: still equal, noise included.
  crop = np.repeat(mc.decode(images.encode_png(_grey8(32)))[..., :1], 3, -1)
  aug = mc.augment(crop, np.random.default_rng(0), strong, colour=False)
  assert np.array_equal(aug[..., 0], aug[..., 1]) and np.array_equal(aug[..., 0], aug[..., 2])
  # The colour path does change the relation between channels (so the check above can fail).
  aug = mc.augment(crop, np.random.default_rng(0), strong, colour=True)
  assert not np.array_equal(aug[..., 0], aug[..., 1])


def test_hue_shift_matches_colorsys():
  x = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
  x[0, 0] = (0.3, 0.3, 0.3)  # grey pixel: hue undefined, must stay grey
  shift = 0.37
  got = mc._shift_hue(x, shift)  # pylint: disable=protected-access
  for idx in np.ndindex(5, 7):
    h, s, v = colorsys.rgb_to_hsv(*x[idx].astype(np.float64))
    want = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    np.testing.assert_allclose(got[idx], want, atol=1e-5)


def test_blur_matches_scipy_gaussian_filter():
  x = np.random.default_rng(0).random((20, 24, 3)).astype(np.float32)
  got = images.gaussian_blur(x, 1.0, border="reflect")
  want = ndimage.gaussian_filter(x.astype(np.float64), (1.0, 1.0, 0), mode="mirror",
                                 truncate=3.0)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The synthetic generators' border: edge values repeated (scipy's 'nearest').
  y = np.random.default_rng(1).random((16, 12))
  np.testing.assert_allclose(images.gaussian_blur(y, 1.5, border="edge"),
                             ndimage.gaussian_filter(y, 1.5, mode="nearest", truncate=3.0),
                             atol=1e-12)


def test_rotation_is_pillows_counter_clockwise_rotate():
  x = np.random.default_rng(0).random((20, 16, 3)).astype(np.float32)
  got = mc._rotate(x, 12.5)  # pylint: disable=protected-access
  want = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c]), "F").rotate(
      12.5, Image.BILINEAR, fillcolor=0.0)) for c in range(3)], -1)
  np.testing.assert_allclose(got, want, atol=1e-6)
  dot = np.zeros((21, 21, 1), np.float32)
  dot[10, 15] = 1  # right of the centre; a quarter turn counter-clockwise puts it above
  turned = mc._rotate(dot, 90.0)  # pylint: disable=protected-access
  assert np.unravel_index(turned.argmax(), dot.shape)[:2] == (5, 10)


def test_rot90_turns_are_exact_and_flip_mirrors():
  crop = np.random.default_rng(0).random((16, 16, 1)).astype(np.float32)
  turns = [np.rot90(crop, k, axes=(0, 1)) for k in range(4)]
  seen = set()
  for seed in range(12):
    out = mc.augment(crop, np.random.default_rng(seed), dataclasses.replace(OFF, rot90=True),
                     colour=False)
    ks = [k for k, t in enumerate(turns) if np.array_equal(out, t)]
    assert len(ks) == 1
    seen.add(ks[0])
  assert len(seen) > 1
  flipped = mc.augment(crop, np.random.default_rng(0), mc.AugmentConfig(
      flip_p=1, rotate_p=0, jitter_p=0, blur_p=0, noise_p=0), colour=False)
  np.testing.assert_array_equal(flipped, crop[:, ::-1])


def test_single_image_example():
  g = _grey8(64)
  rec = _record(g)
  out = mc.single_image_example(rec, None, image_size=32, channels=3, norm={"xray": (0.5, 0.5)})
  assert set(out) == {"image", "label"} and out["label"] == 3
  assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.float32
  want = (_down2(_down2(g / 255).T).T - 0.5) / 0.5
  np.testing.assert_allclose(out["image"][..., 1], want, atol=1e-4)
  a, b = (mc.single_image_example(rec, np.random.default_rng(s), image_size=32, channels=1,
                                  norm=None)["image"] for s in (0, 0))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (32, 32, 1)


def test_pipeline_throughput_runs_the_function_over_the_source():
  seen = []

  def fn(record, rng):
    seen.append(record["k"])
    return {"x": np.float32(rng.random())}

  rate = mc.pipeline_throughput([{"k": i} for i in range(3)], fn, num_examples=7)
  assert rate > 0
  assert sorted(seen) == [0, 0, 0, 1, 1, 2, 2]


def test_jpeg_colour_decodes_to_three_channels():
  buf = io.BytesIO()
  Image.fromarray(_rgb(16)).save(buf, format="JPEG")
  assert mc.decode(buf.getvalue()).shape == (16, 16, 3)
