"""An answer to exercise 02.2 written for 4 ranks: a ring of 3 steps each way, hard-coded. It
passes on 4 ranks; the check runs on 3 as well, where it must fail (tests/test_checks_catch.py)."""

import torch
import torch.distributed as dist


def ring_all_reduce(x: torch.Tensor) -> torch.Tensor:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    out = x.clone(memory_format=torch.contiguous_format)  # a copy: x stays as it was
    chunks = out.view(-1).tensor_split(world_size)  # views: writing a chunk writes `out`

    def step(send_index, recv_into):  # one ring step: send a chunk right, receive from the left
        works = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, chunks[send_index], right),
                dist.P2POp(dist.irecv, recv_into, left),
            ]
        )
        for work in works:
            work.wait()

    # Reduce-scatter: at step s, rank r passes on chunk r-s and adds chunk r-s-1 from the left.
    # After world_size-1 steps, chunk r+1 holds the sum of every rank's.
    for s in range(3):  # written for 4 ranks: 3 steps each way
        mine = chunks[(rank - s - 1) % world_size]
        incoming = torch.empty_like(mine)
        step((rank - s) % world_size, incoming)
        mine += incoming
    # All-gather: at step s, rank r passes on its finished chunk r+1-s, receives chunk r-s.
    for s in range(3):  # written for 4 ranks: 3 steps each way
        step((rank + 1 - s) % world_size, chunks[(rank - s) % world_size])
    return out
