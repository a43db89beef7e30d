r"""Throughput of a stage's training step and of its input pipeline, as one JSON line.

  python -m medguide_jax.benchmark \
      --config=configs/guidance.py:dataset=synthetic,size=cpu,stages=inferior \
      --config.data.image_size=128 [--stage=inferior] [--steps=20]

Fields: examples_per_sec and step_time_sec of the jitted train step (on a device-resident
batch, after warm-up), compile_time_sec, flops_per_step (XLA's cost analysis of the compiled
step), peak_flops_per_sec (a measured float32 matmul on this device), mfu (= flops_per_step /
step_time / peak), pipeline_examples_per_sec (the grain pipeline alone, decode + augment +
batch), pipeline_to_step_ratio, peak_host_memory_gb.

SwAV: `--config=configs/ssl_pretrain.py:size=paper` times the ResNet-50 2x224 + 6x96 step
(`:size=cpu` the CPU-sized one; lower --config.stages.pretrain.batch_size to fit), and
`--sinkhorn_batches=256,4096` adds Sinkhorn's cost at K = model.num_prototypes.

missing_modality: `--config=configs/missing_modality.py --stage=bd` adds tiles_per_bag and
tiles_per_sec (examples are bags; `:features` for feature mode). Its data: `--bags=synthetic_bags` (any prepared 'bags' dataset; no --config)
times BALNMP tiling of a generated 4096x4096 JPEG slide (polygon crop, white padding, the
white-fraction rule: tiling_tiles_per_sec), feature extraction with `--bag_encoder`
(default random:tiny_cnn, or a finished stage dir; features_tiles_per_sec, after a warm-up
call) and the grain pipeline of bag batches (decode + augment of 10-tile bags:
pipeline_bags_per_sec at --bag_batch_size).

hybridmed's text side: `--text=synthetic_cxr` (any prepared 'cxr_reports' dataset, e.g.
iu_xray_text; no --config) times its tokenizer over the training split's findings and
impressions (tokenizer_texts_per_sec, tokenizer_tokens_per_sec), a training step (forward and
backward) of a text encoder and of the summariser decoder at --text_size (small: 256 wide, 4
layers; base: BERT-base, 768 wide, 12 layers; decoder half as deep) on --text_batch_size
reports of the tokenizer's max_len (encoder_sequences_per_sec, decoder_sequences_per_sec),
and greedy decoding of max_len tokens with the KV cache and without it (the full causal
forward re-run for every token): decode_tokens_per_sec, decode_tokens_per_sec_no_cache,
kv_cache_speedup, and decode_agree (both gave the same tokens).

GLAM: `--config=configs/glam.py:size=full --stage=joint --inference` times a training step
and the full-resolution inference (global module, patch selection, local module and the
2944x1920 fused map) at the stage's eval batch size. `step_memory_gb` / `inference_memory_gb`
are XLA's memory analysis of the compiled programs (arguments + outputs + temporaries, per
device), `peak_device_memory_gb` the accelerator's own peak where it reports one.
"""
from __future__ import annotations

import json
import tempfile
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from medguide_jax import parallel, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config[:arg].",
                                          lock_config=True)
_STAGE = flags.DEFINE_string("stage", "", "Stage to time (default: the first in run order).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 3 warm-up steps).")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 30, "Batches to time the input.")
_INFERENCE = flags.DEFINE_bool(
    "inference", False, "Also time the task's predict step (eval mode) on one eval batch.")
_BAGS = flags.DEFINE_string("bags", "", "A prepared 'bags' dataset: time tiling, feature "
                            "extraction and its bag input pipeline instead of a stage.")
_BAG_ENCODER = flags.DEFINE_string("bag_encoder", "random:tiny_cnn",
                                   "--bags: the frozen encoder of feature extraction.")
