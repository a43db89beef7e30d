"""Readers (PNG/JPEG/DICOM/NIfTI), the image_folder builder and the shared-samples builders.

Readers run on files synthesised here with known golden values, and on the real DICOM / NIfTI
samples; the builders are prepared from ../shared/data (MEDGUIDE_SHARED_DATA) with split counts
and class names read from the release files themselves.
"""
from __future__ import annotations

import collections
import csv
import glob
import io
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
from PIL import Image
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
import pytest

from tests import helpers

from medguide_jax.data import builders
from medguide_jax.data import images
from medguide_jax.data import readers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("MEDGUIDE_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")
needs_shared = pytest.mark.skipif(
    not os.path.isdir(SHARED),
    reason=f"shared real samples not found at {SHARED} (set MEDGUIDE_SHARED_DATA)")
MISC = os.path.join(SHARED, "misc_public_medical_samples")


def _png(path, array, mode=None):
  Image.fromarray(array, *([mode] if mode else [])).save(path)
  return path


def _decode(record) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(record["image"])))


def _records(builder) -> dict[str, list[dict]]:
  """split -> every record of it."""
  out = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    out[split] = [source[i] for i in range(len(source))]
  return out


def _counts(builder) -> dict[str, int]:
  return {s: builder.info.splits[s].num_examples for s in builder.info.splits}


# ---------------------------------------------------------------------------------------------
# Readers: PNG / JPEG


def test_png_8bit_rgb_rgba_and_palette(tmp_path):
  grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
  out = readers.read_image(_png(tmp_path / "g.png", grey))
  assert out.dtype == np.uint8 and out.shape == (6, 8)
  np.testing.assert_array_equal(out, grey)

  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(readers.read_image(_png(tmp_path / "c.png", rgb)), rgb)
  rgba = np.concatenate([rgb, np.full((5, 7, 1), 17, np.uint8)], axis=-1)
  out = readers.read_image(_png(tmp_path / "a.png", rgba))
  assert out.shape == (5, 7, 3)
  np.testing.assert_array_equal(out, rgb)  # alpha dropped, colour untouched

  # Palette images: a grey palette is a grey image, a colour one is RGB.
  index = np.array([[0, 1], [2, 1]], np.uint8)
  for colours, want in (([9, 9, 9, 50, 50, 50, 200, 200, 200], np.array([[9, 50], [200, 50]])),
                        ([255, 0, 0, 0, 255, 0, 0, 0, 255], None)):
    image = Image.fromarray(index, "P")
    image.putpalette(colours)
    image.save(tmp_path / "p.png")
    out = readers.read_image(tmp_path / "p.png")
    if want is not None:
      np.testing.assert_array_equal(out, want)
    else:
      np.testing.assert_array_equal(out[1, 0], [0, 0, 255])
      assert out.shape == (2, 2, 3)


def test_png_16bit_round_trip_is_exact(tmp_path):
  # 12-bit-in-16 (mammogram-like) and full 16-bit values, both kept bit for bit.
  for top in (4095, 65535):
    values = np.linspace(0, top, 30).round().astype(np.uint16).reshape(5, 6)
    values[0, 0], values[-1, -1] = 1, top
    path = tmp_path / f"m{top}.png"
    Image.fromarray(values.astype("<u2")).save(path)
    out = readers.read_image(path)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, values)
    # Through the record encoder and back, too.
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(
        images.encode_png(out)))), values)


def test_record_encoder_matches_the_schema(tmp_path):
  for array, mode in ((np.arange(12, dtype=np.uint8).reshape(3, 4), "L"),
                      (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000, "I;16"),
                      (np.arange(36, dtype=np.uint8).reshape(3, 4, 3), "RGB")):
    decoded = Image.open(io.BytesIO(images.encode_png(array)))
    assert decoded.mode == mode
    np.testing.assert_array_equal(np.asarray(decoded), array)
  with pytest.raises(ValueError, match="float32"):
    images.encode_png(np.zeros((2, 2), np.float32))


