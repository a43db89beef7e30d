"""A Hugging Face BERT checkpoint converted by `bert_convert` reproduces `transformers.BertModel`.

tests/fixtures/bert_tiny/ holds a seeded random tiny BertModel as `save_pretrained` writes
it (config.json, model.safetensors: vocab 99, hidden 32, 2 layers, 4 heads, intermediate
37, 64 positions) and reference.npz, what BertModel computed in eval mode for two padded
inputs (see tests/make_bert_fixture.py). The converted `text.BertEncoder` must give the same
last hidden states at real tokens, pooler output and last-layer attention probabilities
to 1e-5. No torch needed: the pytorch_model.bin test is skipped without it.

Broken checkpoints are modified copies of the fixture written into tmp_path (with
`safetensors.numpy.save_file`); each must be one clear error naming what is wrong.

Regenerate the fixture (torch and transformers in a separate venv, never in the project's):
  python -m venv /tmp/bertenv
  /tmp/bertenv/bin/pip install torch transformers safetensors numpy
  /tmp/bertenv/bin/python tests/make_bert_fixture.py            # --verify: check, not write
"""
from __future__ import annotations

import importlib.util
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy

from medguide_jax.models import bert_convert, text
from tests import helpers

FIXTURE = helpers.ROOT / "tests" / "fixtures" / "bert_tiny"
TOL = 1e-5
KWARGS = dict(vocab_size=99, hidden=32, layers=2, heads=4, mlp=37, max_len=64, type_vocab=2,
              eps=1e-12, dropout=0.1, pooler=True)
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURE / "reference.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def state_dict():
  return safetensors.numpy.load_file(str(FIXTURE / "model.safetensors"))


@pytest.fixture(scope="module")
def converted():
  return bert_convert.load_checkpoint(FIXTURE)


def _checkpoint(tmp_path, state, *, config_updates=None, name="ckpt"):
  """A checkpoint dir in tmp_path: the fixture's config.json (updated) and `state`."""
  path = tmp_path / name
  path.mkdir()
  config = json.loads((FIXTURE / "config.json").read_text())
  for key, value in (config_updates or {}).items():
    if value is None:
      config.pop(key, None)   # None: the field is left out
    else:
      config[key] = value
  (path / "config.json").write_text(json.dumps(config))
  if state is not None:
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                                str(path / "model.safetensors"))
  return path


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# -- parity with transformers.BertModel ------------------------------------------------------


@pytest.mark.parametrize("prefix,with_types", [("", True), ("notypes_", False)])
def test_converted_encoder_reproduces_hugging_face(converted, reference, prefix, with_types):
  assert converted.kwargs == KWARGS
  model = text.BertEncoder(**converted.kwargs)
  types = jnp.asarray(reference["token_types"]) if with_types else None
  out = jax.jit(lambda p, ids, mask, types: model.apply(
      {"params": p}, ids, mask, token_types=types, return_attention=True))(
          converted.params, reference["ids"], reference["mask"], types)
  mask = reference["mask"]
  assert mask.any(axis=1).all() and not mask.all(), "the fixture must have padding"
  tokens, ref_tokens = np.asarray(out["tokens"]), reference[prefix + "last_hidden_state"]
  np.testing.assert_allclose(tokens[mask], ref_tokens[mask], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["pooled"], reference[prefix + "pooler_output"], atol=TOL,
                             rtol=0)
  att, ref_att = np.asarray(out["attention"]), reference[prefix + "attentions"]
  for b in range(mask.shape[0]):  # rows of real query tokens, over every key
    np.testing.assert_allclose(att[b][:, mask[b]], ref_att[b][:, mask[b]], atol=TOL, rtol=0)
    assert np.all(att[b][:, mask[b]][..., ~mask[b]] < 1e-30), "padded keys got weight"
  # The attentions are far from uniform, so a wrong head split would show.
  assert ref_att.max() > 0.5


