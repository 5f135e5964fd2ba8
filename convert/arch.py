"""Which registered model a state dict belongs to, read from its keys and shapes.

A `.pth` carries no model name (MAE's `args.model`, when saved, is only a hint), so the
architecture is read from the tensors: the family from the keys (decoder -> MAE
pretraining; `head` / `fc_norm` / `norm` -> classifier, global pool or cls token;
neither decoder nor head -> an encoder-only file; `pooler` -> transformers' ViTModel
pooler), the widths, depths, patch size, channels, mlp ratio, image size and whether
q, k, v have biases from the shapes. Head counts are not in any shape,
so the registered model with the same shapes supplies them; with none, the standard
rule (head_dim 64 in the encoder, 16 heads at width 512 in the decoder) is applied
and said so. Everything the registry's entry does not already fix (image size,
classes, pooling, and the shapes themselves for an unregistered model) becomes a
`create_model` override.

Expected shapes come from the Flax model itself (`jax.eval_shape` of its `init`)
mapped through the key table, so the check cannot disagree with the model it guards.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from convert.table import ConversionError, Shape, canonical_order, flatten, torch_key_and_shape
from semmae_jax.image_size import ImageSize, height_width, image_size, size_text
from semmae_jax.models import create_model, model_family, model_names

log = logging.getLogger(__name__)

# Fields read from the shapes that a registered name fixes (it matches only if they agree).
# The image size, classes, pooling and bands (`in_chans`: a 4-band ViT-B/16 is still ViT-B/16) are free.
_STRUCTURE = ("patch_size", "embed_dim", "depth", "mlp_ratio", "decoder_embed_dim", "decoder_depth")
ENCODER_HEAD_DIM = 64  # ViT-B/L/H all use 64-wide heads
DECODER_HEAD_DIM = 32  # MAE's decoder: 16 heads at width 512
_SHOWN = 8  # wrong shapes listed in an error; a different model altogether would list them all
_FAMILY_WORDS = {"mae": "an MAE pretraining model", "vit": "a ViT classifier"}


@dataclass(frozen=True)
class Architecture:
    """A registered model name plus the `create_model` overrides that make it fit a checkpoint."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "img_size" in self.overrides:  # a JSON meta's [24, 40] is the size (24, 40)
            object.__setattr__(self, "overrides", {**self.overrides, "img_size": image_size(self.overrides["img_size"])})

    @property
    def family(self) -> str:
        return model_family(self.name)

    @property
    def config(self) -> dict[str, Any]:
        """Every constructor field of the model, registry defaults and class defaults included."""
        return full_config(self.name, **self.overrides)

    def __str__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.overrides.items())
        return f"{self.name}({extra})" if extra else self.name

    def with_overrides(self, **changes: Any) -> Architecture:
        """The same model with `changes`; overrides equal to the registry's value are dropped."""
        registered = full_config(self.name)
        merged = {**self.overrides, **changes}
        return Architecture(self.name, {k: v for k, v in merged.items() if registered.get(k) != v})

    def flax_shapes(self) -> dict[str, Shape]:
        """{'blocks_0/attn/qkv/kernel': shape, ...} of the model's params."""
        return dict(_flax_shapes(self.name, tuple(sorted(self.overrides.items()))))

    def torch_shapes(self) -> dict[str, Shape]:
        """{'blocks.0.attn.qkv.weight': shape, ...} in the original's state_dict order."""
        return dict(_torch_shapes(self.name, tuple(sorted(self.overrides.items()))))


def full_config(name: str, **overrides: Any) -> dict[str, Any]:
    """`model_config` completed with the module's own defaults (`img_size`, `mlp_ratio`, ...)."""
    model = create_model(name, **overrides)
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ("parent", "name")}


@functools.lru_cache(maxsize=32)
def _torch_shapes(name: str, overrides: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Shape], ...]:
    shapes = dict(torch_key_and_shape(path, shape) for path, shape in _flax_shapes(name, overrides))
    return tuple((key, shapes[key]) for key in canonical_order(shapes, model_family(name)))


@functools.lru_cache(maxsize=32)
def _flax_shapes(name: str, overrides: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Shape], ...]:
    model = create_model(name, **dict(overrides))
    config = full_config(name, **dict(overrides))
    images = jax.ShapeDtypeStruct((1, *height_width(config["img_size"]), config["in_chans"]), jnp.float32)
    rngs = {"params": jax.random.key(0), "mask": jax.random.key(0)}
    variables = jax.eval_shape(lambda x: nn.meta.unbox(model.init(rngs, x)), images)
    return tuple((path, tuple(leaf.shape)) for path, leaf in flatten(variables["params"]).items())


