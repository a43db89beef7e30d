"""The chest X-ray downstream builders (data_prep/cxr_downstream.py) and their 'cxr_findings'
layout (medguide_jax/data/cxr_findings.py), on small fake official releases written into
tmp_path: a CheXpert-v1.0-small tree (JPEGs and CSVs), RSNA Pneumonia and SIIM-ACR DICOMs
written with pydicom (identifying tags in their headers), Object-CXR JPEGs with rectangles,
ellipses and polygons, and COVIDx split files with 8- and 16-bit PNGs. Golden values are
computed here by hand or with numpy, independently of the builders."""
from __future__ import annotations

import csv
import glob
import io
import itertools
import math
import os

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
import pytest

from data_prep import cxr_downstream as cd
from data_prep import image_folder
from medguide_jax.data import builders
from medguide_jax.data import cxr_findings

SPLITS = ("train", "validation", "test")
NAN = math.nan
SECRETS = ("Doe^Jane", "PID-SECRET-123", "SECRET-HOSPITAL", "19500101")


# ---------------------------------------------------------------------------------------------
# Helpers


def records(builder):
  """split -> id -> record, for the splits the builder wrote."""
  out = {}
  for split in SPLITS:
    if split in builder.info.splits:
      source = builder.as_data_source(split=split)
      out[split] = {text(r["id"]): r for r in (source[i] for i in range(len(source)))}
  return out


def text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def decode(blob) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(bytes(blob))))


def masks(record):
  return [decode(m) for m in record["region_masks"]]


def assert_patient_disjoint(by_split):
  seen = {}
  for split, rows in by_split.items():
    for r in rows.values():
      assert seen.setdefault(text(r["patient"]), split) == split, text(r["patient"])


def key_in(split, prefix, validation, test, skip=()):
  """The first '<prefix><n>' that image_folder.hash_split puts in `split`."""
  return next(k for k in (f"{prefix}{n}" for n in itertools.count())
              if k not in skip and image_folder.hash_split(k, validation, test) == split)