def test_jpeg_grey_colour_and_exif_rotation(tmp_path):
  yy, xx = np.mgrid[0:32, 0:48]
  rgb = np.stack([xx * 5, yy * 7, (xx + yy) * 2], -1).astype(np.uint8)
  Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
  out = readers.read_image(tmp_path / "c.jpg")
  assert out.dtype == np.uint8 and out.shape == (32, 48, 3)
  assert np.abs(out.astype(int) - rgb).mean() < 3  # lossy, but close

  Image.fromarray(rgb[..., 0]).save(tmp_path / "g.JPEG", quality=95)
  assert readers.read_image(tmp_path / "g.JPEG").shape == (32, 48)  # suffix case ignored

  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
  Image.fromarray(rgb).save(tmp_path / "r.jpg", quality=95, exif=exif)
  assert readers.read_image(tmp_path / "r.jpg").shape == (48, 32, 3)


def test_unreadable_and_unsupported_files_name_the_file(tmp_path):
  good = io.BytesIO()
  Image.fromarray(np.zeros((64, 64), np.uint8)).save(good, format="PNG")
  (tmp_path / "cut.png").write_bytes(good.getvalue()[:60])
  (tmp_path / "junk.jpg").write_bytes(b"not a jpeg at all")
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "bad.nii.gz").write_bytes(b"garbage")
  for name in ("cut.png", "junk.jpg", "notes.txt"):
    with pytest.raises(ValueError, match=name):
      readers.read_image(tmp_path / name)
  with pytest.raises(ValueError, match="bad.nii.gz"):
    readers.read_volume_slices(tmp_path / "bad.nii.gz")
  with pytest.raises(ValueError, match=r"bad\.nii\.gz.*read_volume_slices"):
    readers.read_image(tmp_path / "bad.nii.gz")
  assert readers.file_kind(tmp_path / "notes.txt") is None
  assert readers.file_kind("scan.NII.GZ") == "nifti"


def test_downsize_averages_areas_and_keeps_dtype():
  blocks = np.array([[1000, 3000], [65535, 0]], np.uint16)
  image = np.kron(blocks, np.ones((4, 4), np.uint16))  # 8 x 8 of 4 x 4 blocks
  image[0, 0] = 1004  # one brighter pixel: its 4x4 block mean is 1000.25 -> 1000
  out = readers.downsize(image, 2)
  assert out.dtype == np.uint16
  np.testing.assert_array_equal(out, blocks)
  rect = readers.downsize(np.zeros((300, 100, 3), np.uint8), 150)
  assert rect.shape == (150, 50, 3) and rect.dtype == np.uint8
  small = np.ones((5, 5), np.uint8)
  assert readers.downsize(small, 10) is small and readers.downsize(small, None) is small


# ---------------------------------------------------------------------------------------------
# Readers: DICOM


