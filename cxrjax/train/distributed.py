"""Multi-host start-up through `jax.distributed.initialize`.

The coordinator, process count and process id come from the config or from the
environment (CXRJAX_COORDINATOR, CXRJAX_NUM_PROCESSES, CXRJAX_PROCESS_ID, as set by
launch/g5_24xlarge.sh); under SLURM jax detects all three itself.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize(cfg) -> bool:
    """Join the cluster if one is described; True when running multi-process.

    Joining happens once per process: ensemble members train one after another in it.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = cfg.coordinator or os.environ.get("CXRJAX_COORDINATOR", "")
    num = cfg.num_processes or int(os.environ.get("CXRJAX_NUM_PROCESSES", "0") or 0)
    pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("CXRJAX_PROCESS_ID", "-1") or -1)
    if coordinator:
        if num <= 0 or pid < 0:
            raise ValueError(
                "a coordinator was given without the process count and process id "
                "(distributed.num_processes / distributed.process_id or CXRJAX_NUM_PROCESSES / CXRJAX_PROCESS_ID)"
            )
        # Only the CPU backend reads this; it lets CPU processes run collectives (tests).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)
        return True
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # SLURM: jax reads the cluster from the environment
        return True
    return False
