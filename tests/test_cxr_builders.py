"""The chest X-ray report builders (data_prep/cxr_reports.py) on small fake releases written
into tmp_path (an Open-i tarball and PNGs, the IU CSV export, a MIMIC-CXR-JPG tree with gzipped
tables and report files), and iu_xray_text on the project's real IU X-ray reports
(../shared/data/cxr_iu_xray_reports, MEDGUIDE_SHARED_DATA)."""
from __future__ import annotations

import csv
import gzip
import io
import math
import os
import tarfile
import zipfile

import numpy as np
from PIL import Image
import pytest

from data_prep import cxr_reports
from data_prep import image_folder
from medguide_jax.data import builders
from medguide_jax.data import reports
from medguide_jax.data import tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("MEDGUIDE_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")
IU_DIR = os.path.join(SHARED, "cxr_iu_xray_reports")
SPLITS = ("train", "validation", "test")
D = tokenizer.DEID


def records(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def all_records(builder):
  return {s: records(builder, s) for s in SPLITS if s in builder.info.splits}


def text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def assert_patient_disjoint(by_split):
  seen = {}
  for split, rows in by_split.items():
    for r in rows:
      assert seen.setdefault(text(r["patient"]), split) == split, text(r["patient"])


# ---------------------------------------------------------------------------------------------
# A fake IU X-ray release

# uid -> split by image_folder.hash_split: 8 is validation, 9 and 39 test, the others train.
IU_UIDS = list(range(1, 13)) + [39]
NO_FINDINGS, NO_IMPRESSION, NO_SECTIONS, LATERAL_ONLY, UNPROJECTED, BIG = 1, 2, 3, 4, 5, 6


def test_iu_uids_cover_every_split():
  assert {image_folder.hash_split(str(n)) for n in IU_UIDS} == set(SPLITS)
  assert image_folder.hash_split("8") == "validation"


def iu_findings(n):
  if n in (NO_FINDINGS, NO_SECTIONS):
    return ""
  # A word only the held-out studies use: the tokenizer must not learn it.
  word = "Trainword trainword" if image_folder.hash_split(str(n)) == "train" else \
      "Heldoutword heldoutword"
  return f"Heart size normal {n}. No XXXX effusion. {word}."


def iu_impression(n):
  return "" if n in (NO_IMPRESSION, NO_SECTIONS) else f"No acute disease {n}."


def iu_images(n):
  """[(Open-i id, CSV file name, projection or None when the table lacks it)]."""
  out = []
  for suffix, projection in (("1001", "Frontal"), ("2001", "Lateral")):
    if n == LATERAL_ONLY and projection == "Frontal":
      continue
    out.append((f"CXR{n}_IM-{n:04d}-{suffix}", f"{n}_IM-{n:04d}-{suffix}.dcm.png", projection))
  if n == UNPROJECTED:
    out.append((f"CXR{n}_IM-{n:04d}-3001", f"{n}_IM-{n:04d}-3001.dcm.png", None))
  return out


def iu_xml(n, findings=None):
  findings = iu_findings(n) if findings is None else findings
  parents = "".join(f'<parentImage id="{i}"><caption>PA and lateral</caption></parentImage>'
                    for i, _, _ in iu_images(n))
  return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><uId id="CXR{n}"/>'
          f'<MedlineCitation><Article><Abstract>'
          f'<AbstractText Label="COMPARISON">None.</AbstractText>'
          f'<AbstractText Label="INDICATION">XXXX-year-old with cough</AbstractText>'
          f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
          f'<AbstractText Label="IMPRESSION">{iu_impression(n)}</AbstractText>'
          f'</Abstract></Article></MedlineCitation><MeSH><major>normal</major></MeSH>'
          f'{parents}</eCitation>').encode()