def write_csv(path, header, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def gradient(height, width):
  """uint8 [height, width] holding 0 and 255 (so a DICOM's full-range window is the
  identity), distinct values elsewhere."""
  g = (np.arange(height * width).reshape(height, width) * 7) % 256
  g.flat[0], g.flat[-1] = 0, 255
  return g.astype(np.uint8)


def write_image(path, pixels, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path, format=fmt)


def write_dicom(path, pixels, *, patient_id="PID-SECRET-123", view="PA"):
  """A CR chest DICOM (MONOCHROME2, 8-bit, no window) whose header holds identifying tags."""
  path.parent.mkdir(parents=True, exist_ok=True)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"   # computed radiography
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
  ds.Modality, ds.PatientName, ds.PatientBirthDate = "CR", "Doe^Jane", "19500101"
  ds.InstitutionName = "SECRET-HOSPITAL"
  if patient_id:
    ds.PatientID = patient_id
  ds.ViewPosition = view
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
  ds.PixelData = pixels.astype(np.uint8).tobytes()
  ds.save_as(path, enforce_file_format=True)


def assert_no_secrets(builder, by_split):
  """No identifying DICOM value in any record field, nor in the dataset's JSON files."""
  for rows in by_split.values():
    for r in rows.values():
      for key, value in r.items():
        blobs = list(value) if key == "region_masks" else [value]
        for blob in blobs:
          data = bytes(blob) if isinstance(blob, (bytes, np.bytes_)) else str(blob).encode()
          for secret in SECRETS:
            assert secret.encode() not in data, (key, secret)
  for path in glob.glob(os.path.join(os.fspath(builder.data_path), "*.json")):
    with open(path, encoding="utf-8") as f:
      content = f.read()
    for secret in SECRETS:
      assert secret not in content, (path, secret)


# ---------------------------------------------------------------------------------------------
# The layout's helpers


def test_finding_record_mask_size_mismatch_names_file_and_sizes():
  item = cxr_findings.Item(id="x", path="x.png", where="table.csv line 7",
                           labels=np.ones(1, np.float32), study="x", patient="x",
                           regions=[cxr_findings.Region(0, shape="raster",
                                                        mask=np.ones((5, 9), bool))])
  with pytest.raises(ValueError, match=r"table.csv line 7.*9x5.*image is 8x6"):
    cxr_findings.finding_record(np.zeros((6, 8), np.uint8), item, max_side=0)


def test_finding_record_clips_drops_and_shrinks():
  image = gradient(40, 60)
  regions = [cxr_findings.Region(0, box=(-4, 10, 20, 30)),        # clipped at x = 0
             cxr_findings.Region(0, box=(70, 0, 80, 10)),         # outside: dropped
             cxr_findings.Region(0, box=(10, 10, 10, 20)),        # empty: dropped
             cxr_findings.Region(0, shape="raster",
                                 mask=np.pad(np.ones((10, 20), bool), ((20, 10), (30, 10))))]
  item = cxr_findings.Item(id="x", path="x", where="w", labels=np.ones(1, np.float32),
                           study="s", patient="p", regions=regions)
  rec, counts = cxr_findings.finding_record(image, item, max_side=30)
  assert counts == {"boxes_clipped": 1, "boxes_dropped": 2, "regions": 2}
  assert decode(rec["image"]).shape == (20, 30)
  np.testing.assert_allclose(decode(rec["image"]),
                             image.reshape(20, 2, 30, 2).mean(axis=(1, 3)), atol=1)
  np.testing.assert_array_equal(rec["region_boxes"], [[0, 5, 10, 15], [15, 10, 25, 15]])
  expected = np.zeros((20, 30), np.uint8)
  expected[5:15, 0:10] = 255
  np.testing.assert_array_equal(masks(rec)[0], expected)
  expected = np.zeros((20, 30), np.uint8)
  expected[10:15, 15:25] = 255
  np.testing.assert_array_equal(masks(rec)[1], expected)


def test_grey8_conventions():
  dicom = np.array([[0, 257, 65535]], np.uint16)
  np.testing.assert_array_equal(cxr_findings.grey8(dicom, dicom=True), [[0, 1, 255]])
  png16 = np.array([[1000, 2000, 5000]], np.uint16)
  np.testing.assert_array_equal(cxr_findings.grey8(png16, dicom=False),
                                [[0, 64, 255]])   # 1000 / 4000 * 255 = 63.75


def test_decode_rle_is_column_major_relative():
  # 12 rows x 16 columns; runs: 3 pixels from 22, then 2 pixels 9 after that run's end.
  mask = cd.decode_rle(cd.parse_rle("22 3 9 2", "w"), 12, 16)
  expected = np.zeros((12, 16), bool)
  for y, x in ((10, 1), (11, 1), (0, 2), (10, 2), (11, 2)):   # pixel x * 12 + y
    expected[y, x] = True
  np.testing.assert_array_equal(mask, expected)
  with pytest.raises(ValueError, match="run ends at pixel 300"):
    cd.decode_rle(cd.parse_rle("100 200", "w"), 12, 16, "train-rle.csv line 3")
  with pytest.raises(ValueError, match="pairs"):
    cd.parse_rle("1 2 3", "train-rle.csv line 4")


def test_object_annotation_errors_name_line_and_object():
  with pytest.raises(ValueError, match=r"train.csv line 5, object 2: type 3"):
    cd.parse_objects("0 1 2 3 4;3 1 2 3 4", "train.csv line 5")
  with pytest.raises(ValueError, match=r"object 1: a polygon needs 3"):
    cd.parse_objects("2 1 2 3 4", "train.csv line 5")
  with pytest.raises(ValueError, match=r"object 1: a ellipse needs x1 y1 x2 y2"):
    cd.parse_objects("1 1 2 3", "train.csv line 5")


def test_options_and_config_names():
  assert builders.builder_options(cd.CheXpert) == {
      "max_side": int, "missing_files": str, "per_class": int, "selection": str,
      "views": tuple[str, ...]}
  assert builders.builder_options(cd.SiimAcr) == {"max_side": int, "missing_files": str}
  assert cd.CheXpert(data_dir="/x").builder_config.name == "default"
  assert cd.CheXpert(data_dir="/x", selection="5x200",
                     per_class=3).builder_config.name == "selection_5x200-per_class_3"
  assert cd.RsnaPneumonia(data_dir="/x", max_side=0).builder_config.name == "native"
  with pytest.raises(ValueError, match="per_class=3 is an option of selection='5x200'"):
    cd.CheXpert(data_dir="/x", per_class=3)
  with pytest.raises(ValueError, match="views='oblique'"):
    cd.CheXpert(data_dir="/x", views=("oblique",))
  with pytest.raises(ValueError, match="missing_files='warn'"):
    cd.Covidx(data_dir="/x", missing_files="warn")


# ---------------------------------------------------------------------------------------------
# CheXpert

CHEX_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *cd.CHEXPERT_LABELS]


def chex_labels(**values):
  """The 14 CSV cells: blank unless given (names with spaces as underscores)."""
  return [values.get(n.replace(" ", "_"), "") for n in cd.CHEXPERT_LABELS]


