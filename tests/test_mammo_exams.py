"""Real-mammography builders (data_prep/mammo_exams.py): NYU exam lists and CBIS-DDSM.

Fake releases are written here (small raw 16-bit PNGs / pydicom DICOMs of a half-elliptic
breast with bright square lesions) and built end to end at x8 (368 x 240); golden values are
known by construction: labels from the exam list / CSV rows, a final-geometry mask rectangle
that pools to a known block rectangle, and ROI masks that must land exactly on the lesion
pixels after cropping, flipping and windowing. The shared GLAM sample is built when
../shared/data (MEDGUIDE_SHARED_DATA) is there.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import pickle

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
import pytest
import scipy.ndimage

from data_prep import build
from data_prep import mammo_exams
from medguide_jax.data import builders
from medguide_jax.data import mammo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("MEDGUIDE_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")
GLAM_SAMPLE = os.path.join(SHARED, "mammo_nyu_glam_sample")
X8 = (368, 240)
TISSUE, LESION = 1500, 4000


def _decode(blob: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(blob)))


def _records(builder) -> dict[str, dict[str, dict]]:
  """split -> id -> record."""
  out = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    records = [source[i] for i in range(len(source))]
    out[split] = {r["id"].decode(): r for r in records}
  return out


def _breast(shape=(420, 300), chest_wall="left", lesions=()) -> np.ndarray:
  """uint16 raw view: background 0, a half ellipse of TISSUE against the chest-wall edge,
  LESION squares (top, left, size) in raw pixels."""
  h, w = shape
  yy, xx = np.mgrid[0:h, 0:w]
  depth = xx if chest_wall == "left" else w - 1 - xx
  inside = ((yy - h / 2) / (0.45 * h)) ** 2 + (depth / (0.85 * w)) ** 2 <= 1
  image = np.where(inside, TISSUE, 0).astype(np.uint16)
  for top, left, size in lesions:
    image[top:top + size, left:left + size] = LESION
  return image


def _chest_wall_left(image: np.ndarray) -> bool:
  """Whether the breast's tallest column (the chest wall) is its leftmost one, not its tip."""
  cols = np.flatnonzero((image > 0).any(axis=0))
  height = (image[:, cols] > 0).sum(axis=0)
  return cols[0] == 0 and height[0] > 2 * height[-1]


# ---------------------------------------------------------------------------------------------
# Image-size tags


def test_tags_and_image_shapes():
  assert mammo_exams.image_shape_of() == (2944, 1920)
  assert mammo_exams.image_shape_of("x8") == X8
  assert mammo_exams.image_shape_of(image_shape=(736, 480)) == (736, 480)
  assert mammo_exams.config_name(X8) == "x8"
  assert mammo_exams.config_name((2944, 1920)) == "default"
  with pytest.raises(ValueError, match="'x7'"):
    mammo_exams.image_shape_of("x7")  # 7 divides neither side
  with pytest.raises(ValueError, match="'small'"):
    mammo_exams.image_shape_of("small")
  with pytest.raises(ValueError, match="736, 480"):
    mammo_exams.image_shape_of("x8", image_shape=(736, 480))
  with pytest.raises(ValueError, match="out_shape"):
    mammo_exams.image_shape_of(image_shape=(300, 200))


# ---------------------------------------------------------------------------------------------
# NYU exam lists


def _exam(index: int, views, labels: dict, **extra) -> dict:
  cancer = {"left_benign": 0, "left_malignant": 0, "right_benign": 0, "right_malignant": 0}
  cancer.update(labels)
  exam = {"horizontal_flip": "NO", "cancer_label": cancer, **extra}
  for view in views:
    exam[view] = [f"{index}_{view}"]
  return exam


