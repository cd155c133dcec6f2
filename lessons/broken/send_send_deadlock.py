"""Broken on purpose: both ranks send first, so neither ever receives.

What is wrong
    send() returns only once the other side has received (gloo always waits; NCCL does for
    all but small messages). Two ranks that exchange tensors by each calling send() then recv()
    both sit in send(), each waiting for a recv() the other will never reach: a deadlock.

Run it
    torchrun --nproc-per-node 2 lessons/broken/send_send_deadlock.py --debug
    torchrun --nproc-per-node 2 lessons/broken/send_send_deadlock.py

What you should see
    After the 10 s timeout both ranks fail with "Timed out waiting 10000ms for send operation
    to complete", the dist.send line of this file in their tracebacks, and a line that says
    why. --debug cannot name it sooner: DETAIL checks collectives, not send and recv. Without
    --debug, after 8 s (--stuck-after) one rank prints where every rank is, "rank 0: 8 s in
    send(dst=1, tensor [4] float32) at lessons/broken/send_send_deadlock.py:NN", and the
    same for rank 1: both in send, nobody in recv; the run fails at --timeout (60 s). Run
    with a long timeout (--timeout 600) under course.launcher (a notebook's run_lesson, the
    tests) and the launcher stops the run and prints, per rank, "in send() called at
    lessons/broken/send_send_deadlock.py:NN".

The fix
    Order the calls so that each send meets a recv: even ranks send then receive, odd ranks
    receive then send. Or post both at once with isend/irecv (or batch_isend_irecv) and wait
    on both.
"""

import torch
import torch.distributed as dist

from course.ranks import AT_LEAST_2, parser, print_rank, setup
from lessons.broken import explain

NEEDS = AT_LEAST_2


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        right, left = (ctx.rank + 1) % ctx.world_size, (ctx.rank - 1) % ctx.world_size
        mine = torch.full((4,), float(ctx.rank), device=ctx.device)
        theirs = torch.empty(4, device=ctx.device)
        with explain(
            "every rank is in send() to its right-hand neighbour, and none has "
            "reached recv(): each send waits for a recv that never comes"
        ):
            dist.send(mine, right)  # the mistake: everybody sends first...
            dist.recv(theirs, left)  # ...so nobody gets here
        print_rank(f"received {theirs.tolist()} from rank {left}")
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
