"""The demo recipe run by `cxrjax demo`: DenseNet121 + CBAM at 64 px on the synthetic
NIH-format dataset, sized to finish in minutes on two CPU cores.

    cxrjax demo                                  # synth -> prepare -> train -> evaluate
    cxrjax demo --nih-dir /data/nih --out runs/demo-nih
    cxrjax train --config configs/demo.py --workdir runs/demo --config.data.prepared=P
    cxrjax train --config configs/demo.py:smoke --workdir /tmp/demo-smoke \\
        --config.data.prepared=/tmp/prepared
"""

from cxrjax.config import base_config, with_variant


def get_config(variant: str = ""):
    c = base_config()
    c.data.image_size = 64
    c.data.normalization = "dataset"
    c.data.augment = False  # the synthetic findings sit at fixed places
    c.global_batch_size = 32
    c.epochs = 3
    c.log_every_steps = 10
    c.model.arch = "densenet121"
    c.model.cbam = True
    c.model.head = "chexnet"
    c.model.in_channels = 1
    c.loss.name = "bce"
    c.optim.name = "adam"
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 0.5
    c.early_stopping_patience = 0
    c.checkpoint.keep = 1
    c.eval.bootstrap = 200
    c.wandb.mode = "disabled"
    return with_variant(c, variant)
