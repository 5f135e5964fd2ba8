"""Fine-tuning the demo's pretrained encoder to classify the 4 demo creatures.

    python main.py pretrain                          # the demo MAE, into ./output_demo
    python main.py finetune --config finetune_demo   # its encoder, into ./output_finetune_demo

MAE's fine-tuning recipe (layer decay, RandAugment, random erasing, label smoothing, drop
path) at the demo's scale; no mixup (4 classes, 512 images). See docs/converting.md for the
accuracy it reaches and its parity with PyTorch.
"""

from semmae_jax.jobs.finetune import FinetuneConfig


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        model="vit_demo_patch8",
        nb_classes=4,
        finetune="./output_demo/checkpoints",
        global_batch_size=64,  # the same run on 1 or 8 devices (--batch_size would be per device)
        epochs=20,
        warmup_epochs=2,
        blr=5e-3,
        layer_decay=0.75,
        drop_path=0.1,
        num_workers=4,
        output_dir="./output_finetune_demo",
        log_every=8,
    )
