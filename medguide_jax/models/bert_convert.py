"""Imports a pretrained Hugging Face BERT (e.g. a clinical BERT) into `text.BertEncoder`.

The checkpoint is a LOCAL directory as `save_pretrained` writes it (or as a model repository
on the Hugging Face Hub holds it); nothing is ever downloaded, the user places it there:
  config.json         the architecture (`BertConfig`), required;
  model.safetensors   the weights, read with `safetensors.numpy` (no torch); or
  model.safetensors.index.json with its shards (large models), or, only when torch is
  pytorch_model.bin   importable, the pickled state dict (`torch.load(weights_only=True)`).
Checkpoints with only pytorch_model.bin and no torch are an error that says how to get a
safetensors file.

config.json -> `BertEncoder` kwargs (`encoder_kwargs`):
  vocab_size -> vocab_size, hidden_size -> hidden, num_hidden_layers -> layers,
  num_attention_heads -> heads, intermediate_size -> mlp (these five are required),
  max_position_embeddings -> max_len (default 512), type_vocab_size -> type_vocab (2),
  layer_norm_eps -> eps (1e-12), hidden_dropout_prob -> dropout (0.1); the defaults are
  `transformers.BertConfig`'s, which older config.json files (e.g. Bio_ClinicalBERT's)
  rely on. Refused, as BertEncoder would silently compute something else: hidden_act other
  than 'gelu' (BertEncoder's GELU is the exact erf one that 'gelu' names; 'gelu_new',
  'gelu_pytorch_tanh', 'relu', ... differ), position_embedding_type other than 'absolute',
  is_decoder (causal attention), a model_type other than 'bert', hidden_size not a multiple
  of num_attention_heads. `pooler` is not in config.json: it is True when the checkpoint
  holds pooler.dense.* (BertModel, BertForPreTraining), False when it holds neither of them
  (BertForMaskedLM), unless the caller fixes it.

Weights -> params (`convert_state_dict`; the table is in text.py's module docstring):
torch Linear weights are [out, in], so kernel = weight.T, reshaped to the head-split
[D, H, Dh] (query/key/value) and [H, Dh, D] (attention output); LayerNorm weight/bias (old
checkpoints: gamma/beta) -> scale/bias. Keys may carry a 'bert.' prefix (BertForPreTraining,
BertForMaskedLM, ...); the heads under 'cls.' and the position_ids / token_type_ids buffers
that some transformers versions saved are ignored and reported (`ignored`). Every other key
must be one of the encoder's. The shapes come from config.json and are checked key by key;
all missing, unexpected and mis-shaped keys are reported together in ONE
`BertParamMismatchError` naming each key, its expected and found shape and the file. The
converted tree is then checked against `jax.eval_shape` of `BertEncoder(**kwargs).init`
(`validate_params`), which raises the same error in flax paths.

Every error is a `BertCheckpointError` (a ValueError): callers turn it into a config error
(exit 2). `check_vocab_size` compares a tokenizer's vocabulary with the checkpoint's.

Command line (prints a summary; --out writes the converted parameters, read back with
`load_converted`):
  python -m medguide_jax.models.bert_convert /path/to/Bio_ClinicalBERT \
      --out=clinicalbert.msgpack [--tokenizer_vocab_size=28996]
"""
from __future__ import annotations

import functools
import json
import math
import sys
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import serialization, traverse_util

from medguide_jax.models import text

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, TORCH_FILE, TORCH_INDEX)  # preference
PREFIX = "bert."
IGNORED_PREFIXES = ("cls.",)   # pre-training / masked-LM heads
IGNORED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")
SUPPORTED_ACT = "gelu"
_LFS_MAGIC = b"version https://git-lfs"
_REQUIRED = {"vocab_size": "vocab_size", "hidden_size": "hidden",
             "num_hidden_layers": "layers", "num_attention_heads": "heads",
             "intermediate_size": "mlp"}
_OPTIONAL = {"max_position_embeddings": ("max_len", 512), "type_vocab_size": ("type_vocab", 2)}
_PLACE_IT = ("nothing is downloaded: place the checkpoint there (e.g. `git lfs install && "
             "git clone https://huggingface.co/<model>` or `save_pretrained(dir)`)")


