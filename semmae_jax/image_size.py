"""Image sizes: one side (square, the original's `--input_size 224`) or (height, width).

One form everywhere (`image_size`): an int when square, so that square runs' configs,
checkpoints and messages read as they always did; else a (height, width) tuple.
"""

from __future__ import annotations

from collections.abc import Sequence

ImageSize = int | tuple[int, int]  # a square side, or (height, width)


def image_size(value: int | Sequence[int]) -> ImageSize:
    """The one form of an image size: an int when square (the original's `--input_size 224`, and
    what saved configs and checkpoints of square models hold), else (height, width)."""
    sides = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
    sides = sides * 2 if len(sides) == 1 else sides
    if len(sides) != 2 or min(sides) < 1:
        raise ValueError(f"an image size is one side or a height and a width, each >= 1; got {value!r}")
    return sides[0] if sides[0] == sides[1] else sides


def height_width(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an image size in either form."""
    size = image_size(size)
    return (size, size) if isinstance(size, int) else size


def size_text(size: int | Sequence[int]) -> str:
    """`224` or `96x160`: how flags and messages write an image size."""
    h, w = height_width(size)
    return str(h) if h == w else f"{h}x{w}"