def infer_architecture(
    shapes: Mapping[str, Shape],
    model_name: str | None = None,
    *,
    hint: str | None = None,
    stated: Mapping[str, Any] | None = None,
    requested_size: ImageSize | None = None,
) -> Architecture:
    """The model a torch-layout state dict (given as key -> shape) belongs to.

    Args:
      shapes: torch keys (prefixes already stripped) and their shapes.
      model_name: a registered name to use; image size, classes and pooling are still
        read from the shapes, everything else is the name's (the shape check then
        reports any disagreement).
      hint: a name the file itself suggests (MAE's `args.model`); preferred among the
        registered names whose shapes match.
      stated: fields a config file beside the tensors states and the shapes cannot show
        (head counts, `layer_norm_eps`, `norm_pix_loss`: transformers' `config.json`);
        they become overrides, and stated head counts replace the head_dim rule. A stated
        `img_size` gives the position table's grid (`read_layout`).
      requested_size: the image size the caller will resample the tables to: the grid of a
        table that is not square when it fits (`read_layout`).
    """
    stated = dict(stated or {})
    family, found = read_layout(shapes, stated.pop("img_size", None), requested_size)
    if model_name is not None:
        if model_family(model_name) != family:
            raise ConversionError(
                f"the checkpoint holds {describe(family, found)}, but {model_name} is {_FAMILY_WORDS[model_family(model_name)]}"
            )
        arch = Architecture(model_name).with_overrides(**_free_fields(found), **stated)
    else:
        arch = _registered_or_rule(family, found, hint, stated)
    log.info("checkpoint holds %s: model %s", describe(family, found), arch)
    return arch


def read_layout(shapes: Mapping[str, Shape], stated_size: ImageSize | Sequence[int] | None = None,
                requested_size: ImageSize | None = None) -> tuple[str, dict[str, Any]]:
    """(family, config fields) read from the keys and shapes of a torch-layout state dict.

    A position table holds rows x columns positions, which its shape alone cannot split: the
    image size a config beside the tensors states (`stated_size`) does; without one a table is
    square when it can be, else of the size asked for (`requested_size`, `--img_size H W`)."""
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    absent = [key for key in needed if key not in shapes]
    if absent:
        raise ConversionError(
            f"not a ViT / MAE state dict: no {', '.join(absent)} (its first keys: {list(shapes)[:5]})"
        )
    embed_dim, in_chans, patch, patch_w = shapes["patch_embed.proj.weight"]
    if patch != patch_w:
        raise ConversionError(f"non-square patches {patch}x{patch_w} in patch_embed.proj.weight are not supported")
    size = _table_size(shapes["pos_embed"], patch, stated_size, requested_size)
    hidden = shapes.get("blocks.0.mlp.fc1.weight", (4 * embed_dim,))[0]
    found = dict(patch_size=patch, in_chans=in_chans, embed_dim=embed_dim, depth=_count_blocks(shapes, "blocks"),
                 mlp_ratio=hidden / embed_dim, img_size=size)  # fmt: skip
    if "blocks.0.attn.qkv.weight" in shapes:
        found["qkv_bias"] = "blocks.0.attn.qkv.bias" in shapes
    if "decoder_embed.weight" in shapes:
        found.update(
            decoder_embed_dim=shapes["decoder_embed.weight"][0], decoder_depth=_count_blocks(shapes, "decoder_blocks")
        )
        return "mae", found
    found.update(
        num_classes=shapes["head.weight"][0] if "head.weight" in shapes else 0, global_pool="fc_norm.weight" in shapes,
        pooler="pooler.weight" in shapes,
    )
    return "vit", found