def test_config_becomes_the_encoder_kwargs_and_float32_params(converted):
  assert converted.kwargs == KWARGS
  assert converted.ignored == []
  assert converted.weights_file == str(FIXTURE / "model.safetensors")
  leaves = jax.tree.leaves(converted.params)
  assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in leaves)
  assert sum(x.size for x in leaves) == 19978
  q = converted.params["layer_0"]["attention"]["query"]
  assert q["kernel"].shape == (32, 4, 8) and q["bias"].shape == (4, 8)
  assert converted.params["layer_1"]["attention"]["out"]["kernel"].shape == (4, 8, 32)
  kwargs, params = bert_convert.convert_checkpoint(FIXTURE)
  assert kwargs == KWARGS
  _assert_same_tree(params, converted.params)


def test_old_config_without_optional_fields_takes_bert_defaults():
  config = {"vocab_size": 28996, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072}  # Bio_ClinicalBERT-like
  assert bert_convert.encoder_kwargs(config) == dict(
      vocab_size=28996, hidden=768, layers=12, heads=12, mlp=3072, max_len=512, type_vocab=2,
      eps=1e-12, dropout=0.1, pooler=True)


# -- missing files ---------------------------------------------------------------------------


def test_a_missing_directory_names_it_and_what_belongs_there(tmp_path):
  path = tmp_path / "no_such_bert"
  with pytest.raises(bert_convert.BertCheckpointNotFoundError) as error:
    bert_convert.load_checkpoint(path)
  message = str(error.value)
  assert str(path) in message and "does not exist" in message
  assert "config.json" in message and "model.safetensors" in message
  assert "nothing is downloaded: place the checkpoint there" in message
  assert isinstance(error.value, ValueError) and isinstance(error.value, FileNotFoundError)


def test_a_directory_without_config_json_names_it(tmp_path, state_dict):
  path = _checkpoint(tmp_path, state_dict)
  (path / "config.json").unlink()
  with pytest.raises(bert_convert.BertCheckpointNotFoundError,
                     match=rf"{path} has no config\.json \(found \[model\.safetensors\]\)"):
    bert_convert.load_checkpoint(path)


def test_a_directory_without_weights_names_the_expected_files(tmp_path):
  path = _checkpoint(tmp_path, None)
  (path / "tf_model.h5").write_bytes(b"not read")
  with pytest.raises(bert_convert.BertCheckpointNotFoundError) as error:
    bert_convert.load_checkpoint(path)
  message = str(error.value)
  assert f"{path} has no weights (found [config.json, tf_model.h5])" in message
  for name in ("model.safetensors", "pytorch_model.bin", "place the checkpoint there"):
    assert name in message


def test_a_git_lfs_pointer_says_to_pull(tmp_path):
  path = _checkpoint(tmp_path, None)
  (path / "model.safetensors").write_text(
      "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 83872\n")
  with pytest.raises(bert_convert.BertCheckpointError, match="Git LFS pointer.*git lfs pull"):
    bert_convert.load_checkpoint(path)


# -- keys and shapes ------------------------------------------------------------------------


def test_a_missing_key_is_named_with_its_shape_and_the_file(tmp_path, state_dict):
  key = "encoder.layer.1.attention.self.key.weight"
  path = _checkpoint(tmp_path, {k: v for k, v in state_dict.items() if k != key})
  with pytest.raises(bert_convert.BertParamMismatchError) as error:
    bert_convert.load_checkpoint(path)
  message = str(error.value)
  assert str(path / "model.safetensors") in message
  assert f"missing 1 key(s):\n    {key!r}: expected [32, 32]" in message
  assert "unexpected" not in message and "wrong shape" not in message
  assert error.value.missing == [(key, (32, 32))]


def test_a_mis_shaped_key_is_named_with_expected_and_found_shapes(tmp_path, state_dict):
  key = "encoder.layer.0.intermediate.dense.weight"
  state = dict(state_dict)
  state[key] = np.zeros((36, 32), np.float32)
  path = _checkpoint(tmp_path, state)
  with pytest.raises(bert_convert.BertParamMismatchError) as error:
    bert_convert.load_checkpoint(path)
  message = str(error.value)
  assert str(path / "model.safetensors") in message
  assert f"1 key(s) of the wrong shape:\n    {key!r}: expected [37, 32], found [36, 32]" in (
      message)
  assert error.value.misshaped == [(key, (37, 32), (36, 32))]


