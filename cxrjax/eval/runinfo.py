"""What a run is, for the leaderboard: `run.json` in a run folder.

Schema (JSON object; extra keys are allowed and ignored):

    name          str, required   label shown on the leaderboard; run folders that share a
                                  name are one entry (mean and std across them)
    split_family  str, required   "official" (NIH train_val_list/test_list), "random"
                                  (patient-wise random split, e.g. the CheXNet split) or
                                  "synthetic" (cxrjax's synthetic data: no baseline applies)
    split         str, optional   which split exactly, e.g. "chexnet" or "random 90/5/5 seed 0"
    px            int, optional   input resolution in pixels
    backbone      str, optional   e.g. "DenseNet-121"

A run folder holds `run.json`, or the same object under the key "run" of its
`metrics.json`. Results on different split families are never ranked together.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cxrjax.errors import InputError

SPLIT_FAMILIES = ("official", "random", "synthetic")


class RunInfoError(InputError):
    """Missing or malformed run description."""


@dataclass(frozen=True)
class RunInfo:
    name: str
    split_family: str
    split: str = ""
    px: int | None = None
    backbone: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def parse_run_info(data: object, source: str) -> RunInfo:
    if not isinstance(data, dict):
        raise RunInfoError(f"{source}: run description must be a JSON object, got {data!r}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RunInfoError(f"{source}: 'name' must be a non-empty string, got {name!r}")
    family = data.get("split_family")
    if family not in SPLIT_FAMILIES:
        raise RunInfoError(
            f"{source}: 'split_family' is {family!r}; set it to 'official' (NIH "
            "train_val_list/test_list), 'random' (patient-wise random split such as "
            "CheXNet's) or 'synthetic' - results on different splits cannot be ranked together"
        )
    px = data.get("px")
    if px is not None and (isinstance(px, bool) or not isinstance(px, int) or px <= 0):
        raise RunInfoError(f"{source}: 'px' must be a positive integer, got {px!r}")
    for key in ("split", "backbone"):
        if not isinstance(data.get(key, ""), str):
            raise RunInfoError(f"{source}: {key!r} must be a string, got {data[key]!r}")
    return RunInfo(name.strip(), family, data.get("split", ""), px, data.get("backbone", ""))


def read_run_info(path: str | Path) -> RunInfo:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise RunInfoError(f"{path}: run description not found") from e
    except json.JSONDecodeError as e:
        raise RunInfoError(f"{path}: not valid JSON: {e}") from e
    return parse_run_info(data, str(path))
