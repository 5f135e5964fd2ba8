"""The embedded demo: SemMAE pretraining of a small ViT on the synthetic part dataset.

    python main.py pretrain                 # this preset, the demo data, ./output_demo

Expected: about 2-3 minutes on 2 CPU cores; the loss (norm_pix_loss) falls from ~1.34 in
the first epoch to ~0.46 in the last, and `output_demo/` holds a checkpoint, `log.txt`, TensorBoard events and
`reconstruction_epoch*.png` (input | part map | masked input | reconstruction).
"""

from semmae_jax.jobs.pretrain import PretrainConfig


def get_config() -> PretrainConfig:
    return PretrainConfig(
        model="mae_vit_demo_patch8",
        norm_pix_loss=True,
        setting=3,
        gamma=2.0,
        global_batch_size=64,  # the same run on 1 or 8 devices (--batch_size would be per device)
        epochs=30,
        warmup_epochs=3,
        blr=4e-3,
        weight_decay=0.05,
        num_workers=4,
        output_dir="./output_demo",
        save_every=10,
        vis_every=10,
        log_every=4,
    )