def test_every_problem_is_one_error(tmp_path, state_dict):
  state = dict(state_dict)
  del state["pooler.dense.bias"]
  del state["embeddings.LayerNorm.weight"]
  state["encoder.layer.2.output.dense.weight"] = np.zeros((32, 37), np.float32)
  state["embeddings.word_embeddings.weight"] = np.zeros((100, 32), np.float32)
  path = _checkpoint(tmp_path, state)
  with pytest.raises(bert_convert.BertParamMismatchError) as error:
    bert_convert.load_checkpoint(path)
  e = error.value
  assert e.missing == [("embeddings.LayerNorm.weight", (32,)), ("pooler.dense.bias", (32,))]
  assert e.unexpected == [("encoder.layer.2.output.dense.weight", (32, 37))]
  assert e.misshaped == [("embeddings.word_embeddings.weight", (99, 32), (100, 32))]
  message = str(e)
  for key in ("embeddings.LayerNorm.weight", "pooler.dense.bias",
              "encoder.layer.2.output.dense.weight", "embeddings.word_embeddings.weight"):
    assert key in message
  assert "ignored are only cls.*" in message


def test_validate_params_names_every_flax_path(converted):
  params = jax.tree.map(np.copy, converted.params)
  del params["layer_1"]["mlp_norm"]["bias"]
  params["layer_0"]["attention"]["query"]["kernel"] = np.zeros((32, 32), np.float32)
  params["extra"] = {"kernel": np.zeros((2,), np.float32)}
  with pytest.raises(bert_convert.BertParamMismatchError) as error:
    bert_convert.validate_params(params, KWARGS, source="my.msgpack")
  message = str(error.value)
  assert "my.msgpack" in message
  assert "'layer_1/mlp_norm/bias': expected [32]" in message
  assert "'extra/kernel': found [2]" in message
  assert ("'layer_0/attention/query/kernel': expected [32, 4, 8], found [32, 32]"
          in message)
  bert_convert.validate_params(converted.params, KWARGS)  # the real tree fits


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("updates,pattern", [
    ({"hidden_act": "gelu_new"}, r"hidden_act 'gelu_new' is not supported.*only 'gelu'"),
    ({"hidden_act": "relu"}, r"hidden_act 'relu' is not supported"),
    ({"position_embedding_type": "relative_key"},
     r"position_embedding_type 'relative_key' is not supported"),
    ({"model_type": "roberta"}, r"model_type 'roberta' is not supported"),
    ({"is_decoder": True}, r"is_decoder is true"),
    ({"hidden_size": None}, r"lacks \['hidden_size'\]"),
    ({"num_attention_heads": 5}, r"hidden_size 32 is not a multiple of num_attention_heads 5"),
    ({"intermediate_size": "37"}, r"intermediate_size must be a positive integer; got '37'"),
])
def test_an_unsupported_config_is_a_clear_error(tmp_path, state_dict, updates, pattern):
  path = _checkpoint(tmp_path, state_dict, config_updates=updates)
  with pytest.raises(bert_convert.BertCheckpointError, match=pattern) as error:
    bert_convert.load_checkpoint(path)
  assert str(path / "config.json") in str(error.value)


# -- checkpoint variants ----------------------------------------------------------------------


def test_a_pretraining_checkpoint_with_bert_prefix_and_cls_heads_converts_the_same(
    tmp_path, state_dict, converted, capsys):
  state = {"bert." + k: v for k, v in state_dict.items()}
  heads = {"cls.predictions.bias": np.zeros(99, np.float32),
           "cls.predictions.transform.dense.weight": np.zeros((32, 32), np.float32),
           "cls.predictions.decoder.weight": state_dict["embeddings.word_embeddings.weight"],
           "cls.seq_relationship.weight": np.zeros((2, 32), np.float32),
           "bert.embeddings.position_ids": np.arange(64, dtype=np.int64)[None]}
  path = _checkpoint(tmp_path, {**state, **heads})
  loaded = bert_convert.load_checkpoint(path)
  assert loaded.kwargs == KWARGS
  assert loaded.ignored == sorted(heads)
  _assert_same_tree(loaded.params, converted.params)
  bert_convert.main([str(path)])
  out = capsys.readouterr().out
  assert "ignored 5 key(s): bert.embeddings.position_ids, cls.predictions.bias" in out


