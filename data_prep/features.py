"""Feature mode of the missing_modality method: every tile embedded once by a frozen encoder.

    python -m data_prep.features --dataset=synthetic_bags --encoder=random:tiny_cnn
    python -m data_prep.features --dataset=bcnb --encoder=/runs/ssl/pretrain --tag=bcnb_ssl

reads a prepared 'bags' dataset (data/bags.py), gathers each slide's tiles from all its bags
(each tile once, by its position), embeds them with the encoder, and writes the TFDS dataset
`bag_features:<tag>` (ArrayRecord, 'feature_bags' layout): one record per slide, the
features padded to a bucketed size (bags.BUCKETS) with a mask. In feature mode a bag is the
whole slide; build the cohort with `--option bag_size=0` (one bag per slide) so that no tile
is left out, as BALNMP's 10-tile bags drop a slide's remainder.

The encoder is
  * a finished stage of this codebase whose model returns 'features' (e.g. the ssl
    pretraining stage): a stage directory (WORKDIR/STAGE, with results.json) or a workdir
    (its default stage). Tiles are decoded by that stage's task as it decoded its own
    images (its image size, channels and normalisation), features = model(...)['features'];
  * `random:<encoder>[@seed]`, a freshly initialised encoder of models/resnet.py (for tests
    and as a baseline), tiles at `--image_size` (default: their own size), DEFAULT_NORM.

The dataset's metadata 'encoder' records which encoder made the features and the sha256 of
its parameters (param_sources.content_hash), so two feature sets are comparable only when
their hashes are equal. Exit codes as data_prep.build: 0 done, 2 bad usage, 1 broken input.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from typing import Callable, Iterator

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from medguide_jax.data import bags, builders, images

_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class FrozenEncoder:
  """embed(list of encoded tiles) -> float32 [n, D]; info = {name, source, sha256, ...}."""
  embed: Callable[[list[bytes]], np.ndarray]
  info: dict


def _tile_record(tile: bytes) -> dict:
  return {"image": tile, "label": np.int64(-1), "source": "histology", "id": ""}


def _batched(fn, decode, batch_size: int):
  import jax  # pylint: disable=g-import-not-at-top
  jitted = jax.jit(fn)

  def embed(tiles: list[bytes]) -> np.ndarray:
    out = []
    for i in range(0, len(tiles), batch_size):
      chunk = np.stack([decode(t) for t in tiles[i:i + batch_size]])
      n = len(chunk)
      if n < batch_size:  # one compiled shape: pad the last batch
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
      out.append(np.asarray(jitted(chunk), np.float32)[:n])
    return np.concatenate(out)
  return embed


def load_encoder(spec: str, *, image_size: int = 0, batch_size: int = 64) -> FrozenEncoder:
  """The frozen encoder named by `spec` (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from medguide_jax import param_sources  # pylint: disable=g-import-not-at-top
  from medguide_jax.data import multicrop  # pylint: disable=g-import-not-at-top

  def digest(variables) -> str:
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    return param_sources.content_hash(flat)

  if spec.startswith("random:"):
    from medguide_jax.models import resnet  # pylint: disable=g-import-not-at-top
    name, _, seed = spec[len("random:"):].partition("@")
    try:
      seed = int(seed or 0)
      module = resnet.get_encoder(name)
    except ValueError as e:
      raise ValueError(f"--encoder={spec}: {e} (random:<encoder>[@seed])") from None

    def decode(tile: bytes) -> np.ndarray:
      size = image_size or images_size(tile)
      return multicrop.single_image_example(_tile_record(tile), None, image_size=size,
                                            channels=3, norm={})["image"]
    probe = image_size or 32  # global pooling: the parameters do not depend on the size
    variables = module.init(jax.random.PRNGKey(seed),
                            np.zeros((1, probe, probe, 3), np.float32), train=False)
    fn = lambda x: module.apply(variables, x, train=False)
    info = {"name": spec, "source": "random", "encoder": name, "seed": seed,
            "image_size": image_size, "sha256": digest(variables)}
    return FrozenEncoder(_batched(fn, decode, batch_size), info)

  from medguide_jax import evaluate  # pylint: disable=g-import-not-at-top
  path = epath.Path(os.path.expanduser(spec))
  if (path / "results.json").exists():
    workdir, stage = path.parent, path.name
  elif (path / "config.json").exists():
    workdir, stage = path, None
  else:
    raise FileNotFoundError(f"--encoder={spec}: neither a finished stage directory (with "
                            "results.json) nor a workdir (with config.json), nor random:<name>")
  run = evaluate.load_run(workdir, stage)
  task = run.task

  def decode_stage(tile: bytes) -> np.ndarray:
    return task.example_fn(_tile_record(tile), None, augment=False)["image"]

  def fn(x):
    out = run.model.apply(run.variables, {"image": x}, train=False)
    if not isinstance(out, dict) or "features" not in out:
      raise ValueError(f"--encoder={spec}: stage {run.stage!r}'s model returns no "
                       "'features'; use a stage whose model embeds images (e.g. ssl's)")
    return out["features"]
  info = {"name": f"{workdir}/{run.stage}", "source": "stage", "stage": run.stage,
          "method": run.config.get("method", ""), "image_size": run.config.data.image_size,
          "sha256": digest(run.variables)}
  return FrozenEncoder(_batched(fn, decode_stage, batch_size), info)


def images_size(tile: bytes) -> int:
  """The side of an encoded square tile."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(tile)) as im:
    return im.size[0]


def slides_of(source) -> dict[str, dict]:
  """{slide: {'tiles': [bytes], 'xy': [(x, y)], clinical, label, patient}} from bag
  records, each tile once (by position; a tile in two bags is one tile), row by row."""
  out: dict[str, dict] = {}
  for i in range(len(source)):
    r = source[i]
    slide = images.text(r["slide"])
    entry = out.setdefault(slide, {"tiles": [], "xy": [], "seen": set(),
                                   "clinical": np.asarray(r["clinical"], np.float32),
                                   "label": int(r["label"]),
                                   "patient": images.text(r["patient"])})
    for tile, xy in zip(r["tiles"], np.asarray(r["tile_xy"]).reshape(-1, 2)):
      key = (int(xy[0]), int(xy[1]))
      if key[0] < 0 or key not in entry["seen"]:
        entry["seen"].add(key)
        entry["tiles"].append(tile)
        entry["xy"].append(key)
  for entry in out.values():
    del entry["seen"]
    if all(x >= 0 for x, _ in entry["xy"]):  # row by row, whatever order the bags came in
      order = sorted(range(len(entry["xy"])), key=lambda j: entry["xy"][j][::-1])
      entry["tiles"] = [entry["tiles"][j] for j in order]
      entry["xy"] = [entry["xy"][j] for j in order]
  return out


@dataclasses.dataclass(eq=False)
class BagFeaturesConfig(tfds.core.BuilderConfig):
  """One feature set (name = tag): which bag dataset, which encoder."""
  dataset: str | None = None
  encoder: str | None = None
  image_size: int = 0
  batch_size: int = 64

  def options(self) -> dict:
    return {"dataset": self.dataset, "encoder": self.encoder,
            "image_size": self.image_size, "batch_size": self.batch_size}


# skip_registration: `python -m data_prep.features` runs this file as __main__ and then
# imports it again through the registry (builders.DATASETS), which would register the class
# twice in TFDS; the project finds builders through its own registry only.
class BagFeatures(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Per-slide feature bags (module docstring): `bag_features:<tag>`."""

  name = "bag_features"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [BagFeaturesConfig(name="default", description="An untagged set.")]

  def __init__(self, *, tag: str | None = None, dataset: str | None = None,
               encoder: str | None = None, image_size: int | None = None,
               batch_size: int | None = None, **kwargs):
    """Usual TFDS kwargs plus the tag and the feature set's options (None: the defaults
    when building, what the tag was built with when it is prepared).

    Args:
      tag: the feature set's name (letters, digits, '_', '-', '.').
      dataset: the prepared 'bags' dataset whose tiles are embedded, e.g. 'synthetic_bags'.
      encoder: a finished stage dir, a workdir, or 'random:<encoder>[@seed]'.
      image_size: random encoders: tiles resized to this side (0: their own size).
      batch_size: tiles per encoder call.
    """
    name = "default" if tag is None else str(tag)
    if not _TAG_RE.match(name):
      raise ValueError(f"bag_features tag {name!r}: use letters, digits, '_', '-' and '.'")
    given = {"dataset": dataset, "encoder": encoder,
             "image_size": None if image_size is None else int(image_size),
             "batch_size": None if batch_size is None else int(batch_size)}
    given = {k: v for k, v in given.items() if v is not None}
    options = builders.tagged_options(type(self), kwargs.get("data_dir"), name, given,
                                      BagFeaturesConfig(name=name).options())
    if options["batch_size"] < 1 or options["image_size"] < 0:
      raise ValueError(f"batch_size must be >= 1 and image_size >= 0, got {options}")
    kwargs["config"] = BagFeaturesConfig(name=name, description=f"Feature set {name!r}.",
                                         **options)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=bags.feature_bag_features(), description=__doc__,
        metadata=tfds.core.MetadataDict(options=self.builder_config.options(), encoder={},
                                        class_names=[], clinical_names=[], task="",
                                        feature_dim=0, summary={}))

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    if not cfg.dataset or not cfg.encoder:
      raise ValueError(f"bag_features:{cfg.name} is not prepared: give dataset= and "
                       "encoder= to build it (python -m data_prep.features --help)")
    if sources_layout(cfg.dataset) != "bags":
      raise ValueError(f"dataset {cfg.dataset!r} is not a bag dataset (layout "
                       f"{sources_layout(cfg.dataset)!r}); feature mode embeds 'bags' records")
    source_builder = builders.prepare(cfg.dataset, data_dir=os.fspath(self.data_dir_root))
    encoder = load_encoder(cfg.encoder, image_size=cfg.image_size, batch_size=cfg.batch_size)
    meta = source_builder.info.metadata or {}
    self.info.metadata.update(encoder=encoder.info,
                              class_names=list(meta.get("class_names", [])),
                              clinical_names=list(meta.get("clinical_names", [])),
                              task=meta.get("task", ""), source_dataset=cfg.dataset)
    self._stats = {"tiles": 0, "seconds": 0.0}
    return {split: self._generate_examples(
                source_builder.as_data_source(split=split), encoder, split)
            for split in source_builder.info.splits}

  def _generate_examples(self, source, encoder: FrozenEncoder, split: str
                         ) -> Iterator[tuple[str, dict]]:
    per_slide = slides_of(source)
    logging.info("bag_features %s: embedding %d slides of %s", split, len(per_slide), split)
    for slide, entry in per_slide.items():
      start = time.perf_counter()
      x = encoder.embed(entry["tiles"])
      self._stats["seconds"] += time.perf_counter() - start
      self._stats["tiles"] += len(x)
      self.info.metadata["feature_dim"] = int(x.shape[1])
      padded, mask = bags.pad_features(x, bags.bucket(len(x)))
      yield slide, {"features": padded, "mask": mask, "num_tiles": np.int64(len(x)),
                    "encoder": encoder.info["sha256"],
                    "clinical": entry["clinical"], "label": np.int64(entry["label"]),
                    "patient": entry["patient"], "slide": slide, "id": slide}
    self.info.metadata["summary"] = {
        "tiles": self._stats["tiles"],
        "tiles_per_s": round(self._stats["tiles"] / max(self._stats["seconds"], 1e-9), 1)}