def png(path, size=(40, 32), value=100):
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = (np.arange(size[0] * size[1]).reshape(size[1], size[0]) % 200 + value // 4)
  Image.fromarray(pixels.astype(np.uint8), "L").save(path)


def write_tgz(path, members):
  with tarfile.open(path, "w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def write_projections(path):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["uid", "filename", "projection"])
    for n in IU_UIDS:
      for _, name, projection in iu_images(n):
        if projection:
          w.writerow([n, name, projection])


def make_openi(root, *, projections=True, xml=None, skip_image=None):
  """An Open-i layout: NLMCXR_png/, NLMCXR_reports.tgz[, indiana_projections.csv]."""
  root.mkdir(parents=True, exist_ok=True)
  members = {f"ecgen-radiology/{n}.xml": iu_xml(n) for n in IU_UIDS}
  members.update(xml or {})
  write_tgz(root / reports.OPENI_TGZ, members)
  for n in IU_UIDS:
    for image_id, _, _ in iu_images(n):
      if image_id != skip_image:
        png(root / "NLMCXR_png" / f"{image_id}.png", (600, 300) if n == BIG else (40, 32))
  if projections:
    write_projections(root / reports.IU_PROJECTIONS_CSV)
  return root


def make_iu_csv(root, image_dir=("images", "images_normalized")):
  """The Kaggle CSV layout."""
  root.mkdir(parents=True, exist_ok=True)
  with open(root / reports.IU_REPORTS_CSV, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings",
                "impression"])
    for n in IU_UIDS:
      w.writerow([n, "normal", "normal", "Xray Chest", "cough", "None.", iu_findings(n),
                  iu_impression(n)])
  write_projections(root / reports.IU_PROJECTIONS_CSV)
  for n in IU_UIDS:
    for _, name, projection in iu_images(n):
      if projection:
        png(root.joinpath(*image_dir, name))
  return root


@pytest.fixture(scope="module")
def openi_build(tmp_path_factory):
  root = make_openi(tmp_path_factory.mktemp("openi") / "release")
  data_dir = tmp_path_factory.mktemp("openi_data")
  return builders.prepare("iu_xray", data_dir=data_dir, manual_dir=root)


def test_iu_xray_openi_records(openi_build):
  b = openi_build
  by_split = all_records(b)
  assert_patient_disjoint(by_split)
  kept = {n for n in IU_UIDS if n not in (NO_FINDINGS, NO_IMPRESSION, NO_SECTIONS,
                                          LATERAL_ONLY)}
  studies = {split: {int(text(r["study"])) for r in rows} for split, rows in by_split.items()}
  assert set().union(*studies.values()) == kept
  assert studies["validation"] == {8} and studies["test"] == {9, 39}
  rows = [r for rs in by_split.values() for r in rs]
  assert len(rows) == len(kept)            # one frontal image per kept study
  for r in rows:
    n = int(text(r["study"]))
    assert text(r["view"]) == "FRONTAL" and text(r["patient"]) == str(n)
    assert text(r["id"]) == f"{n}/CXR{n}_IM-{n:04d}-1001.png"
    assert text(r["findings"]).startswith(f"Heart size normal {n}. No {D} effusion. ")
    assert text(r["impression"]) == f"No acute disease {n}."
    assert text(r["indication"]) == f"{D} -year-old with cough"
    assert text(r["comparison"]) == "None."
    assert r["labels"].shape == (0,) and r["region_boxes"].shape == (0, 4)
    with Image.open(io.BytesIO(r["image"])) as im:
      assert im.format == "PNG" and im.mode == "L"
      assert im.size == ((512, 256) if n == BIG else (40, 32))


def test_iu_xray_openi_summary(openi_build):
  meta = openi_build.info.metadata
  s = meta["summary"]
  assert s["layout"].startswith("openi (NLMCXR_reports.tgz, indiana_projections.csv")
  assert s["view_source"] == reports.IU_PROJECTIONS_CSV and s["views"] == ["frontal"]
  assert s["lacking"]["findings"] == {"count": 2, "studies": ["1", "3"]}
  assert s["lacking"]["impression"] == {"count": 2, "studies": ["2", "3"]}
  assert s["left_out"]["lacking_sections"]["studies"] == ["1", "2", "3"]
  assert s["left_out"]["no_image_in_views"]["studies"] == ["4"]
  assert s["images_without_projection"] == 1
  assert s["splits"]["validation"] == {"studies": 1, "records": 1, "images": 1}
  assert s["splits"]["train"]["studies"] == 6 and s["reports_read"] == len(IU_UIDS)
  assert s["encoding"]["replaced_characters"] == 0
  assert meta["label_names"] == [] and meta["text_only"] is False
  tok = tokenizer.from_metadata(meta)
  assert tok.sha256 == meta["tokenizer_sha256"]
  vocab = tok.tok.get_vocab()
  assert "trainword" in vocab and "heldoutword" not in vocab   # trained on train only


def test_iu_xray_openi_without_projections_keeps_every_image(tmp_path):
  root = make_openi(tmp_path / "release", projections=False)
  b = builders.prepare("iu_xray", data_dir=tmp_path / "data", manual_dir=root)
  rows = [r for rs in all_records(b).values() for r in rs]
  n_images = sum(len(iu_images(n)) for n in IU_UIDS
                 if n not in (NO_FINDINGS, NO_IMPRESSION, NO_SECTIONS))
  assert len(rows) == n_images and {text(r["view"]) for r in rows} == {""}
  assert b.info.metadata["summary"]["view_source"].startswith("none:")


def test_iu_xray_csv_layout_both_views_either_section(tmp_path):
  root = make_iu_csv(tmp_path / "release", image_dir=("images_normalized",))
  b = builders.prepare("iu_xray", data_dir=tmp_path / "data", manual_dir=root,
                       views=("lateral", "frontal"), require="either")
  assert b.builder_config.name == "either-views_frontal_lateral"
  by_split = all_records(b)
  assert_patient_disjoint(by_split)
  rows = [r for rs in by_split.values() for r in rs]
  studies = {int(text(r["study"])) for r in rows}
  assert studies == set(IU_UIDS) - {NO_SECTIONS}
  assert {text(r["view"]) for r in rows if int(text(r["study"])) == LATERAL_ONLY} == {"LATERAL"}
  assert len(rows) == sum(sum(1 for *_, p in iu_images(n) if p) for n in studies)
  lacking = {int(text(r["study"])): (text(r["findings"]), text(r["impression"])) for r in rows}
  assert lacking[NO_FINDINGS][0] == "" and lacking[NO_IMPRESSION][1] == ""
  s = b.info.metadata["summary"]
  assert s["layout"].startswith("csv (indiana_reports.csv") and s["require"] == "either"
  assert s["left_out"] == {"lacking_sections": {"count": 1, "studies": ["3"]}}


def test_iu_xray_missing_image_is_an_error_naming_it(tmp_path):
  missing = f"CXR{BIG}_IM-{BIG:04d}-1001"
  root = make_openi(tmp_path / "release", skip_image=missing)
  with pytest.raises(cxr_reports.MissingFileError,
                     match=rf"NLMCXR_png/{missing}\.png: image listed by .*NLMCXR_reports\.tgz: "
                           rf"member ecgen-radiology/{BIG}\.xml"):
    builders.prepare("iu_xray", data_dir=tmp_path / "data", manual_dir=root)
  assert not (tmp_path / "data" / "iu_xray").exists()   # a failed build leaves nothing
  b = builders.prepare("iu_xray", data_dir=tmp_path / "data", manual_dir=root,
                       missing_files="skip")
  s = b.info.metadata["summary"]
  assert s["missing_files"]["count"] == 1 and s["missing_files"]["listed"][0].endswith(
      f"{missing}.png")
  assert s["left_out"]["no_image_left"]["studies"] == [str(BIG)]


def test_iu_xray_non_utf8_report(tmp_path):
  bad = iu_xml(7, findings="Heart size normal 7. caf\xe9 effusion.").replace(
      "caf\xe9".encode(), b"caf\xe9")
  root = make_openi(tmp_path / "release", xml={"ecgen-radiology/7.xml": bad})
  with pytest.raises(reports.ReportFormatError,
                     match=r"NLMCXR_reports\.tgz: member ecgen-radiology/7\.xml: byte offset"):
    builders.prepare("iu_xray_text", data_dir=tmp_path / "data", manual_dir=root)
  b = builders.prepare("iu_xray_text", data_dir=tmp_path / "data", manual_dir=root,
                       encoding_errors="replace")
  enc = b.info.metadata["summary"]["encoding"]
  assert enc["replaced_characters"] == 1 and enc["files"][0].endswith("7.xml")
  rows = [r for rs in all_records(b).values() for r in rs]
  assert [text(r["findings"]) for r in rows if text(r["study"]) == "7"] == [
      "Heart size normal 7. caf\ufffd effusion."]
  assert all(r["image"] == b"" and text(r["view"]) == "" for r in rows)
  assert b.info.metadata["text_only"] is True


def test_iu_xray_missing_release_files(tmp_path):
  root = make_iu_csv(tmp_path / "release")
  os.remove(root / reports.IU_PROJECTIONS_CSV)
  with pytest.raises(cxr_reports.MissingFileError,
                     match=r"csv needs indiana_reports\.csv, indiana_projections\.csv"):
    builders.prepare("iu_xray", data_dir=tmp_path / "data", manual_dir=root)
  with pytest.raises(cxr_reports.MissingFileError, match=r"openi needs NLMCXR_reports\.tgz"):
    builders.prepare("iu_xray_text", data_dir=tmp_path / "data", manual_dir=root,
                     layout="openi")
  # An extracted ecgen-radiology/ folder is the openi layout (auto prefers it to the CSV).
  (root / reports.OPENI_FOLDER).mkdir()
  for n in IU_UIDS:
    (root / reports.OPENI_FOLDER / f"{n}.xml").write_bytes(iu_xml(n))
  b = builders.prepare("iu_xray_text", data_dir=tmp_path / "data", manual_dir=root)
  assert b.info.metadata["summary"]["layout"] == "openi (ecgen-radiology)"
  assert sum(b.info.splits[s].num_examples for s in SPLITS) == len(IU_UIDS) - 3


def test_options_and_config_names():
  assert builders.builder_options(cxr_reports.IuXray) == {
      "encoding_errors": str, "layout": str, "max_side": int, "missing_files": str,
      "require": str, "views": tuple[str, ...]}
  assert set(builders.builder_options(cxr_reports.MimicCxrText)) == {
      "encoding_errors", "missing_files", "require"}
  assert cxr_reports.IuXray(data_dir="/nonexistent").builder_config.name == "default"
  assert cxr_reports.IuXray(data_dir="/x", views=("frontal",)).builder_config.name == "default"
  assert cxr_reports.IuXray(data_dir="/x", max_side=0).builder_config.name == "native"
  assert cxr_reports.MimicCxr(data_dir="/x", views=("frontal",)).builder_config.name == \
      "default"
  assert cxr_reports.MimicCxr(data_dir="/x", views=("PA",),
                              max_side=256).builder_config.name == "views_pa-side256"
  with pytest.raises(ValueError, match="views='oblique'"):
    cxr_reports.IuXray(data_dir="/x", views=("oblique",))
  with pytest.raises(ValueError, match="require='all'"):
    cxr_reports.IuXrayText(data_dir="/x", require="all")
  with pytest.raises(ValueError, match="missing_files='warn'"):
    cxr_reports.MimicCxr(data_dir="/x", missing_files="warn")


# ---------------------------------------------------------------------------------------------
# A fake MIMIC-CXR-JPG release

CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
            "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity",
            "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax",
            "Support Devices"]