def test_a_prefixed_checkpoint_names_keys_with_their_prefix(tmp_path, state_dict):
  state = {"bert." + k: v for k, v in state_dict.items()
           if k != "encoder.layer.0.output.dense.bias"}
  state["classifier.weight"] = np.zeros((2, 32), np.float32)   # BertForSequenceClassification
  path = _checkpoint(tmp_path, state)
  with pytest.raises(bert_convert.BertParamMismatchError) as error:
    bert_convert.load_checkpoint(path)
  assert error.value.missing == [("bert.encoder.layer.0.output.dense.bias", (32,))]
  assert error.value.unexpected == [("classifier.weight", (2, 32))]


def test_old_layernorm_names_gamma_beta_convert_the_same(tmp_path, state_dict, converted):
  rename = lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
      "LayerNorm.bias", "LayerNorm.beta")
  path = _checkpoint(tmp_path, {rename(k): v for k, v in state_dict.items()})
  _assert_same_tree(bert_convert.load_checkpoint(path).params, converted.params)


def test_a_masked_lm_checkpoint_without_pooler_builds_the_encoder_without_it(
    tmp_path, state_dict, reference):
  state = {k: v for k, v in state_dict.items() if not k.startswith("pooler.")}
  path = _checkpoint(tmp_path, state)
  loaded = bert_convert.load_checkpoint(path)
  assert loaded.kwargs == {**KWARGS, "pooler": False}
  assert "pooler" not in loaded.params
  out = text.BertEncoder(**loaded.kwargs).apply(
      {"params": loaded.params}, reference["ids"], reference["mask"],
      token_types=reference["token_types"])
  mask = reference["mask"]
  np.testing.assert_allclose(np.asarray(out["tokens"])[mask],
                             reference["last_hidden_state"][mask], atol=TOL, rtol=0)
  np.testing.assert_array_equal(out["pooled"], np.asarray(out["tokens"])[:, 0])
  with pytest.raises(bert_convert.BertParamMismatchError) as error:
    bert_convert.load_checkpoint(path, pooler=True)
  assert [k for k, _ in error.value.missing] == ["pooler.dense.weight", "pooler.dense.bias"]
  dropped = bert_convert.load_checkpoint(FIXTURE, pooler=False)
  assert dropped.ignored == ["pooler.dense.bias", "pooler.dense.weight"]
  assert "pooler" not in dropped.params


def test_sharded_safetensors_convert_the_same(tmp_path, state_dict, converted):
  path = _checkpoint(tmp_path, None)
  keys = sorted(state_dict)
  shards = {"model-00001-of-00002.safetensors": keys[:20],
            "model-00002-of-00002.safetensors": keys[20:]}
  for shard, names in shards.items():
    safetensors.numpy.save_file({k: state_dict[k] for k in names}, str(path / shard))
  weight_map = {k: shard for shard, names in shards.items() for k in names}
  (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  loaded = bert_convert.load_checkpoint(path)
  assert loaded.weights_file == str(path / "model.safetensors.index.json")
  _assert_same_tree(loaded.params, converted.params)


def test_bfloat16_safetensors_are_read_as_float32(tmp_path, state_dict):
  path = _checkpoint(tmp_path, None)
  safetensors.flax.save_file({k: jnp.asarray(v, jnp.bfloat16) for k, v in state_dict.items()},
                             str(path / "model.safetensors"))
  loaded = bert_convert.load_checkpoint(path)
  rounded = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32)
             for k, v in state_dict.items()}
  expected, _ = bert_convert.convert_state_dict(rounded, KWARGS)
  _assert_same_tree(loaded.params, expected)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed: the pytorch_model.bin "
                    "fallback can only be read with torch")
