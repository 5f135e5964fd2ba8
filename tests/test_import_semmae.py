"""Import of the original's `.npy` part records: hand-made good and corrupt records."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from semmae_jax.data.part_maps import read_part_map
from semmae_jax.jobs.parts_import import main
from semmae_jax.parts.semmae_records import import_tree

GRID, ROWS = 28, 196


def make_record(rng, *, parts=None, sizes_scale=1, dtype=np.float32):
    """A valid record: 196 distinct grid positions, their parts one-hot, sizes, random pixels."""
    index = rng.choice(GRID * GRID, size=ROWS, replace=False)
    parts = rng.integers(0, 6, size=ROWS) if parts is None else parts  # part 6 stays empty
    record = np.zeros((ROWS, 207), dtype)
    record[:, :7] = np.bincount(parts, minlength=7) * sizes_scale
    record[np.arange(ROWS), 7 + parts] = 1
    record[:, 14] = index
    record[:, 15:] = rng.random((ROWS, 192))
    return record


def expected_map(record):
    """The part map written out by hand, row by row."""
    grid = np.full((GRID, GRID), 255, np.uint8)
    for row in record:
        position = int(row[14])
        grid[position // GRID, position % GRID] = list(row[7:14]).index(1)
    return grid


def flipped(record):
    """The original's horizontal flip: mirrored grid index, each patch's pixels mirrored."""
    out = record.copy()
    index = record[:, 14].astype(int)
    out[:, 14] = GRID * (index // GRID) + GRID - 1 - index % GRID
    out[:, 15:] = record[:, 15:].reshape(ROWS, 8, 8, 3)[:, :, ::-1].reshape(ROWS, 192)
    return out


class Trap:
    """Unpickling this creates `marker`: proof that a loader ran pickle code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def edited(record, *edits):
    """A copy with each (index, value) edit applied in turn."""
    out = record.copy()
    for index, value in edits:
        out[index] = value
    return out


def write_tree(root: Path):
    """Good and bad records under `root`; returns ({good relative path: record}, {bad relative path: reason})."""
    rng = np.random.default_rng(0)
    base = make_record(rng)
    one_hot, index, all_rows = slice(7, 14), 14, slice(None)
    in_part_0 = np.flatnonzero(base[:, 7] == 1)[0]
    good = {
        "train/n01/a.npy": base,
        "train/n01/a_flip.npy": flipped(base),
        "train/n02/b.npy": make_record(rng, sizes_scale=4, dtype=np.float64),  # sizes count the whole image
        "c.npy": make_record(rng, parts=np.zeros(ROWS, int)),  # one part only
    }
    bad_records = {
        "bad/shape.npy": (base[:195], "shape"),
        "bad/two_ones.npy": (edited(base, ((3, one_hot), 0), ((3, slice(7, 9)), 1)), "not one-hot"),
        # Sums to 1 and keeps its argmax (part 0), so only the 0/1 check can catch it.
        "bad/halves.npy": (edited(base, ((in_part_0, slice(7, 9)), 0.5)), "not one-hot"),
        "bad/no_part.npy": (edited(base, ((0, one_hot), 0)), "not one-hot"),
        "bad/duplicate.npy": (edited(base, ((10, index), base[11, index])), "duplicate"),
        "bad/out_of_range.npy": (edited(base, ((7, index), GRID * GRID)), "0..783"),
        "bad/negative.npy": (edited(base, ((7, index), -1)), "0..783"),
        "bad/fractional.npy": (edited(base, ((7, index), base[7, index] + 0.5)), "integers"),
        "bad/small_sizes.npy": (edited(base, ((all_rows, 0), base[0, 0] - 1)), "inconsistent"),
        "bad/huge_sizes.npy": (edited(base, ((all_rows, slice(0, 7)), base[0, :7] * 5)), "inconsistent"),  # > 784
        "bad/uneven_sizes.npy": (edited(base, ((9, 1), base[9, 1] + 1)), "differ"),
        "bad/nan.npy": (edited(base, ((2, 100), np.nan)), "non-finite"),
        "bad/complex.npy": (base.astype(np.complex64), "dtype"),
    }
    for relative, record in {**good, **{k: v[0] for k, v in bad_records.items()}}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / relative, record)
    bad = {k: v[1] for k, v in bad_records.items()}

    full = (root / "train/n01/a.npy").read_bytes()
    (root / "bad/truncated.npy").write_bytes(full[: len(full) // 2])
    (root / "bad/text.npy").write_text("196 rows of part data, honest\n")
    payload = Trap(root.parent / "pickle_ran")
    np.save(root / "bad/pickled.npy", np.array([payload, None], dtype=object), allow_pickle=True)
    (root / "bad/raw_pickle.npy").write_bytes(pickle.dumps(payload))
    (root / "bad/empty.npy").write_bytes(b"")
    bad.update(
        {
            "bad/truncated.npy": "unreadable",
            "bad/text.npy": "not a .npy",
            "bad/pickled.npy": "unreadable",
            "bad/raw_pickle.npy": "not a .npy",
            "bad/empty.npy": "not a .npy",
        }
    )
    (root / "train/n01/notes.txt").write_text("not a record")  # ignored: not *.npy
    return good, bad


def test_good_records_imported_bad_ones_named_and_skipped(tmp_path, capsys):
    good, bad = write_tree(tmp_path / "src")
    summary = import_tree(tmp_path / "src", tmp_path / "dst", progress=False)

    assert summary.converted == len(good)
    assert dict(summary.rejected).keys() == bad.keys()
    for relative, reason in summary.rejected:
        assert bad[relative] in reason, (relative, reason)
    assert summary.sizes_beyond_record == 1
    assert str(summary).startswith(f"converted {len(good)}, rejected {len(bad)} of {len(good) + len(bad)} ")

    written = {p.relative_to(tmp_path / "dst") for p in (tmp_path / "dst").rglob("*") if p.is_file()}
    assert written == {Path(relative).with_suffix(".png") for relative in good}
    for relative, record in good.items():
        np.testing.assert_array_equal(
            read_part_map(tmp_path / "dst" / Path(relative).with_suffix(".png")), expected_map(record)
        )

    a, a_flip = (read_part_map(tmp_path / "dst/train/n01" / name) for name in ("a.png", "a_flip.png"))
    np.testing.assert_array_equal(a_flip, a[:, ::-1])
    assert (a != 255).sum() == ROWS and (a == 255).sum() == GRID * GRID - ROWS

    errors = capsys.readouterr().err
    for relative in bad:
        assert f"rejected {relative}:" in errors
    assert not (tmp_path / "pickle_ran").exists()


def test_cli_converts_and_reports(tmp_path, capsys):
    good, bad = write_tree(tmp_path / "src")
    main([str(tmp_path / "src"), str(tmp_path / "dst")])
    out = capsys.readouterr()
    assert f"converted {len(good)}, rejected {len(bad)}" in out.out
    assert "bad/duplicate.npy" in out.err
    assert (tmp_path / "dst/train/n02/b.png").is_file()


def test_cli_missing_src_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere"), str(tmp_path / "dst")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err and err.startswith("main.py parts import-semmae: error:")
    assert not (tmp_path / "dst").exists()


def test_cli_fails_when_nothing_converts(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src/only.npy").write_text("garbage")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "src"), str(tmp_path / "dst")])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "converted 0, rejected 1 of 1" in captured.out and "only.npy" in captured.err
