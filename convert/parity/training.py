"""`python main.py parity --train pretrain|finetune|linprobe`: train like the PyTorch original, step for step.

    python main.py parity --train finetune --model vit_test_patch4 --input_size 32 --nb_classes 10 \\
        --batch_size 8 --updates 100

The same initial weights (the job's own initialisation, or `--checkpoint`'s, converted to the
PyTorch side), the same batches (seeded normal images; for MAE the noise the JAX step drew),
N optimizer updates of the job's recipe in JAX, built by the job's own code, and in a PyTorch
reference written as the original scripts train (`convert.parity.torch_training`). Every flag other
than the ones below is the job's own (`main.py pretrain|finetune|linprobe --help`), with its
name and default. Printed: per update the loss and lr on each side and the loss's relative
difference; at the end the largest parameter difference of each group (a module's matrices
or its vectors) relative to the group's largest value. Exit status 1 over any tolerance.

Draws the PyTorch side cannot share are switched off in fine-tuning (drop path, mixup /
cutmix, random erasing). Where this port departs on purpose from the original (README,
"Differences"), the compared run uses the flag that reproduces the original, and a second
JAX run with the port's default shows the difference's effect over the same updates.
"""

from __future__ import annotations

# timm and transformers load triton, which crashes the process when loaded after TensorFlow.
from convert.parity import sides as train_sides  # isort: skip

import argparse
import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from convert.cli import exit_on_error
from convert.core import read_checkpoint
from semmae_jax import config as config_lib
from semmae_jax import sharding
from semmae_jax.jobs import finetune, linprobe, pretrain
from semmae_jax.train.skeleton import Job

JOBS: dict[str, tuple[type, type[Job]]] = {
    "pretrain": (pretrain.PretrainConfig, pretrain.PretrainJob),
    "finetune": (finetune.FinetuneConfig, finetune.FinetuneJob),
    "linprobe": (linprobe.LinprobeConfig, linprobe.LinprobeJob),
}
# Flags set so that both sides draw nothing the other cannot (printed when they change a value).
NO_DRAWS = {"finetune": dict(drop_path=0.0, mixup=0.0, cutmix=0.0, cutmix_minmax=None, reprob=0.0)}
UNCHECKED = "key bias (no gradient, unchecked)"
# The port's departures from the original (README, "Differences"): (what, the original's flags, the port's).
DIFFERENCES = {
    "pretrain": [("cls_token / mask_token exempt from weight decay (--decay_tokens: decayed, as the original)",
                  dict(decay_tokens=True), dict(decay_tokens=False))],
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python main.py parity --train", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Other flags are the job's (main.py JOB --help).")
    p.add_argument("--train", required=True, choices=sorted(JOBS), help="the job whose training is compared")
    p.add_argument("--checkpoint", default=None, help="start from these weights (.pth, orbax, transformers) "
                                                      "instead of the job's initialisation")
    p.add_argument("--updates", type=int, default=100, help="optimizer updates compared (each of --accum_iter steps)")
    p.add_argument("--loss_rtol", type=float, default=1e-4, help="max relative loss difference at any update")
    p.add_argument("--param_rtol", type=float, default=1e-4,
                   help="max parameter difference of a group at the end, relative to the group's largest value")
    p.add_argument("--lr_rtol", type=float, default=1e-6, help="max lr difference, relative to the peak lr")
    p.add_argument("--spread", action="store_true",
                   help="also run the JAX side on one device (another reduction order): float32's own spread")
    p.add_argument("--no_differences", action="store_true", help="skip the runs that show the port's differences")
    p.add_argument("--trust-pickle", action="store_true", help="unpickle the .pth without the safety allow-list")
    return p


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Any]:
    """(the harness's flags, the job's config from the other flags); bad flags end with one line."""
    args, rest = parser().parse_known_args(argv)
    prog = f"main.py parity --train {args.train}"
    config = config_lib.parse_job_config(rest, JOBS[args.train][0], prog, None)
    if args.updates < 1:
        raise SystemExit(f"{prog}: error: --updates must be at least 1, got {args.updates}")
    if config.dtype != "float32":
        raise SystemExit(f"{prog}: error: the trajectories are compared in float32 (--dtype float32)")
    return args, config


