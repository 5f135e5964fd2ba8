"""The one skeleton (`train/skeleton.py`): what every job gets from it, checked job by job.

`--accum_iter` must mean the original's in every job: one optimizer update every
`accum_iter` micro-batches, the lr of the effective batch, a schedule over updates. (The
first linear probe multiplied the lr by `accum_iter` but updated every micro-batch.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semmae_jax import checkpoint
from semmae_jax.cli import main as cli_main
from semmae_jax.key_paths import flat_by_path
from semmae_jax.models import create_model
from semmae_jax.runtime.run_log import epoch_lines

STEPS, EPOCHS, ACCUM = 4, 2, 2  # micro-batches per epoch; 8 micro-batches = 4 updates
SHARED = ["--batch_size", "1", "--steps_per_epoch", str(STEPS), "--epochs", str(EPOCHS), "--warmup_epochs", "2",
          "--accum_iter", str(ACCUM), "--num_workers", "2", "--log_every", "1"]
CLASSIFIER = ["--model", "vit_test_patch4", "--input_size", "32", "--nb_classes", "4"]


def _saved(root: Path, name: str, params: object, meta: dict) -> str:
    checkpoint.save_params(root / name, jax.tree.map(np.asarray, params), meta)
    return str(root / name)


def _init(name: str, **overrides: object) -> object:
    model = create_model(name, **overrides)
    return nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])


def _job_flags(job: str, root: Path) -> list[str]:
    if job == "pretrain":
        return ["pretrain", "--model", "mae_vit_test_patch4", "--input_size", "32", "--blr", "1e-3"]
    if job == "finetune":
        return ["finetune", *CLASSIFIER, "--aa", "none", "--reprob", "0", "--blr", "1e-3"]
    if job == "linprobe":
        encoder = _saved(root, "encoder", _init("vit_test_patch4", num_classes=0, global_pool=False),
                         {"model": "vit_test_patch4", "model_overrides": {"num_classes": 0, "global_pool": False}})
        return ["linprobe", *CLASSIFIER, "--finetune", encoder, "--blr", "0.1"]
    backbone = _saved(root, "mae", _init("mae_vit_test_patch4"), {"model": "mae_vit_test_patch4"})
    return ["parts", "train", "--backbone", backbone, "--num_parts", "3", "--decoder_width", "8", "--blr", "1e-3"]


@pytest.mark.slow
@pytest.mark.parametrize("job", ["pretrain", "finetune", "linprobe", "parts"])
def test_accum_iter_updates_every_k_micro_batches_with_the_effective_batch_lr(job, demo_root, tmp_path):
    out, flags = tmp_path / "run", _job_flags(job, tmp_path)
    cli_main([*flags, *SHARED, "--data_path", str(demo_root), "--output_dir", str(out)])
    assert checkpoint.RunCheckpoints(out / "checkpoints").latest_step() == STEPS * EPOCHS  # micro-batches seen
    opt_state = checkpoint.open_step(out / "checkpoints").host_arrays("opt_state")
    counts = {path: int(value) for path, value in flat_by_path(opt_state).items()
              if path.endswith(("/count", "gradient_step"))}
    updates = STEPS * EPOCHS // ACCUM
    assert any(p.endswith("gradient_step") for p in counts) and set(counts.values()) == {updates}, counts
    # After epoch 0 (2 of the 4 warm-up updates), the lr is half the peak; the peak follows the
    # effective batch: blr x (1 per device x 8 devices x accum_iter) / 256.
    blr = float(flags[-1])
    first = epoch_lines(out)[0]
    np.testing.assert_allclose(first["train_lr"], blr * 8 * ACCUM / 256 * (STEPS // ACCUM) / 4, rtol=1e-6)
    placement = (out / "param_placement.txt").read_text().splitlines()
    assert placement and all(" lr_scale=" in line or " frozen " in line for line in placement)


@pytest.mark.parametrize("job", ["pretrain", "finetune", "linprobe", "parts"])
def test_every_job_takes_attention_and_refuses_cudnn_on_cpu_in_one_line(job, demo_root, tmp_path, capfd):
    """The refusal is the exit message alone (what Python prints for a SystemExit): one line naming
    the option and the platform, no traceback, and not said a second time on the way out."""
    flags = [*_job_flags(job, tmp_path), *SHARED, "--data_path", str(demo_root), "--output_dir", str(tmp_path / "run")]
    capfd.readouterr()
    with pytest.raises(SystemExit) as refused:
        cli_main([*flags, "--attention", "cudnn"])
    message = refused.value.code
    assert isinstance(message, str) and len(message.strip().splitlines()) == 1, message
    assert re.fullmatch(rf"main\.py {job}( train)?: error: attention='cudnn' .*'cpu'.*", message.strip()), message
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err and "cudnn" not in printed.out + printed.err, printed


@pytest.mark.slow
def test_linprobe_eval_scores_the_runs_checkpoint_and_reports_as_every_eval(demo_root, tmp_path, capsys):
    out = tmp_path / "run"
    flags = [*_job_flags("linprobe", tmp_path), *SHARED, "--data_path", str(demo_root), "--output_dir", str(out)]
    cli_main(flags)
    last = epoch_lines(out)[-1]
    (out / "per_class_accuracy.json").unlink()  # the best epoch's, written while training
    capsys.readouterr()
    cli_main([*flags, "--eval"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("* Acc@1"))
    assert float(line.split()[2]) == pytest.approx(last["test_acc1"], abs=1e-3)  # the last epoch's state
    per_class = json.loads((out / "per_class_accuracy.json").read_text())
    assert sum(v["images"] for v in per_class.values()) > 0
    assert sum(v["images"] * v["acc1"] for v in per_class.values()) / sum(
        v["images"] for v in per_class.values()) == pytest.approx(last["test_acc1"], abs=1e-3)
    # Another output directory scores the run named by --resume (its directory), not its own.
    elsewhere = [*flags[:-1], str(tmp_path / "elsewhere"), "--eval", "--resume", str(out)]
    cli_main(elsewhere)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("* Acc@1"))
    assert float(line.split()[2]) == pytest.approx(last["test_acc1"], abs=1e-3)
    with pytest.raises(SystemExit, match=r"error: .*no training checkpoint of a run to evaluate"):
        cli_main([*flags[:-1], str(tmp_path / "empty"), "--eval"])


@pytest.mark.slow
def test_resume_from_another_run_continues_its_state(demo_root, tmp_path, capsys):
    """`--resume OTHER_RUN/checkpoints` starts a new output dir from the other run's last step
    (params, optimizer state, position): only the epochs after it are trained and logged."""
    flags = [*_job_flags("pretrain", tmp_path), *SHARED, "--data_path", str(demo_root)]
    first, second = tmp_path / "first", tmp_path / "second"
    cli_main([*flags, "--output_dir", str(first)])
    capsys.readouterr()
    cli_main([*flags, "--epochs", str(EPOCHS + 1), "--output_dir", str(second), "--resume", str(first / "checkpoints")])
    assert f"resuming from {first / 'checkpoints'} (step {EPOCHS * STEPS}:" in capsys.readouterr().out
    assert [line["epoch"] for line in epoch_lines(second)] == [EPOCHS]
