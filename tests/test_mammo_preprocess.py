"""GLAM/GMIC mammogram preprocessing (medguide_jax.data.mammo) against hand-computed geometry.

The synthetic "breast" is a textured rectangle against the chest-wall edge, so that the
reference's erosion (100 iterations, 4-connected) / dilation and bounding box can be worked out
by hand: opening a rectangle by a diamond of radius 100 keeps its bounding box, with the
corners cut to diamonds. A bright 220x220 label, joined to the breast by a thin line, must be
cut away by the erosion and the largest-component choice.
"""
from __future__ import annotations

import collections
import os
import pickle

import numpy as np
from PIL import Image
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
import pytest

from medguide_jax.data import mammo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("MEDGUIDE_SHARED_DATA") or os.path.join(REPO, "..", "shared", "data")
GLAM_SAMPLE = os.path.join(SHARED, "mammo_nyu_glam_sample")
needs_glam_sample = pytest.mark.skipif(
    not os.path.isdir(GLAM_SAMPLE),
    reason=f"NYU GLAM sample not found at {GLAM_SAMPLE} (set MEDGUIDE_SHARED_DATA)")

LESION = 4000  # unique intensity of the marker disc (breast texture 1000..3000)
LABEL = 4095  # the bright label blob
LINE = 3500  # the thin line joining label and breast


def _breast(pointing: str = "right", lesion: bool = False, seed: int = 0) -> np.ndarray:
  """800x640 uint16: breast rows 100..699 x cols 0..349 (for pointing right), label rows
  20..239 x cols 400..619, a 2-pixel line rows 120..121 x cols 340..409; mirrored for 'left'."""
  rng = np.random.default_rng(seed)
  image = np.zeros((800, 640), np.uint16)
  image[100:700, :350] = rng.integers(1000, 3001, (600, 350))
  image[20:240, 400:620] = LABEL
  image[120:122, 340:410] = LINE
  if lesion:
    rows, cols = np.ogrid[:800, :640]
    image[(rows - 400) ** 2 + (cols - 200) ** 2 <= 20 ** 2] = LESION
  return image if pointing == "right" else np.ascontiguousarray(np.fliplr(image))


# ---------------------------------------------------------------------------------------------
# Exam lists


def _dump(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol)
  return path


class _SystemPayload:
  """Pickles as os.system(f"touch {target}")."""

  def __init__(self, target):
    self.target = str(target)

  def __reduce__(self):
    return os.system, (f"touch {self.target}",)


def test_restricted_loader_refuses_os_system_without_running_it(tmp_path):
  target = tmp_path / "pwned"
  path = _dump(tmp_path / "evil.pkl", [{"L-CC": ["a"], "x": _SystemPayload(target)}])
  with pytest.raises(mammo.UnsafePickleError) as e:
    mammo.load_exam_list(path)
  assert isinstance(e.value, ValueError) and isinstance(e.value, pickle.UnpicklingError)
  assert f"{os.system.__module__}.system" in str(e.value) and str(path) in str(e.value)
  assert not target.exists()
  pickle.loads(pickle.dumps(_SystemPayload(target)))  # the payload itself does work
  assert target.exists()


@pytest.mark.parametrize("module,name,code", [
    ("builtins", "eval", "open({t!r}, 'w')"),
    ("builtins", "exec", "open({t!r}, 'w')"),
    ("__builtin__", "eval", "open({t!r}, 'w')"),
    ("posix", "system", "touch {t}"),
    ("subprocess", "getoutput", "touch {t}"),
    ("builtins", "getattr", "x"),
    ("functools", "partial", "x"),
    ("numpy", "load", "x"),
    ("collections", "namedtuple", "x"),
])
def test_restricted_loader_refuses_other_globals(tmp_path, module, name, code):
  target = tmp_path / "pwned"
  arg = code.format(t=str(target))
  # Protocol 0 by hand: GLOBAL module name, MARK, STRING arg, TUPLE, REDUCE, STOP.
  data = f"c{module}\n{name}\n(S{arg!r}\ntR.".encode()
  path = tmp_path / "evil.pkl"
  path.write_bytes(data)
  with pytest.raises(ValueError, match=f"refused to load global '{module}.{name}'"):
    mammo.load_exam_list(path)
  assert not target.exists()


