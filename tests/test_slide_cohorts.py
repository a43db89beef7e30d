"""The bcnb and wsi_folder bag builders on a hand-made BCNB release and slide folder, and on
the real Aperio sample: schema, tile counts, labels per ALN task, clinical vectors against a
hand computation, determinism, patient-level splits, the patches archive, and bad inputs."""
from __future__ import annotations

import csv
import glob
import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data_prep import build as build_cli
from data_prep import slide_cohorts
from medguide_jax.data import bags
from medguide_jax.data import builders
from medguide_jax.data import clinical
from medguide_jax.data import slides
from tests import helpers

openpyxl = pytest.importorskip("openpyxl")

SHARED = os.environ.get("MEDGUIDE_SHARED_DATA", str(helpers.ROOT.parent / "shared" / "data"))
SVS = sorted(glob.glob(os.path.join(SHARED, "histo_samples", "wsi", "*.svs")))

T, BAG = 128, 4  # small tiles and bags keep the fake slides small
SMALL = {"tile": T, "bag_size": BAG}
HEADER = ["Patient ID", "Age(years)", "Tumour Size(cm)", "Tumour Type", "ER", "PR", "HER2",
          "HER2 Expression", "Histological grading", "Surgical", "Ki67", "Molecular subtype",
          "Number of lymph node metastases", "ALN status"]
# patient -> (split file, ALN status, age, tumour size, ER, PR, HER2, rectangles (x, y, a, b):
# a x b full tiles of T plus a 20-pixel sliver right and below that BALNMP's rule drops).
PATIENTS = {
    "1": ("train", "N0", 45, 2.5, "Positive", "Positive", "Negative",
          [(40, 40, 4, 2), (40, 340, 1, 1)]),
    "2": ("train", "N+(1-2)", 60, 3.0, "Negative", "Positive", "Positive", [(40, 40, 3, 3)]),
    "3": ("train", "N+(>2)", 38, 1.8, "Positive", "Negative", "Negative", [(60, 50, 2, 2)]),
    "4": ("train", "N0", 52, 4.2, "Negative", "Negative", "Negative", [(40, 40, 4, 2)]),
    "5": ("val", "N+(1-2)", 47, 2.2, "Positive", "Positive", "Negative", [(40, 40, 3, 2)]),
    "6": ("val", "N0", 66, 1.1, "Positive", "Positive", "Positive", [(40, 40, 2, 3)]),
    "7": ("test", "N+(>2)", 55, 5.0, "Negative", "Negative", "Positive", [(40, 40, 4, 3)]),
    "8": ("test", "N0", 41, 2.0, "Positive", "Negative", "Negative", [(40, 40, 2, 2)]),
    "9": (None, "N0", 70, 3.3, "Positive", "Positive", "Negative", [(40, 40, 2, 2)]),
}
SPLIT_OF = {"train": "train", "val": "validation", "test": "test"}


# ---------------------------------------------------------------------------------------------
# A fake BCNB release


def _tissue(h: int, w: int, seed: int) -> np.ndarray:
  """H&E-ish pink texture, never 255 (so 'white' only ever means background or fill)."""
  noise = np.random.default_rng(seed).integers(-25, 25, (h, w, 3))
  return np.clip(np.array([200, 90, 160]) + noise, 0, 250).astype(np.uint8)


def _rect(x: int, y: int, a: int, b: int) -> list[list[int]]:
  w, h = a * T + 20, b * T + 20
  return [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]


def _kept(patient: str) -> int:
  """Tiles BALNMP keeps on a patient's slide, by hand: the full tiles of its rectangles."""
  return sum(a * b for _, _, a, b in PATIENTS[patient][7])


def _write_slide(folder, patient: str, blank: bool = False) -> None:
  img = np.full((512, 640, 3), 255, np.uint8)
  polygons = []
  for x, y, a, b in PATIENTS[patient][7]:
    v = _rect(x, y, a, b)
    if not blank:  # tissue a little beyond the polygon
      img[y - 8:v[2][1] + 8, x - 8:v[2][0] + 8] = _tissue(v[2][1] - y + 16, v[2][0] - x + 16,
                                                          int(patient))
    polygons.append({"name": f"Annotation {len(polygons)}", "vertices": v})
  Image.fromarray(img).save(os.path.join(folder, f"{patient}.jpg"), quality=95)
  with open(os.path.join(folder, f"{patient}.json"), "w") as f:
    json.dump({"positive": polygons, "negative": []}, f)