# (subject, study, split, [(dicom, ViewPosition)], report kind)
MIMIC_STUDIES = [
    ("10000001", "50000001", "train", [("d1a", "PA"), ("d1b", "LATERAL")], "full"),
    ("10000001", "50000002", "train", [("d2a", "AP")], "full"),
    ("10000002", "50000003", "train", [("d3a", "PA"), ("d3b", "LL")], "no_findings"),
    ("10000003", "50000004", "train", [("d4a", "LATERAL")], "full"),
    ("10000004", "50000005", "train", [("d5a", "AP"), ("d5b", "")], "last_paragraph"),
    ("11000005", "50000006", "validate", [("d6a", "PA")], "full"),
    ("12000006", "50000007", "test", [("d7a", "AP"), ("d7b", "PA")], "full"),
]
BIG_DICOM = "d7b"


def mimic_report(study, kind):
  findings = "" if kind == "no_findings" else (
      f" FINDINGS: \n \n Lungs are clear {study}.  No effusion.\n \n")
  if kind == "last_paragraph":
    return (f"                                 FINAL REPORT\n PORTABLE CHEST\n \n"
            f" Lines unchanged {study}.  Lungs clear.\n")
  return (f"                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n"
          f" \n INDICATION:  ___ year old man with cough\n \n COMPARISON:  ___\n \n{findings}"
          f" IMPRESSION: \n \n No acute process {study}.\n")


