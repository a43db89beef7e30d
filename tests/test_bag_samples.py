"""The 'bags' builders over the shared real samples (data_prep/bag_samples.py).

tcga_lung_tiles and ham10000_clinical are built once per module from ../shared/data
(MEDGUIDE_SHARED_DATA) into a temporary data dir; counts, labels, splits and clinical values
are checked against the release files themselves (the zip's members, the metadata CSV).
Bad releases are small hand-made ones in tmp_path, so those tests run without the shared data.
"""
from __future__ import annotations

import collections
import csv
import io
import os
import re
import zipfile

import numpy as np
from PIL import Image
import pytest

from data_prep import bag_samples
from data_prep import shared_samples
from medguide_jax.data import bags
from medguide_jax.data import builders
from medguide_jax.data import clinical

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("MEDGUIDE_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")
TCGA_DIR = os.path.join(SHARED, "histo_tcga_luad_lusc_tiles")
HAM_DIR = os.path.join(SHARED, "derm_ham10000_small")
needs_tcga = pytest.mark.skipif(
    not os.path.isfile(os.path.join(TCGA_DIR, bag_samples.TCGA_ZIP)),
    reason=f"shared TCGA lung tiles not found at {TCGA_DIR} (set MEDGUIDE_SHARED_DATA)")
needs_ham = pytest.mark.skipif(
    not os.path.isfile(os.path.join(HAM_DIR, "metadata_subset.csv")),
    reason=f"shared HAM10000 sample not found at {HAM_DIR} (set MEDGUIDE_SHARED_DATA)")

# The zip's regions (its SOURCE.txt): slide -> (release split, label, tiles).
TCGA_REGIONS = {"LUAD_521": ("train", 0, 70), "LUSC_512": ("train", 1, 60),
                "LUAD_507": ("test", 0, 30), "LUSC_515": ("test", 1, 30)}


def _records(builder) -> dict[str, list[dict]]:
  """split -> every record of it, text fields as str."""
  out = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    out[split] = [source[i] for i in range(len(source))]
    for r in out[split]:
      for key in ("patient", "slide", "id"):
        r[key] = r[key].decode()
  return out


def _check_schema(records: dict[str, list[dict]], clinical_len: int, bag_size: int,
                  disjoint_validation: bool = True) -> None:
  """Every record has the 'bags' schema, ids are unique, and no patient crosses splits
  (tcga_lung_tiles: validation shares the train regions, so only train+validation vs test)."""
  ids = [r["id"] for rs in records.values() for r in rs]
  assert len(ids) == len(set(ids))
  for rs in records.values():
    for r in rs:
      assert r["tiles"].shape == (bag_size,) and r["tile_xy"].shape == (bag_size, 2)
      assert r["tile_xy"].dtype == np.int64 and r["clinical"].dtype == np.float32
      assert r["clinical"].shape == (clinical_len,)
      assert r["id"].startswith(r["slide"] + "/bag")
  merge = {} if disjoint_validation else {"validation": "train"}
  patients = collections.defaultdict(list)
  for split, rs in records.items():
    patients[merge.get(split, split)] += [r["patient"] for r in rs]
  bags.check_patient_splits(patients, "records")