def _write_table(path, patients=PATIENTS, header=HEADER, edit=None) -> None:
  """patient-clinical-data.xlsx with BCNB's headers; `edit(values)` may change a row."""
  workbook = openpyxl.Workbook()
  sheet = workbook.active
  sheet.append(header)
  for pid, (_, status, age, size, er, pr, her2, _) in patients.items():
    full = {"Patient ID": int(pid), "Age(years)": age, "Tumour Size(cm)": size,
            "Tumour Type": "Invasive ductal carcinoma", "ER": er, "PR": pr, "HER2": her2,
            "HER2 Expression": "1+", "Histological grading": 2, "Surgical": "Mastectomy",
            "Ki67": 0.2, "Molecular subtype": "Luminal A",
            "Number of lymph node metastases": 0 if status == "N0" else 3, "ALN status": status}
    if edit:
      edit(pid, full)
    sheet.append([full.get(h) for h in header])
  workbook.save(path)


def make_release(root, patients=PATIENTS, wsis: bool = True) -> str:
  """A BCNB manual dir: WSIs/, patient-clinical-data.xlsx, dataset-splitting/."""
  os.makedirs(os.path.join(root, "dataset-splitting"), exist_ok=True)
  if wsis:
    os.makedirs(os.path.join(root, "WSIs"), exist_ok=True)
    for pid in patients:
      _write_slide(os.path.join(root, "WSIs"), pid)
  _write_table(os.path.join(root, "patient-clinical-data.xlsx"), patients)
  for name in ("train", "val", "test"):
    with open(os.path.join(root, "dataset-splitting", f"{name}_id.txt"), "w") as f:
      f.writelines(f"{pid}\n" for pid, p in patients.items() if p[0] == name)
  return str(root)


def write_patches(release: str, out_root: str) -> None:
  """The processed-patches archive as BALNMP's cut_patches.py lays it out:
  patches/<id>/<id>_<region>_<x>_<y>.jpg, x and y relative to the region."""
  for pid in PATIENTS:
    folder = os.path.join(out_root, "patches", pid)
    os.makedirs(folder, exist_ok=True)
    slide = slides.open_slide(os.path.join(release, "WSIs", f"{pid}.jpg"))
    polygons = bags.read_polygons(os.path.join(release, "WSIs", f"{pid}.json"))
    for r, vertices in enumerate(polygons):
      region, (ox, oy) = slides.polygon_region(slide, vertices)
      for t in slides.region_tiles(region, (ox, oy), tile=T):
        with open(os.path.join(folder, f"{pid}_{r}_{t.x - ox}_{t.y - oy}.jpg"), "wb") as f:
          f.write(bags.encode_jpeg(t.pixels))


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def _records(builder) -> dict[str, list[dict]]:
  out = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    out[split] = sorted((source[i] for i in range(len(source))), key=lambda r: _text(r["id"]))
  return out


def _by_id(records: dict[str, list[dict]]) -> dict[str, dict]:
  return {_text(r["id"]): r for rs in records.values() for r in rs}


def _no_build_left(data_dir) -> bool:
  """No prepared dataset, nor TFDS's temporary copy of one, under `data_dir`."""
  left = [p for pattern in ("dataset_info.json", "incomplete*", "*.array_record*")
          for p in glob.glob(os.path.join(str(data_dir), "**", pattern), recursive=True)]
  return not left


def _zscore(values, fit):
  values, fit = np.asarray(values, np.float64), np.asarray(fit, np.float64)
  return (values - fit.mean()) / fit.std()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  return make_release(tmp_path_factory.mktemp("bcnb_release"))