class BertCheckpointError(ValueError):
  """A BERT checkpoint directory that cannot be imported (bad config, files, weights)."""


class BertCheckpointNotFoundError(BertCheckpointError, FileNotFoundError):
  """The checkpoint directory, its config.json or its weights file does not exist."""


class BertParamMismatchError(BertCheckpointError):
  """Weights that do not fit the encoder: every missing, unexpected and mis-shaped key.

  Attributes (besides the message): `missing` [(key, expected shape)], `unexpected`
  [(key, found shape)], `misshaped` [(key, expected shape, found shape)], `source`.
  """

  def __init__(self, message: str, *, missing=(), unexpected=(), misshaped=(), source=""):
    super().__init__(message)
    self.missing, self.unexpected = list(missing), list(unexpected)
    self.misshaped, self.source = list(misshaped), source


class VocabSizeMismatchError(BertCheckpointError):
  """The tokenizer's vocabulary and the checkpoint's word embeddings differ in size."""


# -- config.json ------------------------------------------------------------------------------


def _checkpoint_dir(checkpoint_dir: str | epath.PathLike) -> epath.Path:
  path = epath.Path(checkpoint_dir)
  if not path.exists():
    raise BertCheckpointNotFoundError(
        f"BERT checkpoint directory {path} does not exist; expected a folder with "
        f"{CONFIG_FILE} and {SAFETENSORS_FILE} (or {TORCH_FILE}, which needs torch): "
        f"{_PLACE_IT}")
  if not path.is_dir():
    raise BertCheckpointNotFoundError(
        f"BERT checkpoint {path} is a file, not a directory; expected a folder with "
        f"{CONFIG_FILE} and {SAFETENSORS_FILE}")
  return path


def _listing(path: epath.Path) -> str:
  names = sorted(p.name for p in path.iterdir())
  return f"[{', '.join(names)}]" if names else "nothing"


