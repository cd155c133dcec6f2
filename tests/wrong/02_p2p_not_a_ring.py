"""An answer to exercise 02.2 that sums with isend/irecv alone, but not in a ring: each rank
sends its whole x to every other rank. The check must catch it and say why
(tests/test_checks_catch.py)."""

import torch
import torch.distributed as dist


def ring_all_reduce(x):
    # Skips the point: (n-1) whole copies of x leave each rank, to every peer, instead of
    # 2(n-1) chunks of x/n to the right-hand neighbour only.
    rank, world_size = dist.get_rank(), dist.get_world_size()
    peers = [r for r in range(world_size) if r != rank]
    theirs = {r: torch.empty_like(x) for r in peers}
    works = [dist.isend(x.contiguous(), r) for r in peers]
    works += [dist.irecv(theirs[r], r) for r in peers]
    for work in works:
        work.wait()
    return x + sum(theirs.values())
