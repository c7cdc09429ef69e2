"""Full resolution: DenseNet121 + CBAM at the native 1024 px, bfloat16 compute with
everything rematerialized (66 MiB of saved activations per image, the memory-efficient
DenseNet's floor) so a large batch fits on a 24 GB A10G, AdamW with cosine decay.

Memory on an A10G, compiled for the target (not measured; benchmarks/README.md, "Memory for a
GPU that is not here"): the training step at 8 images per A10G, this recipe's batch, takes
2.01 GiB (257 MiB per image); the largest batch under 20.99 GiB (23,028 MiB less a 1.5 GiB
allowance) is 86 per A10G (18.8 GiB compiled). To plan another batch or card:

    cxrjax bench --out /tmp/plan --arch densenet121 --sizes 1024 --remat all --batch 8 --target a10g

    cxrjax prepare --nih-dir /data/nih --out /data/nih-1024 --image-size 1024
    cxrjax train --config configs/full1024.py --workdir runs/full1024 \\
        --config.data.prepared=/data/nih-1024
    cxrjax train --config configs/full1024.py:smoke --workdir /tmp/full-smoke \\
        --config.data.prepared=/tmp/prepared
"""

from cxrjax.config import base_config, with_variant


def get_config(variant: str = ""):
    c = base_config()
    c.data.image_size = 1024
    c.data.workers = 8
    c.global_batch_size = 32  # 8 per A10G on a g5.24xlarge
    c.epochs = 30
    c.model.arch = "densenet121"
    c.model.cbam = True
    c.model.head = "chexnet"
    c.model.dtype = "bfloat16"
    c.model.remat = "all"
    c.loss.name = "weighted_bce"
    c.optim.name = "adamw"
    c.optim.learning_rate = 3e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 1.0
    c.checkpoint.every_steps = 500  # an epoch at 1024 px is long; spot can end it
    return with_variant(c, variant, smoke_fields={"data.image_size": 64, "checkpoint.every_steps": 2})