def sources_layout(name: str) -> str:
  from medguide_jax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.layout(name)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m data_prep.features",
                                   description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", required=True, help="a prepared 'bags' dataset")
  parser.add_argument("--encoder", required=True,
                      help="a finished stage dir, a workdir, or random:<encoder>[@seed]")
  parser.add_argument("--tag", default=None,
                      help="the feature set's name (default: <dataset>_<encoder>)")
  parser.add_argument("--data_dir", default=None, help="default $MEDGUIDE_DATA_DIR")
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--rebuild", action="store_true")
  return parser


def default_tag(dataset: str, encoder: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset}_{encoder}").strip("_")[:100]


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  tag = args.tag or default_tag(args.dataset, os.path.basename(args.encoder.rstrip("/")))
  if args.dataset.partition(":")[0] not in builders.DATASETS:
    parser.error(f"unknown dataset {args.dataset!r}; valid names: {sorted(builders.DATASETS)}")
  if sources_layout(args.dataset) != "bags":
    parser.error(f"--dataset={args.dataset} is not a bag dataset (layout "
                 f"{sources_layout(args.dataset)!r})")
  spec = args.encoder
  if not spec.startswith("random:") and not os.path.isdir(os.path.expanduser(spec)):
    parser.error(f"--encoder={spec}: no such directory (a stage dir, a workdir, or "
                 "random:<encoder>[@seed])")
  try:
    builder = builders.prepare(f"bag_features:{tag}", data_dir=args.data_dir,
                               rebuild=args.rebuild, dataset=args.dataset, encoder=spec,
                               image_size=args.image_size, batch_size=args.batch_size)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  meta = builder.info.metadata
  for split in builder.info.splits:
    print(f"{split}: {builder.info.splits[split].num_examples} slides")
  print(f"encoder {meta['encoder'].get('name')} sha256 {meta['encoder'].get('sha256')}; "
        f"feature_dim {meta['feature_dim']}; {meta['summary']}")
  print(f"prepared {builder.info.full_name} in {builder.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
