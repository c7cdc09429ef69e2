"""CheXNet recipe (Rajpurkar et al. 2017): DenseNet121 at 224 px, Adam 1e-3, plain BCE,
learning rate cut tenfold when validation loss plateaus (factor 0.1, patience 1), as
in the paper.

    cxrjax train --config configs/chexnet.py --workdir runs/chexnet \\
        --config.data.prepared=/data/nih-224
    cxrjax train --config configs/chexnet.py:smoke --workdir /tmp/chexnet-smoke \\
        --config.data.prepared=/tmp/prepared
"""

from cxrjax.config import base_config, with_variant


def get_config(variant: str = ""):
    c = base_config()
    c.data.image_size = 224
    c.data.horizontal_flip = True  # the paper's only augmentation
    c.global_batch_size = 16
    c.epochs = 20
    c.model.arch = "densenet121"
    c.model.head = "chexnet"
    c.loss.name = "bce"
    c.optim.name = "adam"
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "plateau"
    c.optim.plateau_factor = 0.1
    c.optim.plateau_patience = 1
    return with_variant(c, variant)
