"""Parameter paths: the one tree-path -> 'a/b/c' naming and the one regex matcher.

Every regex over parameter paths in a config (`freeze`, `opt.weight_decay_mask`,
`opt.freeze_steps_params`, `init_params`, `mesh.fsdp_rules`) must match a whole path
(`re.fullmatch`), and one that matches no path is an error that shows real paths.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import jax

PyTree = Any


def key_str(key: Any) -> str:
  """One path entry as text: a dict key (flax params), else an attribute or index."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  return str(getattr(key, "key", key))


def path_str(path: tuple[Any, ...]) -> str:
  """A jax key path as 'a/b/c'."""
  return "/".join(key_str(k) for k in path)


def flatten(tree: PyTree) -> dict[str, Any]:
  """{'a/b/c': leaf} in jax.tree leaf order."""
  return {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def paths(tree: PyTree) -> list[str]:
  """The '/'-joined path of every leaf, in jax.tree leaf order."""
  return list(flatten(tree))


def compile_regex(regex: str, what: str) -> re.Pattern:
  """re.compile, with an error naming the config key."""
  try:
    return re.compile(regex)
  except re.error as e:
    raise ValueError(f"{what}={regex!r} is not a valid regex: {e}") from e


def fullmatch_mask(tree: PyTree, regex: str) -> PyTree:
  """A tree like `tree` with True where the leaf's path fully matches `regex`."""
  pattern = re.compile(regex)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: pattern.fullmatch(path_str(path)) is not None, tree)


def examples(names: Iterable[str], limit: int = 8) -> str:
  names = list(names)
  return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def check_matches(names: list[str], regex: str, what: str) -> None:
  """Raises ValueError when `regex` fully matches none of `names` (showing some)."""
  pattern = compile_regex(regex, what)
  if not any(pattern.fullmatch(n) for n in names):
    raise ValueError(f"{what} regex {regex!r} matches no parameter path (paths look like: "
                     f"{examples(names)})")