@pytest.fixture(scope="module")
def built(release, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("bcnb_data")
  builder = builders.prepare("bcnb", data_dir=data_dir, manual_dir=release, **SMALL)
  return builder, _records(builder)


# ---------------------------------------------------------------------------------------------
# bcnb


def test_each_option_set_is_its_own_config(tmp_path):
  d = str(tmp_path)
  default = slide_cohorts.Bcnb(data_dir=d)
  assert default.builder_config.name == "default"
  assert slide_cohorts.Bcnb(data_dir=d, task=0, stats="train").data_path == default.data_path
  names = {slide_cohorts.Bcnb(data_dir=d, **kw).builder_config.name for kw in (
      {"task": 3}, {"stats": "all"}, {"clinical": ("age", "ki67")}, {"bag_size": 20},
      {"tile": 512}, {"white_rule": "pixels"}, {"seed": 1}, {"tile_format": "png"},
      {"patches": True}, {"task": 3, "stats": "all"})}
  assert len(names) == 10 and "default" not in names and "task3_stats-all" in names
  with pytest.raises(ValueError, match="task=7"):
    slide_cohorts.Bcnb(data_dir=d, task=7)
  with pytest.raises(ValueError, match="'bmi'"):
    slide_cohorts.Bcnb(data_dir=d, clinical=("age", "bmi"))
  with pytest.raises(ValueError, match="stats='some'"):
    slide_cohorts.Bcnb(data_dir=d, stats="some")
  # The class names of each task follow clinical.TASKS.
  for task, names in slide_cohorts.TASK_CLASS_NAMES.items():
    assert len(names) == len(set(clinical.TASKS[task].values()))
    for status, label in clinical.TASKS[task].items():
      assert status in names[label] or names[label] == "N+(>0)"


def test_bags_have_the_schema_tile_count_and_task_0_labels(built):
  builder, records = built
  meta = builder.info.metadata
  assert meta["class_names"] == ["N0", "N+(>0)"] and meta["task"] == 0
  assert meta["bag_size"] == BAG and meta["tile_size"] == T
  assert meta["clinical_names"] == list(clinical.BALNMP_FEATURES)
  for split in ("train", "validation", "test"):
    want = {p for p, v in PATIENTS.items() if v[0] and SPLIT_OF[v[0]] == split}
    assert {_text(r["patient"]) for r in records[split]} == want
    for pid in want:
      mine = [r for r in records[split] if _text(r["patient"]) == pid]
      assert len(mine) == _kept(pid) // BAG  # tiles that cannot fill a bag are dropped
      assert [_text(r["id"]) for r in mine] == [f"{pid}/bag{k}" for k in range(len(mine))]
  for r in _by_id(records).values():
    pid = _text(r["patient"])
    assert _text(r["slide"]) == pid
    assert r["tiles"].shape == (BAG,) and r["tile_xy"].shape == (BAG, 2)
    assert r["label"] == (0 if PATIENTS[pid][1] == "N0" else 1)
    assert r["clinical"].dtype == np.float32 and r["clinical"].shape == (5,)
    tiles = bags.decode_tiles(list(r["tiles"]))
    assert tiles.shape == (BAG, T, T, 3)
    for (x, y), tile in zip(r["tile_xy"], tiles):  # each tile lies inside a rectangle
      assert any(rx <= x and x + T <= rx + a * T + 20 and ry <= y and y + T <= ry + b * T + 20
                 for rx, ry, a, b in PATIENTS[pid][7])
      assert slides.keep_tile(tile)
    assert len({tuple(xy) for xy in r["tile_xy"]}) == BAG
  summary = meta["summary"]
  assert summary["tiles_from"] == "wsi" and summary["not_in_split_files"] == 1  # patient 9
  assert summary["patients"] == {"train": 4, "validation": 2, "test": 2}
  assert summary["bags"] == {s: len(rs) for s, rs in records.items()}
  assert summary["no_tissue"] == [] and summary["outside_task"]["train"] == 0


def test_no_patient_crosses_splits_and_tiles_of_a_slide_are_drawn_once(built):
  _, records = built
  patients = {s: {_text(r["patient"]) for r in rs} for s, rs in records.items()}
  assert not (patients["train"] & patients["validation"]) and not (
      patients["train"] & patients["test"]) and not (patients["validation"] & patients["test"])
  for pid in ("1", "2", "7"):
    xy = [tuple(xy) for r in _by_id(records).values() if _text(r["patient"]) == pid
          for xy in r["tile_xy"]]
    assert len(xy) == len(set(xy)) == (_kept(pid) // BAG) * BAG


def test_clinical_vectors_are_z_scores_with_training_statistics(built):
  _, records = built
  train = [p for p, v in PATIENTS.items() if v[0] == "train"]
  for r in _by_id(records).values():
    pid = _text(r["patient"])
    _, _, age, size, er, pr, her2, _ = PATIENTS[pid]
    want = [_zscore(age, [PATIENTS[p][2] for p in train]),
            _zscore(size, [PATIENTS[p][3] for p in train]),
            er == "Negative", pr == "Negative", her2 == "Negative"]
    np.testing.assert_allclose(r["clinical"], np.asarray(want, np.float32), rtol=1e-5)


def test_rebuilding_gives_the_same_bags(built, release, tmp_path):
  _, records = built
  again = _records(builders.prepare("bcnb", data_dir=tmp_path, manual_dir=release, **SMALL))
  a, b = _by_id(records), _by_id(again)
  assert sorted(a) == sorted(b)
  for key in a:
    assert list(a[key]["tiles"]) == list(b[key]["tiles"])
    np.testing.assert_array_equal(a[key]["tile_xy"], b[key]["tile_xy"])
    np.testing.assert_array_equal(a[key]["clinical"], b[key]["clinical"])


def test_task_1_leaves_out_n0_and_all_stats_are_over_the_task(release, tmp_path):
  builder = builders.prepare("bcnb", data_dir=tmp_path, manual_dir=release, task=1,
                             stats="all", **SMALL)
  assert "task1_stats-all" in os.fspath(builder.data_path)
  meta = builder.info.metadata
  assert meta["class_names"] == ["N+(1-2)", "N+(>2)"] and meta["task"] == 1
  summary = meta["summary"]
  assert summary["outside_task"] == {"train": 2, "validation": 1, "test": 1}  # the N0s
  in_task = [p for p, v in PATIENTS.items() if v[0] and v[1] != "N0"]
  records = _by_id(_records(builder))
  assert {_text(r["patient"]) for r in records.values()} == set(in_task)
  for r in records.values():
    pid = _text(r["patient"])
    assert r["label"] == (0 if PATIENTS[pid][1] == "N+(1-2)" else 1)
    want_age = _zscore(PATIENTS[pid][2], [PATIENTS[p][2] for p in in_task])  # all of the task
    want_size = _zscore(PATIENTS[pid][3], [PATIENTS[p][3] for p in in_task])
    np.testing.assert_allclose(r["clinical"][:2], [want_age, want_size], rtol=1e-5)


def test_the_patches_archive_gives_the_bags_of_the_slides(built, release, tmp_path):
  _, wsi_records = built
  wsi = _by_id(wsi_records)
  # Beside the WSIs, asked for with patches=true: tile positions from WSIs/<id>.json.
  both = str(tmp_path / "both")
  shutil.copytree(release, both)
  write_patches(release, both)
  builder = builders.prepare("bcnb", data_dir=tmp_path / "d1", manual_dir=both, patches=True,
                             **SMALL)
  assert builder.info.metadata["summary"]["tiles_from"] == "patches"
  from_patches = _by_id(_records(builder))
  assert sorted(from_patches) == sorted(wsi)
  for key, r in from_patches.items():
    assert list(r["tiles"]) == list(wsi[key]["tiles"])  # the patch files' bytes, as they are
    np.testing.assert_array_equal(r["tile_xy"], wsi[key]["tile_xy"])
    assert r["label"] == wsi[key]["label"]
    np.testing.assert_array_equal(r["clinical"], wsi[key]["clinical"])
  # On its own (no WSIs/ folder), found without the option; positions unknown.
  alone = str(tmp_path / "alone")
  make_release(alone, wsis=False)
  write_patches(release, alone)
  builder = builders.prepare("bcnb", data_dir=tmp_path / "d2", manual_dir=alone, **SMALL)
  assert builder.info.metadata["tiles_from"] == "patches"
  records = _by_id(_records(builder))
  assert sorted(records) == sorted(wsi)
  for key, r in records.items():
    assert list(r["tiles"]) == list(wsi[key]["tiles"]) and (r["tile_xy"] == -1).all()


# --- bcnb: small releases for other options and for bad input ----------------------------

TINY = {pid: PATIENTS[pid] for pid in ("1", "5", "7")}  # one patient per split


@pytest.fixture
def tiny(tmp_path):
  return make_release(tmp_path / "release", TINY), tmp_path / "data"


def _fails(release: str, data_dir, error, match: str, **options):
  with pytest.raises(error, match=match):
    builders.prepare("bcnb", data_dir=data_dir, manual_dir=release, **SMALL, **options)
  assert _no_build_left(data_dir), "a failed build left files behind"


def test_other_features_one_hot_categories_and_imputed_missing_values(tiny):
  release, data_dir = tiny
  _write_table(os.path.join(release, "patient-clinical-data.xlsx"), TINY,
               edit=lambda pid, row: row.update(
                   {"Ki67": None, "Histological grading": 3} if pid == "5" else {}))
  with pytest.raises(clinical.ClinicalError, match=r"row 3 \(patient 5\), column 'Ki67'"):
    builders.prepare("bcnb", data_dir=data_dir, manual_dir=release,
                     clinical=("age", "ki67", "histological_grade"), **SMALL)
  builder = builders.prepare("bcnb", data_dir=data_dir, manual_dir=release,
                             clinical=("age", "ki67", "histological_grade"),
                             missing=("ki67",), **SMALL)
  assert "clin-age-ki67-histological_grade_missing-ki67" in os.fspath(builder.data_path)
  # Categories come from the training split (patient 1, grade 2): grade 3 is all zeros.
  assert builder.info.metadata["clinical_names"] == [
      "age", "ki67", "ki67_missing", "histological_grade=2"]
  records = _by_id(_records(builder))
  np.testing.assert_array_equal(records["1/bag0"]["clinical"], [0, 0, 0, 1])
  np.testing.assert_array_equal(records["5/bag0"]["clinical"][1:], [0, 1, 0])


def test_a_listed_slide_that_is_absent_names_it(tiny):
  release, data_dir = tiny
  os.remove(os.path.join(release, "WSIs", "5.jpg"))
  _fails(release, data_dir, FileNotFoundError,
         r"val_id.txt lists patient '5', but its slide .*WSIs/5.jpg is not there")


def test_a_polygon_outside_its_image_names_the_slide(tiny):
  release, data_dir = tiny
  with open(os.path.join(release, "WSIs", "7.json"), "w") as f:
    json.dump({"positive": [{"vertices": [[500, 100], [700, 100], [600, 300]]}]}, f)
  _fails(release, data_dir, slides.SlideError, r"WSIs/7.jpg: polygon .* outside the image")


def test_a_non_numeric_clinical_value_names_the_file_row_and_column(tiny):
  release, data_dir = tiny

  def edit(pid, row):
    if pid == "5":  # a validation patient: every row is checked, not only training ones
      row["Age(years)"] = "unknown"
  _write_table(os.path.join(release, "patient-clinical-data.xlsx"), TINY, edit=edit)
  _fails(release, data_dir, clinical.ClinicalError,
         r"patient-clinical-data.xlsx, row 3 \(patient 5\), column 'Age\(years\)': "
         r"'unknown' is not a number")


def test_a_missing_clinical_column_names_the_file_and_column(tiny):
  release, data_dir = tiny
  _write_table(os.path.join(release, "patient-clinical-data.xlsx"), TINY,
               header=[h for h in HEADER if h != "Tumour Size(cm)"])
  _fails(release, data_dir, clinical.ClinicalError,
         r"patient-clinical-data.xlsx: no column\(s\) \['Tumour Size\(cm\)'\]")


def test_a_bad_aln_status_names_the_row(tiny):
  release, data_dir = tiny
  _write_table(os.path.join(release, "patient-clinical-data.xlsx"), TINY,
               edit=lambda pid, row: row.update({"ALN status": "N2"} if pid == "7" else {}))
  _fails(release, data_dir, clinical.ClinicalError, r"row 4 \(patient 7\), column 'ALN status'")


def test_a_patient_in_two_split_files_is_an_error(tiny):
  release, data_dir = tiny
  with open(os.path.join(release, "dataset-splitting", "test_id.txt"), "a") as f:
    f.write("1\n")
  _fails(release, data_dir, ValueError, r"patient '1' is in both 'train' and 'test'")


def test_a_background_slide_is_left_out_with_a_warning_on_the_command_line(
    tiny, caplog, capsys):
  release, data_dir = tiny
  patients = dict(TINY, **{"4": PATIENTS["4"]})  # a second training patient...
  make_release(release, patients)
  _write_slide(os.path.join(release, "WSIs"), "4", blank=True)  # ... whose slide is blank
  with caplog.at_level(logging.WARNING):
    code = build_cli.main(["bcnb", f"--manual_dir={release}", f"--data_dir={data_dir}",
                           f"--option=tile={T}", f"--option=bag_size={BAG}"])
  assert code == 0, capsys.readouterr().err
  assert f"train: {_kept('1') // BAG} examples" in capsys.readouterr().out  # patient 1's
  assert any("slide 4 " in m and "left out" in m for m in caplog.messages)
  builder = builders.prepare("bcnb", data_dir=data_dir, **SMALL)  # prepared: reused
  summary = builder.info.metadata["summary"]
  assert summary["no_tissue"] == ["4"] and summary["patients_without_bags"] == ["4"]
  assert summary["patients"]["train"] == 2
  # A broken release is one 'error:' line and exit 1 on the command line.
  os.remove(os.path.join(release, "WSIs", "5.jpg"))
  code = build_cli.main(["bcnb", f"--manual_dir={release}", f"--data_dir={data_dir}/other"])
  err = capsys.readouterr().err
  assert code == 1 and err.startswith("error:") and "5.jpg" in err


# ---------------------------------------------------------------------------------------------
# wsi_folder


def _blob_slide(h: int, w: int, seed: int) -> np.ndarray:
  """Tissue (textured pink) on an off-white background, in an ellipse."""
  img = np.full((h, w, 3), 245, np.uint8)
  yy, xx = np.mgrid[0:h, 0:w]
  blob = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.42 * w)) ** 2 < 1
  img[blob] = _tissue(h, w, seed)[blob]
  return img


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  """A folder with a 3-level pyramidal TIFF, a PNG with a polygon JSON, a PNG tiled on its
  tissue, a blank PNG, and slides.csv."""
  tifffile = pytest.importorskip("tifffile")
  pytest.importorskip("openslide")
  root = tmp_path_factory.mktemp("cohort")
  pyramid = _blob_slide(768, 1024, 1)
  with tifffile.TiffWriter(str(root / "a.tif")) as tif:
    for k in range(3):
      tif.write(pyramid[::2**k, ::2**k], tile=(256, 256), photometric="rgb",
                subfiletype=0 if k == 0 else 1)
  os.makedirs(root / "sub")
  Image.fromarray(_blob_slide(512, 640, 2)).save(root / "sub" / "b.png")
  with open(root / "sub" / "b.json", "w") as f:
    json.dump({"positive": [{"vertices": [[150, 120], [450, 120], [450, 400], [150, 400]]}]}, f)
  Image.fromarray(_blob_slide(512, 512, 3)).save(root / "c.png")
  Image.fromarray(np.full((384, 384, 3), 250, np.uint8)).save(root / "blank.png")
  rows = [("a.tif", "P1", "1", "train", "50", "2.0", "Positive"),
          ("sub/b.png", "P2", "0", "train", "60", "3.5", "Negative"),
          ("blank.png", "P3", "0", "train", "40", "1.5", "Positive"),
          ("c.png", "P4", "1", "test", "70", "2.5", "Negative")]
  _write_csv(root / "slides.csv", rows)
  return str(root), pyramid, rows


