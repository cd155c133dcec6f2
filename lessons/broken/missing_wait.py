"""Broken on purpose: rank 0 changes a tensor after isend(), without waiting for the send.

What is wrong
    isend() returns at once, before the data has left: the request it returns says when it
    has. Until wait() on that request returns, the tensor still belongs to the send. Here rank
    0 sends its weights with isend, reuses the tensor at once (zeroes it for the next step)
    and calls wait() only afterwards. gloo reads the tensor when the receiver is ready - after
    the zeroing.

Run it
    torchrun --nproc-per-node 2 lessons/broken/missing_wait.py --debug

What you should see
    No error from torch, only a wrong result: rank 1's check fails with "rank 1: received
    [0.0, 0.0, 0.0, 0.0] from rank 0, which sent [7.0, 7.0, 7.0, 7.0]", and a line saying why.
    Which values arrive depends on timing (here rank 1 is busy for a moment, so it receives
    zeros every time); that is what makes this bug hard to find.

The fix
    Wait on the request before touching the tensor: `request = dist.isend(x, 1)`, ... work
    that does not touch x ..., `request.wait()`, then `x.zero_()`. (Dropping the request
    without any wait() is worse: under --debug the message was never delivered at all.)
"""

import time

import torch
import torch.distributed as dist

from course.ranks import parser, print0, setup
from lessons.broken import explain

BUSY_S = 0.5  # rank 1 is busy this long before it posts its recv
VALUE = 7.0  # what rank 0 sends


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, relaunch=True, trace=args.trace) as ctx:
        if ctx.rank == 0:
            weights = torch.full((4,), VALUE, device=ctx.device)
            request = dist.isend(weights, dst=1)
            weights.zero_()  # the mistake: the tensor is reused while the send may still read it
            request.wait()  # too late: wait() belongs before anything touches `weights`
        elif ctx.rank == 1:
            time.sleep(BUSY_S)
            received = torch.empty(4, device=ctx.device)
            dist.recv(received, src=0)
            expected = [VALUE] * 4  # the single-process answer: what rank 0 put in the tensor
            with explain(
                "rank 0 zeroed its tensor after isend() without waiting on the "
                "request, so the send read the zeros"
            ):
                assert received.tolist() == expected, (
                    f"rank 1: received {received.tolist()} from rank 0, which sent {expected}"
                )
        dist.barrier()
        print0("checked: rank 1 received what rank 0 sent")
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
