"""python -m medguide_jax.benchmark prints one JSON line with every promised field."""
import json
import os
import subprocess
import sys

import pytest

from tests import helpers


def test_benchmark_prints_one_json_line():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "medguide_jax.benchmark",
         "--config=configs/guidance.py:dataset=synthetic,smoke,stages=inferior",
         "--config.data.image_size=32", "--steps=2", "--pipeline_batches=2"]
  proc = subprocess.run(cmd, cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                        timeout=helpers.HANG_GUARD_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  assert len(lines) == 1
  result = json.loads(lines[0])
  for key in ("examples_per_sec", "step_time_sec", "compile_time_sec", "flops_per_step",
              "peak_flops_per_sec", "mfu", "pipeline_examples_per_sec", "peak_host_memory_gb"):
    assert result[key] > 0, key
  assert result["examples_per_sec"] == pytest.approx(result["batch_size"] / result["step_time_sec"], rel=0.02)
  assert 0 < result["mfu"] < 1


def test_benchmark_times_glam_inference_and_its_memory():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "medguide_jax.benchmark", "--config=configs/glam.py:smoke",
         "--stage=joint", "--inference", "--config.data.name=synthetic_mammo:tiny",
         "--config.model.global_widths=(4,4,8,8,8)", "--config.model.local_width=4",
         "--config.model.crop_shape=(32,32)", "--config.stages.joint.eval_batch_size=4",
         "--steps=2", "--pipeline_batches=2"]
  proc = subprocess.run(cmd, cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                        timeout=helpers.HANG_GUARD_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][0])
  for key in ("inference_time_sec", "inference_flops", "inference_memory_gb", "step_memory_gb",
              "inference_mfu"):
    assert result[key] > 0, key
  assert result["inference_examples_per_sec"] == pytest.approx(
      4 / result["inference_time_sec"], rel=0.02)


def test_benchmark_times_tiling_feature_extraction_and_the_bag_pipeline():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "medguide_jax.benchmark", "--bags=synthetic_bags:tiny",
         "--pipeline_batches=2", "--bag_batch_size=4"]
  proc = subprocess.run(cmd, cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                        timeout=helpers.HANG_GUARD_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][0])
  for key in ("tiling_tiles_per_sec", "features_tiles_per_sec", "pipeline_bags_per_sec"):
    assert result[key] > 0, key
  # the generated 4096 x 4096 slide: a disc of radius 1900 inside a 15 x 15 grid of tiles
  assert 100 < result["slide_tiles"] <= 225


def test_benchmark_counts_the_tiles_of_a_bag_step():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "medguide_jax.benchmark",
         "--config=configs/missing_modality.py:smoke,stages=bd",
         "--config.data.name=synthetic_bags:tiny", "--config.data.image_size=16",
         "--config.model.encoder_kwargs.width=4", "--steps=2", "--pipeline_batches=2"]
  proc = subprocess.run(cmd, cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                        timeout=helpers.HANG_GUARD_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][0])
  assert result["tiles_per_bag"] == 10
  assert result["tiles_per_sec"] == pytest.approx(10 * result["examples_per_sec"])


def test_benchmark_times_the_tokenizer_text_towers_and_decoding():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "medguide_jax.benchmark", "--text=synthetic_cxr:tiny",
         "--steps=2", "--text_batch_size=4"]
  proc = subprocess.run(cmd, cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                        timeout=helpers.HANG_GUARD_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][0])
  for key in ("tokenizer_texts_per_sec", "tokenizer_tokens_per_sec", "encoder_sequences_per_sec",
              "decoder_sequences_per_sec", "decode_tokens_per_sec",
              "decode_tokens_per_sec_no_cache", "kv_cache_speedup"):
    assert result[key] > 0, key
  # The cached and the re-run decoding produce the same tokens.
  assert result["decode_agree"] is True
  assert result["max_len"] == 112