def _write_csv(path, rows, header=("slide", "patient", "label", "split", "Age", "Size", "ER")):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


WSI_OPTIONS = {"clinical": ("age:Age", "tumour_size:Size", "er_negative:ER"), "tile": T,
               "bag_size": BAG, "tile_format": "png"}


@pytest.fixture(scope="module")
def cohort_built(cohort, tmp_path_factory):
  root, _, _ = cohort
  data_dir = tmp_path_factory.mktemp("wsi_data")
  builder = builders.prepare("wsi_folder:mine", data_dir=data_dir, manual_dir=root,
                             **WSI_OPTIONS)
  return builder, _records(builder), data_dir


def test_wsi_folder_tiles_pyramids_pngs_and_polygons_into_bags(cohort, cohort_built, caplog):
  root, pyramid, rows = cohort
  builder, records, _ = cohort_built
  meta = builder.info.metadata
  assert meta["class_names"] == ["0", "1"] and meta["task"] == "label"
  assert meta["clinical_names"] == ["age", "tumour_size", "er_negative"]
  assert meta["summary"]["no_tissue"] == ["blank"]  # the blank slide: warned, left out
  assert meta["summary"]["with_polygons"] == 1
  assert set(records) == {"train", "test"}
  by_slide = {}
  for r in _by_id(records).values():
    by_slide.setdefault(_text(r["slide"]), []).append(r)
  assert sorted(by_slide) == ["a", "c", "sub/b"]
  # The pyramid, on its tissue at level 0: as many bags as tissue tiles allow; tiles exact.
  slide = slides.open_slide(os.path.join(root, "a.tif"))
  kept = [xy for xy in slides.tissue_tiles(slide, tile=T, min_tissue=0.5)
          if slides.keep_tile(slide.read_region(xy, 0, (T, T)))]
  assert len(by_slide["a"]) == len(kept) // BAG > 0
  for r in by_slide["a"]:
    assert _text(r["patient"]) == "P1" and r["label"] == 1
    for (x, y), tile in zip(r["tile_xy"], bags.decode_tiles(list(r["tiles"]))):
      assert (int(x), int(y)) in kept
      np.testing.assert_array_equal(tile, pyramid[y:y + T, x:x + T])
  # The PNG with a polygon: BALNMP tiling of its bounding box (300 x 280: 2 x 2 full tiles).
  assert len(by_slide["sub/b"]) == 1
  assert sorted(map(tuple, by_slide["sub/b"][0]["tile_xy"].tolist())) == [
      (150, 120), (150, 248), (278, 120), (278, 248)]
  # Clinical vectors: z-scores with the training patients' (P1, P2, P3) statistics.
  for slide_name, age, size, er in (("a", 50, 2.0, 0.0), ("c", 70, 2.5, 1.0)):
    np.testing.assert_allclose(
        by_slide[slide_name][0]["clinical"],
        [_zscore(age, [50, 60, 40]), _zscore(size, [2.0, 3.5, 1.5]), er], rtol=1e-5)


