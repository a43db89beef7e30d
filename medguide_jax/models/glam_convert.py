"""Converts the official GLAM PyTorch weights (nyukat/GLAM models/*.ckpt) to `glam.GLAM`.

The checkpoints are state dicts of `MILSingleImageModel` (src/modeling/glam.py). Its
state_dict() order follows module registration: `global_network` (GlobalNetworkGeneric:
`downsampling_branch` = ResNetV2 with first_conv, layer_list.{i}.{j} = BasicBlockV2
{bn1, conv1, bn2, conv2, downsample.0}, final_bn; then `postprocess_module` =
PostProcessingStandard with gn_conv_1, gn_conv_2, gn_conv_last, combine), then
`detection_network` (DetectionNetworkResNetv3: dn_resnet = ResNetlocal with conv1, bn1,
layer{1..4}.{j} = torchvision BasicBlock {conv1, bn1, conv2, bn2, downsample.{0,1}}; then
gn_conv_last). The aggregators and the region proposal network are plain objects without
weights. Within a module, parameters come before buffers (BN: weight, bias, running_mean,
running_var, num_batches_tracked).

Loading is strict, unlike the reference's `load_state_dict(strict=False)`: every
parameter and BN statistic of our model must be present (else ValueError listing them);
ignored are exactly the training-time heads the released model drops (`mil.`,
`fusion_dnn.`, `shared_rep_filter.`, METHODS.md 4), every `num_batches_tracked`, and
`global_network.postprocess_module.combine.weight` (defined but never used in forward);
any other key is an error. Conv weights go OIHW -> HWIO; BN weight/bias -> params
scale/bias, running_mean/var -> batch_stats mean/var. Shapes are checked against the
model's own initialisation.

The local ResNet depth (18 or 34; `load_variables` and the command line infer it, as does
`convert_state_dict(local_depth=None)`) is read from the whole set of `detection_network.*`
keys: the depth whose required keys differ from the checkpoint's in the fewest names
(`detect_local_depth`). A checkpoint with one key lost is thus still recognised and the
error names that key; a key set that fits both depths equally well is an error.

Command line (writes an .npz that `load_variables` reads; needs `pip install -e ".[torch]"`):
  python -m medguide_jax.models.glam_convert --checkpoint=models/model_sep.ckpt \
      --output=glam_sep.npz
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from medguide_jax.models import glam as glam_lib

IGNORED_PREFIXES = ("mil.", "fusion_dnn.", "shared_rep_filter.")
UNUSED_KEYS = ("global_network.postprocess_module.combine.weight",)
DEFAULT_GLOBAL_WIDTHS = (16, 32, 64, 128, 256)
_GLOBAL_STRIDES = (1, 2, 2, 2, 2)
_GLOBAL_BLOCKS = 2
_LFS_MAGIC = b"version https://git-lfs"


class _Entry(NamedTuple):
  name: str                   # PyTorch state-dict key
  shape: tuple[int, ...]      # PyTorch shape
  target: tuple[str, ...] | None  # flax path ('params'|'batch_stats', ...), None = ignored
  conv: bool                  # OIHW -> HWIO


def _conv(name: str, out_ch: int, in_ch: int, k: int, path: tuple[str, ...]) -> _Entry:
  return _Entry(name, (out_ch, in_ch, k, k), ("params",) + path + ("kernel",), True)


def _bn(name: str, ch: int, path: tuple[str, ...]) -> Iterator[_Entry]:
  yield _Entry(f"{name}.weight", (ch,), ("params",) + path + ("scale",), False)
  yield _Entry(f"{name}.bias", (ch,), ("params",) + path + ("bias",), False)
  yield _Entry(f"{name}.running_mean", (ch,), ("batch_stats",) + path + ("mean",), False)
  yield _Entry(f"{name}.running_var", (ch,), ("batch_stats",) + path + ("var",), False)
  yield _Entry(f"{name}.num_batches_tracked", (), None, False)


def _global_entries(widths: Sequence[int]) -> Iterator[_Entry]:
  pre, path = "global_network.downsampling_branch", ("global_net", "backbone")
  yield _conv(f"{pre}.first_conv.weight", widths[0], 1, 7, path + ("stem_conv",))
  in_ch = widths[0]
  for i, width in enumerate(widths):
    for j in range(_GLOBAL_BLOCKS):
      name, block = f"{pre}.layer_list.{i}.{j}", path + (f"stage{i + 1}_block{j + 1}",)
      yield from _bn(f"{name}.bn1", in_ch, block + ("norm1",))
      yield _conv(f"{name}.conv1.weight", width, in_ch, 3, block + ("conv1",))
      yield from _bn(f"{name}.bn2", width, block + ("norm2",))
      yield _conv(f"{name}.conv2.weight", width, width, 3, block + ("conv2",))
      if j == 0:
        yield _conv(f"{name}.downsample.0.weight", width, in_ch, 1, block + ("proj_conv",))
      in_ch = width
  yield from _bn(f"{pre}.final_bn", widths[-1], path + ("final_norm",))
  pre, path = "global_network.postprocess_module", ("global_net", "heads")
  for torch_name, ours, ch in (("gn_conv_1", "a1_conv", widths[-3]),
                               ("gn_conv_2", "a2_conv", widths[-2]),
                               ("gn_conv_last", "a3_conv", widths[-1])):
    yield _conv(f"{pre}.{torch_name}.weight", glam_lib.NUM_CLASSES, ch, 1, path + (ours,))
  yield _Entry(f"{pre}.combine.weight", (glam_lib.NUM_CLASSES, 3 * glam_lib.NUM_CLASSES, 1, 1),
               None, True)


def _local_entries(depth: int, width: int) -> Iterator[_Entry]:
  if depth not in glam_lib.LOCAL_STAGE_SIZES:
    raise ValueError(f"local_depth must be one of {sorted(glam_lib.LOCAL_STAGE_SIZES)}, "
                     f"got {depth}")
  pre, path = "detection_network.dn_resnet", ("local_net",)
  yield _conv(f"{pre}.conv1.weight", width, 3, 7, path + ("stem_conv",))
  yield from _bn(f"{pre}.bn1", width, path + ("stem_norm",))
  in_ch = width
  for i, blocks in enumerate(glam_lib.LOCAL_STAGE_SIZES[depth]):
    planes = width * 2**i
    for j in range(blocks):
      name, block = f"{pre}.layer{i + 1}.{j}", path + (f"stage{i + 1}_block{j + 1}",)
      yield _conv(f"{name}.conv1.weight", planes, in_ch, 3, block + ("conv1",))
      yield from _bn(f"{name}.bn1", planes, block + ("norm1",))
      yield _conv(f"{name}.conv2.weight", planes, planes, 3, block + ("conv2",))
      yield from _bn(f"{name}.bn2", planes, block + ("norm2",))
      if in_ch != planes:
        yield _conv(f"{name}.downsample.0.weight", planes, in_ch, 1, block + ("proj_conv",))
        yield from _bn(f"{name}.downsample.1", planes, block + ("proj_norm",))
      in_ch = planes
  yield _conv("detection_network.gn_conv_last.weight", glam_lib.NUM_CLASSES, in_ch, 1,
              path + ("head_conv",))


def _entries(local_depth: int, global_widths: Sequence[int], local_width: int) -> list[_Entry]:
  if len(global_widths) != len(_GLOBAL_STRIDES):
    raise ValueError(f"global_widths must have {len(_GLOBAL_STRIDES)} entries, got "
                     f"{tuple(global_widths)}")
  return list(_global_entries(tuple(global_widths))) + list(
      _local_entries(local_depth, local_width))


def reference_state_dict_keys(local_depth: int = 34, *,
                              global_widths: Sequence[int] = DEFAULT_GLOBAL_WIDTHS,
                              local_width: int = 64) -> list[tuple[str, tuple[int, ...]]]:
  """(name, shape) of every entry of MILSingleImageModel.state_dict(), in its order.

  Includes the BN `num_batches_tracked` buffers (shape (), int64 in PyTorch) and the
  unused `combine` conv; excludes the training-only `mil.`/`fusion_dnn.`/
  `shared_rep_filter.` heads, which the released model class does not define. The
  reference hard-codes the defaults; other widths describe the same layout scaled.
  """
  return [(e.name, e.shape) for e in _entries(local_depth, global_widths, local_width)]


def _expected_shapes(local_depth: int, global_widths: Sequence[int],
                     local_width: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of GLAM's variables, from an abstract initialisation."""
  model = glam_lib.GLAM(global_widths=tuple(global_widths), local_depth=local_depth,
                        local_width=local_width, crop_shape=(32, 32))
  x = jax.ShapeDtypeStruct((1, 256, 256, 1), jnp.float32)
  init = functools.partial(model.init, train=False, local=True)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0), x)
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(abstract)).items()}