def chexpert_row(i):
  """Study i's CheXpert values: a mix of 1.0, 0.0, -1.0 and blank."""
  cycle = ["1.0", "", "-1.0", "0.0"]
  return [cycle[(i + k) % 4] for k in range(len(CHEXPERT))]


def write_gz_csv(path, header, rows):
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(header)
  w.writerows(rows)
  path.write_bytes(gzip.compress(buf.getvalue().encode()))


def jpeg(path, size=(40, 32)):
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.arange(size[0] * size[1]).reshape(size[1], size[0]) % 251
  Image.fromarray(pixels.astype(np.uint8), "L").save(path, format="JPEG", quality=90)


def make_mimic(root, *, reports_in="", images=True, skip_label="50000006", bad_report=None,
               split_override=None):
  """A MIMIC-CXR-JPG release; the reports under root ('') or reports/, or as 'zip'."""
  root.mkdir(parents=True, exist_ok=True)
  split_rows, meta_rows, chex_rows = [], [], []
  members = {}
  for i, (subject, study, split, dicoms, kind) in enumerate(MIMIC_STUDIES):
    split = (split_override or {}).get(study, split)
    for dicom, view in dicoms:
      split_rows.append([dicom, study, subject, split])
      meta_rows.append([dicom, subject, study, "CHEST (PA AND LAT)", view, 32, 40])
      if images:
        jpeg(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg",
             (700, 500) if dicom == BIG_DICOM else (40, 32))
    if study != skip_label:
      chex_rows.append([subject, study] + chexpert_row(i))
    relative = f"files/p{subject[:2]}/p{subject}/s{study}.txt"
    data = mimic_report(study, kind).encode()
    if study == bad_report:
      data = data.replace(b"No acute", b"No \xe9cute")
    members[relative] = data
  if reports_in == "zip":
    with zipfile.ZipFile(root / cxr_reports.MIMIC_REPORTS_ZIP, "w") as z:
      for name, data in members.items():
        z.writestr(name, data)
  else:
    for name, data in members.items():
      path = root / reports_in / name if reports_in else root / name
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(data)
  write_gz_csv(root / cxr_reports.MIMIC_SPLIT, ["dicom_id", "study_id", "subject_id", "split"],
               split_rows)
  write_gz_csv(root / cxr_reports.MIMIC_METADATA,
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                "ViewPosition", "Rows", "Columns"], meta_rows)
  write_gz_csv(root / cxr_reports.MIMIC_CHEXPERT, ["subject_id", "study_id"] + CHEXPERT,
               chex_rows)
  return root


