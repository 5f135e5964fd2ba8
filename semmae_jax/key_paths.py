"""Parameter paths as 'blocks_3/attn/qkv/kernel' strings: the language of every regex table
(sharding rules, optimizer tables, converter key table)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax

# The class / mask tokens and the position tables: no weight decay (optim), replicated (sharding).
TOKENS_AND_TABLES = r"(^|/)(cls_token|mask_token|pos_embed|decoder_pos_embed)$"


def path_str(key_path: tuple) -> str:
    """A jax key path -> 'a/b/c'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in key_path)


def flat_by_path(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """{'a/b/c': leaf} for every leaf of `tree`."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def map_with_path(fn: Callable[[str, Any], Any], tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """A tree like `tree` with fn('a/b/c', leaf) at every leaf."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree, is_leaf=is_leaf)


def summarize(paths: list[str]) -> str:
    """'blocks_0/mlp/fc1/kernel', 'blocks_1/...' -> 'blocks_*/mlp/fc1/kernel (x2), ...': short reports."""
    counts = Counter(re.sub(r"_\d+(?=/|$)", "_*", path) for path in paths)
    return ", ".join(f"{p} (x{n})" if n > 1 else p for p, n in counts.items()) or "none"