def _is_ignored(name: str) -> bool:
  return (name.startswith(IGNORED_PREFIXES) or name in UNUSED_KEYS
          or name.endswith(".num_batches_tracked"))


def convert_state_dict(state_dict: Mapping[str, Any], *, local_depth: int | None = 34,
                       global_widths: Sequence[int] = DEFAULT_GLOBAL_WIDTHS,
                       local_width: int = 64) -> dict[str, Any]:
  """The official PyTorch state dict -> GLAM variables {'params', 'batch_stats'}.

  Args:
    state_dict: name -> array (numpy, or anything np.asarray accepts).
    local_depth: depth of the checkpoint's local ResNet (34 for the released models);
      None: inferred from the state dict's keys (`detect_local_depth`).
    global_widths, local_width: the architecture, for scaled-down test models.

  Returns:
    Nested dicts of float32 numpy arrays for `GLAM(global_widths, local_depth,
    local_width).apply`.

  Raises:
    ValueError: naming the missing keys, the unexpected keys, or a key whose shape does not
      fit the model; or, for local_depth=None, a key set that fits no depth better than
      another.
  """
  if local_depth is None:
    local_depth = detect_local_depth(state_dict)
  entries = _entries(local_depth, global_widths, local_width)
  known = {e.name for e in entries}
  missing = [e.name for e in entries if e.target is not None and e.name not in state_dict]
  if missing:
    raise ValueError(f"GLAM state dict lacks {len(missing)} key(s): {missing}")
  unexpected = [k for k in state_dict if k not in known and not _is_ignored(k)]
  if unexpected:
    raise ValueError(f"GLAM state dict has {len(unexpected)} unexpected key(s): {unexpected} "
                     f"(only {list(IGNORED_PREFIXES)}, num_batches_tracked and "
                     f"{list(UNUSED_KEYS)} are ignored)")
  expected = _expected_shapes(local_depth, global_widths, local_width)
  flat = {}
  for e in entries:
    if e.target is None:
      continue
    value = np.asarray(state_dict[e.name], dtype=np.float32)
    if e.conv:
      if value.ndim != 4:
        raise ValueError(f"state dict key {e.name!r} has shape {value.shape}; a conv weight "
                         f"{e.shape} (OIHW) was expected")
      value = value.transpose(2, 3, 1, 0)
    want = expected[e.target]
    if value.shape != want:
      torch_want = (want[3], want[2], want[0], want[1]) if e.conv else want
      raise ValueError(f"state dict key {e.name!r} has shape {np.shape(state_dict[e.name])}; "
                       f"the GLAM model expects {torch_want} (flax {'/'.join(e.target)})")
    flat[e.target] = value
  left = sorted("/".join(k) for k in set(expected) - set(flat))
  if left:  # the table above and the model disagree: a bug here, not in the input
    raise AssertionError(f"glam_convert does not fill model variables {left}")
  return traverse_util.unflatten_dict(flat)