@pytest.fixture(scope="module")
def mimic_build(tmp_path_factory):
  root = make_mimic(tmp_path_factory.mktemp("mimic") / "release")
  data_dir = tmp_path_factory.mktemp("mimic_data")
  return root, builders.prepare("mimic_cxr", data_dir=data_dir, manual_dir=root)


def test_mimic_cxr_records(mimic_build):
  root, b = mimic_build
  by_split = all_records(b)
  assert_patient_disjoint(by_split)
  ids = {s: sorted(text(r["id"]) for r in rows) for s, rows in by_split.items()}
  # Frontal (AP/PA) images of studies with findings and impression; official split.
  assert ids == {"train": ["50000001/d1a", "50000002/d2a"], "validation": ["50000006/d6a"],
                 "test": ["50000007/d7a", "50000007/d7b"]}
  assert b.info.metadata["label_names"] == CHEXPERT
  for split, rows in by_split.items():
    for r in rows:
      study, dicom = text(r["id"]).split("/")
      subject, _, _, dicoms, _ = next(s for s in MIMIC_STUDIES if s[1] == study)
      assert text(r["patient"]) == subject and text(r["study"]) == study
      assert text(r["view"]) == dict(dicoms)[dicom]
      path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
      assert r["image"] == path.read_bytes()          # JPEG bytes as released
      assert text(r["findings"]) == f"Lungs are clear {study}. No effusion."
      assert text(r["impression"]) == f"No acute process {study}."
      assert text(r["indication"]) == f"{D} year old man with cough"
      assert text(r["comparison"]) == D
      labels = r["labels"]
      assert labels.dtype == np.float32 and labels.shape == (14,)
      if study == "50000006":                          # no CheXpert row: all NaN
        assert np.isnan(labels).all()
      else:
        i = [s[1] for s in MIMIC_STUDIES].index(study)
        want = [math.nan if v == "" else float(v) for v in chexpert_row(i)]
        np.testing.assert_array_equal(labels, np.asarray(want, np.float32))