def _write_dicom(path, stored: np.ndarray, *, photometric="MONOCHROME2", slope=None,
                 intercept=None, center=None, width=None, padding=None, modality="CT"):
  """A minimal valid CT-like DICOM file (16-bit signed, explicit VR little endian)."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CTImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
  ds.Modality = modality
  ds.Rows, ds.Columns = stored.shape[-2:]
  if stored.ndim == 3:
    ds.NumberOfFrames = stored.shape[0]
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
  if slope is not None:
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  if center is not None:
    ds.WindowCenter, ds.WindowWidth = center, width
  if padding is not None:
    ds.PixelPaddingValue = padding
  ds.PixelData = stored.astype("<i2").tobytes()
  ds.save_as(path, enforce_file_format=True)
  return path


def _linear_window(hu, c, w):
  """DICOM PS3.3 C.11.2.1.2.1 LINEAR, written out by hand, onto 0..65535."""
  lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
  y = 0.0 if hu <= lo else 1.0 if hu > hi else (hu - (c - 0.5)) / (w - 1) + 0.5
  return int(np.rint(y * 65535))


def test_dicom_rescale_then_window(tmp_path):
  # Stored values -> HU with slope 2, intercept -1024: 512 -> 0 HU, 532 -> 40, 600 -> 176.
  stored = np.array([[0, 512], [532, 600]], np.int16)
  path = _write_dicom(tmp_path / "ct.dcm", stored, slope=2, intercept=-1024, center=40,
                      width=400)
  out = readers.read_image(path)
  assert out.dtype == np.uint16
  want = [[_linear_window(h, 40, 400) for h in row] for row in ((-1024, 0), (40, 176))]
  np.testing.assert_array_equal(out, want)
  assert want[0] == [0, 26280]  # 0 HU: ((0 - 39.5) / 399 + 0.5) * 65535 = 26279.7
  # MONOCHROME1 shows the minimum white: the same data, inverted.
  inverted = readers.read_image(_write_dicom(
      tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", slope=2, intercept=-1024,
      center=40, width=400))
  np.testing.assert_array_equal(inverted, 65535 - np.array(want))
  assert readers.dicom_source(path) == "ct"


def test_dicom_without_window_maps_full_range(tmp_path):
  stored = np.array([[-3, -2], [-1, 1]], np.int16)  # rescaled: -1, 1, 3, 7 (slope 2, +5)
  out = readers.read_image(_write_dicom(tmp_path / "a.dcm", stored, slope=2, intercept=5))
  # (x - min) / (max - min) * 65535 with min -1, max 7: 0, 16383.75, 32767.5, 65535.
  np.testing.assert_array_equal(out, [[0, 16384], [32768, 65535]])
  # Padding pixels (outside the field of view) are left out of [min, max] and become 0.
  padded = np.array([[-2000, 0], [100, 200]], np.int16)
  out = readers.read_image(_write_dicom(tmp_path / "p.dcm", padded, padding=-2000))
  np.testing.assert_array_equal(out, [[0, 0], [32768, 65535]])


def test_dicom_multiframe_needs_a_frame(tmp_path):
  frames = np.arange(12, dtype=np.int16).reshape(3, 2, 2)  # values 0..11 over all frames
  path = _write_dicom(tmp_path / "cine.dcm", frames)
  with pytest.raises(ValueError, match=r"cine\.dcm.*multi-frame.*3 frames"):
    readers.read_image(path)
  with pytest.raises(ValueError, match=r"cine\.dcm.*frame 3 out of range"):
    readers.read_image(path, frame=3)
  assert readers.dicom_num_frames(path) == 3
  # One grey scale for the whole series: frame 1 holds 4..7 of 0..11.
  np.testing.assert_array_equal(readers.read_image(path, frame=1),
                                np.rint(np.arange(4, 8).reshape(2, 2) / 11 * 65535))


@needs_shared
def test_real_dicom_samples():
  ct_path = os.path.join(MISC, "dicom", "CT_small.dcm")
  ct = readers.read_image(ct_path)
  ds = pydicom.dcmread(ct_path)
  hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  assert ct.dtype == np.uint16 and ct.shape == hu.shape
  assert ct.min() == 0 and ct.max() == 65535  # no window in the file: the full HU range
  np.testing.assert_array_equal(np.argsort(ct, axis=None, kind="stable"),
                                np.argsort(hu, axis=None, kind="stable"))  # order kept
  mr_path = os.path.join(MISC, "dicom", "MR_small.dcm")
  mr = readers.read_image(mr_path)
  raw = pydicom.dcmread(mr_path).pixel_array  # window 600 / 1600 in the header
  assert mr.min() == _linear_window(int(raw.min()), 600, 1600)
  assert readers.dicom_source(mr_path) == "mr"


# ---------------------------------------------------------------------------------------------
# Readers: NIfTI


def test_nifti_slices_orientation_intensity_and_empty_slices(tmp_path):
  vol = np.zeros((20, 16, 12), np.float32)  # x, y, z with an identity (RAS) affine
  vol[2:18, 2:14, 3:9] = 100.0  # foreground in axial slices 3..8
  vol[2:18, 2:8, 3:9] = 50.0
  vol[5, 5, 5] = 1e6  # one outlier voxel: beyond the 99.5th percentile, clipped
  vol[1, 14, 4] = 100.0  # a marker: right-anterior corner of slice 4
  path = tmp_path / "v.nii.gz"
  nib.Nifti1Image(vol, np.eye(4)).to_filename(path)
  kept = readers.volume_slices(path, axis=2, every=1)
  assert [z for z, _ in kept] == [3, 4, 5, 6, 7, 8]  # background-only slices skipped
  plane = dict(kept)[4]
  assert plane.dtype == np.uint16 and plane.shape == (16, 20)  # [y, x]
  # Bounds: 0.5th percentile 0 (background), 99.5th 100: 100 -> 65535, 50 -> 32768.
  assert plane[16 - 1 - 14, 1] == 65535  # anterior at the top, x left to right
  assert plane[16 - 1 - 10, 10] == 65535 and plane[16 - 1 - 4, 10] == 32768
  assert plane[0, 0] == 0
  assert dict(kept)[5][16 - 1 - 5, 5] == 65535  # the outlier, clipped
  every2 = readers.read_volume_slices(path, every=2)
  assert len(every2) == 3  # slices 4, 6, 8
  np.testing.assert_array_equal(every2[0], plane)

  nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)).to_filename(
      tmp_path / "fmri.nii")
  with pytest.raises(ValueError, match=r"fmri\.nii.*4-D.*2 volumes"):
    readers.read_volume_slices(tmp_path / "fmri.nii")


@needs_shared
def test_real_nifti_sample():
  path = os.path.join(MISC, "brain_mri", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
  raw = nib.as_closest_canonical(nib.load(path)).get_fdata()
  kept = readers.volume_slices(path, axis=2, every=4)
  indices = [z for z, _ in kept]
  assert all(z % 4 == 0 for z in indices)
  # Background is 0 here: a slice with under 1% non-zero voxels is skipped, others kept.
  for z in range(0, raw.shape[2], 4):
    assert (z in indices) == ((raw[:, :, z] > 0).mean() >= 0.01), z
  assert 0 not in indices
  assert 96 in indices  # mid-brain
  assert all(p.dtype == np.uint16 and p.shape == raw.shape[1::-1] for _, p in kept)
  assert dict(kept)[96].max() == 65535


# ---------------------------------------------------------------------------------------------
# image_folder


@pytest.fixture
def archive(tmp_path):
  """Class folders a/ and b/, a loose file, a DICOM, a NIfTI volume and a hidden file."""
  root = tmp_path / "archive"
  for folder in ("a", "b", ".cache"):
    (root / folder).mkdir(parents=True)
  arrays = {}
  for i in range(3):
    arrays[f"a/{i}.png"] = np.full((4, 5), 10 * i, np.uint8)
    _png(root / f"a/{i}.png", arrays[f"a/{i}.png"])
  arrays["b/deep.png"] = (np.arange(20).reshape(4, 5) * 3000).astype(np.uint16)
  Image.fromarray(arrays["b/deep.png"].astype("<u2")).save(root / "b/deep.png")
  arrays["b/rgb.jpg"] = None
  Image.fromarray(np.full((6, 6, 3), 128, np.uint8)).save(root / "b/rgb.jpg")
  _write_dicom(root / "b/slice.dcm", np.array([[0, 1], [2, 3]], np.int16), modality="MR")
  vol = np.zeros((6, 5, 4), np.float32)
  vol[1:5, 1:4, 1:3] = 7.0
  nib.Nifti1Image(vol, np.eye(4)).to_filename(root / "b/vol.nii.gz")
  _png(root / "loose.png", np.zeros((3, 3), np.uint8))
  _png(root / ".cache/hidden.png", np.zeros((3, 3), np.uint8))
  (root / "README.txt").write_text("not an image")
  return root, arrays


def test_image_folder_labels_from_subfolders(archive, tmp_path):
  root, arrays = archive
  builder = builders.prepare("image_folder:demo", data_dir=tmp_path / "d", manual_dir=root)
  assert images.class_names(builder.as_data_source("train")) == ["a", "b"]
  assert "image_folder/demo/" in os.fspath(builder.data_dir)  # one folder per tag
  records = {r["id"].decode(): (split, r) for split, rs in _records(builder).items()
             for r in rs}
  assert set(records) == {"a/0.png", "a/1.png", "a/2.png", "b/deep.png", "b/rgb.jpg",
                          "b/slice.dcm", "b/vol.nii.gz#1", "b/vol.nii.gz#2", "loose.png"}
  for record_id, (_, record) in records.items():
    want = -1 if record_id == "loose.png" else 0 if record_id.startswith("a/") else 1
    assert record["label"] == want, record_id
  np.testing.assert_array_equal(_decode(records["b/deep.png"][1]), arrays["b/deep.png"])
  np.testing.assert_array_equal(_decode(records["a/2.png"][1]), arrays["a/2.png"])
  assert records["b/slice.dcm"][1]["source"] == b"mr"  # from the DICOM Modality
  assert records["a/0.png"][1]["source"] == b"unknown"
  assert _decode(records["b/vol.nii.gz#1"][1]).dtype == np.uint16
  # Both slices of the volume share one split.
  assert records["b/vol.nii.gz#1"][0] == records["b/vol.nii.gz#2"][0]


def test_image_folder_hash_split_is_deterministic_and_near_80_10_10(tmp_path):
  root = tmp_path / "flat"
  root.mkdir()
  for i in range(300):
    _png(root / f"img{i:03d}.png", np.full((2, 2), i % 256, np.uint8))
  builder = builders.prepare("image_folder:flat", data_dir=tmp_path / "d", manual_dir=root)
  counts = _counts(builder)
  assert sum(counts.values()) == 300
  assert 210 <= counts["train"] <= 270 and 15 <= counts["validation"] <= 45
  assert images.class_names(builder.as_data_source("train")) == []  # no folders: unlabelled
  assert all(r["label"] == -1 for r in _records(builder)["test"])
  again = builders.prepare("image_folder:flat2", data_dir=tmp_path / "d", manual_dir=root)
  assert {s: sorted(r["id"] for r in rs) for s, rs in _records(again).items()} == {
      s: sorted(r["id"] for r in rs) for s, rs in _records(builder).items()}


def test_image_folder_labels_csv_and_split_folders(tmp_path):
  root = tmp_path / "csv"
  (root / "x").mkdir(parents=True)
  for i in range(5):
    _png(root / f"x/{i}.png", np.full((3, 3), i, np.uint8))
  _png(root / "x/unlisted.png", np.zeros((3, 3), np.uint8))
  rows = [("x/0.png", "10", "train", "us"), ("x/1.png", "2", "train", ""),
          ("x/2.png", "2", "val", "us"), ("x/3.png", "", "test", "us"),
          ("x/4.png", "10", "testing", "ct")]
  with open(root / "labels.csv", "w", newline="") as f:
    csv.writer(f).writerows([("path", "label", "split", "source"), *rows])
  builder = builders.prepare("image_folder:csv", data_dir=tmp_path / "d", manual_dir=root,
                             source="xray")
  assert images.class_names(builder.as_data_source("train")) == ["2", "10"]  # numeric order
  got = {r["id"].decode(): (s, int(r["label"]), r["source"].decode())
         for s, rs in _records(builder).items() for r in rs}
  assert got == {"x/0.png": ("train", 1, "us"), "x/1.png": ("train", 0, "xray"),
                 "x/2.png": ("validation", 0, "us"), "x/3.png": ("test", -1, "us"),
                 "x/4.png": ("test", 1, "ct")}

  split_root = tmp_path / "splits"
  for part in ("train/cat", "train/dog", "Test/cat"):
    (split_root / part).mkdir(parents=True)
    _png(split_root / part / "i.png", np.zeros((2, 2), np.uint8))
  builder = builders.prepare("image_folder:splits", data_dir=tmp_path / "d",
                             manual_dir=split_root)
  assert _counts(builder) == {"train": 2, "test": 1}
  assert images.class_names(builder.as_data_source("test")) == ["cat", "dog"]


def test_image_folder_errors(archive, tmp_path):
  root, _ = archive
  empty = tmp_path / "empty"
  (empty / "sub").mkdir(parents=True)
  (empty / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match=r"empty.*no image files"):
    builders.prepare("image_folder:e", data_dir=tmp_path / "d", manual_dir=empty)

  (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  with pytest.raises(ValueError, match=r"a/broken\.png"):
    builders.prepare("image_folder:bad", data_dir=tmp_path / "d", manual_dir=root)
  builder = builders.prepare("image_folder:skip", data_dir=tmp_path / "d", manual_dir=root,
                             skip_unreadable=True)
  ids = {r["id"] for rs in _records(builder).values() for r in rs}
  assert b"a/0.png" in ids and b"a/broken.png" not in ids
  # Reused with the options it was built with; other options need another tag.
  assert builders.prepare("image_folder:skip", data_dir=tmp_path / "d").info.splits
  with pytest.raises(ValueError, match=r"skip.*max_side.*another tag"):
    builders.prepare("image_folder:skip", data_dir=tmp_path / "d", max_side=2)

  with open(root / "labels.csv", "w") as f:
    f.write("path,label\na/0.png,x\na/missing.png,y\n")
  with pytest.raises(FileNotFoundError, match=r"labels\.csv line 3.*a/missing\.png"):
    builders.prepare("image_folder:csvbad", data_dir=tmp_path / "d", manual_dir=root)
  with open(root / "labels.csv", "w") as f:
    f.write("path,label,split\na/0.png,x,holdout\n")
  with pytest.raises(ValueError, match=r"labels\.csv line 2.*unknown split 'holdout'"):
    builders.prepare("image_folder:csvbad2", data_dir=tmp_path / "d", manual_dir=root)
  with pytest.raises(ValueError, match="tag 'a/b'"):
    builders.prepare("image_folder:a/b", data_dir=tmp_path / "d", manual_dir=root)


# ---------------------------------------------------------------------------------------------
# Shared-samples builders (real data)


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("shared_builds")


@needs_shared
def test_medmnist_builders(shared_dir):
  for name, classes, source in (("breastmnist", ["malignant", "normal, benign"], b"us"),
                                ("pneumoniamnist", ["normal", "pneumonia"], b"xray")):
    npz = np.load(os.path.join(SHARED, "medmnist_small", f"{name}.npz"))
    builder = builders.prepare(name, data_dir=shared_dir,
                               manual_dir=os.path.join(SHARED, "medmnist_small"))
    records = _records(builder)
    for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
      labels = npz[f"{key}_labels"].reshape(-1)
      assert len(records[split]) == len(labels), (name, split)
      got = collections.Counter(int(r["label"]) for r in records[split])
      assert [got[0], got[1]] == np.bincount(labels, minlength=2).tolist(), (name, split)
    assert images.class_names(builder.as_data_source("test")) == classes
    first = next(r for r in records["validation"] if r["id"].endswith(b"/val/00000"))
    np.testing.assert_array_equal(_decode(first), npz["val_images"][0])
    assert first["source"] == source
  assert _counts(builders.prepare("breastmnist", data_dir=shared_dir)) == {
      "train": 546, "validation": 78, "test": 156}  # the official MedMNIST split sizes


@needs_shared
def test_max_side_is_its_own_config(shared_dir):
  manual = os.path.join(SHARED, "medmnist_small")
  small = builders.prepare("breastmnist", data_dir=shared_dir, manual_dir=manual, max_side=14)
  assert "max_side_14" in os.fspath(small.data_dir)
  record = small.as_data_source("validation")[0]
  index = int(record["id"].decode().rsplit("/", 1)[1])
  full = np.load(os.path.join(manual, "breastmnist.npz"))["val_images"][index].astype(float)
  want = np.rint(full.reshape(14, 2, 14, 2).mean(axis=(1, 3)))  # 2x2 area means
  np.testing.assert_allclose(_decode(record), want, atol=1)  # float32 accumulation


@needs_shared
def test_brain_tumor_mri(shared_dir):
  root = os.path.join(SHARED, "brain_tumor_mri_small")
  with open(os.path.join(root, "labels.csv")) as f:
    rows = list(csv.DictReader(f))
  builder = builders.prepare("brain_tumor_mri", data_dir=shared_dir, manual_dir=root)
  classes = sorted({r["label"] for r in rows})
  assert images.class_names(builder.as_data_source("train")) == classes == [
      "glioma", "meningioma", "notumor", "pituitary"]
  training = collections.Counter(r["label"] for r in rows if r["split"] == "training")
  validation = {c: round(0.15 * n) for c, n in training.items()}  # stratified 15% holdout
  records = _records(builder)
  assert len(records["validation"]) == sum(validation.values())
  assert collections.Counter(classes[r["label"]] for r in records["validation"]) == validation
  assert len(records["train"]) == sum(training.values()) - sum(validation.values())
  assert {r["id"].decode() for r in records["test"]} == {
      r["image"] for r in rows if r["split"] == "testing"}
  ids = [r["id"] for rs in records.values() for r in rs]
  assert len(ids) == len(set(ids)) == len(rows)
  image = Image.open(io.BytesIO(records["train"][0]["image"]))
  assert image.mode == "L" and records["train"][0]["source"] == b"mr"


@needs_shared
def test_ham10000_lesion_level_splits(shared_dir):
  root = os.path.join(SHARED, "derm_ham10000_small")
  with open(os.path.join(root, "metadata_subset.csv")) as f:
    rows = list(csv.DictReader(f))
  builder = builders.prepare("ham10000", data_dir=shared_dir, manual_dir=root)
  classes = sorted({r["dx"] for r in rows})
  assert images.class_names(builder.as_data_source("test")) == classes
  assert len(classes) == 7
  lesions = collections.defaultdict(set)
  for r in rows:
    lesions[r["dx"]].add(r["lesion_id"])
  per_class = {dx: round(0.1 * len(ls)) for dx, ls in lesions.items()}
  records = _records(builder)
  lesion_of = {f"images/{r['image_id']}.jpg": r["lesion_id"] for r in rows}
  split_lesions = {s: {lesion_of[r["id"].decode()] for r in rs} for s, rs in records.items()}
  assert not split_lesions["train"] & split_lesions["test"]
  assert not split_lesions["train"] & split_lesions["validation"]
  assert not split_lesions["validation"] & split_lesions["test"]
  for split in ("validation", "test"):
    assert collections.Counter(classes[r["label"]] for r in records[split]) == per_class
  assert sum(len(rs) for rs in records.values()) == len(rows)
  dx_of = {f"images/{r['image_id']}.jpg": r["dx"] for r in rows}
  assert all(classes[r["label"]] == dx_of[r["id"].decode()] for r in records["train"])
  assert _decode(records["train"][0]).shape[-1] == 3


@needs_shared
def test_medical_misc_pool(shared_dir):
  builder = builders.prepare("medical_misc", data_dir=shared_dir, manual_dir=SHARED)
  records = [(s, r) for s, rs in _records(builder).items() for r in rs]
  by_source = collections.Counter(r["source"].decode() for _, r in records)
  files = lambda pattern: len(glob.glob(os.path.join(SHARED, pattern)))
  nifti = sum(len(readers.read_volume_slices(os.path.join(MISC, "brain_mri", n), every=4))
              for n in os.listdir(os.path.join(MISC, "brain_mri")))
  assert by_source == {
      "mammo": files("mammo_nyu_*/images/*.png"),
      "xray": files("misc_public_medical_samples/cxr_nih/*.png"),
      "ct": 1, "mr": 1 + nifti + files("brain_tumor_mri_small/*/*/*.jpg"),
      "fundus": files("misc_public_medical_samples/fundus/*"),
      "histology": files("histo_samples/tiles/*.tif") + files("histo_samples/tiles/*/*.jpg")
                   + files("histo_samples/*.png"),
      "dermoscopy": files("derm_ham10000_small/images/*.jpg")}
  assert images.class_names(builder.as_data_source("train")) == []
  assert all(r["label"] == -1 for _, r in records)
  counts = _counts(builder)
  assert set(counts) == {"train", "validation", "test"}
  assert 0.05 < counts["validation"] / len(records) < 0.15
  volume_splits = collections.defaultdict(set)
  for split, r in records:
    record_id = r["id"].decode()
    if "#" in record_id:
      volume_splits[record_id.split("#")[0]].add(split)
    if r["source"] == b"mammo":  # 16-bit kept, long side shrunk to 1024
      image = Image.open(io.BytesIO(r["image"]))
      assert image.mode == "I;16" and max(image.size) == 1024
  assert len(volume_splits) == 2 and all(len(s) == 1 for s in volume_splits.values())


@needs_shared
def test_cli_builds_breastmnist(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "data_prep.build", "breastmnist",
       f"--manual_dir={os.path.join(SHARED, 'medmnist_small')}", f"--data_dir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=helpers.HANG_GUARD_S)
  assert run.returncode == 0, run.stderr
  for line in ("train: 546 examples", "validation: 78 examples", "test: 156 examples"):
    assert line in run.stdout


def test_shared_builders_name_what_is_wrong(tmp_path):
  brain = tmp_path / "brain"
  for split, n in (("Training", 2), ("Testing", 1)):
    for label in ("glioma", "meningioma", "notumor", "pituitary"):
      (brain / split / label).mkdir(parents=True)
      for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
            brain / split / label / f"{i}.jpg")
  # Without labels.csv the release's folders give split and class.
  builder = builders.prepare("brain_tumor_mri", data_dir=tmp_path / "d", manual_dir=brain)
  assert _counts(builder) == {"train": 8, "test": 4}
  with open(brain / "labels.csv", "w") as f:
    f.write("image,split,label\nTraining/glioma/0.jpg,training,glioma\n"
            "Training/glioma/1.jpg,training,astrocytoma\n")
  with pytest.raises(ValueError, match=r"labels\.csv line 3.*'astrocytoma'.*'label'"):
    builders.prepare("brain_tumor_mri", data_dir=tmp_path / "d2", manual_dir=brain)

  ham = tmp_path / "ham"
  (ham / "images").mkdir(parents=True)
  for image_id in ("ISIC_1", "ISIC_2"):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(ham / "images" / f"{image_id}.jpg")
  with open(ham / "metadata_subset.csv", "w") as f:
    f.write("lesion_id,image_id,dx\nHAM_1,ISIC_1,nv\nHAM_1,ISIC_2,mel\n")
  with pytest.raises(ValueError, match=r"metadata_subset\.csv line 3: lesion HAM_1.*'mel'"):
    builders.prepare("ham10000", data_dir=tmp_path / "d", manual_dir=ham)
  with open(ham / "metadata_subset.csv", "w") as f:
    f.write("lesion_id,image_id,dx\nHAM_1,ISIC_1,nv\nHAM_2,ISIC_3,nv\n")
  with pytest.raises(ValueError, match=r"line 3: image .*ISIC_3\.jpg not found"):
    builders.prepare("ham10000", data_dir=tmp_path / "d", manual_dir=ham)

  mnist = tmp_path / "mnist"
  mnist.mkdir()
  np.savez(mnist / "breastmnist.npz", train_images=np.zeros((2, 4, 4), np.uint8),
           train_labels=np.array([0, 2]), val_images=np.zeros((1, 4, 4), np.uint8),
           val_labels=np.array([0]), test_images=np.zeros((1, 4, 4), np.uint8))
  with pytest.raises(ValueError, match=r"breastmnist\.npz: missing arrays \['test_labels'\]"):
    builders.prepare("breastmnist", data_dir=tmp_path / "d", manual_dir=mnist)
  np.savez(mnist / "breastmnist.npz", train_images=np.zeros((2, 4, 4), np.uint8),
           train_labels=np.array([0, 2]), val_images=np.zeros((1, 4, 4), np.uint8),
           val_labels=np.array([0]), test_images=np.zeros((1, 4, 4), np.uint8),
           test_labels=np.array([[1]]))
  with pytest.raises(ValueError, match=r"train_labels\[1\] = 2 is not a class"):
    builders.prepare("breastmnist", data_dir=tmp_path / "d", manual_dir=mnist)
  with pytest.raises(ValueError, match=r"no file matches.*mammo_nyu_glam_sample"):
    builders.prepare("medical_misc", data_dir=tmp_path / "d", manual_dir=mnist)