def chex_row(patient, study, view, side="Frontal", appa="AP", part="train", **labels):
  path = f"CheXpert-v1.0-small/{part}/{patient}/study{study}/view{view}_{side.lower()}.jpg"
  return [path, "Female", "61", side, appa if side == "Frontal" else "", *chex_labels(**labels)]


def make_chexpert(root, train_rows, valid_rows, skip=()):
  release = root / "CheXpert-v1.0-small"
  write_csv(release / "train.csv", CHEX_HEADER, train_rows)
  write_csv(release / "valid.csv", CHEX_HEADER, valid_rows)
  for row in list(train_rows) + list(valid_rows):
    if row[0] not in skip:
      write_image(root / row[0], gradient(30, 40), fmt="JPEG")
  return root


def official_rows():
  a = key_in("train", "patient000", 0.05, 0.0)
  b = key_in("validation", "patient000", 0.05, 0.0)
  train = [chex_row(a, 1, 1, Cardiomegaly="1.0", Edema="-1.0", No_Finding="0.0"),
           chex_row(a, 1, 2, side="Lateral", Cardiomegaly="1.0"),
           chex_row(a, 2, 1, appa="PA", Atelectasis="0.0"),
           chex_row(b, 1, 1, Pleural_Effusion="-1.0")]
  valid = [chex_row("patient64541", 1, 1, part="valid", appa="PA",
                    **{n.replace(" ", "_"): "0.0" for n in cd.CHEXPERT_LABELS})]
  valid[0][CHEX_HEADER.index("Edema")] = "1.0"
  return a, b, train, valid


def expected_labels(**values):
  out = np.full(14, NAN, np.float32)
  for name, v in values.items():
    out[cd.CHEXPERT_LABELS.index(name.replace("_", " "))] = v
  return out


@pytest.fixture(scope="module")
def chexpert_build(tmp_path_factory):
  a, b, train, valid = official_rows()
  root = make_chexpert(tmp_path_factory.mktemp("chexpert"), train, valid)
  data_dir = tmp_path_factory.mktemp("chexpert_data")
  return a, b, builders.prepare("chexpert", data_dir=data_dir, manual_dir=root)


def test_chexpert_records_and_splits(chexpert_build):
  a, b, builder = chexpert_build
  by_split = records(builder)
  assert {s: sorted(v) for s, v in by_split.items()} == {
      "train": [f"train/{a}/study1/view1_frontal.jpg", f"train/{a}/study2/view1_frontal.jpg"],
      "validation": [f"train/{b}/study1/view1_frontal.jpg"],
      "test": ["valid/patient64541/study1/view1_frontal.jpg"]}
  assert_patient_disjoint(by_split)
  assert list(builder.info.metadata["label_names"]) == list(cd.CHEXPERT_LABELS)
  r = by_split["train"][f"train/{a}/study1/view1_frontal.jpg"]
  np.testing.assert_array_equal(r["labels"], expected_labels(
      Cardiomegaly=1, Edema=-1, No_Finding=0))
  assert (text(r["patient"]), text(r["study"]), text(r["view"])) == (a, f"{a}/study1", "AP")
  assert text(by_split["train"][f"train/{a}/study2/view1_frontal.jpg"]["view"]) == "PA"
  assert decode(r["image"]).shape == (30, 40) and decode(r["image"]).dtype == np.uint8
  assert r["region_labels"].shape == (0,) and r["region_boxes"].shape == (0, 4)
  test = by_split["test"]["valid/patient64541/study1/view1_frontal.jpg"]
  want = np.zeros(14, np.float32)
  want[cd.CHEXPERT_LABELS.index("Edema")] = 1
  np.testing.assert_array_equal(test["labels"], want)
  summary = builder.info.metadata["summary"]
  assert summary["splits"]["train"]["images"] == 2
  assert summary["splits"]["train"]["positives"]["Cardiomegaly"] == 1
  assert summary["splits"]["train"]["uncertain"]["Edema"] == 1
  assert summary["splits"]["validation"]["uncertain"]["Pleural Effusion"] == 1


def test_chexpert_renamed_release_laterals_and_shrinking(tmp_path):
  a, _, train, valid = official_rows()
  root = make_chexpert(tmp_path / "dl", train, valid)
  renamed = tmp_path / "my_chexpert"
  os.rename(root / "CheXpert-v1.0-small", renamed)   # Paths resolved under the release
  b = builders.prepare("chexpert", data_dir=tmp_path / "data", manual_dir=renamed,
                       views=("frontal", "lateral"), max_side=20)
  by_split = records(b)
  lateral = by_split["train"][f"train/{a}/study1/view2_lateral.jpg"]
  assert text(lateral["view"]) == "LATERAL"
  assert decode(lateral["image"]).shape == (15, 20)


