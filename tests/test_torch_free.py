"""The core install (`pip install .`, no `torch` extra): training, k-NN and the input pipeline without torch.

The jobs run in a fresh process where torch, torchvision, timm and transformers cannot be
imported, as on a machine that never installed them; the training resize then takes PIL's
kernel, which must give torchvision's pixels.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import torchvision.transforms.functional as F
from PIL import Image

from convert.cli import main as convert_main
from convert.safe_load import save_torch_checkpoint
from convert.table import ConversionError
from semmae_jax.data.transforms import resize

REPO = Path(__file__).resolve().parent.parent
HIDDEN = ("torch", "torchvision", "timm", "transformers")

# Runs each command line of argv[2] (JSON) through the CLI with the packages of argv[1] hidden.
PROGRAM = textwrap.dedent('''
    import json, sys

    HIDDEN = set(sys.argv[1].split(","))


    class Hidden:
        """A meta-path finder, first in line: the hidden packages are not installed, as far as imports see."""

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    assert not HIDDEN & {name.partition(".")[0] for name in sys.modules}
    sys.meta_path.insert(0, Hidden())
    from semmae_jax.cli import main
    from semmae_jax.data.transforms import TrainTransform

    print("resize kernel:", TrainTransform().resize_kernel)
    for argv in json.loads(sys.argv[2]):
        main(argv)
    print("imported:", sorted(HIDDEN & {name.partition(".")[0] for name in sys.modules}))
''')


@pytest.mark.slow
def test_pretraining_and_knn_run_with_torch_unimportable(demo_root, tmp_path):
    """`pretrain` (two steps of the tiny model on the demo data) then `knn` of its checkpoint: no
    image skipped (a failing resize would skip them all, not stop the run), no torch module loaded."""
    run, knn = tmp_path / "run", tmp_path / "knn.json"
    commands = [
        ["pretrain", "--model", "mae_vit_test_patch4", "--input_size", "32", "--batch_size", "2", "--epochs", "1",
         "--steps_per_epoch", "2", "--warmup_epochs", "1", "--num_workers", "2", "--output_dir", str(run)],
        ["knn", "--checkpoint", str(run), "--data_path", str(demo_root), "--input_size", "32", "--num_workers", "2",
         "--batch_size", "8", "--k", "5", "--out", str(knn)],
    ]
    done = subprocess.run([sys.executable, "-c", PROGRAM, ",".join(HIDDEN), json.dumps(commands)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped an unreadable image" not in done.stderr
    assert "resize kernel: pil" in done.stdout
    assert "imported: []" in done.stdout
    assert (run / "checkpoints" / "2" / "params").is_dir()
    assert json.loads(knn.read_text())["count"] == 128


def test_a_pth_without_torch_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    """Reading (what `--finetune` / `--resume` of a .pth do) and writing (`convert to-torch`) a .pth on
    the core install: the converter's one-line error, naming the file and the extra to install."""
    pth = tmp_path / "weights.pth"
    save_torch_checkpoint(pth, {"w": np.zeros(3, np.float32)})
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, as where it is not installed
    expected = f"error: {pth}: a PyTorch .pth file needs torch, which is not installed: pip install 'semmae-jax[torch]'"
    with pytest.raises(SystemExit):
        convert_main(["to-flax", str(pth), str(tmp_path / "orbax")])
    assert capsys.readouterr().err.strip() == expected
    with pytest.raises(ConversionError, match=r"back\.pth: a PyTorch \.pth file needs torch"):
        save_torch_checkpoint(tmp_path / "back.pth", {"w": np.zeros(3, np.float32)})


def random_images(rng: np.random.Generator) -> list[np.ndarray]:
    """Noise (the hardest case for a resize kernel) and smooth colour fields, of several sizes and shapes."""
    images = []
    for height, width in ((37, 50), (100, 80), (224, 224), (333, 500), (640, 427)):
        images.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        images.append(np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)))
    return images


def test_the_torch_free_resize_gives_torchvisions_pixels_on_random_images():
    """PIL's kernel (the training resize without torch) against torchvision's `resize` + `hflip`, down
    and up, square and not: within the tolerance the training resize is held to on photographs
    (`test_train_resize_kernels_against_torchvision_on_photographs`: 0.05 grey levels on average,
    0.5 for any image), and in fact its stricter bound for PIL (0.01, 0.05)."""
    modes = {"bicubic": F.InterpolationMode.BICUBIC, "bilinear": F.InterpolationMode.BILINEAR}
    distances = []
    for k, pixels in enumerate(random_images(np.random.default_rng(0))):
        for size, method, flip in (((224, 224), "bicubic", k % 2 == 0), ((64, 64), "bicubic", k % 2 == 1),
                                   ((48, 80), "bilinear", True)):
            ours = resize(tf.constant(pixels), size, method, "pil", flip).numpy().astype(np.int64)
            theirs = F.resize(Image.fromarray(pixels), list(size), modes[method])
            theirs = np.asarray(F.hflip(theirs) if flip else theirs, np.int64)
            distances.append(np.abs(ours - theirs).mean())
    print(f"torch-free resize vs torchvision: mean {np.mean(distances):.4f}, worst {max(distances):.4f} levels")
    assert np.mean(distances) < 0.01 and max(distances) < 0.05


def test_the_pinned_set_lies_inside_the_package_ranges_and_the_core_needs_no_torch():
    """requirements.txt (what the README and CI install) pins every package of pyproject.toml's core
    and its `torch` and `test` extras inside their ranges; the core lists none of the PyTorch side."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    ranges = [Requirement(line) for line in [*project["dependencies"], *extras["torch"], *extras["test"]]]
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.split("#")[0].strip():
            pinned = Requirement(line.split("#")[0])
            pins[pinned.name] = Version(next(iter(pinned.specifier)).version)
    for wanted in ranges:
        if wanted.name != project["name"] and (wanted.marker is None or wanted.marker.evaluate()):
            assert pins.get(wanted.name) in wanted.specifier, f"requirements.txt: {wanted.name} {pins.get(wanted.name)}"
    assert not {Requirement(line).name for line in project["dependencies"]} & set(HIDDEN)


@pytest.mark.parametrize("command", [["parity", "--help"], ["convert", "--help"]])
def test_a_pytorch_side_command_on_the_core_install_names_the_extra_in_one_line(command):
    done = subprocess.run([sys.executable, "-c", PROGRAM, ",".join(HIDDEN), json.dumps([command])], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if command[0] == "convert":  # the converter itself needs no torch until a .pth is read or written
        assert done.returncode == 0, done.stderr[-3000:]
        return
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == ("main.py parity: needs the PyTorch side (timm is not installed): "
                                                   "pip install 'semmae-jax[torch]'")
    assert "Traceback" not in done.stderr
