"""Whole-slide reading and BALNMP tiling against hand-made slides and the real Aperio sample."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from PIL import Image

from medguide_jax.data import slides
from tests import helpers

SHARED = os.environ.get("MEDGUIDE_SHARED_DATA", str(helpers.ROOT.parent / "shared" / "data"))
SVS = glob.glob(os.path.join(SHARED, "histo_samples", "wsi", "*.svs"))


def _pattern(h: int, w: int) -> np.ndarray:
  yy, xx = np.mgrid[0:h, 0:w]
  return np.stack([(xx // 4) % 250, (yy // 4) % 250, ((xx + yy) // 8) % 250], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
  """A 3-level tiled TIFF (downsamples 1, 2, 4), as scanners write pyramids."""
  tifffile = pytest.importorskip("tifffile")
  pytest.importorskip("openslide")
  img = _pattern(1024, 768)
  path = str(tmp_path_factory.mktemp("slides") / "pyramid.tif")
  with tifffile.TiffWriter(path) as tif:
    for k in range(3):
      tif.write(img[::2**k, ::2**k], tile=(256, 256), photometric="rgb",
                subfiletype=0 if k == 0 else 1)
  return path, img


def test_a_pyramidal_tiff_reads_every_level_through_openslide(pyramid):
  path, img = pyramid
  slide = slides.open_slide(path)
  assert slide.level_count == 3 and slide.level_downsamples == (1.0, 2.0, 4.0)
  assert slide.dimensions == (768, 1024)
  # location is in level-0 pixels; size in the level's pixels
  np.testing.assert_array_equal(slide.read_region((64, 128), 1, (100, 50)),
                                img[::2, ::2][64:114, 32:132])
  np.testing.assert_array_equal(slide.read_region((0, 0), 2, (192, 256)), img[::4, ::4])
  assert [slides.level_for(slide, downsample=d) for d in (1, 1.9, 2, 3, 8)] == [0, 0, 1, 1, 2]


def test_magnification_needs_the_objective_power(pyramid):
  slide = slides.open_slide(pyramid[0])
  with pytest.raises(slides.SlideError, match="no objective power"):
    slides.level_for(slide, magnification=10)
  slide.properties["openslide.objective-power"] = "40"
  assert slides.level_for(slide, magnification=20) == 1  # 40x / 20x = downsample 2
  assert slides.level_for(slide, magnification=5) == 2   # 8 wanted, 4 is the coarsest


def test_a_jpeg_slide_reads_through_pillow_with_a_raised_pixel_bound(tmp_path, monkeypatch):
  img = _pattern(300, 500)
  path = tmp_path / "slide.png"
  Image.fromarray(img).save(path)
  slide = slides.open_slide(path)
  assert slide.dimensions == (500, 300) and slide.level_count == 1
  np.testing.assert_array_equal(slide.read_region((10, 20), 0, (40, 30)), img[20:50, 10:50])
  edge = slide.read_region((480, 290), 0, (40, 30))  # past the border: white
  np.testing.assert_array_equal(edge[:10, :20], img[290:, 480:])
  assert (edge[10:] == 255).all() and (edge[:, 20:] == 255).all()
  assert Image.MAX_IMAGE_PIXELS != slides.MAX_SLIDE_PIXELS  # raised for slides only
  monkeypatch.setattr(slides, "MAX_SLIDE_PIXELS", 1000)
  with pytest.raises(slides.SlideError, match="more than MAX_SLIDE_PIXELS=1000"):
    slides.open_slide(path)


def test_bad_slides_name_the_file(tmp_path):
  with pytest.raises(slides.SlideError, match="no such file"):
    slides.open_slide(tmp_path / "absent.svs")
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(slides.SlideError, match="unknown slide format '.txt'"):
    slides.open_slide(tmp_path / "notes.txt")
  (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(slides.SlideError, match="broken.jpg: cannot open"):
    slides.open_slide(tmp_path / "broken.jpg")


def test_balnmps_white_fraction_counts_channel_values_and_discards_at_the_threshold():
  tile = np.zeros((4, 4, 3), np.uint8)
  tile[:2] = 255  # half the pixels white
  assert slides.white_fraction(tile) == 0.5 == slides.white_fraction(tile, "pixels")
  yellow = np.zeros((4, 4, 3), np.uint8)
  yellow[..., :2] = 255  # (255, 255, 0): no white pixel, but 2 of 3 channels at 255
  assert slides.white_fraction(yellow) == pytest.approx(2 / 3)
  assert slides.white_fraction(yellow, "pixels") == 0.0
  assert not slides.keep_tile(yellow) and slides.keep_tile(yellow, rule="pixels")
  exact = np.zeros((10, 10, 3), np.uint8)
  exact.reshape(-1, 3)[:30] = 255  # exactly 0.3: BALNMP discards at >=
  assert slides.white_fraction(exact) == pytest.approx(0.3)
  assert not slides.keep_tile(exact)
  exact.reshape(-1, 3)[29] = 0
  assert slides.keep_tile(exact)


def test_a_polygon_region_is_white_outside_padded_and_tiled(tmp_path):
  img = _pattern(700, 900)
  img[img == 255] = 254  # so that 'white' below means 'filled'
  path = tmp_path / "slide.jpg"
  Image.fromarray(img).save(path, quality=100)
  slide = slides.open_slide(path)
  triangle = [(100, 100), (700, 100), (100, 500)]  # (x, y)
  region, origin = slides.polygon_region(slide, triangle)
  assert origin == (100, 100) and region.shape == (400, 600, 3)
  assert (region[390, 590] == 255).all()          # outside the triangle: white
  assert not (region[10, 10] == 255).all()         # inside: the slide's pixels
  padded = slides.pad_to_multiple(region)
  assert padded.shape == (512, 768, 3) and (padded[400:] == 255).all()
  tiles = slides.region_tiles(region, origin)
  assert (100, 100) in [(t.x, t.y) for t in tiles]        # the full corner tile is kept
  assert (612, 356) not in [(t.x, t.y) for t in tiles]    # the padded far corner is not
  assert all(t.pixels.shape == (256, 256, 3) and slides.keep_tile(t.pixels) for t in tiles)
  with pytest.raises(slides.SlideError, match="outside the image"):
    slides.polygon_region(slide, [(800, 600), (950, 600), (800, 650)])


def test_bags_are_drawn_once_seeded_and_drop_the_remainder():
  bags = slides.make_bags(35, seed=8888)
  assert len(bags) == 3 and all(len(b) == 10 for b in bags)
  flat = [i for b in bags for i in b]
  assert len(set(flat)) == 30 and set(flat) <= set(range(35))
  assert bags == slides.make_bags(35, seed=8888) and bags != slides.make_bags(35, seed=1)
  assert slides.make_bags(9, seed=0) == []
  # bag_size=0: the whole slide is one bag (feature mode reads such datasets)
  assert slides.make_bags(7, bag_size=0, seed=3) == [list(range(7))]
  assert slides.make_bags(0, bag_size=0, seed=3) == []
  with pytest.raises(ValueError, match="bag_size=-1"):
    slides.make_bags(7, bag_size=-1, seed=3)


def test_tissue_is_found_on_a_blob_on_white(tmp_path):
  img = np.full((1024, 1024, 3), 245, np.uint8)
  yy, xx = np.mgrid[0:1024, 0:1024]
  blob = (yy - 300) ** 2 + (xx - 600) ** 2 < 200 ** 2
  img[blob] = (200, 80, 160)  # H&E-ish pink: saturated
  path = tmp_path / "slide.png"
  Image.fromarray(img).save(path)
  slide = slides.open_slide(path)
  mask = slides.tissue_mask(slide.thumbnail(256))
  assert abs(mask.mean() - blob.mean()) < 0.02
  tiles = slides.tissue_tiles(slide, tile=128, min_tissue=0.9)
  assert tiles and all(blob[y + 64, x + 64] for x, y in tiles)
  blank = tmp_path / "blank.png"
  Image.fromarray(np.full((256, 256, 3), 250, np.uint8)).save(blank)
  assert slides.tissue_tiles(slides.open_slide(blank)) == []


@pytest.mark.skipif(not SVS, reason=f"no .svs sample under {SHARED}/histo_samples/wsi")
def test_the_real_aperio_slide_reads_and_tiles_its_tissue():
  slide = slides.open_slide(SVS[0])
  assert slide.dimensions == (2220, 2967) and slide.level_count == 1
  assert slide.properties["openslide.objective-power"] == "20"
  tiles = slides.tissue_tiles(slide, tile=256, min_tissue=0.5)
  grid = (2220 // 256) * (2967 // 256)
  assert 0.2 * grid < len(tiles) < 0.95 * grid
  x, y = tiles[0]
  pixels = slide.read_region((x, y), 0, (256, 256))
  assert pixels.shape == (256, 256, 3) and slides.keep_tile(pixels, rule="pixels")


def test_reading_slides_in_threads_leaves_pillows_bound_as_it_was(tmp_path):
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  paths = []
  for i in range(8):
    paths.append(tmp_path / f"slide{i}.png")
    Image.fromarray(_pattern(64 + i, 80)).save(paths[-1])
  before = Image.MAX_IMAGE_PIXELS
  with futures.ThreadPoolExecutor(8) as pool:
    shapes = list(pool.map(lambda p: slides.open_slide(p).pixels().shape, paths * 8))
  assert shapes[:8] == [(64 + i, 80, 3) for i in range(8)]
  assert Image.MAX_IMAGE_PIXELS == before != slides.MAX_SLIDE_PIXELS
