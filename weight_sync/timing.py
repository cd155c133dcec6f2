"""Timing device work right: a Clock that marks a moment of the device's work (a CUDA event
under NCCL, the host's clock on CPU), and broadcast_timing, a broadcast timed the fair way.
The engine uses both; the trainer's side (lesson 09, the benchmark) the second."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from weight_sync.groups import Group


class Clock:
    """Marks a moment of the device's work and, after a sync, says how long ago it was: a CUDA
    event under NCCL (the host is ahead of the GPU), the host's clock on CPU."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.at = None

    def mark(self) -> None:
        if self.cuda:
            self.at = torch.cuda.Event(enable_timing=True)
            self.at.record()
        else:
            self.at = time.monotonic()

    def since(self) -> float:
        """Seconds from the mark to now; the device must have been synchronized."""
        if not self.cuda:
            return time.monotonic() - self.at
        now = torch.cuda.Event(enable_timing=True)
        now.record()
        now.synchronize()
        return self.at.elapsed_time(now) / 1e3


def broadcast_timing(group: Group, nbytes: int, repeats: int) -> float:
    """Seconds per broadcast of nbytes from rank 0, the slowest rank's, done right: a barrier so
    nobody's time includes waiting for the others, one broadcast discarded (warm-up), a device
    sync before reading the clock. Every rank of the group runs this together."""
    dtype = torch.float32 if nbytes % 4 == 0 else torch.uint8  # 4 GiB: 2**30 elements, not 2**32
    data = torch.ones(nbytes // dtype.itemsize, dtype=dtype, device=group.device)
    group.barrier()
    group.broadcast(data, 0).wait()  # warm-up: first-touch, connections, caches
    group.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        group.broadcast(data, 0).wait()
    group.sync()
    return group.slowest((time.perf_counter() - start) / repeats)