def read_config(checkpoint_dir: str | epath.PathLike) -> dict[str, Any]:
  """The checkpoint's config.json as a dict.

  Raises:
    BertCheckpointNotFoundError: no such directory, or no config.json in it.
    BertCheckpointError: config.json is not a JSON object.
  """
  path = _checkpoint_dir(checkpoint_dir)
  config_path = path / CONFIG_FILE
  if not config_path.exists():
    raise BertCheckpointNotFoundError(
        f"BERT checkpoint directory {path} has no {CONFIG_FILE} (found {_listing(path)}); "
        f"expected the {CONFIG_FILE} that save_pretrained writes next to the weights: "
        f"{_PLACE_IT}")
  try:
    config = json.loads(config_path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise BertCheckpointError(f"{config_path} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise BertCheckpointError(f"{config_path} holds a {type(config).__name__}, not a JSON "
                              f"object")
  return config


def _positive_int(key: str, value: Any, source: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise BertCheckpointError(f"{source}: {key} must be a positive integer; got {value!r}")
  return value


def encoder_kwargs(config: Mapping[str, Any], *, source: str = CONFIG_FILE,
                   pooler: bool = True) -> dict[str, Any]:
  """A BERT config (config.json as a dict) -> `text.BertEncoder` keyword arguments.

  Args:
    config: the parsed config.json.
    source: where it came from, for messages.
    pooler: BertEncoder's `pooler` (not part of a BERT config; see `convert_checkpoint`).

  Returns:
    {vocab_size, hidden, layers, heads, mlp, max_len, type_vocab, eps, dropout, pooler}
    (the mapping and defaults are in the module docstring; dtype is left to the caller).

  Raises:
    BertCheckpointError: a required field is missing, a size is not a positive integer,
      or the config asks for something BertEncoder does not compute (module docstring).
  """
  missing = [k for k in _REQUIRED if k not in config]
  if missing:
    raise BertCheckpointError(f"{source} lacks {missing}: a BERT config.json needs "
                              f"{list(_REQUIRED)}")
  model_type = config.get("model_type", "bert")
  if model_type != "bert":
    raise BertCheckpointError(
        f"{source}: model_type {model_type!r} is not supported; only BERT checkpoints "
        f"(model_type 'bert', e.g. BertModel, BertForPreTraining, BertForMaskedLM) convert "
        f"into text.BertEncoder")
  act = config.get("hidden_act", SUPPORTED_ACT)
  if act != SUPPORTED_ACT:
    raise BertCheckpointError(
        f"{source}: hidden_act {act!r} is not supported; text.BertEncoder computes the "
        f"exact (erf) GELU that hidden_act {SUPPORTED_ACT!r} names, so only "
        f"{SUPPORTED_ACT!r} converts without changing the model's outputs")
  position = config.get("position_embedding_type", "absolute")
  if position != "absolute":
    raise BertCheckpointError(
        f"{source}: position_embedding_type {position!r} is not supported; text.BertEncoder "
        f"has absolute learned position embeddings only ('absolute')")
  if config.get("is_decoder", False):
    raise BertCheckpointError(f"{source}: is_decoder is true (causal attention); "
                              f"text.BertEncoder is a bidirectional encoder")
  kwargs = {ours: _positive_int(key, config[key], source)
            for key, ours in _REQUIRED.items()}
  for key, (ours, default) in _OPTIONAL.items():
    kwargs[ours] = _positive_int(key, config.get(key, default), source)
  if kwargs["hidden"] % kwargs["heads"]:
    raise BertCheckpointError(f"{source}: hidden_size {kwargs['hidden']} is not a multiple "
                              f"of num_attention_heads {kwargs['heads']}")
  eps = config.get("layer_norm_eps", 1e-12)
  dropout = config.get("hidden_dropout_prob", 0.1)
  for key, value in (("layer_norm_eps", eps), ("hidden_dropout_prob", dropout)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and 0 <= value < 1):
      raise BertCheckpointError(f"{source}: {key} must be a number in [0, 1); got {value!r}")
  attention_dropout = config.get("attention_probs_dropout_prob", dropout)
  if attention_dropout != dropout:
    logging.warning("%s: attention_probs_dropout_prob %s differs from hidden_dropout_prob "
                    "%s; BertEncoder uses one rate (%s) for both", source, attention_dropout,
                    dropout, dropout)
  kwargs.update(eps=float(eps), dropout=float(dropout), pooler=bool(pooler))
  return kwargs


def check_vocab_size(tokenizer_vocab_size: int, checkpoint_dir: str | epath.PathLike, *,
                     tokenizer_source: str = "the tokenizer") -> int:
  """Checks that a tokenizer fits the checkpoint's word embeddings; returns the size.

  Sizes must be equal. A larger tokenizer produces ids past the embedding table, which a
  gather on an accelerator silently clamps to the last row; a smaller one almost always
  means a different word-piece vocabulary, whose ids index the wrong rows.

  Args:
    tokenizer_vocab_size: the tokenizer's number of ids (`tokenizers.Tokenizer
      .get_vocab_size()`, or the lines of vocab.txt).
    checkpoint_dir: the BERT checkpoint directory (its config.json's vocab_size is read).
    tokenizer_source: the tokenizer's name or path, for the message.

  Raises:
    VocabSizeMismatchError: naming both sizes and both sources.
    BertCheckpointError: the checkpoint directory or its config.json is unusable.
  """
  config = read_config(checkpoint_dir)
  source = str(epath.Path(checkpoint_dir) / CONFIG_FILE)
  if "vocab_size" not in config:
    raise BertCheckpointError(f"{source} has no vocab_size")
  size = _positive_int("vocab_size", config["vocab_size"], source)
  if int(tokenizer_vocab_size) != size:
    raise VocabSizeMismatchError(
        f"tokenizer vocabulary size {int(tokenizer_vocab_size)} ({tokenizer_source}) does "
        f"not match the BERT checkpoint's vocab_size {size} ({source}): use the tokenizer "
        f"(vocab.txt / tokenizer.json) that came with the checkpoint")
  return size


# -- weights files ----------------------------------------------------------------------------


def find_weights(checkpoint_dir: str | epath.PathLike) -> epath.Path:
  """The weights file of a checkpoint directory, in the order of `WEIGHT_FILES`.

  Raises:
    BertCheckpointNotFoundError: no directory, or none of `WEIGHT_FILES` in it.
  """
  path = _checkpoint_dir(checkpoint_dir)
  for name in WEIGHT_FILES:
    if (path / name).exists():
      return path / name
  raise BertCheckpointNotFoundError(
      f"BERT checkpoint directory {path} has no weights (found {_listing(path)}); expected "
      f"{SAFETENSORS_FILE} (or {SAFETENSORS_INDEX} with its shards, or {TORCH_FILE}, which "
      f"needs torch). TensorFlow (tf_model.h5) and flax (flax_model.msgpack) files are not "
      f"read: save the model with save_pretrained(dir, safe_serialization=True). {_PLACE_IT}")


def _check_not_lfs_pointer(path: epath.Path) -> None:
  with path.open("rb") as f:
    if f.read(len(_LFS_MAGIC)) == _LFS_MAGIC:
      raise BertCheckpointError(f"{path} is a Git LFS pointer, not the weights: run "
                                f"`git lfs pull` in {path.parent}")


def _read_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
  import safetensors  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  _check_not_lfs_pointer(path)
  try:
    try:
      return safetensors.numpy.load_file(str(path))
    except TypeError:
      # numpy has no bfloat16: such files are read through jax and cast to float32 below.
      with safetensors.safe_open(str(path), framework="flax") as f:
        return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
  except (OSError, ValueError, safetensors.SafetensorError) as e:
    raise BertCheckpointError(f"cannot read {path} as safetensors: {e}") from e


def _import_torch(path: epath.Path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise BertCheckpointError(
        f"{path} is a PyTorch pickle and reading it needs torch, which is not installed. "
        f"Either convert it to {SAFETENSORS_FILE} once where torch is available, e.g. "
        f"`python -c \"import transformers; transformers.BertModel.from_pretrained('"
        f"{path.parent}').save_pretrained('{path.parent}', safe_serialization=True)\"`, or "
        f'install torch (pip install -e ".[torch]")') from e
  return torch


def _read_torch(path: epath.Path) -> dict[str, np.ndarray]:
  torch = _import_torch(path)
  _check_not_lfs_pointer(path)
  try:
    with path.open("rb") as f:
      obj = torch.load(f, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch raises many kinds
    raise BertCheckpointError(f"cannot read {path} with torch.load: {e}") from e
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise BertCheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
  out = {}
  for name, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise BertCheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not "
                                f"a tensor")
    value = value.detach().cpu()
    out[name] = (value.float() if value.is_floating_point() else value).numpy()
  return out


def _read_sharded(index: epath.Path, read: Callable[[epath.Path], dict]) -> dict:
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (ValueError, KeyError, TypeError) as e:
    raise BertCheckpointError(f"{index} is not a weights index (a JSON object with a "
                              f"'weight_map'): {e}") from e
  out = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = index.parent / shard
    if not shard_path.exists():
      raise BertCheckpointNotFoundError(f"{index} names the shard {shard}, which is not in "
                                        f"{index.parent}")
    out.update(read(shard_path))
  return out


def read_state_dict(checkpoint_dir: str | epath.PathLike
                    ) -> tuple[dict[str, np.ndarray], epath.Path]:
  """(state dict {name: numpy array}, the weights file it came from) of a checkpoint dir.

  Raises:
    BertCheckpointNotFoundError: no directory or no weights file in it.
    BertCheckpointError: an unreadable file, a Git LFS pointer, or pytorch_model.bin
      without torch.
  """
  path = find_weights(checkpoint_dir)
  if path.name == SAFETENSORS_FILE:
    state = _read_safetensors(path)
  elif path.name == SAFETENSORS_INDEX:
    state = _read_sharded(path, _read_safetensors)
  else:
    _import_torch(path)  # the clear error before anything is read
    state = _read_torch(path) if path.name == TORCH_FILE else _read_sharded(path, _read_torch)
  return state, path


# -- conversion ------------------------------------------------------------------------------


class _Entry(NamedTuple):
  name: str                   # HF key, without the 'bert.' prefix
  target: tuple[str, ...]     # flax path under 'params'
  shape: tuple[int, ...]      # flax shape
  in_dims: int                # kernels: leading input dims of `shape`; 0: bias; -1: as is

  @property
  def torch_shape(self) -> tuple[int, ...]:
    if self.in_dims > 0:  # Linear weight [out, in]
      return (math.prod(self.shape[self.in_dims:]), math.prod(self.shape[:self.in_dims]))
    return (math.prod(self.shape),) if self.in_dims == 0 else self.shape

  def to_flax(self, value: np.ndarray) -> np.ndarray:
    if self.in_dims > 0:
      value = value.T
    return np.ascontiguousarray(value.reshape(self.shape), dtype=np.float32)


def _norm(name: str, path: tuple[str, ...], d: int) -> Iterable[_Entry]:
  yield _Entry(f"{name}.weight", path + ("scale",), (d,), -1)
  yield _Entry(f"{name}.bias", path + ("bias",), (d,), -1)


def _linear(name: str, path: tuple[str, ...], kernel: tuple[int, ...], in_dims: int,
            bias: tuple[int, ...]) -> Iterable[_Entry]:
  yield _Entry(f"{name}.weight", path + ("kernel",), kernel, in_dims)
  yield _Entry(f"{name}.bias", path + ("bias",), bias, 0)


def entries(kwargs: Mapping[str, Any]) -> list[_Entry]:
  """The HF key -> flax path table for `BertEncoder(**kwargs)`, shapes from the kwargs."""
  d, h, f = kwargs["hidden"], kwargs["heads"], kwargs["mlp"]
  dh = d // h
  out = [
      _Entry("embeddings.word_embeddings.weight", ("embeddings", "word", "embedding"),
             (kwargs["vocab_size"], d), -1),
      _Entry("embeddings.position_embeddings.weight", ("embeddings", "position", "embedding"),
             (kwargs["max_len"], d), -1),
      _Entry("embeddings.token_type_embeddings.weight",
             ("embeddings", "token_type", "embedding"), (kwargs["type_vocab"], d), -1),
      *_norm("embeddings.LayerNorm", ("embeddings", "norm"), d),
  ]
  for i in range(kwargs["layers"]):
    pre, layer = f"encoder.layer.{i}", (f"layer_{i}",)
    for qkv in ("query", "key", "value"):
      out += _linear(f"{pre}.attention.self.{qkv}", layer + ("attention", qkv), (d, h, dh), 1,
                     (h, dh))
    out += _linear(f"{pre}.attention.output.dense", layer + ("attention", "out"), (h, dh, d),
                   2, (d,))
    out += _norm(f"{pre}.attention.output.LayerNorm", layer + ("attention_norm",), d)
    out += _linear(f"{pre}.intermediate.dense", layer + ("mlp", "intermediate"), (d, f), 1,
                   (f,))
    out += _linear(f"{pre}.output.dense", layer + ("mlp", "output"), (f, d), 1, (d,))
    out += _norm(f"{pre}.output.LayerNorm", layer + ("mlp_norm",), d)
  if kwargs.get("pooler", True):
    out += _linear("pooler.dense", ("pooler",), (d, d), 1, (d,))
  return out


def _aliases(name: str) -> tuple[str, ...]:
  """`name` and its pre-2019 spelling (LayerNorm gamma/beta for weight/bias)."""
  if ".LayerNorm." in name:
    return (name, name.replace(".weight", ".gamma").replace(".bias", ".beta"))
  return (name,)


def _describe(kwargs: Mapping[str, Any]) -> str:
  keys = ("vocab_size", "hidden", "layers", "heads", "mlp", "max_len", "type_vocab", "pooler")
  return "BertEncoder(" + ", ".join(f"{k}={kwargs[k]}" for k in keys if k in kwargs) + ")"


def _shape(shape: Sequence[int]) -> str:
  return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _mismatch(what: str, source: str, kwargs: Mapping[str, Any], missing, unexpected,
              misshaped, note: str = "") -> BertParamMismatchError:
  lines = [f"{what} {source} do not fit {_describe(kwargs)}:"]
  if missing:
    lines.append(f"  missing {len(missing)} key(s):")
    lines += [f"    {k!r}: expected {_shape(s)}" for k, s in missing]
  if unexpected:
    lines.append(f"  {len(unexpected)} unexpected key(s){note}:")
    lines += [f"    {k!r}: found {_shape(s)}" for k, s in unexpected]
  if misshaped:
    lines.append(f"  {len(misshaped)} key(s) of the wrong shape:")
    lines += [f"    {k!r}: expected {_shape(w)}, found {_shape(g)}" for k, w, g in misshaped]
  return BertParamMismatchError("\n".join(lines), missing=missing, unexpected=unexpected,
                                misshaped=misshaped, source=source)


def _prefix(state_dict: Mapping[str, Any]) -> str:
  return PREFIX if any(k.startswith(PREFIX) for k in state_dict) else ""


def has_pooler(state_dict: Mapping[str, Any]) -> bool:
  """Whether a state dict holds any pooler.dense.* key (with or without 'bert.')."""
  prefix = _prefix(state_dict)
  return any(prefix + k in state_dict for k in POOLER_KEYS)


def convert_state_dict(state_dict: Mapping[str, Any], kwargs: Mapping[str, Any], *,
                       source: str = "state dict") -> tuple[dict[str, Any], list[str]]:
  """A Hugging Face BERT state dict -> (BertEncoder params, ignored keys).

  Args:
    state_dict: name -> array (numpy, or anything np.asarray takes).
    kwargs: the BertEncoder kwargs (`encoder_kwargs`), which fix every shape; with
      pooler=False any pooler.dense.* keys are ignored.
    source: the weights file, for messages.

  Returns:
    The nested params tree of float32 numpy arrays (what goes under 'params' for
    `BertEncoder(**kwargs).apply`), and the sorted state-dict keys left out on purpose
    ('cls.*' heads, saved buffers, and the pooler when kwargs['pooler'] is False).

  Raises:
    BertParamMismatchError: one error naming every missing, unexpected and mis-shaped key
      with its expected and found (torch-layout) shape, and the file.
  """
  prefix = _prefix(state_dict)
  ignored, by_name, unexpected = [], {}, []
  dropped = () if kwargs.get("pooler", True) else POOLER_KEYS
  for key in state_dict:
    name = key[len(prefix):] if key.startswith(prefix) else None
    if key.startswith(IGNORED_PREFIXES) or name in IGNORED_BUFFERS or name in dropped:
      ignored.append(key)
    elif name is None:
      unexpected.append(key)
    else:
      by_name[name] = key
  flat, missing, misshaped, used = {}, [], [], set()
  for e in entries(kwargs):
    found = next((a for a in _aliases(e.name) if a in by_name), None)
    if found is None:
      missing.append((prefix + e.name, e.torch_shape))
      continue
    used.add(found)
    value = np.asarray(state_dict[by_name[found]])
    if tuple(value.shape) != e.torch_shape:
      misshaped.append((by_name[found], e.torch_shape, tuple(value.shape)))
      continue
    flat[e.target] = e.to_flax(value)
  unexpected += [key for name, key in by_name.items() if name not in used]
  if missing or unexpected or misshaped:
    note = (f" (ignored are only {', '.join(p + '*' for p in IGNORED_PREFIXES)} and the "
            f"buffers {', '.join(IGNORED_BUFFERS)})")
    unexpected = [(k, tuple(np.shape(state_dict[k]))) for k in sorted(unexpected)]
    raise _mismatch("BERT weights", source, kwargs, missing, unexpected, misshaped, note)
  return traverse_util.unflatten_dict(flat), sorted(ignored)


@functools.lru_cache(maxsize=16)
def _expected_shapes(frozen_kwargs: tuple[tuple[str, Any], ...]
                     ) -> dict[tuple[str, ...], tuple[int, ...]]:
  model = text.BertEncoder(**dict(frozen_kwargs))
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
  init = functools.partial(model.init, train=False)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0), ids, mask)["params"]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(abstract)).items()}


