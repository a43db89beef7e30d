"""hybridmed: the network's towers and parts, each stage's loss terms, the evaluators, and the
method end to end on synthetic_cxr:tiny (a run check, not a result)."""
from __future__ import annotations

import collections
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import hybridmed as hm_config
from medguide_jax import paths
from medguide_jax.data import builders
from medguide_jax.evaluation import hybridmed as hm_evals
from medguide_jax.evaluation import text_metrics
from medguide_jax.models import resnet, text
from medguide_jax.tasks import base
from medguide_jax.tasks import hybridmed as hm_task
from tests import helpers


def test_image_tokens_pool_to_the_pooled_features():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  for name, kw in (("tiny_cnn", {"width": 4}), ("resnet18", {"width": 2}),
                   ("vit_tiny", {"width": 16, "patch": 8, "posemb_grid": (4, 4)})):
    enc = resnet.get_encoder(name, **kw)
    variables = enc.init(jax.random.key(1), x, train=False)
    pooled, tokens = enc.apply(variables, x, train=False, tokens=True)
    assert tokens.shape[-1] == resnet.feature_dim(name, **kw), name
    np.testing.assert_allclose(pooled, enc.apply(variables, x, train=False), rtol=1e-6)
    if name != "vit_tiny" or enc.pool == "gap":
      np.testing.assert_allclose(pooled, tokens.mean(1), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  """The tiny dataset's training source and a smoke config on it."""
  builder = builders.prepare("synthetic_cxr:tiny")
  config = hm_config.get_config("smoke,dataset=synthetic_cxr:tiny")
  # Small towers: these tests run the loss eagerly, op by op.
  config.data.image_size, config.model.encoder_kwargs.width = 32, 4
  config.model.text = {"hidden": 16, "layers": 1, "heads": 2, "mlp": 32}
  config.model.decoder = {"hidden": 16, "layers": 1, "heads": 2, "mlp": 32}
  config.model.embed_dim = 8
  return builder.as_data_source(split="train"), config


def _task(tiny, kind):
  source, config = tiny
  ctx = base.TaskContext(config=config, stage=config.stages[kind], train_source=source)
  task = hm_task.make_task(ctx)
  records = [source[i] for i in range(4)]
  examples = [task.example_fn(r, None, augment=False) for r in records]
  batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
  batch["mask"] = jnp.ones((4,), bool)
  return task, batch


def _loss_terms(task, batch) -> dict:
  rng = jax.random.key(0)
  variables = task.init(rng, batch)
  teacher = task.init_teacher(rng, batch)
  teacher = {} if teacher is None else jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                    teacher)
  state = base.LossState(step=jnp.int32(0),
                         model_state={k: v for k, v in variables.items() if k != "params"},
                         extra={}, teacher=teacher)
  loss, (metrics, _) = task.loss(variables["params"], state, batch, rng)
  return variables, float(loss), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("kind,terms", [
    ("summariser", {"sum"}),
    ("joint", {"cg", "cl", "sum", "cap", "dis"}),
    ("joint_no_dis", {"cg", "cl", "sum", "cap"}),
    ("joint_global_only", {"cg", "sum", "cap", "dis"}),
    ("joint_concat", {"cg", "cl", "sum", "cap", "dis"}),
])
def test_each_stage_minimises_its_terms(tiny, kind, terms):
  task, batch = _task(tiny, kind)
  variables, loss, metrics = _loss_terms(task, batch)
  got = {k[2:] for k in metrics if k.startswith("L_")}
  assert got == terms
  assert loss == pytest.approx(sum(metrics[f"L_{t}"] for t in terms), rel=1e-5)
  top = set(variables["params"])
  if kind == "summariser":   # text only: no image tower is built
    assert {"txt", "dec"} <= top and "img" not in top
    assert task.init_teacher(jax.random.key(0), batch) is None
  else:
    assert {"img", "txt", "dec", "img_global", "txt_local", "logit_scale"} <= top
    # each tower's regex addresses its parameters and no other tower's
    keys = paths.paths(variables["params"])
    owners = {k: [t for t, r in text.TOWER_REGEXES.items() if re.fullmatch(r, k)]
              for k in keys}
    assert all(len(o) <= 1 for o in owners.values())
    assert {t for o in owners.values() for t in o} == set(text.TOWER_REGEXES)
  # The teacher (the summariser) is needed exactly where L_Dis is on.
  assert (task.init_teacher(jax.random.key(0), batch) is not None) == ("dis" in terms)


