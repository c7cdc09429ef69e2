"""What one worker process measures: a plain, JSON-friendly description of a case."""

from __future__ import annotations

import dataclasses

FRAMEWORKS = ("cxrjax", "torch", "torch_compile", "keras")
PEERS = FRAMEWORKS[1:]
DTYPES = ("float32", "bfloat16")
SCALING_DEVICES = (1, 2, 4, 8)
WARMUP_STEPS = 2


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    framework: str  # one of FRAMEWORKS
    arch: str  # a cxrjax arch: densenet121|densenet169|densenet201|tiny
    size: int  # square image side in pixels
    dtype: str  # compute dtype: float32 | bfloat16
    remat: bool  # cxrjax remat; torchvision memory_efficient; Keras has none
    batch: int  # per device
    steps: int  # timed steps after WARMUP_STEPS
    memory_budget_bytes: int = 0  # cxrjax: also find the largest batch that fits this
    scaling: bool = False  # cxrjax: measure 1/2/4/8 devices instead of the plain case
    prepared: str = ""  # cxrjax: also time the step fed by grain from this folder
    workers: int = 0  # grain decode processes for `prepared`

    def __post_init__(self):
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"unknown framework {self.framework!r}; expected one of {', '.join(FRAMEWORKS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.size < 32 or self.batch < 1 or self.steps < 1:
            raise ValueError(f"need size >= 32, batch >= 1 and steps >= 1, got {self.size}, {self.batch}, {self.steps}")

    def label(self) -> str:
        remat = "remat" if self.remat else "no-remat"
        kind = "scaling" if self.scaling else self.framework
        return f"{kind} {self.arch} {self.size}px {self.dtype} {remat} batch {self.batch}"

    def row(self, **fields) -> dict:
        """A result row that names this case; `fields` add the measured values."""
        base = {
            "framework": self.framework, "arch": self.arch, "size": self.size, "dtype": self.dtype,
            "remat": self.remat, "batch_per_device": self.batch,
        }
        return {**base, **fields}


def not_measured(spec: CaseSpec, status: str, reason: str) -> dict:
    """The result of a case that was skipped (a peer without its library) or failed."""
    tasks = ("scaling",) if spec.scaling else ("inference", "train")
    rows = [spec.row(task=task, status=status, reason=reason) for task in tasks]
    return {"measurements": [] if spec.scaling else rows, "max_batch": [], "scaling": rows if spec.scaling else []}