def _exam_payload():
  return [{
      "L-CC": ["0_L-CC"], "R-MLO": ("0_R-MLO",), "horizontal_flip": "NO",
      "cancer_label": collections.OrderedDict(left_benign=0, left_malignant=1,
                                              right_benign=np.int64(1), right_malignant=0),
      "best_center": {"L-CC": [(np.int64(1072), np.int64(-210))]},
      "pixels": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # non-contiguous
      "objects": np.array(["a", {"b": 1}], dtype=object),
      "nested": {"set": {1, 2}, "frozen": frozenset({"x"}), "bytes": b"\x00\xff", "none": None,
                 "flag": True, "scalar": np.float64(0.5), "dtype": np.dtype("<u2"),
                 "record": np.zeros(2, [("a", "<i4"), ("b", "<f8")])},
  }]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_restricted_loader_accepts_numpy_and_containers(tmp_path, protocol):
  want = _exam_payload()
  got = mammo.load_exam_list(_dump(tmp_path / "ok.pkl", want, protocol))
  assert got[0].keys() == want[0].keys()
  for key in ("L-CC", "R-MLO", "horizontal_flip", "cancer_label", "best_center"):
    assert got[0][key] == want[0][key]
  assert isinstance(got[0]["cancer_label"], collections.OrderedDict)
  np.testing.assert_array_equal(got[0]["pixels"], want[0]["pixels"])
  assert got[0]["pixels"].dtype == np.float32
  assert list(got[0]["objects"]) == ["a", {"b": 1}]
  nested = got[0]["nested"]
  for key in ("set", "frozen", "bytes", "none", "flag", "scalar", "dtype"):
    assert nested[key] == want[0]["nested"][key] and type(nested[key]) is type(
        want[0]["nested"][key])
  assert nested["record"].dtype == want[0]["nested"]["record"].dtype


def test_restricted_loader_reads_numpy1_pickles(tmp_path):
  data = pickle.dumps([{"a": np.arange(3), "b": np.int64(7)}], protocol=0)
  assert b"numpy._core.multiarray" in data
  path = tmp_path / "np1.pkl"  # the module names numpy 1 writes
  path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
  got = mammo.load_exam_list(path)
  np.testing.assert_array_equal(got[0]["a"], [0, 1, 2])
  assert got[0]["b"] == 7