def test_the_summariser_is_the_teacher_and_shares_the_decoder(tiny):
  """joint's teacher has the summariser stage's parameter tree, and L_Dis is 0 when the
  captioner's logits are the teacher's (a student that already agrees)."""
  summariser, batch = _task(tiny, "summariser")
  joint, _ = _task(tiny, "joint")
  rng = jax.random.key(0)
  teacher = joint.init_teacher(rng, batch)
  tree = jax.eval_shape(summariser.init, rng, batch)
  assert jax.tree.structure(teacher) == jax.tree.structure(tree)
  # The captioner adds only its cross-attention and memory projection to the decoder.
  dec = joint.init(rng, batch)["params"]["dec"]
  own = [k for k in paths.paths(dec) if "captioner" in k]
  assert own and all("cross_attention" in k or k.startswith("memory_captioner") for k in own)


def test_zero_shot_classes_must_have_prompts(tiny):
  task, _ = _task(tiny, "joint")
  with pytest.raises(ValueError, match="classes \\['fracture'\\]"):
    hm_evals.ZeroShot(task, name="zero_shot", classes="fracture")
  ev = hm_evals.ZeroShot(task, name="zero_shot")
  assert ev.classes == ["opacity", "effusion", "cardiomegaly", "pneumothorax",
                        "support_devices"]


def test_generation_scores_the_decoded_impressions_against_the_references(tiny):
  """The evaluator decodes the generated ids with the run's tokenizer and scores them with
  text_metrics; a generator that writes the reference exactly scores 1 (and full clinical
  accuracy by the synthetic grammar)."""
  task, batch = _task(tiny, "joint")
  source = tiny[0]
  refs = [source[i]["impression"].decode() for i in range(4)]
  ids, _ = task.tok.encode(refs, 32)
  outputs = {"generated/captioner": ids[:, 1:]}   # generated: no [CLS]
  ctx = types.SimpleNamespace(outputs=outputs, source=[source[i] for i in range(4)])
  ev = hm_evals.Generation(task, name="generation")
  got = ev.run(ctx)
  assert got["captioner/bleu_4"] == pytest.approx(1.0, abs=1e-6)
  assert got["captioner/rouge_l"] == pytest.approx(1.0)
  assert got["captioner/clinical/macro/f1"] in (1.0,) or np.isnan(
      got["captioner/clinical/macro/f1"])
  expected = text_metrics.caption_scores(task.tok.decode(ids[:, 1:]), refs)
  assert got["captioner/cider"] == pytest.approx(expected["cider"])
  assert ev.keys() >= set(got)


# --------------------------------------------------------------------------- end to end
# Small towers for the end-to-end runs (compiling the steps is most of their time).
TINY = ["--config.data.image_size=32", "--config.model.encoder_kwargs.width=4",
        "--config.model.text.hidden=32", "--config.model.text.mlp=64",
        "--config.model.text.layers=1", "--config.model.decoder.hidden=32",
        "--config.model.decoder.mlp=64", "--config.model.decoder.layers=1",
        "--config.model.embed_dim=16"]


def _stage_args(stages, steps=4):
  return TINY + [f"--config.stages.{s}.{k}={v}" for s in stages for k, v in (
      ("num_steps", steps), ("num_epochs", 0), ("batch_size", 8), ("bootstrap", 20))]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("hm")
  stages = ("summariser", "joint", "probe")
  helpers.run_main(workdir, _stage_args(stages), config_file="configs/hybridmed.py",
                   config_arg=f"smoke,dataset=synthetic_cxr:tiny,stages={'+'.join(stages)}")
  return workdir


def test_the_method_runs_and_reports_every_evaluator(tiny_run):
  rows = {r["model"]: r for r in json.loads((tiny_run / "results.json").read_text())["table"]}
  assert set(rows) == {"summariser", "joint", "probe"}
  for key in ("zero_shot/mean/auc", "zero_shot/opacity/auc", "retrieval/i2t/recall@5",
              "retrieval/t2i/recall@1", "generation/captioner/bleu_4",
              "generation/captioner/rouge_l", "generation/captioner/cider",
              "generation/captioner/clinical/macro/f1"):
    assert key in rows["joint"], key
  for key in ("generation/summariser/rouge_l", "generation/most_frequent/rouge_l",
              "generation/last_findings_sentence/bleu_4"):
    assert key in rows["summariser"], key
  assert "mean/auc" in rows["probe"] and "opacity/auc" in rows["probe"]
  # the teacher was loaded from the summariser (and hashed for resume checks)
  assert (tiny_run / "joint" / "teacher.json").exists()
  metrics = helpers.metrics_lines(tiny_run / "joint" / "metrics.jsonl")
  assert any(m.get("train/L_dis", 0) > 0 for m in metrics)
  run = json.loads((tiny_run / "run.json").read_text())
  assert run["datasets"][0]["tokenizer"]["source"] == "dataset"