def main(argv: Sequence[str]) -> None:
    args, config = parse(argv)
    with jax.default_matmul_precision("float32"):  # a wrong model name, shape, ...: one line, no traceback
        failed = config_lib.one_line_errors(f"main.py parity --train {args.train}", exit_on_error, compare, args,
                                    JOBS[args.train][1], config)
    if failed:
        print(f"training parity FAILED: {', '.join(failed)}")
        raise SystemExit(1)
    print("training parity OK")


def prepare(args: argparse.Namespace, job_cls: type[Job], config: Any) -> train_sides.Setup:
    """The job with the draws off and the original's flags, its start, batches and schedule."""
    forced = dict(NO_DRAWS.get(args.train, {}))
    for _, original, _ in DIFFERENCES.get(args.train, []):
        forced.update(original)
    changed = {k: v for k, v in forced.items() if getattr(config, k) != v}
    if changed:
        print(f"set for parity: {', '.join(f'{k}={v}' for k, v in changed.items())}")
    job = job_cls(dataclasses.replace(config, **forced))
    mesh = sharding.make_mesh(config.mesh)
    batch = config.batch_geometry()
    source = None
    if args.checkpoint:
        source = read_checkpoint(args.checkpoint, img_size=config.input_size, trust_pickle=args.trust_pickle).params
    start, notes = train_sides.initial(job, mesh, batch, source)
    for note in notes:
        print(note)
    spe = train_sides.steps_per_epoch(job.config, args.updates)
    batches = train_sides.make_batches(job, args.updates * config.accum_iter, batch.global_batch, config.seed + 2)
    lr = config.learning_rate(batch)
    print(f"{args.train} {config.model}: {args.updates} updates of {batch.describe()}, lr {lr:.4g}, {spe} micro-batches an epoch, {config.epochs} epochs "
          f"({config.warmup_epochs} warm-up), {jax.device_count()} devices")
    return train_sides.Setup(job, mesh, batch, start, batches, spe, lr)


def compare(args: argparse.Namespace, job_cls: type[Job], config: Any) -> list[str]:
    """Both runs, the report, and the names of the checks over tolerance."""
    setup = prepare(args, job_cls, config)
    ours = train_sides.jax_trajectory(setup)
    theirs = train_sides.torch_trajectory(setup)
    failed = report(ours, theirs, setup.lr, args)
    if args.spread and jax.device_count() == 1:
        print("float32 spread: needs 2 or more devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2)")
    elif args.spread:
        other = train_sides.jax_trajectory(setup, mesh=sharding.make_mesh(config.mesh, devices=jax.devices()[:1]))
        print(f"float32 spread, JAX on {jax.device_count()} devices vs 1: {summary(ours, other)}")
    if not args.no_differences:
        show_differences(setup, job_cls, theirs)
    return failed


def show_differences(setup: train_sides.Setup, job_cls: type[Job], theirs: train_sides.Trajectory) -> None:
    """Each of the port's departures: a JAX run with the port's default against the original's run."""
    for what, _, port in DIFFERENCES.get(setup.job.name, []):
        other = train_sides.jax_trajectory(setup, job=job_cls(dataclasses.replace(setup.job.config, **port)))
        print(f"difference: {what}; the port's default vs the original: {summary(other, theirs)}")