def test_exam_list_structure_errors_name_file_exam_and_key(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.pkl"):
    mammo.load_exam_list(tmp_path / "missing.pkl")
  path = _dump(tmp_path / "d.pkl", {"L-CC": ["a"]})
  with pytest.raises(ValueError, match=r"d\.pkl: an exam list must be a list of dicts, got dict"):
    mammo.load_exam_list(path)
  _dump(path, [{"L-CC": ["a"]}, ["L-CC"]])
  with pytest.raises(ValueError, match="exam 1 is a list, not a dict"):
    mammo.load_exam_list(path)
  _dump(path, [{"L-CC": ["a"]}, {"R-CC": "1_R-CC"}])
  with pytest.raises(ValueError, match="exam 1 key 'R-CC' must be a list of image names"):
    mammo.load_exam_list(path)
  _dump(path, [{"L-MLO_benign_seg": [3]}])
  with pytest.raises(ValueError, match="exam 0 key 'L-MLO_benign_seg'"):
    mammo.load_exam_list(path)
  _dump(path, [{"L-CC": ["a"], "cancer_label": [0, 1]}])
  with pytest.raises(ValueError, match="exam 0 key 'cancer_label' must be a dict"):
    mammo.load_exam_list(path)
  _dump(path, [{"L-CC": ["a"], "horizontal_flip": "no"}])
  with pytest.raises(ValueError, match="exam 0 key 'horizontal_flip'"):
    mammo.load_exam_list(path)
  path.write_bytes(pickle.dumps([{"L-CC": ["a"]}])[:-5])
  with pytest.raises(ValueError, match=r"d\.pkl: cannot unpickle"):
    mammo.load_exam_list(path)


@needs_glam_sample
def test_loads_the_real_exam_lists():
  exams = mammo.load_exam_list(os.path.join(GLAM_SAMPLE, "exam_list_before_cropping.pkl"))
  assert len(exams) == 4 and exams[0]["R-CC"] == ["0_R-CC"]
  assert mammo.view_labels(exams[0]["cancer_label"], "R-MLO") == (1, 0)
  assert mammo.view_labels(exams[3]["cancer_label"], "L-CC") == (0, 1)
  bcc = mammo.load_exam_list(os.path.join(SHARED, "mammo_nyu_bcc_cc_views", "data.pkl"))
  assert [mammo.view_labels(e["cancer_label"], "R-CC") for e in bcc[1:3]] == [(0, 1), (0, 0)]


def test_views_sides_and_labels():
  assert mammo.VIEWS == ("L-CC", "R-CC", "L-MLO", "R-MLO")
  assert [mammo.side(v) for v in mammo.VIEWS] == ["left", "right", "left", "right"]
  label = {"left_benign": 1, "left_malignant": 0, "right_benign": 0, "right_malignant": 1}
  assert mammo.view_labels(label, "L-MLO") == (1, 0)
  assert mammo.view_labels(label, "R-CC") == (0, 1)
  with pytest.raises(ValueError, match="view must be one of"):
    mammo.side("L_CC")
  with pytest.raises(ValueError, match=r"cancer_label lacks \['right_malignant'\]"):
    mammo.view_labels({"right_benign": 1}, "R-CC")
  # load_image flips R views for 'NO', L views for 'YES' (all breasts then point right).
  assert [mammo.needs_flip(v, "NO") for v in mammo.VIEWS] == [False, True, False, True]
  assert [mammo.needs_flip(v, "YES") for v in mammo.VIEWS] == [True, False, True, False]
  with pytest.raises(ValueError, match="horizontal_flip must be one of"):
    mammo.needs_flip("R-CC", False)


# ---------------------------------------------------------------------------------------------
# Step 1: cropping


def test_crop_finds_the_largest_component_and_drops_the_label():
  crop = mammo.crop_mammogram(_breast("right"), "L-CC", "NO")
  # Bounding box rows 100..699, cols 0..349; 50 rows of buffer above / below, 50 columns on
  # the nipple side only (the right); the label (cols 400..) stays out.
  assert crop.window == (50, 750, 0, 400)
  assert crop.distance_from_starting_side == 0 and crop.pointing == "right"
  # Last mask row 699 (crop row 649) holds the bottom tips of diamonds centred on cols 100..249.
  assert crop.bottommost_points == (649, (100, 249))
  # Crop height 700 -> rows < int(700 / 3) = 233 ignored; col 349 is set at raw rows 200..599
  # (the sides of diamonds centred on col 249), crop rows 150..549.
  assert crop.rightmost_points == ((233, 549), 349)
  # Without erosion the thin line joins label and breast into one component.
  joined = mammo.crop_mammogram(_breast("right"), "L-CC", "NO", iterations=0)
  assert joined.window == (0, 750, 0, 640)


def test_crop_of_a_breast_pointing_left_mirrors_with_the_reference_offsets():
  crop = mammo.crop_mammogram(_breast("left"), "R-CC", "NO")
  assert crop.pointing == "left"
  assert crop.window == (50, 750, 240, 640)  # the buffer now on the left
  assert crop.distance_from_starting_side == 0
  # The reference mirrors x as `right - x` / `width - x` (one more than fliplr's width-1-x).
  assert crop.bottommost_points == (649, (101, 250))
  assert crop.rightmost_points == ((233, 549), 350)
  # The same image read as an L view with horizontal_flip 'YES' points left as well.
  assert mammo.crop_mammogram(_breast("left"), "L-MLO", "YES") == crop


def test_crop_errors():
  with pytest.raises(ValueError, match="no breast found"):
    mammo.crop_mammogram(np.zeros((300, 300), np.uint16), "L-CC")
  with pytest.raises(ValueError, match="no breast found"):  # too thin to survive erosion
    mammo.crop_mammogram(np.pad(np.ones((150, 150), np.uint16), 10), "L-CC")
  with pytest.raises(ValueError, match="2-D"):
    mammo.crop_mammogram(np.ones((4, 4, 3), np.uint8), "L-CC")
  with pytest.raises(ValueError, match="view must be one of"):
    mammo.crop_mammogram(_breast(), "CC")


# ---------------------------------------------------------------------------------------------
# Step 2: the optimal centre


def _crop_info(rightmost_x, bottommost_y=0):
  return mammo.CropWindow(0, 0, 0, 0, ((0, 0), rightmost_x), (bottommost_y, (0, 0)), 0, "right")


def test_optimal_center_cc_scans_rows_and_pins_the_column():
  image = np.zeros((60, 30), np.uint16)
  image[40:56, 10:20] = 1
  # Window (20, 10): column pinned at rightmost_x - 5 - 1 = 19; rows 10..50 scanned; the
  # window rows [c - 10, c + 10) hold the whole block (rows 40..55) for c in 46..50; the one
  # nearest to com row 30 wins.
  assert mammo.optimal_center(image, "L-CC", _crop_info(25), window_shape=(20, 10)) == (46, 19)
  # An R-CC view is flipped first: the mirrored image gives the same centre.
  assert mammo.optimal_center(np.fliplr(image), "R-CC", _crop_info(25),
                              window_shape=(20, 10)) == (46, 19)
  # A block near the top (rows 5..15) is held whole for centres 10..15: the tie nearest to
  # row 30 is the last one; an empty image ties everywhere and gets com itself.
  top = np.zeros((60, 30), np.uint16)
  top[5:16, 15:20] = 1
  assert mammo.optimal_center(top, "L-CC", _crop_info(25), window_shape=(20, 10)) == (15, 19)
  assert mammo.optimal_center(top * 0, "L-CC", _crop_info(25),
                              window_shape=(20, 10)) == (30, 19)
  # Shorter than the window: the row is the image centre, whatever the content.
  assert mammo.optimal_center(image, "L-CC", _crop_info(25), window_shape=(100, 10)) == (30, 19)


def test_optimal_center_mlo_uses_bottommost_and_rightmost():
  image = np.zeros((60, 30), np.uint16)
  image[5:41, 22:30] = 1  # last non-zero row of the rightmost 10 columns: 40
  # (min(40, bottommost 50) - 10 - 1, 25 - 5 - 1)
  assert mammo.optimal_center(image, "L-MLO", _crop_info(25, 50),
                              window_shape=(20, 10)) == (29, 19)
  assert mammo.optimal_center(image, "L-MLO", _crop_info(25, 33),
                              window_shape=(20, 10)) == (22, 19)


def test_optimal_center_of_the_synthetic_crop():
  image = _breast("right")
  crop = mammo.crop_mammogram(image, "L-CC")
  cropped = crop.apply(image)
  # 700 rows < 2944: row 700 // 2; column 349 - 961.
  assert mammo.optimal_center(cropped, "L-CC", crop) == (350, -612)
  # MLO: (649 - 1472 - 1, 349 - 961).
  assert mammo.optimal_center(cropped, "L-MLO", crop) == (-824, -612)


# ---------------------------------------------------------------------------------------------
# Step 3: the window


def test_fit_window_pads_small_images_with_zeros():
  image = np.arange(1, 21, dtype=np.uint16).reshape(5, 4)
  cc = mammo.fit_window(image, (100, -50), "R-CC", out_shape=(9, 6))
  want = np.zeros((9, 6), np.uint16)
  want[2:7, :4] = image  # CC: floor(4 / 2) rows on top, 2 below; MLO / CC: columns right
  np.testing.assert_array_equal(cc, want)
  assert cc.dtype == np.uint16
  mlo = mammo.fit_window(image, (100, -50), "L-MLO", out_shape=(9, 6))
  want = np.zeros((9, 6), np.uint16)
  want[:5, :4] = image  # MLO: all rows below
  np.testing.assert_array_equal(mlo, want)
  odd = mammo.fit_window(image[:4, :2], (0, 0), "L-CC", out_shape=(9, 2))
  assert odd[:2].sum() == 0 and odd[6:].sum() == 0  # pad 5: int(5 / 2) = 2 top, 3 bottom
  np.testing.assert_array_equal(odd[2:6], image[:4, :2])


def test_fit_window_centres_and_shifts_inside_large_images():
  image = np.arange(20 * 16).reshape(20, 16).astype(np.float32)
  fit = lambda center, shape=(6, 4): mammo.fit_window(image, center, "L-CC", out_shape=shape)
  np.testing.assert_array_equal(fit((10, 8)), image[7:13, 6:10])  # top = 10 - 3, left = 8 - 2
  np.testing.assert_array_equal(fit((1, 15)), image[0:6, 12:16])  # shifted down and left
  np.testing.assert_array_equal(fit((19, 0)), image[14:20, 0:4])  # shifted up and right
  np.testing.assert_array_equal(fit((10, 8), (5, 3)), image[8:13, 7:10])  # odd: top = 10 - 2
  tall = mammo.fit_window(image[:, :3], (10, -100), "L-MLO", out_shape=(6, 4))
  np.testing.assert_array_equal(tall[:, :3], image[7:13, :3])
  assert (tall[:, 3] == 0).all()
  with pytest.raises(ValueError, match="view must be one of"):
    mammo.fit_window(image, (0, 0), "XCCL")


# ---------------------------------------------------------------------------------------------
# The whole pipeline


def test_preprocess_geometry_by_hand():
  image = _breast("right")
  out = mammo.preprocess_view(image, view="L-CC")
  assert out.image.shape == (2944, 1920) and out.image.dtype == np.uint16
  assert out.crop.window == (50, 750, 0, 400) and out.best_center == (350, -612)
  assert not out.flipped and out.offsets == (-1122, 0)
  want = np.zeros((2944, 1920), np.uint16)
  want[1122:1822, :400] = image[50:750, :400]  # pad (2944 - 700) / 2 = 1122 rows on top
  np.testing.assert_array_equal(out.image, want)
  assert not (out.image == LABEL).any()
  mlo = mammo.preprocess_view(image, view="L-MLO")
  want = np.zeros((2944, 1920), np.uint16)
  want[:700, :400] = image[50:750, :400]
  np.testing.assert_array_equal(mlo.image, want)


@pytest.mark.parametrize("horizontal_flip", ["NO", "YES"])
@pytest.mark.parametrize("view", mammo.VIEWS)
def test_raw_masks_follow_the_image_exactly(view, horizontal_flip):
  pointing = mammo.breast_pointing(view, horizontal_flip)
  image = _breast(pointing, lesion=True)
  lesion = image == LESION
  out = mammo.preprocess_view(image, view=view, horizontal_flip=horizontal_flip,
                              masks={"lesion": lesion, "label": image == LABEL})
  assert out.flipped == (pointing == "left")
  assert out.masks["lesion"].dtype == np.uint8 and set(np.unique(out.masks["lesion"])) == {0, 1}
  np.testing.assert_array_equal(out.masks["lesion"] == 1, out.image == LESION)
  assert out.masks["lesion"].sum() == lesion.sum()
  assert out.masks["label"].sum() == 0
  # Every breast ends up pointing right: chest wall at column 0.
  assert (out.image[:, 0] > 0).sum() == 600 and (out.image[:, 400:] == 0).all()
  # Mirrored inputs give the same output.
  right = mammo.preprocess_view(_breast("right", lesion=True), view=view,
                                horizontal_flip="NO" if view[0] == "L" else "YES")
  np.testing.assert_array_equal(out.image, right.image)


def test_downsampled_output_and_masks():
  image = _breast("left", lesion=True)
  full = mammo.preprocess_view(image, view="R-CC", masks={"m": image == LESION})
  small = mammo.preprocess_view(image, view="R-CC", masks={"m": image == LESION},
                                out_shape=(736, 480))
  assert small.factor == 4 and small.image.shape == small.masks["m"].shape == (736, 480)
  np.testing.assert_array_equal(small.image, mammo.downsample(full.image, 4))
  np.testing.assert_array_equal(small.masks["m"], mammo.downsample_mask(full.masks["m"], 4))
  assert small.masks["m"].sum() > 0
  with pytest.raises(ValueError, match=r"out_shape \(1472, 961\) must be"):
    mammo.preprocess_view(image, view="R-CC", out_shape=(1472, 961))
  with pytest.raises(ValueError, match="out_shape"):
    mammo.preprocess_view(image, view="R-CC", out_shape=(1000, 480))


def test_final_masks_are_used_as_they_are():
  image = _breast("left")
  mask = np.zeros((2944, 1920), np.uint8)
  mask[100:110, 4:8] = 255
  out = mammo.preprocess_view(image, view="R-CC", masks={"benign": mask},
                              mask_geometry="final")
  np.testing.assert_array_equal(out.masks["benign"], mask > 0)  # neither flipped nor moved
  small = mammo.preprocess_view(image, view="R-CC", masks={"benign": mask},
                                mask_geometry="final", out_shape=(1472, 960))
  assert small.masks["benign"].shape == (1472, 960) and small.masks["benign"].sum() == 10
  with pytest.raises(ValueError, match="mask 'benign': shape"):
    mammo.preprocess_view(image, view="R-CC", masks={"benign": mask[:-1]},
                          mask_geometry="final")
  with pytest.raises(ValueError, match="mask 'lesion': shape"):
    mammo.preprocess_view(image, view="R-CC", masks={"lesion": mask})  # raw geometry
  with pytest.raises(ValueError, match="mask_geometry must be one of"):
    mammo.preprocess_view(image, view="R-CC", masks={"lesion": mask}, mask_geometry="cropped")


def test_standardize():
  out = mammo.standardize(np.array([[0, 1], [2, 3]], np.uint16))
  # mean 1.5, std sqrt(1.25)
  np.testing.assert_allclose(out, (np.array([[0, 1], [2, 3]]) - 1.5) / np.sqrt(1.25), rtol=1e-6)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(mammo.standardize(np.full((3, 3), 7, np.uint16)), 0)


def test_downsample_and_downsample_mask():
  x = np.arange(16, dtype=np.float32).reshape(4, 4)
  np.testing.assert_array_equal(mammo.downsample(x, 2), [[2.5, 4.5], [10.5, 12.5]])
  u = np.array([[0, 1, 4, 4], [1, 1, 4, 5]], np.uint16)
  np.testing.assert_array_equal(mammo.downsample(u, 2), [[1, 4]])  # 0.75 -> 1, 4.25 -> 4
  assert mammo.downsample(u, 2).dtype == np.uint16
  m = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]], np.uint8)  # 2, 1, 1 set of 4
  np.testing.assert_array_equal(mammo.downsample_mask(m, 2), [[1, 0, 0]])
  np.testing.assert_array_equal(mammo.downsample_mask(m, 2, rule="any"), [[1, 1, 1]])
  with pytest.raises(ValueError, match="positive integer"):
    mammo.downsample(x, 1.5)
  with pytest.raises(ValueError, match="not divisible"):
    mammo.downsample(x, 3)
  with pytest.raises(ValueError, match="rule"):
    mammo.downsample_mask(m, 2, rule="mean")


