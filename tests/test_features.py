"""Feature mode (data_prep.features): every tile of a slide embedded once by a frozen encoder."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from data_prep import features
from medguide_jax import param_sources, train
from medguide_jax.data import bags, builders, images, multicrop, sources
from medguide_jax.models import resnet
from tests.test_ssl import tiny_pretrain

TILE = 16


def _slide_tiles(split: int, i: int) -> list[np.ndarray]:
  rng = np.random.default_rng([split, i])
  return [rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)
          for _ in range(int(rng.integers(3, 40)))]


class ToyBags(bags.BagBuilder):
  """Slides of 3-39 random tiles; bag_size 0 (one bag per slide) except slide 0 of train,
  whose tiles come in two overlapping bags (a tile in two bags is one tile)."""
  name = "toy_bags_for_features"

  def _split_generators(self, dl_manager):
    del dl_manager
    self.info.metadata.update(class_names=["n0", "n+"], clinical_names=["age"], task="0",
                              bag_size=0, tile_size=TILE, summary={})
    return {"train": self._generate_examples(0, 5), "test": self._generate_examples(1, 3)}

  def _generate_examples(self, split: int, n: int):
    for i in range(n):
      tiles = [images.encode_png(t) for t in _slide_tiles(split, i)]
      xy = [(TILE * j, 0) for j in range(len(tiles))]
      groups = [range(len(tiles))] if (split, i) != (0, 0) else [range(0, 3), range(1, len(tiles))]
      for k, members in enumerate(groups):
        r = bags.bag_record([tiles[j] for j in members], [xy[j] for j in members], [0.5 * i],
                            i % 2, patient=f"p{split}_{i}", slide=f"s{split}_{i}", bag=k)
        yield r["id"], r


@pytest.fixture(autouse=True)
def _toy_registered(monkeypatch):
  monkeypatch.setitem(builders._REGISTRY, ToyBags.name, f"{__name__}:ToyBags")
  monkeypatch.setitem(sources.LAYOUTS, ToyBags.name, "bags")


def _records(builder, split):
  source = builder.as_data_source(split=split)
  return {images.text(r["slide"]): r for r in (source[i] for i in range(len(source)))}


def test_a_random_encoder_embeds_every_tile_once_padded_to_its_bucket(tmp_path):
  rc = features.main([f"--dataset={ToyBags.name}", "--encoder=random:tiny_cnn@3",
                      f"--data_dir={tmp_path}", "--tag=toy", "--batch_size=8"])
  assert rc == 0
  built = builders.prepare("bag_features:toy", data_dir=tmp_path)  # reused: options stored
  meta = built.info.metadata
  module = resnet.get_encoder("tiny_cnn")
  variables = module.init(jax.random.PRNGKey(3), np.zeros((1, 32, 32, 3), np.float32),
                          train=False)
  sha = param_sources.content_hash(traverse_util.flatten_dict(variables, sep="/"))
  assert meta["encoder"]["sha256"] == sha and meta["encoder"]["name"] == "random:tiny_cnn@3"
  assert meta["class_names"] == ["n0", "n+"] and meta["clinical_names"] == ["age"]
  assert meta["feature_dim"] == resnet.feature_dim("tiny_cnn")
  for split, n in (("train", 5), ("test", 3)):
    records = _records(built, split)
    assert sorted(records) == [f"s{split == 'test':d}_{i}" for i in range(n)]
    for i in range(n):
      r = records[f"s{split == 'test':d}_{i}"]
      tiles = _slide_tiles(split == "test", i)
      assert r["num_tiles"] == len(tiles) and images.text(r["encoder"]) == sha
      assert r["features"].shape == (bags.bucket(len(tiles)), meta["feature_dim"])
      np.testing.assert_array_equal(r["mask"], np.arange(len(r["mask"])) < len(tiles))
      x = np.stack([multicrop.single_image_example(
          {"image": images.encode_png(t), "label": 0, "source": "histology"}, None,
          image_size=TILE, channels=3, norm={})["image"] for t in tiles])
      want = np.asarray(module.apply(variables, x, train=False))
      np.testing.assert_allclose(r["features"][:len(tiles)], want, rtol=1e-5, atol=1e-5)
      assert not r["features"][len(tiles):].any()
      assert r["label"] == i % 2 and images.text(r["patient"]) == f"p{split == 'test':d}_{i}"


def test_an_ssl_pretraining_stage_is_a_frozen_encoder(tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_pretrain(steps=2), str(workdir))
  stage = workdir / "pretrain"
  rc = features.main([f"--dataset={ToyBags.name}", f"--encoder={stage}",
                      f"--data_dir={tmp_path / 'data'}", "--tag=ssl"])
  assert rc == 0
  built = builders.prepare("bag_features:ssl", data_dir=tmp_path / "data")
  from medguide_jax import evaluate  # pylint: disable=g-import-not-at-top
  run = evaluate.load_run(workdir, "pretrain")
  assert built.info.metadata["encoder"]["sha256"] == param_sources.content_hash(
      traverse_util.flatten_dict(jax.device_get(run.variables), sep="/"))
  r = _records(built, "test")["s1_0"]
  tiles = _slide_tiles(1, 0)
  x = np.stack([run.task.example_fn({"image": images.encode_png(t), "label": -1,
                                     "source": "histology"}, None, augment=False)["image"]
                for t in tiles])
  want = run.model.apply(run.variables, {"image": x}, train=False)["features"]
  np.testing.assert_allclose(r["features"][:len(tiles)], want, rtol=1e-4, atol=1e-5)


def test_bad_feature_requests_exit_2_before_anything_is_written(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    features.main(["--dataset=synthetic_paired", "--encoder=random:tiny_cnn",
                   f"--data_dir={tmp_path}"])
  assert e.value.code == 2 and "not a bag dataset" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    features.main([f"--dataset={ToyBags.name}", f"--encoder={tmp_path / 'nowhere'}",
                   f"--data_dir={tmp_path}"])
  assert e.value.code == 2 and "nowhere" in capsys.readouterr().err
  assert features.main([f"--dataset={ToyBags.name}", "--encoder=random:no_such_net",
                        f"--data_dir={tmp_path}", "--tag=bad"]) == 1
  assert "no_such_net" in capsys.readouterr().err
  assert not (tmp_path / "bag_features").exists() or not any(
      (tmp_path / "bag_features").rglob("*.array_record*"))