def _nyu_release(root, exams, present: dict[str, np.ndarray], masks=None,
                 exam_list="exam_list_before_cropping.pkl"):
  os.makedirs(root / "images", exist_ok=True)
  os.makedirs(root / "segmentation", exist_ok=True)
  with open(root / exam_list, "wb") as f:
    pickle.dump(exams, f, protocol=2)
  for name, image in present.items():
    Image.fromarray(image.astype("<u2")).save(root / "images" / f"{name}.png")
  for name, mask in (masks or {}).items():
    Image.fromarray(mask).save(root / "segmentation" / f"{name}.png")
  return root


# A final-geometry (2944 x 1920) mask rectangle that 8x8 pooling maps onto blocks 100..199 x
# 50..99 exactly.
FINAL_MASK = np.zeros((2944, 1920), np.uint8)
FINAL_MASK[800:1600, 400:800] = 255
POOLED_MASK = np.zeros(X8, np.uint8)
POOLED_MASK[100:200, 50:100] = 255


@pytest.fixture(scope="module")
def nyu_release(tmp_path_factory):
  """2 exams: exam 0 right benign (R-CC with a mask; L-MLO's image missing), exam 1 left
  malignant (CC views only)."""
  root = tmp_path_factory.mktemp("nyu")
  exams = [_exam(0, mammo.VIEWS, {"right_benign": 1}),
           _exam(1, ("L-CC", "R-CC"), {"left_malignant": 1})]
  present = {"0_L-CC": _breast(chest_wall="left"), "0_R-CC": _breast(chest_wall="right"),
             "0_R-MLO": _breast((440, 320), chest_wall="right"),
             "1_L-CC": _breast((400, 280), chest_wall="left"),
             "1_R-CC": _breast((400, 280), chest_wall="right")}
  return _nyu_release(root, exams, present, masks={"0_R-CC_benign": FINAL_MASK}), present


def test_nyu_end_to_end(nyu_release, tmp_path, caplog):
  root, present = nyu_release
  with caplog.at_level(logging.WARNING):
    builder = builders.prepare("nyu_mammo:x8", data_dir=tmp_path, manual_dir=root)
  missing = [r.getMessage() for r in caplog.records if "missing and skipped" in r.getMessage()]
  assert len(missing) == 1 and ": 1 image file(s)" in missing[0]
  assert str(root / "images" / "0_L-MLO.png") in missing[0]

  # 2 exams < 10: evaluation-only, every image in every split, said in metadata and description.
  records = _records(builder)
  assert set(records) == {"train", "validation", "test"}
  for split in records.values():
    assert sorted(split) == sorted(present)
  assert builder.info.metadata["evaluation_only"] is True
  assert builder.info.description.startswith("EVALUATION-ONLY")
  assert builder.info.metadata["image_shape"] == list(X8)
  assert list(builder.info.metadata["class_names"]) == ["benign", "malignant"]

  want = {"0_L-CC": (0, 0), "0_R-CC": (1, 0), "0_R-MLO": (1, 0), "1_L-CC": (0, 1),
          "1_R-CC": (0, 0)}
  for name, record in records["test"].items():
    assert (record["benign"], record["malignant"]) == want[name], name
    assert record["view"].decode() == name[2:] and record["source"] == b"mammo"
    image = _decode(record["image"])
    assert image.dtype == np.uint16 and image.shape == X8
    assert _chest_wall_left(image), name  # R views were flipped, L views were not
    assert record["has_malignant_mask"] == 0 and record["malignant_mask"] == b""
    if name == "0_R-CC":
      assert record["has_benign_mask"] == 1
      np.testing.assert_array_equal(_decode(record["benign_mask"]), POOLED_MASK)
    else:
      assert record["has_benign_mask"] == 0 and record["benign_mask"] == b"", name
  # The record is exactly the preprocessing of the raw PNG, nothing added.
  direct = mammo.preprocess_view(present["0_R-MLO"], view="R-MLO", out_shape=X8)
  np.testing.assert_array_equal(_decode(records["test"]["0_R-MLO"]["image"]), direct.image)


