"""Fisher 2025 recipe: DenseNet121 + CBAM at 320 px, the Fisher head (128-64, dropout
0.3), dynamically weighted BCE with smoothing 0.1, Adam, batch 16, plateau (0.5, 3,
min 1e-6), early stopping on validation mean AUC (patience 10), random patient-wise
90/5/5 split (prepare with `--split random`).

    cxrjax prepare --nih-dir /data/nih --out /data/nih-320-random --image-size 320 --split random
    cxrjax train --config configs/fisher2025.py --workdir runs/fisher \\
        --config.data.prepared=/data/nih-320-random
    cxrjax train --config configs/fisher2025.py:smoke --workdir /tmp/fisher-smoke \\
        --config.data.prepared=/tmp/prepared
"""

from cxrjax.config import base_config, with_variant


def get_config(variant: str = ""):
    c = base_config()
    c.data.image_size = 320
    c.global_batch_size = 16
    c.epochs = 50
    c.model.arch = "densenet121"
    c.model.cbam = True
    c.model.head = "fisher"
    c.model.dropout = 0.3
    c.loss.name = "dynamic_bce"
    c.loss.smooth = 0.1
    c.loss.l2 = 1e-4
    c.optim.name = "adam"
    c.optim.learning_rate = 1e-4
    c.optim.schedule = "plateau"
    c.optim.plateau_factor = 0.5
    c.optim.plateau_patience = 3
    c.optim.min_lr = 1e-6
    c.early_stopping_patience = 10
    return with_variant(c, variant)
