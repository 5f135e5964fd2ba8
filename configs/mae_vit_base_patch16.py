"""MAE ViT-B/16 pretraining, MAE's PRETRAIN.md recipe (random masking, 800 epochs).

    python main.py pretrain --config mae_vit_base_patch16 --data_path $IMAGENET

MAE used 64 images per GPU on 64 GPUs: effective batch 4096, lr = 1.5e-4 x 4096 / 256
= 2.4e-3. `--batch_size` is per device, so the effective batch follows the device count;
keep it at 4096 with `--accum_iter` on fewer devices. MAE's fine-tuned top-1 on
ImageNet-1k: 83.6.
"""

from semmae_jax.jobs.pretrain import PretrainConfig


def get_config() -> PretrainConfig:
    return PretrainConfig(
        model="mae_vit_base_patch16",
        input_size=224,
        mask_ratio=0.75,
        norm_pix_loss=True,
        setting=0,
        batch_size=64,
        epochs=800,
        warmup_epochs=40,
        blr=1.5e-4,
        weight_decay=0.05,
        output_dir="./output_mae_vit_base_patch16",
    )