def load_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint into {name: numpy array}, on CPU.

  Unwraps a {'model': ...} or {'state_dict': ...} wrapper. Needs torch, imported here.

  Raises:
    FileNotFoundError: no file at `path`.
    ImportError: torch is not installed.
    ValueError: a Git LFS pointer instead of the weights, or a non-tensor entry.
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"no checkpoint at {path}")
  with p.open("rb") as f:
    if f.read(len(_LFS_MAGIC)) == _LFS_MAGIC:
      raise ValueError(f"{path} is a Git LFS pointer, not the weights: run `git lfs pull`")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'reading {path} needs PyTorch: pip install -e ".[torch]"') from e
  with p.open("rb") as f:
    obj = torch.load(f, map_location="cpu", weights_only=True)
  for wrapper in ("model", "state_dict"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  out = {}
  for name, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    out[name] = value.detach().cpu().numpy()
  return out


def save_variables(path: str, variables: Mapping[str, Any]) -> None:
  """Writes converted variables as an .npz keyed 'params/global_net/...'."""
  flat = traverse_util.flatten_dict(dict(variables), sep="/")
  with epath.Path(path).open("wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})


_LOCAL_PREFIX = "detection_network."


@functools.lru_cache(maxsize=None)
def _local_required_keys(depth: int) -> frozenset[str]:
  """Names of the local module's entries that `convert_state_dict` requires at `depth`."""
  # Names do not depend on the width (projections sit where the width doubles).
  return frozenset(e.name for e in _local_entries(depth, 64) if e.target is not None)


def detect_local_depth(state_dict: Mapping[str, Any]) -> int:
  """The local ResNet depth (18 or 34) whose key set best explains the state dict's.

  Compares the required `detection_network.*` keys of every candidate depth with the
  state dict's own (ignored keys such as num_batches_tracked left out) and picks the depth
  with the fewest differing names, missing plus unexpected. ResNet-18's 101 names are a
  subset of ResNet-34's 181, so a complete checkpoint of either depth differs from its own
  depth in no name and from the other in 80: a few lost or stray keys leave the depth
  recognised, and `convert_state_dict` at that depth then names exactly those keys.

  Raises:
    ValueError: the state dict has no `detection_network.*` keys, or two depths fit its
      keys equally well (naming both).
  """
  given = {k for k in state_dict if k.startswith(_LOCAL_PREFIX) and not _is_ignored(k)}
  if not given:
    raise ValueError(f"GLAM state dict has no {_LOCAL_PREFIX}* (local module) keys: cannot "
                     f"tell the local ResNet depth; expected those of ResNet-"
                     f"{' or ResNet-'.join(map(str, sorted(glam_lib.LOCAL_STAGE_SIZES)))}")
  differ = {depth: len(_local_required_keys(depth) ^ given)
            for depth in sorted(glam_lib.LOCAL_STAGE_SIZES)}
  fewest = min(differ.values())
  best = [depth for depth, n in differ.items() if n == fewest]
  if len(best) > 1:
    raise ValueError(
        f"cannot tell the local ResNet depth of the GLAM state dict: its {len(given)} "
        f"{_LOCAL_PREFIX}* keys fit " + " and ".join(f"ResNet-{d}" for d in best)
        + f" equally well ({fewest} missing or unexpected keys each); pass local_depth")
  return best[0]


def load_variables(path: str, *, like: Mapping[str, Any]) -> dict[str, Any]:
  """GLAM variables from an .npz written by this module or from a PyTorch checkpoint.

  Args:
    path: `*.npz` (see `save_variables`), else a PyTorch checkpoint (needs torch),
      converted for the released architecture (default widths, local depth read from
      the checkpoint).
    like: the model's own variables (e.g. from `GLAM.init`); the result has exactly its
      structure, shapes and dtypes.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: naming a missing, unexpected or mis-shaped variable.
  """
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"no GLAM weights at {path}")
  if p.suffix == ".npz":
    with p.open("rb") as f, np.load(f) as data:
      loaded = traverse_util.unflatten_dict({tuple(k.split("/")): data[k] for k in data.files})
  else:
    state = load_torch_checkpoint(path)
    loaded = convert_state_dict(state, local_depth=detect_local_depth(state))
  return _match(loaded, like, path)


def _match(loaded: Mapping[str, Any], like: Mapping[str, Any], path: str) -> dict[str, Any]:
  got = traverse_util.flatten_dict(dict(loaded), sep="/")
  want = traverse_util.flatten_dict(dict(like), sep="/")
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(f"{path}: variables missing {missing}, unexpected {extra}")
  out = {}
  for k, ref in want.items():
    if tuple(np.shape(got[k])) != tuple(np.shape(ref)):
      raise ValueError(f"{path}: {k} has shape {np.shape(got[k])}, the model expects "
                       f"{np.shape(ref)}")
    out[k] = np.asarray(got[k], dtype=ref.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: --checkpoint=PATH.ckpt --output=PATH.npz [--local_depth=34]."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="official GLAM .ckpt")
  parser.add_argument("--output", required=True, help="where to write the .npz")
  parser.add_argument("--local_depth", type=int, default=None,
                      help="18 or 34 (default: inferred from the checkpoint)")
  args = parser.parse_args(argv)
  state = load_torch_checkpoint(args.checkpoint)
  depth = args.local_depth or detect_local_depth(state)
  variables = convert_state_dict(state, local_depth=depth)
  save_variables(args.output, variables)
  n = sum(np.size(v) for v in jax.tree.leaves(variables))
  print(f"wrote {args.output}: {n} values (local ResNet-{depth})")


if __name__ == "__main__":
  main()