def test_pytorch_model_bin_converts_the_same_when_torch_is_installed(tmp_path, state_dict,
                                                                     converted):
  import torch  # pylint: disable=g-import-not-at-top
  path = _checkpoint(tmp_path, None)
  torch.save({"bert." + k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
             str(path / "pytorch_model.bin"))
  loaded = bert_convert.load_checkpoint(path)
  assert loaded.weights_file == str(path / "pytorch_model.bin")
  _assert_same_tree(loaded.params, converted.params)


def test_pytorch_model_bin_without_torch_says_to_convert_or_install(tmp_path, monkeypatch):
  path = _checkpoint(tmp_path, None)
  (path / "pytorch_model.bin").write_bytes(b"a pickle")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
  with pytest.raises(bert_convert.BertCheckpointError) as error:
    bert_convert.load_checkpoint(path)
  message = str(error.value)
  assert str(path / "pytorch_model.bin") in message
  assert "needs torch, which is not installed" in message
  assert "model.safetensors" in message and "install torch" in message


# -- tokenizer ------------------------------------------------------------------------------


def test_vocab_size_mismatch_names_both_sizes_and_sources():
  with pytest.raises(bert_convert.VocabSizeMismatchError) as error:
    bert_convert.check_vocab_size(30522, FIXTURE, tokenizer_source="vocab.txt of bert-base")
  message = str(error.value)
  assert "tokenizer vocabulary size 30522 (vocab.txt of bert-base)" in message
  assert f"vocab_size 99 ({FIXTURE / 'config.json'})" in message
  assert isinstance(error.value, ValueError)


def test_a_matching_tokenizer_passes():
  import tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {f"tok{i}": i for i in range(99)}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="tok1"))
  assert bert_convert.check_vocab_size(tokenizer.get_vocab_size(), FIXTURE) == 99


# -- command line and converted files ----------------------------------------------------------


def test_command_line_writes_a_file_that_loads_back(tmp_path, converted, capsys):
  out = tmp_path / "bert_tiny.msgpack"
  bert_convert.main([str(FIXTURE), f"--out={out}", "--tokenizer_vocab_size=99"])
  printed = capsys.readouterr().out
  assert "BertEncoder(vocab_size=99, hidden=32, layers=2, heads=4, mlp=37" in printed
  assert "19,978 parameters" in printed and "ignored 0 key(s)" in printed
  kwargs, params = bert_convert.load_converted(out)
  assert kwargs == KWARGS
  _assert_same_tree(params, converted.params)


@pytest.mark.parametrize("args,pattern", [
    (["{missing}"], "does not exist"),
    (["{fixture}", "--tokenizer_vocab_size=98"], "tokenizer vocabulary size 98"),
])
def test_command_line_errors_exit_2(tmp_path, capsys, args, pattern):
  args = [a.format(missing=tmp_path / "nope", fixture=FIXTURE) for a in args]
  with pytest.raises(SystemExit) as exit_info:
    bert_convert.main(args)
  assert exit_info.value.code == 2
  assert pattern in capsys.readouterr().err


def test_command_line_checks_a_tokenizer_file_against_the_checkpoint(tmp_path, capsys):
  """A trained report tokenizer is not the checkpoint's vocabulary: exit 2 naming both."""
  from medguide_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.ReportTokenizer(tokenizer_lib.train(
      ["the lungs are clear", "no pleural effusion"] * 3, vocab_size=60, min_frequency=1))
  path = tmp_path / "tokenizer.json"
  path.write_text(tok.to_json(), encoding="utf-8")
  with pytest.raises(SystemExit) as exit_info:
    bert_convert.main([str(FIXTURE), f"--tokenizer={path}"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert f"tokenizer vocabulary size {tok.vocab_size} ({path})" in err
  assert f"vocab_size 99 ({FIXTURE / 'config.json'})" in err
  with pytest.raises(SystemExit) as exit_info:
    bert_convert.main([str(FIXTURE), f"--tokenizer={tmp_path / 'absent.txt'}"])
  assert exit_info.value.code == 2 and "absent.txt: no such tokenizer file" in \
      capsys.readouterr().err
