"""Stop and checkpoint requests from signals, answered at step boundaries.

SIGTERM/SIGINT ask for a checkpoint and a clean exit; SIGUSR1 (a spot rebalance
recommendation) for a checkpoint while training goes on.

One process: a Python handler sets a flag, read after every step. Several processes:
jax.distributed's preemption service owns SIGTERM (its handler replaces any other) and
brings every process to the same step (`reached_preemption_sync_point`, asked after every
step); SIGINT sets the flag, which the processes compare at log steps (a collective, so
never in between, or one process would wait for the others).
"""

from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopFlag:
    """The signal handlers of one training run; enter it after `jax.distributed.initialize`."""

    def __init__(self):
        self.signal = None
        self.reason = ""
        self.checkpoint_wanted = False  # SIGUSR1: a checkpoint now, training goes on
        self._multi = jax.process_count() > 1
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._handle_checkpoint)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def _handle_checkpoint(self, signum, frame):
        self.checkpoint_wanted = True

    def checkpoint_requested(self, log_step: bool) -> bool:
        """Whether SIGUSR1 asked for a checkpoint; several processes compare at log steps,
        so all save the same step."""
        wanted = self.checkpoint_wanted
        if self._multi:
            if not log_step:
                return False
            wanted = bool(multihost_utils.process_allgather(np.int32(wanted)).max())
        self.checkpoint_wanted = False
        return wanted

    def __exit__(self, *exc):
        self.release()

    def release(self) -> None:
        """Give the signals their previous handlers back (once training has no steps left)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def during_evaluation(self) -> bool:
        """Whether to abandon an evaluation pass now, so a spot notice's two minutes hold at
        1024 px. One process only: a cluster's processes would have to agree, and jax's
        preemption service answers only at training steps."""
        return not self._multi and self.signal is not None

    def requested(self, step: int, log_step: bool) -> bool:
        """Whether to stop after `step`; every process gets the same answer."""
        if not self._multi:
            self.reason = f"{self.signal} received" if self.signal else ""
        elif multihost_utils.reached_preemption_sync_point(step):
            self.reason = "SIGTERM (preemption notice) reached a process"
        elif log_step and multihost_utils.process_allgather(np.int32(self.signal is not None)).max():
            self.reason = f"{self.signal} received" if self.signal else "a signal reached another process"
        return bool(self.reason)