def test_mimic_cxr_summary(mimic_build):
  _, b = mimic_build
  s = b.info.metadata["summary"]
  assert s["conventions"] == {"headers": 6, "last_paragraph": 1}
  assert s["lacking"] == {"findings": {"count": 2, "studies": ["50000003", "50000005"]}}
  assert s["left_out"]["lacking_sections"]["studies"] == ["50000003", "50000005"]
  assert s["left_out"]["no_image_in_views"]["studies"] == ["50000004"]
  assert s["studies_without_labels"] == {"count": 1, "studies": ["50000006"]}
  assert s["splits"]["test"] == {"studies": 1, "patients": 1, "records": 2}
  assert s["views"] == ["AP", "PA"] and s["max_side"] == 0
  assert s["missing_files"] == {"policy": "error"}


def test_mimic_cxr_errors(tmp_path):
  root = make_mimic(tmp_path / "release")
  os.remove(root / cxr_reports.MIMIC_METADATA)
  with pytest.raises(cxr_reports.MissingFileError,
                     match=r"mimic-cxr-2\.0\.0-metadata\.csv\.gz not found"):
    builders.prepare("mimic_cxr", data_dir=tmp_path / "data", manual_dir=root)
  root = make_mimic(tmp_path / "r2")
  os.remove(root / "files/p10/p10000001/s50000001/d1a.jpg")
  with pytest.raises(cxr_reports.MissingFileError,
                     match=r"s50000001/d1a\.jpg: image d1a of study 50000001 \(.*split"):
    builders.prepare("mimic_cxr", data_dir=tmp_path / "data", manual_dir=root)
  root = make_mimic(tmp_path / "r3", split_override={"50000002": "test"})
  with pytest.raises(ValueError, match=r"patient '10000001' is in both 'train' and 'test'"):
    builders.prepare("mimic_cxr", data_dir=tmp_path / "data", manual_dir=root)
  root = make_mimic(tmp_path / "r4", split_override={"50000002": "holdout"})
  with pytest.raises(reports.ReportFormatError, match=r"split\.csv\.gz line 4: split 'holdout'"):
    builders.prepare("mimic_cxr", data_dir=tmp_path / "data", manual_dir=root)


def test_mimic_cxr_shrinks_and_skips(tmp_path):
  root = make_mimic(tmp_path / "release", reports_in="reports")
  os.remove(root / "files/p10/p10000001/s50000002/d2a.jpg")
  b = builders.prepare("mimic_cxr", data_dir=tmp_path / "data", manual_dir=root,
                       max_side=256, missing_files="skip")
  by_split = all_records(b)
  assert [text(r["id"]) for r in by_split["train"]] == ["50000001/d1a"]
  big = next(r for r in by_split["test"] if text(r["id"]).endswith(BIG_DICOM))
  with Image.open(io.BytesIO(big["image"])) as im:
    assert im.format == "PNG" and im.size == (256, 183)
  small = next(r for r in by_split["test"] if not text(r["id"]).endswith(BIG_DICOM))
  assert small["image"][:3] == b"\xff\xd8\xff"       # small enough: JPEG as released
  s = b.info.metadata["summary"]
  assert s["missing_files"]["images"]["count"] == 1
  assert s["left_out"]["no_image_left"]["studies"] == ["50000002"]


