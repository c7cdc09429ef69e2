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
    evaluation    str, optional   which evaluation of the run this is, e.g. "test" or
                                  "test, tta 4": two evaluations of one run are two entries
    replicate_group str, optional runs that declare the same group are replicates (say,
                                  seeds of one recipe): one entry, mean and "± runs" over them
    test_images_full int, optional images in the split's full test list (for `official`
                                  it is always NIH's 25,596, for split "chexnet" 22,433 by
                                  default); a row scored on fewer is not ranked among
                                  published full-test results
    smoke         bool, optional  a pipeline check (tiny model, a few steps): never ranked
                                  among published results

A run folder holds `run.json`, or the same object under the key "run" of its
`metrics.json`. Results on different split families are never ranked together. The
leaderboard takes a run's identity from this description, never from its folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from cxrjax.errors import InputError
from cxrjax.jsonfile import read_json

SPLIT_FAMILIES = ("official", "random", "synthetic")
# Images in NIH's test_list.txt: the official split family's full test list.
OFFICIAL_TEST_IMAGES = 25596
# Fixed public splits whose test list size is known (split name -> images).
KNOWN_TEST_LISTS = {"chexnet": 22433}


class RunInfoError(InputError):
    """Missing or malformed run description."""


@dataclass(frozen=True)
class RunInfo:
    name: str
    split_family: str
    split: str = ""
    px: int | None = None
    backbone: str = ""
    evaluation: str = ""
    replicate_group: str = ""
    test_images_full: int | None = None
    smoke: bool = False

    def full_test_images(self) -> int | None:
        """How many images a full-test evaluation of this run's split scores, if known."""
        if self.split_family == "official":
            return OFFICIAL_TEST_IMAGES
        return self.test_images_full or KNOWN_TEST_LISTS.get(self.split)

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
    for key in ("split", "backbone", "evaluation", "replicate_group"):
        if not isinstance(data.get(key, ""), str):
            raise RunInfoError(f"{source}: {key!r} must be a string, got {data[key]!r}")
    full = data.get("test_images_full")
    if full is not None and (isinstance(full, bool) or not isinstance(full, int) or full <= 0):
        raise RunInfoError(f"{source}: 'test_images_full' must be a positive integer, got {full!r}")
    smoke = data.get("smoke", False)
    if not isinstance(smoke, bool):
        raise RunInfoError(f"{source}: 'smoke' must be true or false, got {smoke!r}")
    return RunInfo(
        name.strip(),
        family,
        data.get("split", ""),
        px,
        data.get("backbone", ""),
        data.get("evaluation", "").strip(),
        data.get("replicate_group", "").strip(),
        full,
        smoke,
    )


def read_run_info(path: str | Path) -> RunInfo:
    path = Path(path)
    data = read_json(path, RunInfoError, missing=f"{path}: run description not found", shape=None)
    return parse_run_info(data, str(path))  # says what a run description must be
