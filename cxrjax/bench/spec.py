"""What one worker process measures: a plain, JSON-friendly description of a case."""

from __future__ import annotations

import dataclasses

FRAMEWORKS = ("cxrjax", "torch", "torch_compile", "keras")
PEERS = FRAMEWORKS[1:]
DTYPES = ("float32", "bfloat16")
# step: inference and training timed (plus the grain-fed step when `prepared` is set);
# max_batch: the largest batch per device under `memory_budget_bytes`;
# scaling: training on 1, 2, 4 and 8 devices.
TASKS = ("step", "max_batch", "scaling")
SCALING_DEVICES = (1, 2, 4, 8)
WARMUP_STEPS = 2


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    framework: str  # one of FRAMEWORKS
    arch: str  # a cxrjax arch: densenet121|densenet169|densenet201|tiny
    size: int  # square image side in pixels
    dtype: str  # compute dtype: float32 | bfloat16
    remat: str  # cxrjax model.remat; torchvision memory_efficient unless "none"; Keras has none
    batch: int  # per device
    steps: int  # timed steps after WARMUP_STEPS
    task: str = "step"  # one of TASKS
    memory_budget_bytes: int = 0  # max_batch: the budget per device
    prepared: str = ""  # cxrjax step: also time the step fed by grain from this folder
    workers: int = 0  # grain decode processes for `prepared`
    inference: bool = True  # step: also time inference (a short run may leave it out)

    def __post_init__(self):
        from cxrjax.models.densenet import REMAT_MODES  # lazily: `cxrjax --help` imports no flax

        for field, value, allowed in (
            ("framework", self.framework, FRAMEWORKS),
            ("dtype", self.dtype, DTYPES),
            ("remat", self.remat, REMAT_MODES),
            ("task", self.task, TASKS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {field} {value!r}; expected one of {', '.join(allowed)}")
        if self.size < 32 or self.batch < 1 or self.steps < 1:
            raise ValueError(f"need size >= 32, batch >= 1 and steps >= 1, got {self.size}, {self.batch}, {self.steps}")
        if self.task == "max_batch" and self.memory_budget_bytes <= 0:
            raise ValueError("a max_batch case needs a positive memory budget")

    def label(self) -> str:
        kind = self.framework if self.task == "step" else f"{self.framework} {self.task}"
        return f"{kind} {self.arch} {self.size}px {self.dtype} remat {self.remat} batch {self.batch}"

    def row(self, **fields) -> dict:
        """A result row that names this case; `fields` add the measured values."""
        base = {
            "framework": self.framework,
            "arch": self.arch,
            "size": self.size,
            "dtype": self.dtype,
            "remat": self.remat,
            "batch_per_device": self.batch,
        }
        return {**base, **fields}


def empty_result() -> dict:
    return {"measurements": [], "max_batch": [], "scaling": []}


def not_measured(spec: CaseSpec, status: str, reason: str) -> dict:
    """The result of a case that was skipped (a peer without its library, the deadline) or failed."""
    result = empty_result()
    if spec.task == "step":
        tasks = ("inference", "train") if spec.inference else ("train",)
        result["measurements"] = [spec.row(task=task, status=status, reason=reason) for task in tasks]
    else:
        result[spec.task] = [spec.row(task=spec.task, status=status, reason=reason)]
    return result