def test_nyu_splits_csv(nyu_release, tmp_path):
  root, _ = nyu_release
  copy = tmp_path / "release"
  os.makedirs(copy)
  for name in os.listdir(root):
    os.symlink(root / name, copy / name)
  with open(copy / "splits.csv", "w") as f:
    f.write("exam,split\n0,train\n1,test\n")
  builder = builders.prepare("nyu_mammo:x8", data_dir=tmp_path / "data", manual_dir=copy)
  records = _records(builder)
  assert set(records) == {"train", "test"}  # nothing listed as validation
  assert sorted(records["train"]) == ["0_L-CC", "0_R-CC", "0_R-MLO"]
  assert sorted(records["test"]) == ["1_L-CC", "1_R-CC"]
  assert builder.info.metadata["evaluation_only"] is False

  with open(copy / "splits.csv", "w") as f:
    f.write("exam,split\n0,train\n1,later\n")
  with pytest.raises(ValueError, match=r"splits.csv line 3: unknown value 'later' in column "
                                       "'split'"):
    mammo_exams.read_splits_csv(str(copy / "splits.csv"), ["0", "1"])
  with open(copy / "splits.csv", "w") as f:
    f.write("exam,split\n0,train\n")
  with pytest.raises(ValueError, match=r"exams \['1'\] are not listed"):
    mammo_exams.read_splits_csv(str(copy / "splits.csv"), ["0", "1"])


def _unit(key: str) -> float:
  """SHA-256 of the key as a number in [0, 1), written out independently of the builders."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def _sha_split(key: str) -> str:
  u = _unit(key)
  return "test" if u < 0.1 else "validation" if u < 0.2 else "train"


def test_nyu_hash_splits_keep_exams_together(tmp_path):
  exams = [_exam(i, mammo.VIEWS, {}, **({"patient_id": f"pat{i // 2}"} if i < 40 else {}))
           for i in range(80)]
  # Only the existence of the files matters for the split: empty files are enough.
  os.makedirs(tmp_path / "images")
  for exam in exams:
    for view in mammo.VIEWS:
      (tmp_path / "images" / f"{exam[view][0]}.png").touch()
  items, missing = mammo_exams.nyu_images(str(tmp_path), exams, "list.pkl")
  assert len(items) == 320 and not missing
  by_split, evaluation_only = mammo_exams.nyu_splits(items, str(tmp_path / "splits.csv"))
  assert not evaluation_only
  split_of = {}
  for split, part in by_split.items():
    for item in part:
      assert split_of.setdefault(item.exam, split) == split  # one split per exam key
      # The key: patient_id where given (two exams per patient), else the list position.
      index = int(item.name.split("_")[0])
      key = f"pat{index // 2}" if index < 40 else str(index)
      assert item.exam == key and split == _sha_split(key)
  assert sum(len(p) for p in by_split.values()) == 320
  assert len(split_of) == 60 and len(set(split_of.values())) == 3


def test_nyu_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no exam list"):
    mammo_exams.find_exam_list(str(tmp_path))
  root = _nyu_release(tmp_path / "empty", [_exam(0, mammo.VIEWS, {})], {}, exam_list="data.pkl")
  with pytest.raises(FileNotFoundError, match=f"{root / 'images'}: none of the 4 images"):
    builders.prepare("nyu_mammo:x8", data_dir=tmp_path / "data", manual_dir=root)
  with pytest.raises(ValueError, match="exam 1: no 'cancer_label'"):
    mammo_exams.nyu_images(str(root), [_exam(0, (), {}), {"L-CC": ["x"]}], "list.pkl")
  with pytest.raises(ValueError, match="'0_L-CC' is also in exam 0"):
    mammo_exams.nyu_images(str(root), [_exam(0, ("L-CC",), {}), _exam(0, ("L-CC",), {})],
                           "list.pkl")


# ---------------------------------------------------------------------------------------------
# CBIS-DDSM


def _write_dicom(path, pixels: np.ndarray):
  """A minimal mammography-like DICOM (MONOCHROME2, unsigned, no window)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
  ds.Modality, ds.PatientName = "MG", "Doe^Jane"
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
  bits = 8 if pixels.dtype == np.uint8 else 16
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
  ds.PixelData = pixels.astype("u1" if bits == 8 else "<u2").tobytes()
  ds.save_as(path, enforce_file_format=True)


