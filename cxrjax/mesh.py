"""The device mesh: one `data` axis over every device of every process.

Batches are sharded along `data`, parameters and optimizer state are replicated;
BatchNorm's batch mean then runs over the global batch, and XLA adds the all-reduce.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def per_process_batch(global_batch: int, mesh: Mesh) -> int:
    """This process's share of a global batch; it must split evenly over devices."""
    devices = mesh.devices.size
    if global_batch % devices:
        raise ValueError(f"global batch {global_batch} does not split over {devices} devices")
    return global_batch // jax.process_count()


def to_global(batch: dict, mesh: Mesh) -> dict:
    """Assemble each process's numpy batch into one global array per key."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


class DeviceBatches:
    """Global batches from this process's host batches, the next `ahead` of them already
    sent to the devices: the one batch iterator of training and evaluation.

    `to_global` only starts each copy, so the device never waits for the host's transfer
    of the batch it needs next. `get_state()` is the host iterator's position as of the
    batch last yielded (not of those sent ahead), so a checkpoint resumes at the next
    batch; the host iterator is restored before it is wrapped.
    """

    def __init__(self, host_batches, mesh: Mesh, ahead: int = 2):
        self._host, self._mesh, self._ahead = host_batches, mesh, ahead
        self._queue = collections.deque()
        self._state = self._host_state()

    def _host_state(self):
        return self._host.get_state() if hasattr(self._host, "get_state") else None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self._queue) <= self._ahead:
            host = next(self._host, None)
            if host is None:
                break
            self._queue.append((to_global(host, self._mesh), self._host_state()))
        if not self._queue:
            raise StopIteration
        batch, self._state = self._queue.popleft()
        return batch

    def get_state(self):
        return self._state


def to_host(tree):
    """Full numpy values of (possibly multi-process) global arrays, on every process."""
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(tree)):
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