def _jpeg(h: int, w: int, value: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# tcga_lung_tiles


@pytest.fixture(scope="module")
def tcga(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tcga")
  builder = builders.prepare("tcga_lung_tiles", data_dir=data_dir, manual_dir=TCGA_DIR)
  return builder, _records(builder)


@pytest.fixture(scope="module")
def tcga_members():
  """slide -> {(x, y): (member, bytes)} from the zip itself."""
  out = collections.defaultdict(dict)
  with zipfile.ZipFile(os.path.join(TCGA_DIR, bag_samples.TCGA_ZIP)) as z:
    for name in z.namelist():
      m = re.search(r"/(LUAD|LUSC)/(\d+)_(\d+)_(\d+)\.jpg$", name)
      if m:
        row, col = int(m[2]), int(m[3])
        out[f"{m[1]}_{m[4]}"][(col * 256, row * 256)] = (name, z.read(name))
  return out


@needs_tcga
def test_tcga_schema_counts_labels_and_metadata(tcga, tcga_members):
  builder, records = tcga
  assert {s: len(v) for s, v in records.items()} == {"train": 11, "validation": 2, "test": 6}
  _check_schema(records, clinical_len=0, bag_size=10, disjoint_validation=False)
  meta = builder.info.metadata
  assert meta["class_names"] == ["LUAD", "LUSC"] and meta["clinical_names"] == []
  assert meta["bag_size"] == 10 and meta["tile_size"] == 256 and "LUSC" in meta["task"]
  assert {s: len(t) for s, t in tcga_members.items()} == {
      s: n for s, (_, _, n) in TCGA_REGIONS.items()}  # the zip is as SOURCE.txt says
  bags_of = collections.Counter((s, r["slide"]) for s, rs in records.items() for r in rs)
  # 70 tiles: 1 bottom row (10 tiles) validation, 60 train; 60: 10 + 50; test 30 each.
  assert bags_of == {("train", "LUAD_521"): 6, ("validation", "LUAD_521"): 1,
                     ("train", "LUSC_512"): 5, ("validation", "LUSC_512"): 1,
                     ("test", "LUAD_507"): 3, ("test", "LUSC_515"): 3}
  for split, rs in records.items():
    for r in rs:
      release, label, _ = TCGA_REGIONS[r["slide"]]
      assert r["label"] == label and r["patient"] == r["slide"]
      assert split == release or (split == "validation" and release == "train")
  # Validation is the bottom tile row of each train region, and no tile is in two bags.
  bottom = {"LUAD_521": 6 * 256, "LUSC_512": 5 * 256}
  for split, rs in records.items():
    for r in rs:
      if r["slide"] in bottom:
        assert ((r["tile_xy"][:, 1] == bottom[r["slide"]]).all() if split == "validation"
                else (r["tile_xy"][:, 1] < bottom[r["slide"]]).all())
  tiles = [(r["slide"], tuple(xy)) for rs in records.values() for r in rs for xy in r["tile_xy"]]
  assert len(tiles) == len(set(tiles)) == 190
  summary = meta["summary"]
  assert summary["bags"] == {"train": 11, "validation": 2, "test": 6}
  assert summary["regions"]["LUAD_521"]["validation_rows"] == [6]


@needs_tcga
def test_tcga_tiles_are_the_zip_members_byte_for_byte(tcga, tcga_members):
  _, records = tcga
  for rs in records.values():
    for r in rs:
      for data, xy in zip(r["tiles"], r["tile_xy"]):
        assert data == tcga_members[r["slide"]][tuple(int(v) for v in xy)][1]


@needs_tcga
def test_tcga_rebuilds_identically_and_options_are_configs(tcga, tmp_path):
  _, records = tcga
  again = _records(builders.prepare("tcga_lung_tiles", data_dir=tmp_path, manual_dir=TCGA_DIR))
  for split in records:
    assert [r["id"] for r in records[split]] == [r["id"] for r in again[split]]
    for a, b in zip(records[split], again[split]):
      assert list(a["tiles"]) == list(b["tiles"])
      np.testing.assert_array_equal(a["tile_xy"], b["tile_xy"])
  # bag_size=0: one bag per region part; another seed draws other bags.
  whole = builders.prepare("tcga_lung_tiles", data_dir=tmp_path,
                           manual_dir=TCGA_DIR, bag_size=0)
  assert "bag0_val20_seed0" in os.fspath(whole.data_dir)
  counts = {s: whole.info.splits[s].num_examples for s in whole.info.splits}
  assert counts == {"train": 2, "validation": 2, "test": 2}
  assert sorted(len(r["tiles"]) for r in _records(whole)["train"]) == [50, 60]
  other = _records(builders.prepare("tcga_lung_tiles", data_dir=tmp_path,
                                    manual_dir=TCGA_DIR, seed=1))
  assert ([r["tile_xy"].tolist() for r in other["train"]]
          != [r["tile_xy"].tolist() for r in records["train"]])


def _zip(path, members: dict[str, bytes]) -> str:
  with zipfile.ZipFile(path, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)
  return os.fspath(path)


def _fake_tcga(folders=("train/LUAD", "train/LUSC", "test/LUAD", "test/LUSC"), rows: int = 2
               ) -> dict[str, bytes]:
  """A hand-made zip of the release's layout: `rows` x 10 grey tiles per region."""
  tile = _jpeg(256, 256)
  return {f"tcga_luadlusc/{folder}/{r}_{c}_{600 + k}.jpg": tile
          for k, folder in enumerate(folders) for r in range(rows) for c in range(10)}


def test_tcga_hand_made_zip_builds(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _zip(manual / bag_samples.TCGA_ZIP, {"tcga_luadlusc/README.txt": b"notes",
                                       "__MACOSX/tcga_luadlusc/train/LUAD/._0_0_600.jpg": b"x",
                                       **_fake_tcga(rows=3)})
  builder = builders.prepare("tcga_lung_tiles", data_dir=tmp_path / "data", manual_dir=manual)
  records = _records(builder)
  # 3 rows of 10 per region: train regions 2 rows train + 1 row validation.
  assert {s: len(v) for s, v in records.items()} == {"train": 4, "validation": 2, "test": 6}
  assert {r["slide"] for r in records["test"]} == {"LUAD_602", "LUSC_603"}
  _check_schema(records, clinical_len=0, bag_size=10, disjoint_validation=False)


def test_tcga_bad_zips_name_the_zip_and_the_folder_or_member(tmp_path):
  path = _zip(tmp_path / "a.zip", _fake_tcga(("train/LUAD", "train/LUSC", "test/LUAD")))
  with pytest.raises(shared_samples.SharedSamplesFormatError,
                     match=r"a\.zip: no tile in \['test/LUSC/'\]"):
    bag_samples.read_tcga_zip(path)
  path = _zip(tmp_path / "b.zip", {**_fake_tcga(), "tcga_luadlusc/test/LUSC/tile.jpg": b""})
  with pytest.raises(shared_samples.SharedSamplesFormatError,
                     match=r"b\.zip: member tcga_luadlusc/test/LUSC/tile\.jpg: expected"):
    bag_samples.read_tcga_zip(path)
  path = _zip(tmp_path / "c.zip", {**_fake_tcga(), "x/train/LUSC/0_0_9.jpg": _jpeg(128, 256)})
  with pytest.raises(shared_samples.SharedSamplesFormatError, match=r"0_0_9\.jpg: a 256 x 128"):
    bag_samples.read_tcga_zip(path)
  path = _zip(tmp_path / "d.zip", {**_fake_tcga(), "x/test/LUAD/0_0_600.jpg": _jpeg(256, 256)})
  with pytest.raises(shared_samples.SharedSamplesFormatError, match="region K=600 also has"):
    bag_samples.read_tcga_zip(path)
  with pytest.raises(shared_samples.SharedSamplesFormatError, match="e.zip not found"):
    bag_samples.read_tcga_zip(os.fspath(tmp_path / "e.zip"))
  # Through prepare: the error, and nothing left behind.
  manual = tmp_path / "manual"
  manual.mkdir()
  _zip(manual / bag_samples.TCGA_ZIP, _fake_tcga(("train/LUAD", "test/LUAD", "test/LUSC")))
  with pytest.raises(shared_samples.SharedSamplesFormatError, match="train/LUSC/"):
    builders.prepare("tcga_lung_tiles", data_dir=tmp_path / "data", manual_dir=manual)
  assert not (tmp_path / "data" / "tcga_lung_tiles").exists()


# ---------------------------------------------------------------------------------------------
# ham10000_clinical


def _metadata(root) -> dict[str, dict[str, str]]:
  with open(os.path.join(root, "metadata_subset.csv")) as f:
    return {r["image_id"]: r for r in csv.DictReader(f)}


def _hand_vector(row: dict, train_rows: list[dict]) -> np.ndarray:
  """The clinical vector computed here from the CSV: age z-scored over the training rows'
  known ages (0 and flag 1 when missing), sex and site one-hot over the training values."""
  ages = np.array([float(r["age"]) for r in train_rows if r["age"] not in ("", "nan")])
  sexes = sorted({r["sex"] for r in train_rows})
  sites = sorted({r["localization"] for r in train_rows})
  known = row["age"] not in ("", "nan")
  age = (float(row["age"]) - ages.mean()) / ages.std() if known else 0.0
  return np.array([age, 0.0 if known else 1.0] + [row["sex"] == s for s in sexes]
                  + [row["localization"] == s for s in sites], np.float32)


@pytest.fixture(scope="module")
def ham(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("ham")
  builder = builders.prepare("ham10000_clinical", data_dir=data_dir, manual_dir=HAM_DIR)
  return builder, _records(builder), data_dir


@needs_ham
def test_ham_schema_counts_splits_and_labels(ham):
  builder, records, _ = ham
  meta = builder.info.metadata
  rows = _metadata(HAM_DIR)
  assert {s: len(v) for s, v in records.items()} == {"train": 537, "validation": 67, "test": 67}
  assert sum(map(len, records.values())) == len(rows)
  _check_schema(records, clinical_len=len(meta["clinical_names"]), bag_size=1)
  assert meta["class_names"] == ["non-melanoma", "melanoma"] and "mel" in meta["task"]
  assert meta["bag_size"] == 1 and meta["tile_size"] == 0
  assert meta["clinical_names"][:4] == ["age", "age_missing", "sex=female", "sex=male"]
  assert {s: sum(int(r["label"]) for r in rs) for s, rs in records.items()} == {
      "train": 80, "validation": 10, "test": 10}  # 100 mel lesions, 80/10/10
  for rs in records.values():
    for r in rs:
      row = rows[r["slide"]]
      assert r["patient"] == row["lesion_id"] and int(r["label"]) == (row["dx"] == "mel")
  # The ham10000 builder's lesion splits, exactly.
  ham_rows = shared_samples.Ham10000.rows(HAM_DIR)
  split_of = shared_samples.Ham10000.lesion_splits(ham_rows)
  assert all(split_of[r["patient"]] == s for s, rs in records.items() for r in rs)
  bags.check_patient_splits({s: [r["patient"] for r in rs] for s, rs in records.items()},
                            "ham10000_clinical")


@needs_ham
def test_ham_tiles_are_the_image_files_and_clinical_is_hand_computed(ham):
  builder, records, _ = ham
  rows = _metadata(HAM_DIR)
  train_rows = [rows[r["slide"]] for r in records["train"]]
  for split in records:
    for r in records[split][:3] + records[split][-2:]:
      with open(os.path.join(HAM_DIR, "images", f"{r['slide']}.jpg"), "rb") as f:
        assert r["tiles"][0] == f.read()
      np.testing.assert_allclose(r["clinical"], _hand_vector(rows[r["slide"]], train_rows),
                                 rtol=1e-5, atol=1e-6)
  summary = builder.info.metadata["summary"]
  assert summary["age_mean"] == pytest.approx(np.mean([float(r["age"]) for r in train_rows]))


@needs_ham
def test_ham_crops_are_seeded_crops_of_the_image(ham):
  _, whole, data_dir = ham
  builder = builders.prepare("ham10000_clinical", data_dir=data_dir, manual_dir=HAM_DIR,
                             crops=3, crop_size=64)
  assert "crops3_size64_seed0" in os.fspath(builder.data_dir)
  assert builder.info.metadata["bag_size"] == 3 and builder.info.metadata["tile_size"] == 64
  records = _records(builder)
  assert {s: [r["id"] for r in rs] for s, rs in records.items()} == {
      s: [r["id"] for r in rs] for s, rs in whole.items()}
  for r in records["test"][:5]:
    image = np.asarray(Image.open(os.path.join(HAM_DIR, "images", f"{r['slide']}.jpg")))
    tiles = bags.decode_tiles(r["tiles"])
    assert tiles.shape == (3, 64, 64, 3)
    for tile, (x, y) in zip(tiles, r["tile_xy"]):
      np.testing.assert_array_equal(tile, image[y:y + 64, x:x + 64])  # PNG: lossless
  # Crops depend on the seed and the image only: the same for one image in any build.
  im = records["test"][0]
  pixels = np.asarray(Image.open(os.path.join(HAM_DIR, "images", f"{im['slide']}.jpg")))
  import zlib  # pylint: disable=g-import-not-at-top
  _, xy = bag_samples.random_crops(pixels, 3, 64, (0, zlib.crc32(im["slide"].encode())), "x")
  assert im["tile_xy"].tolist() == [list(p) for p in xy]


def _fake_ham(root, ages: dict[int, str] | None = None, columns=None) -> None:
  """A hand-made release: 10 mel and 10 nv lesions of 20 x 16 images, lesion 3 with a second
  image (ISIC_0000099, as the full release has several per lesion); `ages` overrides."""
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  columns = columns or ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
  sites = ("back", "face", "trunk")
  with open(os.path.join(root, "metadata_subset.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for i in list(range(20)) + [99]:
      values = {"lesion_id": f"HAM_{3 if i == 99 else i:07d}", "image_id": f"ISIC_{i:07d}",
                "dx": "mel" if i % 2 else "nv", "dx_type": "histo",
                "age": (ages or {}).get(i, f"{30 + 5 * (i % 7)}.0"),
                "sex": "male" if i % 3 else "female", "localization": sites[i % 3]}
      writer.writerow([values[c] for c in columns])
      with open(os.path.join(root, "images", f"ISIC_{i:07d}.jpg"), "wb") as img:
        img.write(_jpeg(16, 20, (10 * i) % 256))


def test_ham_missing_age_is_imputed_and_flagged(tmp_path):
  manual = tmp_path / "manual"
  _fake_ham(manual, ages={0: "", 1: "nan", 5: ""})
  builder = builders.prepare("ham10000_clinical", data_dir=tmp_path / "data", manual_dir=manual)
  records = _records(builder)
  rows = _metadata(manual)
  train_rows = [rows[r["slide"]] for r in records["train"]]
  assert builder.info.metadata["clinical_names"] == [
      "age", "age_missing", "sex=female", "sex=male", "body_site=back", "body_site=face",
      "body_site=trunk"]
  flagged = set()
  for rs in records.values():
    for r in rs:
      np.testing.assert_allclose(r["clinical"], _hand_vector(rows[r["slide"]], train_rows),
                                 rtol=1e-5, atol=1e-6)
      if r["clinical"][1]:
        assert r["clinical"][0] == 0.0  # the training mean
        flagged.add(r["slide"])
  assert flagged == {"ISIC_0000000", "ISIC_0000001", "ISIC_0000005"}
  # One record per image; a lesion's images share its split.
  split_of = {r["slide"]: (s, r["patient"]) for s, rs in records.items() for r in rs}
  assert len(split_of) == 21 and split_of["ISIC_0000099"] == split_of["ISIC_0000003"]
  assert sum(s["missing_age"] for s in builder.info.metadata["summary"]["splits"].values()) == 3


def test_ham_bad_metadata_names_the_file_and_column(tmp_path):
  no_age = tmp_path / "no_age"
  _fake_ham(no_age, columns=["lesion_id", "image_id", "dx", "sex", "localization"])
  with pytest.raises(shared_samples.SharedSamplesFormatError,
                     match=r"metadata_subset\.csv: missing columns \['age'\]"):
    bag_samples.read_ham_images(os.fspath(no_age))
  bad_age = tmp_path / "bad_age"
  _fake_ham(bad_age, ages={1: "forty"})
  with pytest.raises(clinical.ClinicalError,
                     match=r"metadata_subset\.csv line 3, column 'age': 'forty' is not a number"):
    builders.prepare("ham10000_clinical", data_dir=tmp_path / "data", manual_dir=bad_age)
  assert not (tmp_path / "data" / "ham10000_clinical").exists()
  with pytest.raises(shared_samples.SharedSamplesFormatError, match="none of"):
    bag_samples.read_ham_images(os.fspath(tmp_path))
  with pytest.raises(ValueError, match="crops=-1"):
    bag_samples.Ham10000Clinical(data_dir=os.fspath(tmp_path), crops=-1)