def _table_size(table: Shape, patch: int, stated: ImageSize | Sequence[int] | None,
                requested: ImageSize | None) -> ImageSize:
    """The image size of a [1, 1 + rows*columns, D] position table (`read_layout`)."""
    positions = table[1] - 1

    def grid(size: ImageSize | Sequence[int]) -> tuple[int, int]:
        return tuple(length // patch for length in height_width(size))

    if stated is not None:
        rows, columns = grid(stated)
        if rows * columns != positions:
            raise ConversionError(f"pos_embed {table} holds {positions} positions, not the {rows}x{columns} grid of "
                                  f"the image size {size_text(stated)} its config states")
        return image_size(stated)
    side = math.isqrt(positions)
    if side * side == positions:
        return side * patch
    if requested is not None and math.prod(grid(requested)) == positions:
        return image_size(requested)
    raise ConversionError(f"pos_embed {table} holds {positions} positions, not a square grid: give the image size "
                          "it was made for (--img_size HEIGHT WIDTH)")


def describe(family: str, found: Mapping[str, Any]) -> str:
    """Words for a layout: 'an MAE pretraining model (encoder + decoder)', 'an encoder only', ..."""
    if family == "mae":
        return "an MAE pretraining model (encoder + decoder)"
    pool = "global-pool (fc_norm)" if found["global_pool"] else "cls-token (norm)"
    if found["num_classes"]:
        return f"a {pool} classifier with {found['num_classes']} classes"
    if found["global_pool"]:
        return f"a {pool} encoder without a head (loaded as a feature extractor)"
    if found.get("pooler"):
        return "an encoder with transformers ViTModel's pooler (loaded as a feature extractor: the pooled cls token)"
    return "an encoder only (no decoder, no head; loaded as a feature extractor: the normalised cls token)"


def _count_blocks(shapes: Mapping[str, Shape], prefix: str) -> int:
    indices = {int(m[1]) for key in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _free_fields(found: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint may change about a registered model without changing its name."""
    return {k: v for k, v in found.items() if k not in _STRUCTURE}


def _registered_or_rule(
    family: str, found: Mapping[str, Any], hint: str | None, stated: Mapping[str, Any]
) -> Architecture:
    structure = {k: v for k, v in found.items() if k in _STRUCTURE}
    matches = [name for name in model_names(family) if all(full_config(name)[k] == v for k, v in structure.items())]
    if hint is not None and hint not in matches:
        log.info("the checkpoint's args.model=%r does not match its shapes; ignoring it", hint)
    if matches:
        name = hint if hint in matches else matches[0]
        return Architecture(name).with_overrides(**_free_fields(found), **stated)
    heads = {k: v for k, v in stated.items() if k.endswith("num_heads")} or _heads_by_rule(found)
    base = model_names(family)[0]
    log.info(
        "no registered model has these shapes: built as %s with overrides, num_heads %s %s",
        base,
        "as stated" if "num_heads" in stated else "by the head_dim rule",
        heads,
    )
    return Architecture(base).with_overrides(**found, **{**stated, **heads})


def _heads_by_rule(found: Mapping[str, Any]) -> dict[str, int]:
    widths = {"num_heads": (found["embed_dim"], ENCODER_HEAD_DIM)}
    if "decoder_embed_dim" in found:
        widths["decoder_num_heads"] = (found["decoder_embed_dim"], DECODER_HEAD_DIM)
    heads = {}
    for name, (width, head_dim) in widths.items():
        if width % head_dim:
            raise ConversionError(f"cannot infer {name} for width {width} (not a multiple of {head_dim}); pass --model")
        heads[name] = width // head_dim
    return heads


def key_mismatches(actual: Iterable[str], expected: Iterable[str]) -> tuple[list[str], list[str]]:
    """(missing, unexpected): keys the model needs but the checkpoint lacks, and the reverse."""
    actual, expected = list(actual), list(expected)
    have, want = set(actual), set(expected)
    return [k for k in expected if k not in have], [k for k in actual if k not in want]


def check_shapes(actual: Mapping[str, Shape], expected: Mapping[str, Shape], model: Architecture) -> None:
    """Raise one `ConversionError` naming every missing, unexpected and wrongly shaped key."""
    missing, unexpected = key_mismatches(actual, expected)
    wrong = [
        f"{k}: checkpoint {tuple(actual[k])} vs model {tuple(v)}"
        for k, v in expected.items()
        if k in actual and tuple(actual[k]) != tuple(v)
    ]
    problems = [
        f"{what} {_compact(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected))
        if keys
    ]
    if wrong:
        more = f"; and {len(wrong) - _SHOWN} more" if len(wrong) > _SHOWN else ""
        problems.append("wrong shapes: " + "; ".join(wrong[:_SHOWN]) + more)
    if problems:
        raise ConversionError(f"checkpoint does not fit model {model}: " + "; ".join(problems))


def _compact(keys: list[str]) -> str:
    """Keys with the block index folded: 'blocks.*.attn.qkv.weight (x12)' instead of 12 names."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(re.sub(r"(?<=blocks)([._])\d+(?=[./])", r"\1*", key), []).append(key)
    return "[" + ", ".join(f"{p} (x{len(g)})" if len(g) > 1 else g[0] for p, g in groups.items()) + "]"