def test_chexpert_missing_image_and_column(tmp_path):
  a, _, train, valid = official_rows()
  root = make_chexpert(tmp_path / "dl", train, valid, skip=(train[2][0],))
  with pytest.raises(FileNotFoundError, match=r"view1_frontal.jpg: image listed by .*"
                     r"train.csv line 4"):
    builders.prepare("chexpert", data_dir=tmp_path / "data", manual_dir=root)
  b = builders.prepare("chexpert", data_dir=tmp_path / "data", manual_dir=root,
                       missing_files="skip")
  missing = b.info.metadata["summary"]["missing_files"]
  assert missing["policy"] == "skip" and missing["image"]["count"] == 1
  assert f"train/{a}/study2/view1_frontal.jpg" not in records(b)["train"]
  bad = tmp_path / "bad"
  header = [c for c in CHEX_HEADER if c != "AP/PA"]
  write_csv(bad / "CheXpert-v1.0-small" / "train.csv", header, [])
  with pytest.raises(ValueError, match=r"train.csv: missing columns \['AP/PA'\]"):
    builders.prepare("chexpert", data_dir=tmp_path / "data2", manual_dir=bad)


def test_chexpert_bad_value_names_line_and_column(tmp_path):
  _, _, train, valid = official_rows()
  train[1][CHEX_HEADER.index("Edema")] = "2.0"
  root = make_chexpert(tmp_path / "dl", train, valid)
  with pytest.raises(ValueError, match=r"train.csv line 3, column 'Edema': '2.0'"):
    builders.prepare("chexpert", data_dir=tmp_path / "data", manual_dir=root)


def five_by_200_rows():
  """Per class 4 qualifying images (distinct patients), plus images that must never be
  chosen, plus a second image of each qualifying patient (left out if it is chosen)."""
  rows, n = [], itertools.count(1)
  for name in cd.CHEXPERT_5X200:
    key = name.replace(" ", "_")
    others = [o.replace(" ", "_") for o in cd.CHEXPERT_5X200 if o != name]
    for k in range(4):
      patient = f"patient{next(n):05d}"
      rows.append(chex_row(patient, 1, 1, **{key: "1.0", others[0]: "0.0"},
                           **({others[1]: ""} if k % 2 else {}), Fracture="-1.0"))
      rows.append(chex_row(patient, 2, 1, **{key: "1.0", others[0]: "1.0"}))   # 2 positive
    rows.append(chex_row(f"patient{next(n):05d}", 1, 1, **{key: "1.0", others[2]: "-1.0"}))
    rows.append(chex_row(f"patient{next(n):05d}", 1, 1, side="Lateral", **{key: "1.0"}))
  return rows


def test_chexpert_5x200_selection(tmp_path):
  train = five_by_200_rows()
  root = make_chexpert(tmp_path / "dl", train, [])
  os.remove(root / "CheXpert-v1.0-small" / "valid.csv")   # not read by 5x200
  b = builders.prepare("chexpert", data_dir=tmp_path / "data", manual_dir=root,
                       selection="5x200", per_class=3)
  assert list(b.info.metadata["label_names"]) == list(cd.CHEXPERT_5X200)
  by_split = records(b)
  test = by_split["test"]
  assert len(test) == 15
  per_class = {}
  for r in test.values():
    labels = r["labels"]
    assert (labels == 1).sum() == 1
    assert all(v == 0 or math.isnan(v) for v in labels[labels != 1])
    per_class.setdefault(int(np.argmax(labels == 1)), []).append(text(r["id"]))
  assert {k: len(v) for k, v in per_class.items()} == {j: 3 for j in range(5)}
  # The fixed-seed draw, recomputed: candidates in CSV order, rng [seed, class index].
  header = {c: i for i, c in enumerate(CHEX_HEADER)}
  for j, name in enumerate(cd.CHEXPERT_5X200):
    others = [o for o in cd.CHEXPERT_5X200 if o != name]
    candidates = [r[0].split("/", 1)[1] for r in train if r[header["Frontal/Lateral"]] ==
                  "Frontal" and r[header[name]] == "1.0" and
                  all(r[header[o]] in ("0.0", "") for o in others)]
    assert len(candidates) == 4
    chosen = np.random.default_rng([cd.CHEXPERT_5X200_SEED, j]).choice(4, 3, replace=False)
    assert sorted(per_class[j]) == sorted(candidates[i] for i in chosen)
  assert_patient_disjoint(by_split)
  test_patients = {text(r["patient"]) for r in test.values()}
  rest = [r for s in ("train", "validation") for r in by_split.get(s, {}).values()]
  assert not test_patients & {text(r["patient"]) for r in rest}
  frontal = [r for r in train if r[header["Frontal/Lateral"]] == "Frontal"]
  same_patient = sum(1 for r in frontal if r[0].split("/")[2] in test_patients) - 15
  summary = b.info.metadata["summary"]
  assert summary["left_out_same_patient_as_test"] == same_patient == 15
  assert len(rest) + 15 + same_patient == len(frontal)