def report(ours: train_sides.Trajectory, theirs: train_sides.Trajectory, peak_lr: float,
           args: argparse.Namespace) -> list[str]:
    """The per-update table and the per-group table; returns the failed checks."""
    print(f"{'update':>6}  {'loss JAX':>12}  {'loss PyTorch':>12}  {'rel diff':>9}  {'lr JAX':>10}  {'lr PyTorch':>10}")
    loss_diffs = relative(ours.losses, theirs.losses)
    lr_diffs = np.abs(np.subtract(ours.lrs, theirs.lrs)) / max(abs(peak_lr), 1e-30)
    for i, (a, b, d, la, lb) in enumerate(zip(ours.losses, theirs.losses, loss_diffs, ours.lrs, theirs.lrs,
                                              strict=True)):
        print(f"{i:>6}  {a:>12.7g}  {b:>12.7g}  {d:>9.2e}  {la:>10.4g}  {lb:>10.4g}")
    groups = group_diffs(ours.params, theirs.params)
    print(f"{'parameter group':<48}  {'max |diff| / max |p|':>20}")
    checked = {name: diff for name, diff in groups.items() if not name.endswith(UNCHECKED)}
    for name, diff in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{name:<48}  {diff:>20.3e}{'  over' if name in checked and not diff <= args.param_rtol else ''}")
    worst = max(checked, key=checked.get)
    print(f"largest: loss rel diff {np.nanmax(loss_diffs):.2e} (update {int(np.nanargmax(loss_diffs))}), lr diff "
          f"{np.nanmax(lr_diffs):.2e} of the peak, parameters {checked[worst]:.2e} ({worst}); tolerances "
          f"{args.loss_rtol:g}, {args.lr_rtol:g}, {args.param_rtol:g}")
    failed = []
    if not np.all(loss_diffs <= args.loss_rtol):
        failed.append(f"loss (max rel diff {np.nanmax(loss_diffs):.2e} > {args.loss_rtol:g})")
    if not np.all(lr_diffs <= args.lr_rtol):
        failed.append(f"lr (max diff {np.nanmax(lr_diffs):.2e} of the peak > {args.lr_rtol:g})")
    over = [name for name, diff in checked.items() if not diff <= args.param_rtol]
    if over:
        failed.append(f"parameters ({', '.join(over)} > {args.param_rtol:g})")
    return failed


def relative(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-30)


def pieces(key: str, ours: np.ndarray, theirs: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(group, our part, their part) of one tensor: 'blocks.3.attn.qkv.weight' -> 'blocks.3 matrices';
    a module's vectors (biases, norms) apart. The key third of a qkv bias is a group of its own
    (`UNCHECKED`): softmax ignores a shift shared by all keys, so its gradient is 0 in exact
    arithmetic and rounding noise on each side, which Adam scales up to lr-sized steps."""
    module = re.match(r"(?:decoder_)?blocks\.\d+|[^.]+", key).group(0)
    group = f"{module} {'matrices' if theirs.ndim > 1 else 'vectors'}"
    if not key.endswith("attn.qkv.bias"):
        return [(group, ours, theirs)]
    (q_a, k_a, v_a), (q_b, k_b, v_b) = np.split(ours, 3), np.split(theirs, 3)
    return [(group, np.concatenate([q_a, v_a]), np.concatenate([q_b, v_b])), (f"{module} {UNCHECKED}", k_a, k_b)]


def group_diffs(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> dict[str, float]:
    """Per group: the largest |difference| over the largest |value| (the PyTorch side's)."""
    diffs: dict[str, float] = {}
    scales: dict[str, float] = {}
    for key in ours.keys() & theirs.keys():
        for name, a, b in pieces(key, ours[key], theirs[key]):
            diffs[name] = max(diffs.get(name, 0.0), float(np.max(np.abs(a - b))))
            scales[name] = max(scales.get(name, 0.0), float(np.max(np.abs(b))))
    return {name: diffs[name] / max(scales[name], 1e-30) for name in diffs}


def summary(a: train_sides.Trajectory, b: train_sides.Trajectory) -> str:
    """One line: the largest loss difference over the updates and the largest group difference."""
    groups = {k: v for k, v in group_diffs(a.params, b.params).items() if not k.endswith(UNCHECKED)}
    worst = max(groups, key=groups.get)
    return (f"loss max rel diff {np.max(relative(a.losses, b.losses)):.2e} (last update "
            f"{relative(a.losses, b.losses)[-1]:.2e}); parameters max {groups[worst]:.2e} ({worst})")