# ---------------------------------------------------------------------------------------------
# Reading


def test_read_mammogram_png(tmp_path):
  a16 = np.array([[0, 4095], [65535, 7]], np.uint16)
  Image.fromarray(a16.astype("<u2")).save(tmp_path / "a.png")
  out = mammo.read_mammogram(tmp_path / "a.png")
  np.testing.assert_array_equal(out, a16)
  assert out.dtype == np.uint16
  a8 = np.array([[0, 255]], np.uint8)
  Image.fromarray(a8).save(tmp_path / "b.png")
  np.testing.assert_array_equal(mammo.read_mammogram(tmp_path / "b.png"), [[0, 255]])
  Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
  with pytest.raises(ValueError, match=r"rgb\.png: a mammogram must be a grey"):
    mammo.read_mammogram(tmp_path / "rgb.png")
  with pytest.raises(FileNotFoundError, match="nope.png"):
    mammo.read_mammogram(tmp_path / "nope.png")


def test_read_mammogram_dicom_then_crop(tmp_path):
  stored = np.zeros((40, 30), np.uint16)
  stored[5:35, :20] = 1000 + np.arange(600).reshape(30, 20)  # 12-bit breast, background 0
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality = "MG"
  ds.Rows, ds.Columns = stored.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  ds.PixelData = stored.astype("<u2").tobytes()
  path = tmp_path / "mg.dcm"
  ds.save_as(path, enforce_file_format=True)
  assert pydicom.dcmread(path).Modality == "MG"
  out = mammo.read_mammogram(path)
  assert out.dtype == np.uint16
  # No window: the full range [0, 1599] onto 0..65535, background stays 0.
  np.testing.assert_array_equal(out, np.rint(stored / 1599 * 65535).astype(np.uint16))
  crop = mammo.crop_mammogram(out, "L-CC", iterations=2, buffer_size=1)
  assert crop.window == mammo.crop_mammogram(stored, "L-CC", iterations=2,
                                             buffer_size=1).window == (4, 36, 0, 21)


