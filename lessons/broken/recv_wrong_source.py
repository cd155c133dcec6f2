"""Broken on purpose: a recv that names the wrong source.

What is wrong
    The ranks pass a token down the line: rank r receives it from r - 1, adds its rank and
    sends it on to r + 1. Rank 2 receives from rank 0 (a slip: `rank - 2`), which never sends
    to it. Rank 2 waits in recv(), rank 1 in its send() to rank 2, rank 3 in its recv() from
    rank 2; rank 0 has finished its part and waits in the closing barrier. Nothing fails: under
    default flags every rank just waits, until the collective timeout (60 s) ends the run with
    "Timed out waiting ... for recv" naming no peer.

Run it
    torchrun --nproc-per-node 4 lessons/broken/recv_wrong_source.py

What you should see
    After 8 s (--stuck-after) one rank prints where every rank is, the peers included:
        stuck? rank 1 has waited 8 s in one call; where every rank is (...):
          rank 0: 8 s in barrier() at lessons/broken/recv_wrong_source.py:NN: dist.barrier()
          rank 1: 8 s in send(dst=2, tensor [1] float32) at ...: dist.send(token, dst=rank + 1)
          rank 2: 8 s in recv(src=0, tensor [1] float32) at ...: dist.recv(token, src=rank - 2)
          rank 3: 8 s in recv(src=2, tensor [1] float32) at ...: dist.recv(token, src=rank - 1)
    Rank 2 waits for rank 0, who sends to nobody: that is the slip. At --timeout the run fails.

The fix
    `src=rank - 1`, as in the rule the others follow.
"""

import torch
import torch.distributed as dist

from course.ranks import AT_LEAST_2, parser, print_rank, setup

NEEDS = AT_LEAST_2


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        rank, token = ctx.rank, torch.zeros(1, device=ctx.device)
        if rank == 2:
            dist.recv(token, src=rank - 2)  # the mistake: rank 2 should receive from rank 1
        elif rank > 0:
            dist.recv(token, src=rank - 1)
        token += rank
        if rank + 1 < ctx.world_size:
            dist.send(token, dst=rank + 1)
        dist.barrier()
        print_rank(f"token: {token.item()}")
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
