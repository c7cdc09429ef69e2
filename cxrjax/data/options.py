"""The options of `cxrjax prepare`, apart from the conversion code so that the command
line can show their defaults without importing the image and record libraries."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PrepareOptions:
    image_size: int
    split: str = "official"  # official | chexnet | random
    val_fraction: float = 0.1
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
    seed: int = 0
    source_size: int = 1024  # every NIH PNG is 1024x1024; 0 accepts any square size
    records_per_shard: int = 1024
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    skip_bad: bool = False
    labels: str | None = None  # a Data_Entry CSV; default: the one in nih_dir