# ---------------------------------------------------------------------------------------------
# RSNA Pneumonia

RSNA_HEADER = ["patientId", "x", "y", "width", "height", "Target"]


def make_rsna(root, *, rows=None, skip=()):
  pids = [key_in(s, "rsna-", 0.15, 0.15) for s in SPLITS]
  pids += [key_in("train", "rsna-", 0.15, 0.15, skip=pids)]
  a, b, c, d = pids
  rows = rows or [[a, "10", "8", "20", "12", "1"], [a, "50.0", "30.0", "30.0", "30.0", "1"],
                  [b, "70", "5", "10", "10", "1"], [b, "4", "4", "8", "8", "1"],
                  [c, "", "", "", "", "0"], [d, "", "", "", "", "0"]]
  write_csv(root / cd.RSNA_LABELS_CSV, RSNA_HEADER, rows)
  write_csv(root / cd.RSNA_CLASS_CSV, ["patientId", "class"],
            [[a, "Lung Opacity"], [a, "Lung Opacity"], [b, "Lung Opacity"],
             [c, "Normal"], [d, "No Lung Opacity / Not Normal"]])
  for pid in pids:
    if pid not in skip:
      write_dicom(root / cd.RSNA_IMAGES / f"{pid}.dcm", gradient(48, 64), view="AP")
  return root, pids


def test_rsna_boxes_masks_shrinking_and_privacy(tmp_path):
  root, (a, b, c, d) = make_rsna(tmp_path / "dl")
  builder = builders.prepare("rsna_pneumonia", data_dir=tmp_path / "data", manual_dir=root,
                             max_side=32)
  by_split = records(builder)
  assert_patient_disjoint(by_split)
  assert sorted(by_split["train"]) == sorted([a, d])
  ra = by_split["train"][a]
  assert text(ra["view"]) == "AP" and text(ra["patient"]) == a
  np.testing.assert_array_equal(ra["labels"], [1])
  np.testing.assert_allclose(decode(ra["image"]),
                             gradient(48, 64).reshape(24, 2, 32, 2).mean(axis=(1, 3)),
                             atol=1)
  # (10, 8, 30, 20) and (50, 30, 80, 60) clipped to (50, 30, 64, 48), halved.
  np.testing.assert_array_equal(ra["region_boxes"], [[5, 4, 15, 10], [25, 15, 32, 24]])
  np.testing.assert_array_equal(ra["region_labels"], [0, 0])
  first, second = np.zeros((24, 32), np.uint8), np.zeros((24, 32), np.uint8)
  first[4:10, 5:15] = 255
  second[15:24, 25:32] = 255
  got = masks(ra)
  np.testing.assert_array_equal(got[0], first)
  np.testing.assert_array_equal(got[1], second)
  rb = by_split["validation"][b]   # (70, 5, 80, 15) is outside the 64-wide image: dropped
  np.testing.assert_array_equal(rb["region_boxes"], [[2, 2, 6, 6]])
  rc = by_split["test"][c]
  np.testing.assert_array_equal(rc["labels"], [0])
  assert rc["region_boxes"].shape == (0, 4) and len(rc["region_masks"]) == 0
  summary = builder.info.metadata["summary"]
  assert (summary["boxes_clipped"], summary["boxes_dropped"], summary["regions"]) == (1, 1, 3)
  assert summary["splits"]["train"]["boxes_clipped"] == 1
  assert summary["splits"]["validation"]["boxes_dropped"] == 1
  assert summary["splits"]["train"]["positives"] == {"Pneumonia": 1}
  assert summary["detailed_classes"] == {"Lung Opacity": 2, "Normal": 1,
                                         "No Lung Opacity / Not Normal": 1}
  assert list(builder.info.metadata["region_names"]) == ["pneumonia"]
  # The counts made while writing are in the metadata on disk too.
  reread = builders.prepare("rsna_pneumonia", data_dir=tmp_path / "data", max_side=32)
  assert reread.info.metadata["summary"]["splits"] == summary["splits"]
  assert_no_secrets(builder, by_split)