SHARED_IU = helpers.ROOT.parent / "shared" / "data" / "cxr_iu_xray_reports"


@pytest.mark.skipif(not SHARED_IU.is_dir(), reason=f"IU X-ray reports not at {SHARED_IU}")
def test_a_text_only_dataset_runs_the_summariser_only(tmp_path):
  proc = helpers.run_main(tmp_path / "w", _stage_args(("summariser", "joint")) + [
      f"--config.data.manual_dir={SHARED_IU}"], config_file="configs/hybridmed.py",
      check=False, config_arg="smoke,dataset=iu_xray_text,stages=summariser+joint")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "is text-only (no images): only the summariser stage runs on it" in proc.stderr


def test_bad_method_settings_exit_2_before_anything_is_written(tmp_path):
  alone = ["--config.stages.joint_no_dis.init_from=", "--config.stages.joint_no_dis.init_params="]
  for stage, override, message in (
      ("summariser", "--config.hm.local=loVT", "hm.local='loVT'"),
      ("joint_no_dis", "--config.stages.joint_no_dis.evals.zero_shot.classes=fracture",
       "classes ['fracture']")):
    extra = alone if stage == "joint_no_dis" else []
    proc = helpers.run_main(tmp_path / "w", _stage_args((stage,)) + extra + [override],
                            config_file="configs/hybridmed.py", check=False,
                            config_arg=f"smoke,dataset=synthetic_cxr:tiny,stages={stage}")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_the_text_tower_starts_from_a_converted_bert_with_its_vocabulary(tmp_path):
  """bert_convert --npz writes 'params/txt/...' that init_from loads into the text tower; the
  run tokenises with the checkpoint's vocab.txt (data.tokenizer), whose size must match."""
  from medguide_jax.models import bert_convert  # pylint: disable=g-import-not-at-top
  fixture = helpers.ROOT / "tests" / "fixtures" / "bert_tiny"
  npz = tmp_path / "bert.npz"
  bert_convert.main([str(fixture), f"--npz={npz}", "--max_len=48"])
  source = builders.prepare("synthetic_cxr:tiny").as_data_source(split="train")
  words = collections.Counter(w for i in range(len(source)) for s in ("findings", "impression")
                              for w in re.findall(r"[a-z]+", source[i][s].decode().lower()))
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  vocab += [w for w, _ in words.most_common(99 - len(vocab))]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  text_args = ["--config.model.text.hidden=32", "--config.model.text.layers=2",
               "--config.model.decoder.layers=1",
               "--config.model.text.heads=4", "--config.model.text.mlp=37",
               "--config.model.decoder.hidden=32", "--config.model.decoder.heads=4",
               f"--config.data.tokenizer={tmp_path / 'vocab.txt'}", "--config.data.max_len=48",
               "--config.data.impression_len=24",
               f"--config.stages.summariser.init_from={npz}",
               "--config.stages.summariser.init_params=txt/.*"]
  workdir = tmp_path / "w"
  helpers.run_main(workdir, _stage_args(("summariser",), steps=1) + text_args + [
      "--config.stages.summariser.opt.lr=0.0"], config_file="configs/hybridmed.py",
      config_arg="smoke,dataset=synthetic_cxr:tiny,stages=summariser")
  from medguide_jax import checkpointing  # pylint: disable=g-import-not-at-top
  trained = paths.flatten(checkpointing.load_variables(workdir / "summariser" / "variables"))
  with np.load(npz) as f:
    loaded = {k: f[k] for k in f.files}
  assert loaded.keys() - {k for k in loaded if "pooler" in k} <= trained.keys()
  for key, value in loaded.items():
    if "pooler" not in key:   # the tower has no pooler: [CLS] is its global vector
      np.testing.assert_array_equal(trained[key], value, err_msg=key)
  run = json.loads((workdir / "run.json").read_text())
  assert run["datasets"][0]["tokenizer"]["vocab_size"] == 99
  # A vocabulary of another size than the checkpoint's embedding table: exit 2, nothing run.
  (tmp_path / "vocab.txt").write_text("\n".join(vocab[:-1]) + "\n")
  proc = helpers.run_main(tmp_path / "w2", _stage_args(("summariser",), steps=1) + text_args,
                          config_file="configs/hybridmed.py", check=False,
                          config_arg="smoke,dataset=synthetic_cxr:tiny,stages=summariser")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "embeddings/word/embedding" in proc.stderr
