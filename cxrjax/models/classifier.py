"""The chest X-ray classifier: DenseNet backbone, optional CBAM, a head; logits out.

Written with flax.linen because its variables are plain dicts
({'params', 'batch_stats'}): they go straight into `jax.jit` with `NamedSharding`,
into orbax checkpoints and into optax, with no per-step traversal of a module graph.

Call convention::

    variables = model.init(rngs, x, train=False)          # {'params', 'batch_stats'}
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                  rngs={'dropout': key})   # logits [B, 14] float32

Grad-CAM: the final feature map (after CBAM) and the logits come from one apply with
`method="features_and_logits"`. For gradients of a logit with respect to the feature
map, split the model at the feature map::

    fmap = model.apply(variables, x, method="features")
    logits, vjp = jax.vjp(lambda f: model.apply(variables, f, method="classify"), fmap)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cxrjax.findings import NUM_FINDINGS
from cxrjax.models.cbam import CBAM
from cxrjax.models.densenet import DenseNet, arch_spec, maybe_remat, remat_mode, remat_policy
from cxrjax.models.heads import ChexnetHead, FisherHead

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
HEADS = ("chexnet", "fisher")


def default_model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "arch": "densenet121",
            "cbam": False,
            "head": "chexnet",
            "num_classes": NUM_FINDINGS,
            "dropout": 0.3,
            "dtype": "float32",
            "remat": "none",  # none | dense_layers | all (see models/densenet.py)
            "remat_policy": "nothing_saveable",
            "in_channels": 3,
            "init_from": "",
        }
    )


class ChestXrayClassifier(nn.Module):
    arch: str = "densenet121"
    cbam: bool = False
    head: str = "chexnet"
    num_classes: int = NUM_FINDINGS
    dropout: float = 0.3
    dtype: Any = jnp.float32
    remat: str = "none"
    remat_policy: str = "nothing_saveable"
    in_channels: int = 3

    def setup(self):
        spec = arch_spec(self.arch)
        self.backbone = DenseNet(
            spec.block_config,
            spec.growth_rate,
            spec.init_features,
            dtype=self.dtype,
            remat=self.remat,
            remat_policy=self.remat_policy,
        )
        if self.cbam:
            attention_cls = maybe_remat(CBAM, remat_mode(self.remat) == "all", self.remat_policy)
            self.attention = attention_cls(dtype=self.dtype)
        if self.head == "chexnet":
            self.classifier = ChexnetHead(self.num_classes)
        elif self.head == "fisher":
            self.classifier = FisherHead(self.num_classes, self.dropout)
        else:
            raise ValueError(f"unknown head {self.head!r}; expected one of {', '.join(HEADS)}")

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Final feature map [B, h, w, C] in the compute dtype (after CBAM when enabled)."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"expected NHWC input with {self.in_channels} channel(s), got shape {x.shape}")
        fmap = self.backbone(x, train=train)
        return self.attention(fmap) if self.cbam else fmap

    def classify(self, fmap: jax.Array, train: bool = False) -> jax.Array:
        return self.classifier(fmap, train=train).astype(jnp.float32)

    def features_and_logits(self, x: jax.Array, train: bool = False):
        fmap = self.features(x, train=train)
        return fmap, self.classify(fmap, train=train)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.classify(self.features(x, train=train), train=train)


def build_model(cfg) -> ChestXrayClassifier:
    """The classifier described by a model config (see `default_model_config`)."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {cfg.dtype!r}; expected one of {', '.join(DTYPES)}")
    if cfg.in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {cfg.in_channels!r}")
    arch_spec(cfg.arch)
    remat = remat_mode(cfg.remat)
    if remat != "none":
        remat_policy(cfg.remat_policy)
    if cfg.head not in HEADS:
        raise ValueError(f"unknown head {cfg.head!r}; expected one of {', '.join(HEADS)}")
    return ChestXrayClassifier(
        arch=cfg.arch,
        cbam=bool(cfg.cbam),
        head=cfg.head,
        num_classes=int(cfg.num_classes),
        dropout=float(cfg.dropout),
        dtype=DTYPES[cfg.dtype],
        remat=remat,
        remat_policy=cfg.remat_policy,
        in_channels=int(cfg.in_channels),
    )