def test_mimic_cxr_text_from_zip_and_encoding(tmp_path):
  root = make_mimic(tmp_path / "release", reports_in="zip", images=False,
                    bad_report="50000006")
  os.remove(root / cxr_reports.MIMIC_CHEXPERT)
  with pytest.raises(reports.ReportFormatError,
                     match=r"mimic-cxr-reports\.zip: member files/p11/p11000005/s50000006\.txt: "
                           "byte offset"):
    builders.prepare("mimic_cxr_text", data_dir=tmp_path / "data", manual_dir=root)
  b = builders.prepare("mimic_cxr_text", data_dir=tmp_path / "data", manual_dir=root,
                       encoding_errors="replace")
  by_split = all_records(b)
  assert_patient_disjoint(by_split)
  assert {s: sorted(text(r["id"]) for r in rows) for s, rows in by_split.items()} == {
      "train": ["50000001", "50000002", "50000004"], "validation": ["50000006"],
      "test": ["50000007"]}
  assert text(by_split["validation"][0]["impression"]) == "No \ufffdcute process 50000006."
  assert all(r["image"] == b"" and r["labels"].shape == (0,) for rs in by_split.values()
             for r in rs)
  meta = b.info.metadata
  assert meta["label_names"] == [] and meta["text_only"] is True
  assert meta["summary"]["encoding"]["replaced_characters"] == 1


def test_mimic_cxr_text_missing_report(tmp_path):
  root = make_mimic(tmp_path / "release", images=False)
  os.remove(root / "files/p10/p10000004/s50000005.txt")
  with pytest.raises(cxr_reports.MissingFileError,
                     match=r"report of study 50000005 .* looked for .*s50000005\.txt"):
    builders.prepare("mimic_cxr_text", data_dir=tmp_path / "data", manual_dir=root)
  os.remove(root / cxr_reports.MIMIC_SPLIT)
  with pytest.raises(cxr_reports.MissingFileError, match=r"split\.csv\.gz not found"):
    builders.prepare("mimic_cxr_text", data_dir=tmp_path / "data", manual_dir=root)


# ---------------------------------------------------------------------------------------------
# The real IU X-ray reports


@pytest.fixture(scope="module")
def shared_iu():
  if not os.path.isdir(IU_DIR):
    pytest.skip(f"shared IU X-ray reports not found at {IU_DIR} (set MEDGUIDE_SHARED_DATA)")
  return IU_DIR


@pytest.mark.parametrize("layout, studies, lacking", [
    (None, 3419, {"findings": 530, "impression": 34}),      # the Open-i XML (auto)
    ("csv", 3331, {"findings": 514, "impression": 31}),     # SOURCE.txt: with_both=3331
])
def test_iu_xray_text_on_shared_reports(shared_iu, tmp_path, layout, studies, lacking):
  options = {"layout": layout} if layout else {}
  b = builders.prepare("iu_xray_text", data_dir=tmp_path, manual_dir=shared_iu, **options)
  counts = {s: b.info.splits[s].num_examples for s in SPLITS}
  assert sum(counts.values()) == studies and min(counts.values()) > 250
  s = b.info.metadata["summary"]
  assert s["layout"].startswith("openi (NLMCXR_reports.tgz)" if not layout else
                                "csv (indiana_reports.csv)")
  assert {k: v["count"] for k, v in s["lacking"].items()} == lacking
  assert s["reports_read"] == (3955 if not layout else 3851)
  assert {k: s["splits"][k]["studies"] for k in SPLITS} == counts
  by_split = all_records(b)
  assert_patient_disjoint(by_split)
  rows = [r for rs in by_split.values() for r in rs]
  assert all(text(r["findings"]) and text(r["impression"]) for r in rows)
  assert not any("XXXX" in text(r["findings"]) + text(r["impression"]) for r in rows)
  # Split by the hash of the uid, the same in both layouts.
  assert all(image_folder.hash_split(text(r["study"])) == split
             for split, rs in by_split.items() for r in rs)
  tok = tokenizer.from_metadata(b.info.metadata)
  assert tok.vocab_size > 500 and tok.tokens(f"no {D} effusion").count(D) == 1