def expected_shapes(kwargs: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {flax path: shape} of `BertEncoder(**kwargs)`'s params, from `jax.eval_shape`."""
  return dict(_expected_shapes(tuple(sorted(kwargs.items()))))


def validate_params(params: Mapping[str, Any], kwargs: Mapping[str, Any], *,
                    source: str = "converted BERT parameters") -> None:
  """Checks a params tree against `BertEncoder(**kwargs).init`'s, by `jax.eval_shape`.

  Raises:
    BertParamMismatchError: one error naming every missing, unexpected and mis-shaped
      parameter ('/'-joined flax paths) with its expected and found shape.
  """
  want = expected_shapes(kwargs)
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(params)).items()}
  join = "/".join
  missing = [(join(k), s) for k, s in sorted(want.items()) if k not in got]
  unexpected = [(join(k), s) for k, s in sorted(got.items()) if k not in want]
  misshaped = [(join(k), want[k], s) for k, s in sorted(got.items())
               if k in want and want[k] != s]
  if missing or unexpected or misshaped:
    raise _mismatch("BERT parameters from", source, kwargs, missing, unexpected, misshaped)


class BertCheckpoint(NamedTuple):
  """A converted checkpoint: `BertEncoder(**kwargs).apply({'params': params}, ...)`."""
  kwargs: dict[str, Any]
  params: dict[str, Any]
  ignored: list[str]          # state-dict keys left out on purpose (cls.*, buffers, ...)
  weights_file: str
  config_file: str