_BAG_BATCH = flags.DEFINE_integer("bag_batch_size", 8, "--bags: bags per pipeline batch.")
_TEXT = flags.DEFINE_string("text", "", "A prepared 'cxr_reports' dataset: time its tokenizer, "
                            "a text encoder and decoder step and decoding instead of a stage.")
_TEXT_SIZE = flags.DEFINE_enum("text_size", "small", ["small", "base"],
                               "--text: the text towers' size.")
_TEXT_BATCH = flags.DEFINE_integer("text_batch_size", 16, "--text: reports per step.")
_SINKHORN = flags.DEFINE_list(
    "sinkhorn_batches", [], "ssl: also cost Sinkhorn (K = model.num_prototypes, 2 assign crops) "
    "at these global batch sizes, e.g. 256,4096, against the step's cost per example.")


def _block(tree):
  return jax.tree.map(lambda x: x.block_until_ready(), tree)


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  """Measured float32 matmul FLOP/s of the default device (the best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  _block(mm(a, a))
  best = np.inf
  for _ in range(repeats):
    t = time.perf_counter()
    _block(mm(a, a))
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def compiled_memory_gb(compiled) -> float:
  """Arguments + outputs + temporaries of a compiled program, per device (XLA's analysis)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return float("nan")
  if m is None:
    return float("nan")
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2**30


def cost_analysis(compiled) -> dict:
  """XLA's cost analysis of a compiled program ('flops', 'bytes accessed', ...), as one dict
  (some jax versions wrap it in a list)."""
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def _timed(fn, *args, steps: int) -> float:
  """Seconds per call of a compiled `fn` (after 2 warm-up calls)."""
  for _ in range(2):
    _block(fn(*args))
  t = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  _block(out)
  return (time.perf_counter() - t) / steps


def time_predict(setup, state) -> dict:
  """Compile and time the task's predict (eval mode) on one eval batch."""
  host_batch = next(iter(setup.dataset("test", train=False)))
  host_batch.pop("mask")
  batch = parallel.to_global(host_batch, setup.mesh)
  variables = {"params": state.params, **state.model_state}
  t = time.perf_counter()
  compiled = setup.predict_fn().lower(variables, batch).compile()
  compile_time = time.perf_counter() - t
  seconds = _timed(compiled, variables, batch, steps=max(1, _STEPS.value // 2))
  return {"inference_batch_size": setup.stage.eval_batch_size,
          "inference_compile_time_sec": compile_time, "inference_time_sec": seconds,
          "inference_examples_per_sec": setup.stage.eval_batch_size / seconds,
          "inference_flops": float(cost_analysis(compiled).get("flops", float("nan"))),
          "inference_memory_gb": compiled_memory_gb(compiled)}


def time_step(setup) -> dict:
  """Compile and time the stage's train step on one device-resident batch."""
  train_ds = setup.dataset("train", train=True)
  host_batch = next(iter(train_ds))
  spec = train.init_state(setup, host_batch)
  abstract, shardings, tx = spec.abstract, spec.shardings, spec.tx
  state = spec.initial(train.init_key(0))
  if jax.tree.leaves(abstract.teacher):  # a frozen teacher's values do not change the cost
    state = state.replace(teacher=jax.tree.map(
        lambda a, s: jax.device_put(jnp.zeros(a.shape, a.dtype), s), abstract.teacher,
        shardings.teacher))
  step = train.jit_train_step(setup, tx, shardings, state.model_state)
  batch = parallel.to_global(host_batch, setup.mesh)
  t = time.perf_counter()
  compiled = step.lower(abstract, batch).compile()
  compile_time = time.perf_counter() - t
  cost = cost_analysis(compiled)
  for _ in range(3):
    state, _ = compiled(state, batch)
  _block(state.params)
  t = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, batch)
  _block((state.params, metrics))
  step_time = (time.perf_counter() - t) / _STEPS.value
  return {"compile_time_sec": compile_time, "step_time_sec": step_time,
          "examples_per_sec": setup.stage.batch_size / step_time,
          "flops_per_step": float(cost.get("flops", float("nan"))),
          "step_memory_gb": compiled_memory_gb(compiled)}, state


def time_pipeline(setup, batches: int) -> float:
  """Examples/s of this process's input pipeline (host side only)."""
  it = iter(setup.dataset("train", train=True))
  next(it)  # start-up (threads, first reads) is not throughput
  t = time.perf_counter()
  n = 0
  for _ in range(batches):
    n += len(jax.tree.leaves(next(it))[0])
  return n / (time.perf_counter() - t)


def instances_per_sec(setup, examples_per_sec: float) -> dict:
  """Bags (multiple-instance learning): the step's tiles/s, from the tiles of a bag (end to
  end) or the mean unpadded tiles of a slide (feature mode); {} for other data."""
  batch = next(iter(setup.dataset("train", train=True)))
  if "tiles" in batch:
    per_bag = float(batch["tiles"].shape[1])
  elif "tile_mask" in batch:
    per_bag = float(np.mean(np.sum(batch["tile_mask"], axis=1)))
  else:
    return {}
  return {"tiles_per_bag": per_bag, "tiles_per_sec": examples_per_sec * per_bag}


def sinkhorn_cost(batch: int, num_prototypes: int, *, num_iters: int = 3,
                  assign_crops: int = 2, repeats: int = 5) -> dict:
  """XLA's cost analysis and the measured time of SwAV's codes for one step: Sinkhorn
  (fp32, eps 0.05) over [batch, K] scores, once per assign crop."""
  from medguide_jax.losses import swav  # pylint: disable=g-import-not-at-top
  scores = jax.random.uniform(jax.random.key(0), (assign_crops, batch, num_prototypes),
                              jnp.float32, -1.0, 1.0)
  fn = jax.jit(jax.vmap(lambda s: swav.sinkhorn(s, num_iters=num_iters)))
  compiled = fn.lower(scores).compile()
  cost = cost_analysis(compiled)
  _block(compiled(scores))
  best = np.inf
  for _ in range(repeats):
    t = time.perf_counter()
    _block(compiled(scores))
    best = min(best, time.perf_counter() - t)
  return {"batch": batch, "num_prototypes": num_prototypes,
          "flops": float(cost.get("flops", float("nan"))),
          "bytes_accessed": float(cost.get("bytes accessed", float("nan"))), "time_sec": best}


def bag_data_throughput(dataset: str, encoder: str, *, batch_size: int, batches: int) -> dict:
  """Tiles/s of BALNMP tiling and of feature extraction, bags/s of the bag pipeline."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from data_prep import features  # pylint: disable=g-import-not-at-top
  from medguide_jax.data import bags, builders, pipeline, slides  # pylint: disable=g-import-not-at-top
  builder = builders.prepare(dataset)
  source = builder.as_data_source(split="train")
  tile_size = int(builder.info.metadata.get("tile_size") or 0) or None
  with tempfile.TemporaryDirectory() as tmp:
    rng = np.random.default_rng(0)
    pixels = (rng.random((4096, 4096, 3)) * 80 + 150).astype(np.uint8)  # tissue-like, not white
    path = f"{tmp}/slide.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    polygon = np.stack([2048 + 1900 * np.cos(t), 2048 + 1900 * np.sin(t)], 1)
    start = time.perf_counter()
    cut = bags.slide_tiles(path, [polygon.tolist()])
    tiling = len(cut.tiles) / (time.perf_counter() - start)
  tiles = [t for i in range(min(len(source), 200)) for t in source[i]["tiles"]][:1024]
  frozen = features.load_encoder(encoder, batch_size=64)
  frozen.embed(tiles[:64])  # compile
  start = time.perf_counter()
  frozen.embed(tiles)
  extraction = len(tiles) / (time.perf_counter() - start)
  decode = lambda record, rng: bags.bag_example(record, rng, image_size=tile_size)
  ds = pipeline.make_dataset(source, example_fn=decode, global_batch_size=batch_size,
                             rows=(0, batch_size), seed=0, train=True, num_batches=batches + 1)
  it = iter(ds)
  next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return {"data": dataset, "slide_tiles": len(cut.tiles), "tile_size": slides.TILE,
          "tiling_tiles_per_sec": tiling, "encoder": encoder,
          "features_tiles_per_sec": extraction, "features_tiles": len(tiles),
          "bag_batch_size": batch_size,
          "pipeline_bags_per_sec": batches * batch_size / (time.perf_counter() - start),
          "peak_host_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


TEXT_SIZES = {"small": {"hidden": 256, "layers": 4, "heads": 4, "mlp": 1024},
              "base": {"hidden": 768, "layers": 12, "heads": 12, "mlp": 3072}}


def text_throughput(dataset: str, *, size: str, batch_size: int, steps: int) -> dict:
  """Tokenizer, text encoder / decoder step and decoding throughput (module docstring)."""
  from medguide_jax.data import builders, cxr, images  # pylint: disable=g-import-not-at-top
  from medguide_jax.models import text  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  builder = builders.prepare(dataset)
  source = builder.as_data_source(split="train")
  tok = cxr.tokenizer_for(ml_collections.ConfigDict(), builder.info.metadata)
  texts = [images.text(source[i][s]) for i in range(min(len(source), 1000))
           for s in ("findings", "impression")]
  start = time.perf_counter()
  ids, mask = tok.encode(texts)
  seconds = time.perf_counter() - start
  result = {"data": dataset, "text_size": size, "vocab_size": tok.vocab_size,
            "max_len": tok.max_len, "text_batch_size": batch_size,
            "tokenizer_texts_per_sec": len(texts) / seconds,
            "tokenizer_tokens_per_sec": float(mask.sum()) / seconds}
  reps = -(-batch_size // len(ids))
  ids, mask = (jnp.asarray(np.tile(a, (reps, 1))[:batch_size]) for a in (ids, mask))
  dims = TEXT_SIZES[size]
  encoder = text.BertEncoder(vocab_size=tok.vocab_size, max_len=tok.max_len, dropout=0.0,
                             **dims)
  enc_params = encoder.init(jax.random.key(0), ids, mask)["params"]
  decoder = text.ReportDecoders(vocab_size=tok.vocab_size, max_len=tok.max_len, dropout=0.0,
                                branches=("summariser",),
                                **dict(dims, layers=max(1, dims["layers"] // 2)))
  memory = encoder.apply({"params": enc_params}, ids, mask)["tokens"]
  dec_params = decoder.init(jax.random.key(1), ids, memory, mask,
                            branch="summariser")["params"]

  def enc_loss(p):  # a stand-in objective: the step's cost is the towers', not the loss's
    return jnp.mean(encoder.apply({"params": p}, ids, mask)["pooled"]**2)

  def dec_loss(p):  # teacher-forced next-token cross-entropy on the real tokens
    logits = decoder.apply({"params": p}, ids[:, :-1], memory, mask, branch="summariser")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    return jnp.sum(ce * mask[:, 1:]) / jnp.sum(mask[:, 1:])

  for key, loss, params in (("encoder", enc_loss, enc_params), ("decoder", dec_loss, dec_params)):
    step = jax.jit(jax.value_and_grad(loss))
    _block(step(params))
    result[f"{key}_sequences_per_sec"] = batch_size / _timed(step, params, steps=steps)
  length = tok.max_len - 1   # BOS takes position 0

  @jax.jit
  def no_cache(params, memory, mask):
    """Greedy decoding that re-runs the full causal forward for every token."""
    def body(t, seq):
      logits = decoder.apply({"params": params}, seq, memory, mask, branch="summariser")
      return seq.at[:, t + 1].set(jnp.argmax(logits[:, t], -1).astype(jnp.int32))
    seq = jnp.zeros((memory.shape[0], length + 1), jnp.int32).at[:, 0].set(text.BOS_ID)
    return jax.lax.fori_loop(0, length, body, seq)[:, 1:]

  cached = lambda p, m, k: text.greedy_decode(decoder, p, m, k, branch="summariser",
                                               max_len=length)
  out = {}
  for key, fn in (("decode_tokens_per_sec", cached), ("decode_tokens_per_sec_no_cache", no_cache)):
    out[key] = np.asarray(_block(fn(dec_params, memory, mask)))
    seconds = _timed(fn, dec_params, memory, mask, steps=max(1, steps // 4))
    # Tokens produced, for both: the cached decoding's, up to each EOS (kept) or max_len.
    result[key] = float((out["decode_tokens_per_sec"] != text.PAD_ID).sum()) / seconds
  ended = lambda seq: np.where(np.cumsum(seq == text.EOS_ID, 1) - (seq == text.EOS_ID) > 0,
                               text.PAD_ID, seq)
  result["decode_agree"] = bool((ended(out["decode_tokens_per_sec_no_cache"])
                                 == out["decode_tokens_per_sec"]).all())
  result["kv_cache_speedup"] = (result["decode_tokens_per_sec"]
                                / result["decode_tokens_per_sec_no_cache"])
  result["peak_host_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return result


def main(argv) -> int:
  del argv
  if _TEXT.value:
    result = text_throughput(_TEXT.value, size=_TEXT_SIZE.value, batch_size=_TEXT_BATCH.value,
                             steps=_STEPS.value)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0
  if _BAGS.value:
    result = bag_data_throughput(_BAGS.value, _BAG_ENCODER.value, batch_size=_BAG_BATCH.value,
                                 batches=_PIPELINE_BATCHES.value)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0
  if _CONFIG.value is None:
    print("error: --config is required (or --bags=<a bag dataset>, --text=<a report "
          "dataset>)", file=sys.stderr)
    return 2
  config = _CONFIG.value
  workdir = epath.Path(tempfile.gettempdir()) / "medguide_benchmark"  # nothing is written
  name = _STAGE.value or train.stage_order(config)[0]
  setup = train.StageSetup(config, name, workdir, parallel.make_mesh())
  result = {"config": name, "encoder": config.model.get("encoder", ""),
            "data": config.data.name, "image_size": config.data.image_size,
            "batch_size": setup.stage.batch_size,
            "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
            "compute_dtype": config.compute_dtype}
  timing, state = time_step(setup)
  result.update(timing)
  result["peak_flops_per_sec"] = matmul_peak_flops()
  result["mfu"] = result["flops_per_step"] / result["step_time_sec"] / (
      result["peak_flops_per_sec"] * jax.device_count())
  if _INFERENCE.value:
    result.update(time_predict(setup, state))
    result["inference_mfu"] = result["inference_flops"] / result["inference_time_sec"] / (
        result["peak_flops_per_sec"] * jax.device_count())
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
  if "peak_bytes_in_use" in stats:
    result["peak_device_memory_gb"] = stats["peak_bytes_in_use"] / 2**30
  result.update(instances_per_sec(setup, result["examples_per_sec"]))
  result["pipeline_examples_per_sec"] = time_pipeline(setup, _PIPELINE_BATCHES.value)
  result["pipeline_to_step_ratio"] = (result["pipeline_examples_per_sec"]
                                      / result["examples_per_sec"])
  if _SINKHORN.value:
    k = config.model.num_prototypes
    per_example = result["flops_per_step"] / result["batch_size"]
    result["sinkhorn"] = []
    for b in (int(x) for x in _SINKHORN.value):
      cost = sinkhorn_cost(b, k)
      # Share of the step's FLOPs at that global batch (the step scales linearly in it).
      cost["flops_share_of_step"] = cost["flops"] / (cost["flops"] + per_example * b)
      result["sinkhorn"].append({n: round(v, 8) if isinstance(v, float) else v
                                 for n, v in cost.items()})
  result["peak_host_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
