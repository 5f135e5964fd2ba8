"""`parts train / export / eval / show` end to end on the demo data, with a tiny random MAE as the backbone.

One short training run (module fixture) feeds every test: its loss falls, its maps are
written in the format the pretraining pipeline reads, an interrupted export resumes
without rewriting, and eval / show run on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.reader import ConverterReader
from semmae_jax import checkpoint
from semmae_jax.data.part_maps import NO_PART, read_part_map
from semmae_jax.jobs import parts, parts_tools
from semmae_jax.models import create_model
from semmae_jax.runtime.run_log import epoch_lines

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("demo_root")]
REPO = Path(__file__).resolve().parent.parent
TRAIN = ["--num_parts", "3", "--background", "--batch_size", "4", "--steps_per_epoch", "3", "--epochs", "4",
         "--warmup_epochs", "0", "--blr", "0.03", "--decoder_width", "8", "--num_workers", "2", "--log_every", "1",
         "--vis_every", "4", "--save_every", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 12-step part-learning run on a random `mae_vit_test_patch4` (32 x 32 inputs, 8 x 8 patches)."""
    root = tmp_path_factory.mktemp("parts")
    mae = create_model("mae_vit_test_patch4")
    params = jax.jit(lambda: nn.unbox(mae.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]))()
    checkpoint.save_params(root / "mae", jax.tree.map(np.asarray, params))
    parts.train_main(["--backbone", str(root / "mae"), "--output_dir", str(root / "run"), *TRAIN],
                     reader=ConverterReader())
    return root / "run"


def test_an_interrupted_run_resumes_to_the_same_parameters(run_dir, tmp_path, capsys):
    """The run cut back to its step-6 checkpoint and run again with the same command ends where it ended."""
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "12")
    capsys.readouterr()
    parts.train_main(["--backbone", str(run_dir.parent / "mae"), "--output_dir", str(tmp_path / "run"), *TRAIN],
                     reader=ConverterReader())
    assert "resuming this run from its checkpoint at step 6" in capsys.readouterr().out
    resumed, _ = checkpoint.load_params(tmp_path / "run" / "checkpoints" / "12")
    straight, _ = checkpoint.load_params(run_dir / "checkpoints" / "12")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), resumed["learner"],
                 straight["learner"])


def export(run_dir: Path, out: Path) -> None:
    parts_tools.export_main(["--checkpoint", str(run_dir), "--out", str(out), "--batch_size", "64", "--num_workers", "2"])


def test_training_lowers_the_loss_and_saves_a_checkpoint_and_pictures(run_dir):
    epochs = epoch_lines(run_dir)
    assert len(epochs) == 4 and epochs[-1]["train_loss"] < 0.8 * epochs[0]["train_loss"]
    assert {"train_pixels", "train_tokens", "train_diversity", "train_foreground"} <= set(epochs[0])
    assert (run_dir / "checkpoints" / "12").is_dir() and (run_dir / "parts_epoch0003.png").is_file()
    run = parts_tools.load_run(str(run_dir))
    assert (run.grid, run.model.learner.num_maps, run.background) == (8, 4, True)


def test_export_writes_maps_the_pretraining_pipeline_reads(run_dir, demo_root, tmp_path):
    from semmae_jax import data

    export(run_dir, tmp_path / "maps")
    maps = sorted((tmp_path / "maps" / "train").rglob("*.png"))
    assert len(maps) == len(list((demo_root / "train").rglob("*.jpg")))
    values = np.unique(np.concatenate([read_part_map(p).ravel() for p in maps[::16]]))
    assert read_part_map(maps[0]).shape == (8, 8) and set(values) <= {0, 1, 2, NO_PART}
    source = data.image_folder(demo_root, "train", part_path=tmp_path / "maps")  # every image has its map
    loader = data.TrainLoader(source, process_batch=8, transform=data.TrainTransform(img_size=32, patch_size=4),
                              process_index=0, process_count=1)
    labels = next(loader.epoch_batches(0))["part_labels"]
    assert labels.shape == (8, 64) and set(np.unique(labels)) <= {-1, 0, 1, 2}


def test_export_resumes_without_rewriting(run_dir, tmp_path, capsys):
    export(run_dir, tmp_path / "maps")
    maps = sorted((tmp_path / "maps").rglob("*.png"))
    for path in maps:
        os.utime(path, (1, 1))  # a mark that a rewrite would clear
    removed = maps[::100]
    for path in removed:
        path.unlink()
    capsys.readouterr()
    export(run_dir, tmp_path / "maps")
    assert f"{len(removed)} part maps written, {len(maps) - len(removed)} already there" in capsys.readouterr().out
    rewritten = [p for p in sorted((tmp_path / "maps").rglob("*.png")) if p.stat().st_mtime != 1]
    assert rewritten == removed
    assert not list((tmp_path / "maps").rglob("*.partial.png"))


def test_eval_scores_learned_parts_and_baselines_and_show_draws_them(run_dir, tmp_path):
    results = parts_tools.evaluate(parts_tools.ViewConfig(checkpoint=str(run_dir), out=str(tmp_path / "e.json"),
                                                          num_workers=2))
    assert list(results) == ["learned parts", "k-means of patch tokens (k=4)", "raw attention (argmax of 4 heads)",
                             "one part (reference)"]
    assert all(0.0 <= r["miou"] <= 1.0 and len(r["iou"]) == 6 for r in results.values())
    learned, *baselines, _ = results.values()
    for baseline in baselines:  # docs/stage1.md's claim, already after 12 steps on a random backbone
        assert learned["miou"] > baseline["miou"] and learned["ari"] > baseline["ari"], (learned, baseline)
    assert json.loads((tmp_path / "e.json").read_text())["images"] == 128
    picture = parts_tools.show(parts_tools.ViewConfig(checkpoint=str(run_dir), out=str(tmp_path / "s.png"),
                                                      num_images=3, num_workers=2))
    assert picture.is_file()


def test_two_processes_export_one_share_each(run_dir, tmp_path):
    """`jax.distributed` with 2 processes: each writes its own contiguous share, together every map once."""
    from semmae_jax.runtime.launch import free_port

    port, out = free_port(), tmp_path / "maps"
    code = "import sys, torchvision; from semmae_jax import cli; cli.main(sys.argv[1:])"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen([sys.executable, "-c", code, "parts", "export", "--checkpoint", str(run_dir), "--out", str(out),
                                 "--batch_size", "64", "--num_workers", "2", "--coordinator_address",
                                 f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
                                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    for index, output in enumerate(outputs):
        assert f"process {index}: 256 images in its share: 256 part maps written" in output
    assert len(list(out.rglob("*.png"))) == 512