def test_rsna_native_pixels_are_the_dicoms(tmp_path):
  root, (a, *_) = make_rsna(tmp_path / "dl")
  builder = builders.prepare("rsna_pneumonia", data_dir=tmp_path / "data", manual_dir=root)
  r = records(builder)["train"][a]
  np.testing.assert_array_equal(decode(r["image"]), gradient(48, 64))
  np.testing.assert_array_equal(r["region_boxes"], [[10, 8, 30, 20], [50, 30, 64, 48]])


def test_rsna_errors(tmp_path):
  root, (a, *_) = make_rsna(tmp_path / "dl", skip=())
  os.remove(root / cd.RSNA_IMAGES / f"{a}.dcm")
  with pytest.raises(FileNotFoundError, match=rf"{a}.dcm: image listed by .*"
                     rf"{cd.RSNA_LABELS_CSV} line 2"):
    builders.prepare("rsna_pneumonia", data_dir=tmp_path / "data", manual_dir=root)
  no_target = tmp_path / "no_target"
  write_csv(no_target / cd.RSNA_LABELS_CSV, RSNA_HEADER[:-1], [["p", "", "", "", ""]])
  with pytest.raises(ValueError, match=rf"{cd.RSNA_LABELS_CSV}: missing columns \['Target'\]"):
    builders.prepare("rsna_pneumonia", data_dir=tmp_path / "d2", manual_dir=no_target)
  no_images = tmp_path / "no_images"
  write_csv(no_images / cd.RSNA_LABELS_CSV, RSNA_HEADER, [["p", "", "", "", "", "0"]])
  with pytest.raises(builders.ManualDirError, match=rf"{cd.RSNA_IMAGES}: folder not found"):
    builders.prepare("rsna_pneumonia", data_dir=tmp_path / "d3", manual_dir=no_images)
  mixed = tmp_path / "mixed"
  write_csv(mixed / cd.RSNA_LABELS_CSV, RSNA_HEADER,
            [["p", "1", "1", "2", "2", "1"], ["p", "", "", "", "", "0"]])
  with pytest.raises(ValueError, match=r"line 3: patientId p has Target 0 here but 1"):
    builders.prepare("rsna_pneumonia", data_dir=tmp_path / "d4", manual_dir=mixed)


# ---------------------------------------------------------------------------------------------
# SIIM-ACR


def test_siim_rle_masks_patient_splits_and_privacy(tmp_path):
  root = tmp_path / "dl"
  dicoms = root / cd.SIIM_IMAGES
  image = gradient(12, 16)
  # img1 and img2: one patient (one split); img3: no PatientID (split by its ImageId).
  write_dicom(dicoms / "1.2.3" / "1.2.3.1" / "img1.dcm", image)
  write_dicom(dicoms / "1.2.4" / "1.2.4.1" / "img2.dcm", image)
  write_dicom(dicoms / "img3.dcm", image, patient_id="", view="AP")
  write_dicom(dicoms / "extra.dcm", image)   # not in the table
  write_csv(root / cd.SIIM_RLE_CSV, ["ImageId", " EncodedPixels"],
            [["img1", " 22 3 9 2"], ["img1", " 0 2"], ["img1", " 0 2"], ["img2", " -1"],
             ["img3", " -1"]])
  builder = builders.prepare("siim_acr", data_dir=tmp_path / "data", manual_dir=root)
  by_split = records(builder)
  assert_patient_disjoint(by_split)
  split_of = {i: s for s, rows in by_split.items() for i in rows}
  assert split_of["img1"] == split_of["img2"] == image_folder.hash_split(
      "PID-SECRET-123", 0.15, 0.15)
  assert split_of["img3"] == image_folder.hash_split("img3", 0.15, 0.15)
  r1 = by_split[split_of["img1"]]["img1"]
  np.testing.assert_array_equal(r1["labels"], [1])
  first = np.zeros((12, 16), np.uint8)
  for y, x in ((10, 1), (11, 1), (0, 2), (10, 2), (11, 2)):
    first[y, x] = 255
  second = np.zeros((12, 16), np.uint8)
  second[0:2, 0] = 255
  got = masks(r1)
  assert len(got) == 2   # the repeated row once
  np.testing.assert_array_equal(got[0], first)
  np.testing.assert_array_equal(got[1], second)
  np.testing.assert_array_equal(r1["region_boxes"], [[1, 0, 3, 12], [0, 0, 1, 2]])
  np.testing.assert_array_equal(decode(r1["image"]), image)
  assert text(r1["patient"]) == "img1" and text(r1["view"]) == "PA"
  r3 = by_split[split_of["img3"]]["img3"]
  np.testing.assert_array_equal(r3["labels"], [0])
  assert len(r3["region_masks"]) == 0 and text(r3["view"]) == "AP"
  summary = builder.info.metadata["summary"]
  assert summary["duplicate_rows"] == 1 and summary["dicoms_not_in_table"] == 1
  assert summary["images_without_patient_id"] == 1 and summary["regions"] == 2
  assert_no_secrets(builder, by_split)