CBIS_HEADER = ["patient_id", "breast_density", "left or right breast", "image view",
               "abnormality id", "abnormality type", "pathology", "image file path",
               "cropped image file path", "ROI mask file path"]


def _csv(path, rows, header=CBIS_HEADER):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _csv_path(folder: str, uid: str, name="000000.dcm") -> str:
  """A CSV path: the case folder, then UID folders that the download does not have."""
  return f"{folder}/1.3.6.1.4.1.9590.100.1.2.{uid}/1.3.6.1.4.1.9590.100.1.2.{uid}9/{name}"


def _lesion_case(root, folder: str, image: np.ndarray, lesions) -> list[str]:
  """Writes the full image and one ROI folder per lesion (mask + cropped lesion image, the
  NBIA names); returns the ROI folder names."""
  _write_dicom(f"{root}/CBIS-DDSM/{folder}/07-20-2016-DDSM-1/1.000000-full mammogram "
               "images-2/1-1.dcm", image)
  roi_folders = []
  for n, (top, left, size) in enumerate(lesions, start=1):
    roi = np.zeros(image.shape, np.uint8)
    roi[top:top + size, left:left + size] = 255
    base = f"{root}/CBIS-DDSM/{folder}_{n}/08-29-2017-DDSM-3/1.000000-ROI mask images-4"
    _write_dicom(f"{base}/1-1.dcm", image[top - 5:top + size + 5, left - 5:left + size + 5])
    _write_dicom(f"{base}/1-2.dcm", roi)
    roi_folders.append(f"{folder}_{n}")
  return roi_folders


@pytest.fixture(scope="module")
def cbis_release(tmp_path_factory):
  """P_00001 LEFT CC: two benign masses (one BENIGN_WITHOUT_CALLBACK) and a malignant calc,
  listed in the mass and calc train CSVs (the calc row under its own folder); P_00002 RIGHT MLO
  in the mass test CSV, malignant, stored pointing right (unlike NYU's right views)."""
  root = tmp_path_factory.mktemp("cbis")
  benign = [(150, 60, 24), (240, 100, 24)]
  malignant = [(190, 160, 24)]
  left_cc = _breast(chest_wall="left", lesions=benign + malignant)
  mass = _lesion_case(root, "Mass-Training_P_00001_LEFT_CC", left_cc, benign)
  calc = _lesion_case(root, "Calc-Training_P_00001_LEFT_CC", left_cc, malignant)
  right_mlo = _breast((440, 320), chest_wall="left", lesions=[(200, 80, 32)])
  test = _lesion_case(root, "Mass-Test_P_00002_RIGHT_MLO", right_mlo, [(200, 80, 32)])

  def row(patient, side, view, n, kind, pathology, folder, roi_folder):
    # The ROI and cropped columns name the same folder (their files in the other order).
    return [patient, 2, side, view, n, kind, pathology, _csv_path(folder, "11"),
            _csv_path(roi_folder, "22", "000000.dcm"), _csv_path(roi_folder, "22", "000001.dcm")]

  _csv(root / "mass_case_description_train_set.csv", [
      row("P_00001", "LEFT", "CC", 1, "mass", "BENIGN", "Mass-Training_P_00001_LEFT_CC",
          mass[0]),
      row("P_00001", "LEFT", "CC", 2, "mass", "BENIGN_WITHOUT_CALLBACK",
          "Mass-Training_P_00001_LEFT_CC", mass[1])])
  _csv(root / "calc_case_description_train_set.csv", [
      row("P_00001", "LEFT", "CC", 1, "calcification", "MALIGNANT",
          "Calc-Training_P_00001_LEFT_CC", calc[0])])
  _csv(root / "mass_case_description_test_set.csv", [
      row("P_00002", "RIGHT", "MLO", 1, "mass", "MALIGNANT", "Mass-Test_P_00002_RIGHT_MLO",
          test[0])])
  return root


