"""Stage 1 on the demo data: parts of the demo creatures, learned on the demo MAE's encoder.

    python main.py pretrain --setting 0 --output_dir output_mae_demo   # the backbone (1.5 min)
    python main.py parts train --config parts_demo --backbone output_mae_demo/checkpoints

About 4 minutes on 2 CPU cores; `parts eval --checkpoint output_parts_demo` then reports the
learned parts ahead of k-means and raw attention in mIoU and ARI (docs/stage1.md: 0.351 /
0.742 against 0.064 / -0.006 and 0.085 / 0.000). Five parts plus a background part: the demo's
true parts are a background and five body parts.
"""

from semmae_jax.jobs.parts import PartsConfig


def get_config() -> PartsConfig:
    return PartsConfig(
        num_parts=5,
        background=True,
        global_batch_size=64,  # the same run on 1 or 8 devices (--batch_size would be per device)
        epochs=100,
        warmup_epochs=5,
        num_workers=4,
        output_dir="./output_parts_demo",
        save_every=25,
        vis_every=25,
        log_every=8,
    )
