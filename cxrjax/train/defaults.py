"""Every training field with its default; the files in configs/ start from this."""

from __future__ import annotations

import ml_collections

from cxrjax.models import default_model_config


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.epochs = 10
    c.global_batch_size = 32  # over all devices of all processes
    c.log_every_steps = 50
    c.max_steps_per_epoch = 0  # 0: one pass over the training part

    c.data = ml_collections.ConfigDict()
    c.data.prepared = ""  # output folder of `cxrjax prepare`
    c.data.image_size = 224
    c.data.workers = 0  # grain decode processes per host (0: in the main process)
    c.data.normalization = "imagenet"  # imagenet | dataset (measured on the training part)
    c.data.augment = True
    c.data.rotation_deg = 10.0
    c.data.shift = 0.05
    c.data.zoom = 0.1
    c.data.shear_deg = 5.0
    c.data.horizontal_flip = False
    c.data.keep_no_finding = 1.0
    c.data.oversample_rare_below = 0.0
    c.data.oversample_factor = 1

    c.model = default_model_config()

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "bce"  # bce | weighted_bce | balanced_bce | dynamic_bce | focal
    c.loss.smooth = 0.1
    c.loss.focal_gamma = 2.0
    c.loss.focal_alpha = 0.25
    c.loss.l2 = 0.0  # on the head's dense kernels

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"  # adam | adamw | sgd
    c.optim.learning_rate = 1e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-7  # Keras's Adam epsilon
    c.optim.weight_decay = 1e-4
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.grad_accum_steps = 1
    c.optim.schedule = "plateau"  # constant | exponential | cosine | plateau
    c.optim.decay_rate = 0.95  # exponential, per epoch
    c.optim.warmup_epochs = 1.0  # cosine
    c.optim.plateau_factor = 0.5
    c.optim.plateau_patience = 3
    c.optim.min_lr = 1e-6

    c.early_stopping_patience = 10  # epochs without a better val mean AUC; 0: never stop

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3
    c.checkpoint.every_steps = 0  # 0: at the end of each epoch only

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 0  # global; 0: same as training
    c.eval.bootstrap = 1000
    c.eval.test = True  # evaluate the best weights on the test part at the end

    c.wandb = ml_collections.ConfigDict()
    c.wandb.mode = "offline"  # offline | online | disabled
    c.wandb.project = "cxrjax"
    c.wandb.entity = ""

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""  # host:port of process 0
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    c.ensemble = ml_collections.ConfigDict()
    c.ensemble.members = 1  # >1: train members with seeds seed, seed+1, ...
    c.ensemble.overrides = ""  # per member, ';'-separated: "optim.learning_rate=1e-3;optim.learning_rate=3e-4"
    return c


def smoke(c: ml_collections.ConfigDict, image_size: int = 32) -> ml_collections.ConfigDict:
    """A recipe shrunk to seconds on a CPU: tiny DenseNet, a few steps, no wandb."""
    c.model.arch = "tiny"
    c.data.image_size = image_size
    c.data.workers = 0
    c.global_batch_size = 8
    c.epochs = 2
    c.max_steps_per_epoch = 4
    c.log_every_steps = 2
    c.checkpoint.every_steps = 0
    c.eval.bootstrap = 20
    c.wandb.mode = "disabled"
    return c