def test_siim_errors(tmp_path):
  root = tmp_path / "dl"
  write_dicom(root / cd.SIIM_IMAGES / "img1.dcm", gradient(12, 16))
  write_csv(root / cd.SIIM_RLE_CSV, ["ImageId", "EncodedPixels"], [["img1", "100 200"]])
  with pytest.raises(ValueError, match=rf"{cd.SIIM_RLE_CSV} line 2: the run ends at pixel "
                     r"300, past the image's 16x12 = 192 pixels"):
    builders.prepare("siim_acr", data_dir=tmp_path / "data", manual_dir=root)
  write_csv(root / cd.SIIM_RLE_CSV, ["ImageId", "EncodedPixels"],
            [["img1", "-1"], ["img9", "-1"]])
  with pytest.raises(FileNotFoundError, match=r"img9.dcm: image listed by .*line 3"):
    builders.prepare("siim_acr", data_dir=tmp_path / "data", manual_dir=root)
  write_csv(root / cd.SIIM_RLE_CSV, ["ImageId", "Pixels"], [["img1", "-1"]])
  with pytest.raises(ValueError, match=r"missing columns \['EncodedPixels'\]"):
    builders.prepare("siim_acr", data_dir=tmp_path / "data", manual_dir=root)


# ---------------------------------------------------------------------------------------------
# Object-CXR


def test_object_cxr_shapes(tmp_path):
  root = tmp_path / "dl"
  rows = [["a.jpg", "0 2 3 12 9"], ["b.jpg", "1 4 6 24 16"], ["c.jpg", "2 2 2 14 2 2 15"],
          ["d.jpg", ""], ["f", "0 30 20 50 40;0 45 0 50 5"]]
  write_csv(root / "train.csv", ["image_name", "annotation"], rows)
  write_csv(root / "dev.csv", ["image_name", "annotation"], [["e.jpg", "0 1 1 3 3"]])
  for name, _ in rows:
    write_image(root / "train" / (name if "." in name else f"{name}.jpg"), gradient(30, 40),
                fmt="JPEG")
  write_image(root / "dev" / "e.jpg", gradient(30, 40), fmt="JPEG")
  builder = builders.prepare("object_cxr", data_dir=tmp_path / "data", manual_dir=root)
  by_split = records(builder)
  assert sorted(by_split["test"]) == ["dev/e.jpg"]
  train = {**by_split.get("train", {}), **by_split.get("validation", {})}
  assert sorted(train) == ["train/a.jpg", "train/b.jpg", "train/c.jpg", "train/d.jpg",
                           "train/f.jpg"]
  rows_, cols = np.mgrid[0:30, 0:40]
  cy, cx = rows_ + 0.5, cols + 0.5   # pixel centres
  a = train["train/a.jpg"]
  np.testing.assert_array_equal(a["region_boxes"], [[2, 3, 12, 9]])
  np.testing.assert_array_equal(masks(a)[0], np.where(
      (cx > 2) & (cx < 12) & (cy > 3) & (cy < 9), 255, 0))
  b = train["train/b.jpg"]   # ellipse in (4, 6, 24, 16): centre (14, 11), radii (10, 5)
  np.testing.assert_array_equal(b["region_boxes"], [[4, 6, 24, 16]])
  inside = ((cx - 14) / 10) ** 2 + ((cy - 11) / 5) ** 2 < 1
  np.testing.assert_array_equal(masks(b)[0], np.where(inside, 255, 0))
  c = train["train/c.jpg"]   # triangle (2, 2), (14, 2), (2, 15): hypotenuse 13x + 12y = 206
  np.testing.assert_array_equal(c["region_boxes"], [[2, 2, 14, 15]])
  inside = (cx > 2) & (cy > 2) & (13 * cx + 12 * cy < 206)
  np.testing.assert_array_equal(masks(c)[0], np.where(inside, 255, 0))
  d = train["train/d.jpg"]
  np.testing.assert_array_equal(d["labels"], [0])
  assert d["region_boxes"].shape == (0, 4)
  f = train["train/f.jpg"]   # (30, 20, 50, 40) clipped to the 40 x 30 image; (45, ...) dropped
  np.testing.assert_array_equal(f["labels"], [1])
  np.testing.assert_array_equal(f["region_boxes"], [[30, 20, 40, 30]])
  assert np.asarray([train[k]["labels"][0] for k in sorted(train)]).tolist() == [1, 1, 1, 0, 1]
  summary = builder.info.metadata["summary"]
  assert (summary["boxes_clipped"], summary["boxes_dropped"]) == (1, 1)
  assert list(builder.info.metadata["region_names"]) == ["foreign_object"]
  assert_patient_disjoint(by_split)