# ---------------------------------------------------------------------------------------------
# The real NYU sample


@needs_glam_sample
@pytest.mark.parametrize("view", ["R-CC", "R-MLO"])
def test_real_sample_benign_mask_lies_on_the_breast(view):
  image = mammo.read_mammogram(os.path.join(GLAM_SAMPLE, "images", f"0_{view}.png"))
  mask = np.asarray(Image.open(os.path.join(GLAM_SAMPLE, "segmentation",
                                            f"0_{view}_benign.png")))
  out = mammo.preprocess_view(image, view=view, masks={"benign": mask}, mask_geometry="final")
  # Golden values from running the reference code (nyukat/GLAM 17a0019: crop_mammogram.py,
  # get_optimal_centers.py, loading.py) on these files.
  want = {"R-CC": ((0, 2144, 0, 801), (1072, -210), (-400, 0)),
          "R-MLO": ((0, 2650, 0, 1006), (1126, -5), (0, 0))}[view]
  assert (out.crop.window, out.best_center, out.offsets) == want and out.flipped
  lesion = out.masks["benign"].astype(bool)
  assert lesion.sum() == (mask > 0).sum() > 10000
  assert (out.image[lesion] > 0).all()  # never on the zero background or padding
  z = mammo.standardize(out.image)
  breast = out.image > 0
  assert z[lesion].mean() > z[breast].mean() + 0.2 > z.mean() + 0.2  # a dense lesion
  # The unflipped geometry would put the mask on the background: the flip matters.
  assert (out.image[np.fliplr(lesion)] == 0).mean() > 0.99
