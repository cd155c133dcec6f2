"""Broken on purpose: rank 0 calls all_reduce while rank 1 calls broadcast.

What is wrong
    A collective is a call that every rank makes together: the same op, in the same order,
    with tensors of the same shape. Here a branch on the rank sends rank 0 into all_reduce and
    rank 1 into broadcast. Neither can finish: each waits for a partner that never comes.

Run it
    torchrun --nproc-per-node 2 lessons/broken/collective_mismatch.py --debug
    torchrun --nproc-per-node 2 lessons/broken/collective_mismatch.py --timeout 5

What you should see
    With --debug (TORCH_DISTRIBUTED_DEBUG=DETAIL) both ranks fail at once, and each names both
    calls: "Detected mismatch between collectives on ranks. Rank 0 is running collective:
    CollectiveFingerPrint(... OpType=ALLREDUCE ...), but Rank 1 is running collective:
    CollectiveFingerPrint(... OpType=BROADCAST ...)". Without it, one rank waits the whole
    timeout and says only "Timed out waiting 5000ms for recv operation to complete", the other
    that its peer closed the connection: the tracebacks' lines of this file are all you get.

The fix
    Every rank makes the same call: take the collective out of the `if`, and branch on the rank
    only for what differs (here: which tensor each rank contributes).
"""

import torch
import torch.distributed as dist

from course.ranks import parser, print_rank, setup


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, relaunch=True, trace=args.trace) as ctx:
        x = torch.full((4,), float(ctx.rank + 1), device=ctx.device)
        if ctx.rank == 0:
            dist.all_reduce(x)  # the mistake: rank 0 sums...
        else:
            dist.broadcast(x, src=0)  # ...while the others wait for rank 0's broadcast
        print_rank(f"x = {x.tolist()}")
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