# ---------------------------------------------------------------------------------------------
# COVIDx


def write_covidx(root, name, lines):
  root.mkdir(parents=True, exist_ok=True)
  (root / name).write_text("".join(line + "\n" for line in lines))


def test_covidx_v9_one_hot_16bit_and_hash_validation(tmp_path):
  root = tmp_path / "dl"
  train_patients = [key_in("train", "c", 0.1, 0.0), key_in("validation", "c", 0.1, 0.0)]
  write_covidx(root, "train.txt", [f"{train_patients[0]} a.png positive rsna",
                                   f"{train_patients[0]} b.png negative rsna",
                                   f"{train_patients[1]} c.png negative sirm"])
  write_covidx(root, "test.txt", ["t1 d.png positive bimcv"])
  png16 = (np.arange(12 * 10).reshape(12, 10) * 37 + 1000).astype(np.uint16)
  (root / "train").mkdir()
  Image.fromarray(png16).save(root / "train" / "a.png")   # 16-bit grey PNG
  for name in ("b.png", "c.png"):
    write_image(root / "train" / name, gradient(12, 10))
  write_image(root / "test" / "d.png", gradient(12, 10))
  builder = builders.prepare("covidx", data_dir=tmp_path / "data", manual_dir=root)
  assert list(builder.info.metadata["class_names"]) == ["negative", "positive"]
  assert list(builder.info.metadata["label_names"]) == ["negative", "positive"]
  by_split = records(builder)
  assert sorted(by_split["train"]) == ["train/a.png", "train/b.png"]
  assert sorted(by_split["validation"]) == ["train/c.png"]
  assert sorted(by_split["test"]) == ["test/d.png"]
  np.testing.assert_array_equal(by_split["train"]["train/a.png"]["labels"], [0, 1])
  np.testing.assert_array_equal(by_split["train"]["train/b.png"]["labels"], [1, 0])
  assert text(by_split["train"]["train/a.png"]["patient"]) == f"rsna/{train_patients[0]}"
  low, high = png16.min(), png16.max()
  np.testing.assert_array_equal(decode(by_split["train"]["train/a.png"]["image"]),
                                np.rint((png16 - low) * 255.0 / (high - low)))
  assert_patient_disjoint(by_split)


def test_covidx_older_classes_and_errors(tmp_path):
  root = tmp_path / "dl"
  write_covidx(root, "train.txt", ["1 a.png normal", "2 b.png COVID-19", "3 c.png pneumonia"])
  write_covidx(root, "test.txt", ["4 d.png COVID-19"])
  for part, name in (("train", "a.png"), ("train", "b.png"), ("train", "c.png"),
                     ("test", "d.png")):
    write_image(root / part / name, gradient(8, 8))
  builder = builders.prepare("covidx", data_dir=tmp_path / "data", manual_dir=root)
  assert list(builder.info.metadata["class_names"]) == ["normal", "pneumonia", "COVID-19"]
  np.testing.assert_array_equal(records(builder)["test"]["test/d.png"]["labels"], [0, 0, 1])
  write_covidx(root, "test.txt", ["4 d.png COVID-19", "5 e.png"])
  with pytest.raises(ValueError, match=r"test.txt line 2: 2 fields"):
    builders.prepare("covidx", data_dir=tmp_path / "d2", manual_dir=root)
  write_covidx(root, "test.txt", ["4 d.png COVID-19", "5 e.png normal"])
  with pytest.raises(FileNotFoundError, match=r"test/e.png: image listed by .*test.txt line 2"):
    builders.prepare("covidx", data_dir=tmp_path / "d3", manual_dir=root)
  os.remove(root / "test.txt")
  with pytest.raises(builders.ManualDirError, match=r"test.txt: file not found"):
    builders.prepare("covidx", data_dir=tmp_path / "d4", manual_dir=root)