def test_wsi_folder_options_are_stored_with_the_tag(cohort, cohort_built):
  builder, _, data_dir = cohort_built
  assert list(builder.info.metadata["options"]["clinical"]) == list(WSI_OPTIONS["clinical"])
  again = builders.prepare("wsi_folder:mine", data_dir=data_dir)  # no options: reused
  assert again.data_path == builder.data_path and again.builder_config.tile == T
  with pytest.raises(ValueError, match="already prepared with other options"):
    builders.prepare("wsi_folder:mine", data_dir=data_dir, tile=64)


def test_wsi_folder_cuts_tissue_tiles_at_a_chosen_level(cohort, tmp_path):
  root, pyramid, rows = cohort
  _write_csv(os.path.join(root, "one.csv"), rows[:1])
  builder = builders.prepare("wsi_folder:level1", data_dir=tmp_path, manual_dir=root,
                             csv="one.csv", level=1, min_tissue=0.3, tile=64, bag_size=BAG,
                             tile_format="png")
  level1 = pyramid[::2, ::2]
  records = _by_id(_records(builder))
  assert records
  for r in records.values():
    for (x, y), tile in zip(r["tile_xy"], bags.decode_tiles(list(r["tiles"]))):
      assert x % 128 == 0 and y % 128 == 0  # 64 pixels at level 1 = 128 at level 0
      np.testing.assert_array_equal(tile, level1[y // 2:y // 2 + 64, x // 2:x // 2 + 64])


def test_clinical_and_missing_options_parse_with_clear_errors():
  assert slide_cohorts.parse_clinical(("age", "tumour_size:Size", "bmi:BMI:numeric")) == (
      ("age", "tumour_size", "bmi"), {"age": "Age(years)", "tumour_size": "Size", "bmi": "BMI"},
      {"bmi": ("numeric", "BMI")})
  for bad, match in (("bmi:BMI", "unknown feature 'bmi'"), ("bmi:BMI:ordinal", "'ordinal'"),
                     ("age:", "write feature")):
    with pytest.raises(ValueError, match=match):
      slide_cohorts.parse_clinical((bad,))
  assert slide_cohorts.canonical_missing(("ki67", "age:error", "tumour_size:mean_flag")) == (
      "ki67", "tumour_size")
  with pytest.raises(ValueError, match="policy one of"):
    slide_cohorts.parse_missing(("ki67:drop",))


def test_the_hash_split_is_by_patient_seeded_and_70_15_15():
  patients = [f"patient{i}" for i in range(3000)]
  splits = [slide_cohorts.patient_split(p) for p in patients]
  assert splits == [slide_cohorts.patient_split(p, seed=0) for p in patients]
  fractions = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
  assert abs(fractions["train"] - 0.70) < 0.03 and abs(fractions["test"] - 0.15) < 0.03
  assert splits != [slide_cohorts.patient_split(p, seed=1) for p in patients]


@pytest.mark.skipif(not SVS, reason=f"the real Aperio sample is absent: no .svs under "
                    f"{SHARED}/histo_samples/wsi (set MEDGUIDE_SHARED_DATA)")
def test_the_real_aperio_slide_becomes_bags_through_openslide(tmp_path):
  root = tmp_path / "cohort"
  os.makedirs(root)
  _write_csv(root / "slides.csv", [(SVS[0], "cmu1", "tumour")], ("slide", "patient", "label"))
  builder = builders.prepare("wsi_folder:aperio", data_dir=tmp_path / "data", manual_dir=root)
  split = slide_cohorts.patient_split("cmu1")  # no split column: the patient's hash
  assert list(builder.info.splits) == [split]
  records = _records(builder)[split]
  slide = slides.open_slide(SVS[0])
  tissue = set(slides.tissue_tiles(slide, tile=slides.TILE, min_tissue=0.5))
  assert 0 < len(records) <= len(tissue) // slides.BAG_SIZE
  xy = [tuple(map(int, p)) for r in records for p in r["tile_xy"]]
  assert len(xy) == len(set(xy)) and set(xy) <= tissue
  r = records[0]
  assert builder.info.metadata["class_names"] == ["tumour"] and r["label"] == 0
  assert r["clinical"].shape == (0,)  # no clinical features asked for
  tiles = bags.decode_tiles(list(r["tiles"]))
  assert tiles.shape == (slides.BAG_SIZE, 256, 256, 3)
  x, y = r["tile_xy"][0]
  original = slide.read_region((int(x), int(y)), 0, (256, 256)).astype(int)
  assert np.abs(tiles[0].astype(int) - original).mean() < 8  # JPEG, quality 100, 4:2:0


# --- wsi_folder: bad input ------------------------------------------------------------------


def _wsi_fails(root, data_dir, rows, error, match: str, header=None, **options):
  _write_csv(os.path.join(root, "bad.csv"), rows, *([header] if header else []))
  with pytest.raises(error, match=match):
    builders.prepare("wsi_folder:bad", data_dir=data_dir, manual_dir=root, csv="bad.csv",
                     **{**WSI_OPTIONS, **options})
  assert _no_build_left(data_dir), "a failed build left files behind"


def test_wsi_folder_bad_inputs_name_the_file_line_and_column(cohort, tmp_path):
  root, _, rows = cohort
  data = tmp_path / "data"
  _wsi_fails(root, data, rows + [("gone.svs", "P5", "1", "test", "50", "2", "Positive")],
             FileNotFoundError, r"bad.csv line 6: slide 'gone.svs' is not there")
  _wsi_fails(root, data, rows[:1] + [("c.png", "P4", "1", "test", "old", "2", "Positive")],
             clinical.ClinicalError, r"bad.csv line 3, column 'Age': 'old' is not a number")
  _wsi_fails(root, data, [r[:5] + r[6:] for r in rows], clinical.ClinicalError,
             r"bad.csv: no column\(s\) \['Size'\]",
             header=("slide", "patient", "label", "split", "Age", "ER"))
  _wsi_fails(root, data, rows[:1] + [("c.png", "P1", "1", "test", "50", "2.0", "Positive")],
             ValueError, r"bad.csv: patient 'P1' is in both 'train' and 'test'")
  _wsi_fails(root, data, rows[:1], slides.SlideError, r"a.tif: no objective power",
             magnification=10.0)
  _wsi_fails(root, data, rows[:1] + [("c.png", "P4", "1", "tset", "5", "2", "Positive")],
             ValueError, r"bad.csv line 3, column 'split': unknown split 'tset'")
