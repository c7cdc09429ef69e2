"""What one worker process measures: a plain, JSON-friendly description of a case."""

from __future__ import annotations

import dataclasses

FRAMEWORKS = ("cxrjax", "torch", "torch_compile", "keras")
PEERS = FRAMEWORKS[1:]
DTYPES = ("float32", "bfloat16")
# step: inference and training timed (plus the grain-fed step when `prepared` is set);
# max_batch: the largest batch per device under `memory_budget_bytes`;
# scaling: training on 1, 2, 4 and 8 devices;
# compiled: the training step compiled for a GPU target that need not be present (memory
# plan and largest batch from XLA's buffer assignment; nothing runs).
TASKS = ("step", "max_batch", "scaling", "compiled")
RESULT_KEYS = ("measurements", "max_batch", "scaling", "compiled")
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
    target: str = ""  # compiled: a cxrjax.bench.gpu_target key, or "auto" for the device present
    target_devices: int = 1  # compiled: devices of the target on one host (a g5.24xlarge has 4)
    allowance_bytes: int = 0  # compiled: left out of the card's memory for what XLA does not plan

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
        if self.task == "compiled" and (not self.target or self.target_devices < 1 or self.allowance_bytes < 0):
            raise ValueError("a compiled case needs a target, at least one device and an allowance >= 0")

    def label(self) -> str:
        kind = self.framework if self.task == "step" else f"{self.framework} {self.task}"
        if self.task == "compiled":
            kind += f" for {self.target_devices} x {self.target}"
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
    return {key: [] for key in RESULT_KEYS}


def not_measured(spec: CaseSpec, status: str, reason: str) -> dict:
    """The result of a case that was skipped (a peer without its library, the deadline) or failed."""
    result = empty_result()
    if spec.task == "step":
        tasks = ("inference", "train") if spec.inference else ("train",)
        result["measurements"] = [spec.row(task=task, status=status, reason=reason) for task in tasks]
    else:
        result[spec.task] = [spec.row(task=spec.task, status=status, reason=reason)]
    return result
