"""Flags every job shares, as dataclass bases of the job configs.

A job config (`PretrainConfig`, `FinetuneConfig`, ...) inherits these and redeclares a
field only where its original script had another default (the help text is inherited,
see `semmae_jax.config`). Names are the original scripts' flag names.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from etils import epath

from semmae_jax import sharding
from semmae_jax.checkpoint.manager import RUN_CHECKPOINTS
from semmae_jax.config import field
from semmae_jax.data.bands import Bands, data_bands
from semmae_jax.image_size import image_size
from semmae_jax.models import create_model
from semmae_jax.models.layers import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from semmae_jax.runtime import distributed
from semmae_jax.runtime.batch_geometry import BatchGeometry
from semmae_jax.runtime.storage import is_local, output_path


@dataclasses.dataclass(frozen=True)
class ScheduleFlags:
    """Batch, length and learning rate (MAE's `main_pretrain.py` defaults)."""

    batch_size: int = field(64, "batch size per device (global = batch_size x devices)")
    global_batch_size: int | None = field(None, "the global batch, pinned: each device takes global / devices, so a "
                                                "run gives the same results on any number of devices that divide it "
                                                "(overrides --batch_size)")
    accum_iter: int = field(1, "gradient accumulation: micro-batches per optimizer update")
    epochs: int = field(400, "training epochs")
    warmup_epochs: int = field(40, "linear warm-up epochs")
    lr: float | None = field(None, "absolute learning rate (default: blr x effective batch / 256)")
    blr: float = field(1e-3, "base learning rate: lr = blr x effective batch / 256")
    min_lr: float = field(0.0, "learning rate at the end of the cosine")
    weight_decay: float = field(0.05, "weight decay")

    FOLLOWS: ClassVar[dict[str, str]] = {"global_batch_size": "batch_size"}  # `--batch_size` alone: per device

    def check(self) -> None:
        for name in ("batch_size", "accum_iter", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"--warmup_epochs must be 0 or more, got {self.warmup_epochs}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"--global_batch_size must be at least 1, got {self.global_batch_size}")

    def batch_geometry(self) -> BatchGeometry:
        """The run's batch at every scope, on this run's devices (`--global_batch_size` wins over `--batch_size`)."""
        return BatchGeometry.from_flags(self.batch_size, self.global_batch_size, self.accum_iter)

    def learning_rate(self, batch: BatchGeometry) -> float:
        """The original's `lr = blr * eff_batch_size / 256`, unless --lr."""
        return self.lr if self.lr is not None else self.blr * batch.effective / 256


@dataclasses.dataclass(frozen=True)
class ModelFlags:
    """The registered model a job builds, its input size and compute dtype."""

    model: str = field("vit_large_patch16", "registered model name (see docs/architecture.md, Models)")
    input_size: int | tuple[int, int] | None = field(None, "image size: one side (square) or HEIGHT WIDTH (default: "
                                                           "the model's own: 224 for the original's models)", join=image_size)
    in_chans: int = field(3, "bands of the images: 3 for RGB; another count reads TIFF / GeoTIFF, 8- or 16-bit PNG "
                             "and .npy without loss (docs/data.md, Bands)")
    dtype: str = field("float32", "compute dtype (params stay float32)", choices=("float32", "bfloat16"))

    FOLLOWS: ClassVar[dict[str, str]] = {"input_size": "model"}  # `--model` alone: that model's own size

    def __post_init__(self) -> None:
        """An unset `--input_size` becomes the model's registered size, so a config always states it
        (a run's saved config, and the resume check, see the size it trained at)."""
        size = create_model(self.model).img_size if self.input_size is None else image_size(self.input_size)
        object.__setattr__(self, "input_size", create_model(self.model, img_size=size).img_size)  # a size it takes
        if self.in_chans < 1:
            raise ValueError(f"--in_chans must be at least 1, got {self.in_chans}")


@dataclasses.dataclass(frozen=True)
class ClassifierFlags:
    """A classifier on a pretrained encoder (fine-tuning, linear probing): the original scripts' names."""

    nb_classes: int = field(1000, "number of classes")
    global_pool: bool = field(True, "mean-pool the patch tokens (--cls_token: use the cls token)")
    finetune: str | None = field(None, "pretrained checkpoint to start from (orbax dir, run dir or .pth)")
    eval: bool = field(False, "evaluate --resume on the validation split and stop")
    dist_eval: bool = field(False, "accepted for the original's command lines: evaluation is always distributed")


@dataclasses.dataclass(frozen=True)
class ComputeFlags:
    """How the model computes, whatever the job."""

    attention: str = field("xla", "attention kernel: 'xla', or 'cudnn' (fused flash attention: NVIDIA GPUs, "
                                  "bfloat16 / float16)", choices=ATTENTION_IMPLEMENTATIONS)


@dataclasses.dataclass(frozen=True)
class RematFlags:
    """What the backward pass recomputes, for the jobs that train the encoder's blocks."""

    remat: str = field("none", "recompute activations in the backward pass: 'full' (--remat alone) recomputes each "
                               "block from its input; 'save_dot_except_mlp' keeps the attention's projections, "
                               "'save_qkv_proj' the q, k, v projection, 'minimal' every matmul without a batch "
                               "dimension (MaxText's names); 'none' keeps everything",
                       choices=tuple(REMAT_POLICIES), bare="full")


@dataclasses.dataclass(frozen=True)
class BandFlags:
    """Per-band statistics of images that are not 8-bit RGB (`data.bands`)."""

    mean: tuple[float, ...] | None = field(None, "per-band mean, in the files' units (default: the dataset's "
                                                 "stored statistics, else ImageNet's for RGB)", join=tuple)
    std: tuple[float, ...] | None = field(None, "per-band std, in the files' units (as --mean)", join=tuple)


@dataclasses.dataclass(frozen=True)
class DataFlags(BandFlags):
    """Where the images come from."""

    data_path: str | None = field(None, "image folder root with train/ and val/ (default: the demo data)")
    dataset: str = field("folder", "'folder' (--data_path) or 'tfds:NAME'")
    tfds_data_dir: str | None = field(None, "TFDS data dir (ImageNet archives in its downloads/manual/)")
    num_workers: int = field(10, "parallel decoding calls (tf.data)")
    steps_per_epoch: int | None = field(None, "cap on the steps of an epoch (quick runs)")

    def check(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"--num_workers must be at least 1, got {self.num_workers}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"--steps_per_epoch must be at least 1, got {self.steps_per_epoch}")

    def data_paths(self, part_path: str | None = None) -> tuple[str | None, str | None]:
        """(`--data_path`, `part_path`), or the demo data and its part maps when no dataset is named."""
        from semmae_jax.data.demo import data_or_demo

        return data_or_demo(self.data_path, part_path, self.dataset)

    def bands(self, in_chans: int) -> Bands | None:
        """How the images are read (`data.bands`): None for 8-bit RGB with ImageNet's statistics."""
        return data_bands(self.data_paths()[0], in_chans, self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
    """jax.distributed's own names; without them, SLURM / Open MPI / TPU pods are detected."""

    coordinator_address: str | None = field(None, "HOST:PORT of process 0 (multi-process runs)")
    num_processes: int | None = field(None, "number of processes")
    process_id: int | None = field(None, "this process's index")
    heartbeat_timeout_seconds: int = field(distributed.DEFAULT_HEARTBEAT_TIMEOUT, "a peer silent this long is declared "
                                           "dead: the others exit with code 75 (retry) and one line")

    def start_runtime(self) -> None:
        """Join the job's processes (if several): before anything touches a device."""
        distributed.initialize(self.coordinator_address, self.num_processes, self.process_id,
                               heartbeat_timeout_seconds=self.heartbeat_timeout_seconds)


@dataclasses.dataclass(frozen=True)
class TrainFlags(DistributedFlags):
    """Outputs, checkpoints, the mesh (and, inherited, the processes)."""

    output_dir: str = field("./output_dir", "checkpoints, log.txt and pictures")
    log_dir: str | None = field(None, "TensorBoard directory (default: --output_dir)")
    resume: str = field("auto", "'auto' (this run's latest checkpoint), a run directory, an orbax checkpoint, a .pth, "
                                "or 'scratch' (start over when every checkpoint of this run is damaged)")
    seed: int = field(0, "seed of the data order, augmentation, init and masking")
    mesh: str = field(sharding.DEFAULT_MESH, "device mesh, e.g. data:-1,fsdp:2,tensor:1")
    save_every: int = field(1, "checkpoint every N epochs (and at the end)")
    save_every_steps: int = field(0, "also checkpoint every N steps (0: off)")
    local_save_every: int = field(0, "also checkpoint every N steps on each host's own disk (0: off): a dead host "
                                     "then costs at most N steps")
    local_checkpoint_dir: str | None = field(None, "a directory on each host's own disk for --local_save_every "
                                                   "(default: <output_dir>/local_checkpoints)")
    keep_checkpoints: int = field(2, "checkpoints kept")
    log_every: int = field(20, "fetch and log metrics every N steps")
    max_nonfinite_steps: int = field(0, "steps with a non-finite loss or gradient skipped (not applied) before the "
                                        "run stops")
    allow_config_change: bool = field(False, "resume this run's checkpoint even with flags that change the run")
    profile_steps: str | None = field(None, "A:B: a jax.profiler trace of the steps after step A up to step B (as the "
                                            "logs count steps) under --log_dir, for TensorBoard's profile plugin")
    profile_all_processes: bool = field(False, "--profile_steps traces every process (default: process 0 only)")
    peak_tflops: float | None = field(None, "peak TFLOP/s of one device, for MFU (default: the bf16 datasheet peak of "
                                            "a known GPU or TPU; no MFU on other devices)")

    def check(self) -> None:
        for name in ("save_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.save_every_steps < 0 or self.max_nonfinite_steps < 0 or self.local_save_every < 0:
            raise ValueError("--save_every_steps, --local_save_every and --max_nonfinite_steps must be 0 or more")
        if self.local_save_every and self.local_checkpoint_dir is None and not is_local(self.output_dir):
            raise ValueError(f"--local_save_every needs --local_checkpoint_dir (a directory on each host's own disk) "
                             f"when --output_dir is not local ({self.output_dir})")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"--peak_tflops must be above 0, got {self.peak_tflops}")
        _ = self.profile_range

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """`--profile_steps A:B` as (A, B), 0 <= A < B; None when no trace is asked for."""
        if self.profile_steps is None:
            return None
        first, _, last = self.profile_steps.partition(":")
        try:
            start, stop = int(first), int(last)
        except ValueError:
            start = stop = -1
        if not 0 <= start < stop:
            raise ValueError(f"--profile_steps takes A:B with 0 <= A < B (steps as the logs count them), "
                             f"got {self.profile_steps!r}")
        return start, stop

    @property
    def checkpoint_dir(self) -> epath.Path:
        """Where the run's checkpoints go: local, or any epath location (`gs://bucket/run/checkpoints`)."""
        return output_path(self.output_dir) / RUN_CHECKPOINTS

    @property
    def local_checkpoint_root(self) -> epath.Path:
        """Where `--local_save_every` writes (each process under its own subdirectory, `checkpoint/local.py`)."""
        return output_path(self.local_checkpoint_dir or f"{self.output_dir}/local_checkpoints")
