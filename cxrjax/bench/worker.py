"""One case in a fresh process: `python -m cxrjax.bench.worker SPEC_JSON RESULT_PATH`.

A fresh process per case gives each case its own allocator peak, keeps JAX's GPU
preallocation away from PyTorch, lets Keras choose its backend before it is imported,
confines an out-of-memory failure to its case, and lets the runner stop a case at the
run's deadline without losing the cases before it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cxrjax.bench.gpu_target import ensure_plugin_registered
from cxrjax.bench.spec import SCALING_DEVICES, CaseSpec


def measure(spec: CaseSpec) -> dict:
    if spec.framework == "cxrjax":
        from cxrjax.bench import jax_case

        run = {
            "step": jax_case.measure_case,
            "max_batch": jax_case.measure_max_batch,
            "scaling": jax_case.measure_scaling,
            "compiled": jax_case.measure_compiled,
        }[spec.task]
        return run(spec)
    from cxrjax.bench import peers

    return peers.measure_keras(spec) if spec.framework == "keras" else peers.measure_torch(spec)


def main(argv: list[str] | None = None) -> int:
    spec_json, result_path = sys.argv[1:] if argv is None else argv
    ensure_plugin_registered()  # before JAX is imported: the CUDA plugin registers without a driver
    spec = CaseSpec(**json.loads(spec_json))
    if spec.task == "scaling":  # on a CPU backend, simulate the devices; GPUs are what they are
        import jax

        jax.config.update("jax_num_cpu_devices", max(SCALING_DEVICES))
    partial = Path(f"{result_path}.partial")
    partial.write_text(json.dumps(measure(spec)))
    os.replace(partial, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