def load_checkpoint(checkpoint_dir: str | epath.PathLike, *,
                    pooler: bool | None = None) -> BertCheckpoint:
  """Reads and converts a local Hugging Face BERT checkpoint directory (module docstring).

  Args:
    checkpoint_dir: the folder with config.json and the weights.
    pooler: None: keep the pooler when the checkpoint has one (pooler.dense.*), else build
      the encoder without it ('pooled' is then the [CLS] token); True: require it; False:
      ignore it.

  Raises:
    BertCheckpointError (every subclass): see `read_config`, `encoder_kwargs`,
      `read_state_dict`, `convert_state_dict`, `validate_params`.
  """
  config = read_config(checkpoint_dir)
  config_file = str(epath.Path(checkpoint_dir) / CONFIG_FILE)
  encoder_kwargs(config, source=config_file)  # config errors before the weights are read
  state_dict, weights = read_state_dict(checkpoint_dir)
  if pooler is None:
    pooler = has_pooler(state_dict)
  kwargs = encoder_kwargs(config, source=config_file, pooler=pooler)
  params, ignored = convert_state_dict(state_dict, kwargs, source=str(weights))
  validate_params(params, kwargs, source=str(weights))
  if ignored:
    logging.info("%s: ignored %d key(s): %s", weights, len(ignored), ignored)
  if not pooler:
    logging.info("%s: no pooler; BertEncoder(pooler=False) returns the [CLS] token as "
                 "'pooled'", weights)
  return BertCheckpoint(kwargs, params, ignored, str(weights), config_file)


