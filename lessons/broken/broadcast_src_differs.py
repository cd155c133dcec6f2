"""Broken on purpose: a broadcast whose source differs from rank to rank.

What is wrong
    Every rank must name the same source in broadcast(). Here each rank decides for itself who
    holds the checkpoint, from a value it computed on its own (its own file listing, its own
    clock...): ranks 0 and 1 say rank 0, ranks 2 and 3 say rank 1. Two sources send, and the
    ranks wait for data in a pattern that never completes. Without --debug nothing names it:
    every rank waits until the collective timeout (60 s).

Run it
    torchrun --nproc-per-node 4 lessons/broken/broadcast_src_differs.py

What you should see
    After 8 s (--stuck-after) one rank prints where every rank is; the broadcast's src differs:
        stuck? rank N has waited 8 s in one call; where every rank is (...):
          rank 0: 8 s in broadcast(src=0, tensor [4] float32) at ...: dist.broadcast(w, src=src)
          ...
          rank 3: 8 s in broadcast(src=1, tensor [4] float32) at ...: dist.broadcast(w, src=src)
    (Some ranks may already be past it, in the barrier.) With --debug the ranks compare their
    broadcasts before they start, and fail at once, naming the two.

The fix
    Decide the source once, the same way on every rank (a constant, or rank 0's choice sent with
    broadcast_object_list from a fixed rank), then broadcast.
"""

import torch
import torch.distributed as dist

from course.ranks import parser, print_rank, setup

NEEDS = ("exactly 4 ranks", lambda n: n == 4)


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        w = torch.full((4,), float(ctx.rank), device=ctx.device)
        src = 0 if ctx.rank < 2 else 1  # the mistake: each rank's own idea of who has the weights
        dist.broadcast(w, src=src)
        dist.barrier()
        print_rank(f"weights: {w.tolist()}")
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