def _lesion_count(image: np.ndarray) -> np.ndarray:
  """Lesion pixels (of 64) in each 8x8 block, read back from the pooled image: raw values
  0 / TISSUE / LESION are read onto 0..65535 (min-max), so tissue is 65535 * 1500 / 4000 and a
  block with k lesion pixels has mean tissue + k / 64 * (65535 - tissue)."""
  tissue = 65535 * TISSUE / LESION
  return np.rint((image.astype(np.float64) - tissue) / ((65535 - tissue) / 64)).astype(int)


def _assert_mask_on_lesions(mask: np.ndarray, image: np.ndarray):
  """Blocks more than half lesion are in the mask, blocks less than half are not (exactly
  half may go either way)."""
  count = _lesion_count(image)
  assert mask.any() and (count > 32).any()
  assert mask[count > 32].all() and not mask[(count < 32) & (image > 0)].any()
  assert not mask[image == 0].any()


def test_cbis_end_to_end(cbis_release, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    builder = builders.prepare("cbis_ddsm:x8", data_dir=tmp_path, manual_dir=cbis_release)
  assert any("calc_case_description_test_set.csv" in r.getMessage() for r in caplog.records)
  records = _records(builder)
  train_split = "validation" if _unit("P_00001") < 0.1 else "train"
  assert sorted(records) == sorted({train_split, "test"})
  assert list(records[train_split]) == ["P_00001_LEFT_CC"]
  assert list(records["test"]) == ["P_00002_RIGHT_MLO"]
  assert builder.info.metadata["evaluation_only"] is False

  cc = records[train_split]["P_00001_LEFT_CC"]
  assert (cc["benign"], cc["malignant"]) == (1, 1)
  assert cc["view"] == b"L-CC" and cc["has_benign_mask"] == 1 and cc["has_malignant_mask"] == 1
  image = _decode(cc["image"])
  benign, malignant = (_decode(cc[f"{c}_mask"]) > 0 for c in ("benign", "malignant"))
  assert image.shape == benign.shape == X8
  # The union of the two benign ROIs and the calc ROI lie exactly on the lesion pixels.
  _assert_mask_on_lesions(benign | malignant, image)
  assert not (benign & malignant).any()
  assert scipy.ndimage.label(benign)[1] == 2 and scipy.ndimage.label(malignant)[1] == 1
  assert _chest_wall_left(image)

  mlo = records["test"]["P_00002_RIGHT_MLO"]
  assert (mlo["benign"], mlo["malignant"]) == (0, 1) and mlo["view"] == b"R-MLO"
  assert mlo["has_benign_mask"] == 0 and mlo["benign_mask"] == b""
  image = _decode(mlo["image"])
  malignant = _decode(mlo["malignant_mask"]) > 0
  _assert_mask_on_lesions(malignant, image)
  assert _chest_wall_left(image)  # found pointing right, so not flipped
  for record in (cc, mlo):  # no DICOM tag reaches a record
    assert b"Doe" not in b"".join(v for v in record.values() if isinstance(v, bytes))


def test_cbis_splits_by_patient():
  def item(patient, *splits):
    return mammo_exams.CbisImage(record_id=f"{patient}_LEFT_CC", patient=patient, view="L-CC",
                                 image_path="x", where="w", official_splits=set(splits))
  patients = [f"P_{i:05d}" for i in range(200)]
  items = [item(p, "train") for p in patients] + [item("P_T", "test"), item("P_B", "train"),
                                                   item("P_B", "test")]
  splits = mammo_exams.cbis_splits(items)
  assert [i.patient for i in splits["test"]] == ["P_T", "P_B", "P_B"]  # both of P_B's images
  held = {i.patient for i in splits["validation"]}
  assert held == {p for p in patients if _unit(p) < 0.1}
  assert 8 <= len(held) <= 35


def test_cbis_errors(cbis_release, tmp_path):
  bad = [h for h in CBIS_HEADER if h != "pathology"]
  _csv(tmp_path / "mass_case_description_train_set.csv", [], header=bad)
  with pytest.raises(ValueError, match=r"mass_case_description_train_set.csv: missing columns "
                                       r"\['pathology'\]"):
    mammo_exams.cbis_images(str(tmp_path))
  _csv(tmp_path / "mass_case_description_train_set.csv",
       [["P_1", 2, "LEFT", "CC", 1, "mass", "BENIGN", "a/b.dcm", "c", "d"],
        ["P_1", 2, "LEFT", "CC", 2, "mass", "PROBABLY", "a/b.dcm", "c", "d"]])
  with pytest.raises(ValueError, match=r"train_set.csv line 3: unknown value 'PROBABLY' in "
                                       "column 'pathology'"):
    mammo_exams.cbis_images(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="none of the CBIS-DDSM case description CSVs"):
    mammo_exams.cbis_images(str(tmp_path / "nowhere"))
  tree = mammo_exams.DicomTree(str(cbis_release))
  with pytest.raises(FileNotFoundError, match=r"x.csv line 7 column 'image file path': DICOM "
                                              r"'Mass-Training_P_09999_LEFT_CC/1/2/000000.dcm' "
                                              "not found"):
    tree.resolve_image("Mass-Training_P_09999_LEFT_CC/1/2/000000.dcm", "x.csv line 7",
                       "image file path")
  # By exact path, and by its case folder when the UID folders differ.
  exact = ("CBIS-DDSM/Mass-Test_P_00002_RIGHT_MLO/07-20-2016-DDSM-1/1.000000-full mammogram "
           "images-2/1-1.dcm")
  assert tree.resolve_image(exact, "w", "c") == os.path.join(str(cbis_release), exact)
  assert tree.resolve_image(_csv_path("Mass-Test_P_00002_RIGHT_MLO", "9"), "w", "c") == \
      os.path.join(str(cbis_release), exact)


# ---------------------------------------------------------------------------------------------
# The shared GLAM sample (real NYU mammograms)


@pytest.mark.skipif(not os.path.isdir(GLAM_SAMPLE),
                    reason=f"shared GLAM sample not found at {GLAM_SAMPLE} "
                    "(set MEDGUIDE_SHARED_DATA)")
def test_shared_glam_sample_x8(tmp_path, capsys):
  assert build.main(["nyu_glam_sample:x8", f"--manual_dir={GLAM_SAMPLE}",
                     f"--data_dir={tmp_path}"]) == 0
  out = capsys.readouterr().out
  assert "test: 4 examples" in out and "nyu_glam_sample/x8/1.0.0" in out
  builder = builders.prepare("nyu_glam_sample:x8", data_dir=tmp_path)  # reused, not rebuilt
  records = _records(builder)
  with open(os.path.join(GLAM_SAMPLE, "labels.csv")) as f:
    want = {row["image"][len("images/"):-len(".png")]: row for row in csv.DictReader(f)
            if row["image_present"] == "1"}
  assert len(want) == 4
  for split in ("train", "validation", "test"):
    assert sorted(records[split]) == sorted(want)
  for name, record in records["test"].items():
    assert (record["benign"], record["malignant"]) == (int(want[name]["benign"]),
                                                       int(want[name]["malignant"]))
    assert record["has_benign_mask"] == (name in ("0_R-CC", "0_R-MLO"))
    assert record["has_malignant_mask"] == 0
    assert _decode(record["image"]).shape == X8
    if record["has_benign_mask"]:
      mask = _decode(record["benign_mask"])
      assert mask.shape == X8 and set(np.unique(mask)) == {0, 255}
  assert builder.info.metadata["evaluation_only"] is True