def convert_checkpoint(checkpoint_dir: str | epath.PathLike, *, pooler: bool | None = None
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(BertEncoder kwargs, params tree of float32 numpy arrays) of a checkpoint directory.

  `load_checkpoint` without the bookkeeping; the ignored keys are logged.
  """
  checkpoint = load_checkpoint(checkpoint_dir, pooler=pooler)
  return checkpoint.kwargs, checkpoint.params


# -- converted files --------------------------------------------------------------------------


def save_converted(path: str | epath.PathLike, kwargs: Mapping[str, Any],
                   params: Mapping[str, Any]) -> None:
  """Writes {'encoder_kwargs': JSON, 'params': tree} as flax msgpack (`load_converted`)."""
  data = serialization.msgpack_serialize(
      {"encoder_kwargs": json.dumps(dict(kwargs), sort_keys=True),
       "params": jax.tree.map(np.asarray, dict(params))})
  epath.Path(path).write_bytes(data)


def save_npz(path: str | epath.PathLike, params: Mapping[str, Any], *, prefix: str = "txt",
             max_len: int | None = None) -> None:
  """Writes the encoder's params as an .npz of 'params/<prefix>/...' keys, the form a stage's
  `init_from` reads (param_sources), e.g. hybridmed's text tower:
    --config.stages.summariser.init_from=bert.npz --config.stages.summariser.init_params=txt/.*
  `max_len` keeps the first max_len rows of the position table (a model built for shorter
  texts than the checkpoint's 512 positions: BERT's positions are absolute, so the first rows
  are the ones those texts use)."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  key = "embeddings/position/embedding"
  if max_len is not None:
    if max_len > flat[key].shape[0]:
      raise BertCheckpointError(f"max_len={max_len} exceeds the checkpoint's "
                                f"{flat[key].shape[0]} positions")
    flat[key] = flat[key][:max_len]
  with epath.Path(path).open("wb") as f:
    np.savez(f, **{f"params/{prefix}/{k}": np.asarray(v, np.float32) for k, v in flat.items()})


def load_converted(path: str | epath.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """(kwargs, params) from a file of `save_converted`, validated like a fresh conversion.

  Raises:
    BertCheckpointNotFoundError: no file at `path`.
    BertCheckpointError: not such a file; BertParamMismatchError: params that do not fit
      the stored kwargs.
  """
  p = epath.Path(path)
  if not p.exists():
    raise BertCheckpointNotFoundError(f"no converted BERT parameters at {p}")
  try:
    data = serialization.msgpack_restore(p.read_bytes())
    kwargs, params = json.loads(data["encoder_kwargs"]), data["params"]
  except Exception as e:  # pylint: disable=broad-except  # msgpack raises many kinds
    raise BertCheckpointError(f"{p} is not a converted BERT file (bert_convert --out): "
                              f"{e}") from e
  validate_params(params, kwargs, source=str(p))
  return kwargs, params


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: DIR [--out=FILE.msgpack] [--tokenizer=FILE | --tokenizer_vocab_size=N]
  [--no_pooler].

  A checkpoint that cannot be imported prints the error and exits with code 2.
  """
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("checkpoint_dir", help="local folder with config.json and the weights")
  parser.add_argument("--out", default=None, help="write the converted parameters (msgpack)")
  parser.add_argument("--npz", default=None, help="write them as an .npz of "
                      "'params/txt/...' keys for a stage's init_from")
  parser.add_argument("--max_len", type=int, default=None,
                      help="--npz: keep the first max_len position embeddings")
  parser.add_argument("--tokenizer", default=None,
                      help="a tokenizer.json or vocab.txt to check against the checkpoint")
  parser.add_argument("--tokenizer_vocab_size", type=int, default=None,
                      help="check the tokenizer's vocabulary size against the checkpoint's")
  parser.add_argument("--no_pooler", action="store_true",
                      help="drop the pooler even if the checkpoint has one")
  args = parser.parse_args(argv)
  from medguide_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  try:
    if args.tokenizer is not None:
      check_vocab_size(tokenizer_lib.load(args.tokenizer).get_vocab_size(with_added_tokens=True),
                       args.checkpoint_dir, tokenizer_source=args.tokenizer)
    if args.tokenizer_vocab_size is not None:
      check_vocab_size(args.tokenizer_vocab_size, args.checkpoint_dir,
                       tokenizer_source="--tokenizer_vocab_size")
    checkpoint = load_checkpoint(args.checkpoint_dir,
                                 pooler=False if args.no_pooler else None)
  except (BertCheckpointError, tokenizer_lib.TokenizerError) as e:  # exit 2, as a config error
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e
  n = sum(np.size(v) for v in jax.tree.leaves(checkpoint.params))
  print(f"{checkpoint.weights_file}: {_describe(checkpoint.kwargs)}, {n:,} parameters")
  print(f"encoder kwargs: {json.dumps(checkpoint.kwargs, sort_keys=True)}")
  print(f"ignored {len(checkpoint.ignored)} key(s)"
        + (f": {', '.join(checkpoint.ignored)}" if checkpoint.ignored else ""))
  if args.out:
    save_converted(args.out, checkpoint.kwargs, checkpoint.params)
    print(f"wrote {args.out}")
  if args.npz:
    try:
      save_npz(args.npz, checkpoint.params, max_len=args.max_len)
    except BertCheckpointError as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(2) from e
    print(f"wrote {args.npz}")


if __name__ == "__main__":
  main()
