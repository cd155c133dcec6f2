"""Broken on purpose: the receiver allocates fewer elements than the sender sends.

What is wrong
    recv() fills a tensor that the receiver allocated beforehand, so the receiver must know the
    shape. Here it assumes every batch has 8 rows, but the sender's last batch has 10. gloo
    finds 40 bytes arriving for a 32-byte buffer and kills the process; a buffer larger than
    the message would be filled only in part, silently.

Run it
    torchrun --nproc-per-node 2 lessons/broken/recv_wrong_shape.py --debug

What you should see
    Rank 1 aborts at once: "terminate called after throwing an instance of
    'gloo::EnforceNotMet' ... op.preamble.length <= op.nbytes. 40 vs 32. Received data size
    doesn't match expected size", then "Fatal Python error: Aborted" and its Python stack
    (faulthandler, which the course turns on in every rank), whose recv_wrong_shape.py line is
    the recv; the course's launcher shows it as one line, "in recv() called at
    lessons/broken/recv_wrong_shape.py:NN". The summary says "rank 1 failed first (exit code
    -6)" (SIGABRT).

The fix
    Send the shape first, in a fixed-size header the receiver can always allocate, then the
    tensor (lesson 02's shape handshake), or use send_object_list for small things.
"""

import torch
import torch.distributed as dist

from course.ranks import parser, print_rank, setup

ROWS_EXPECTED, ROWS_SENT = 8, 10  # what the receiver assumes; what the sender's batch has


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, relaunch=True, trace=args.trace) as ctx:
        if ctx.rank == 0:
            dist.send(torch.arange(float(ROWS_SENT), device=ctx.device), dst=1)
        elif ctx.rank == 1:
            batch = torch.empty(ROWS_EXPECTED, device=ctx.device)  # the mistake: a guessed shape
            dist.recv(batch, src=0)
            print_rank(f"received {batch.tolist()}")
        dist.barrier()
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
