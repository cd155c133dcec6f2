"""Broken on purpose: one rank waits in Python for something that never happens.

What is wrong
    Rank 3 waits for a file that it expects rank 0 to write, polling with time.sleep; rank 0
    never writes it (the path is spelled differently). Rank 3 is not in any collective, so no
    collective can fail with its name: the other ranks wait for it in the next all_reduce until
    the collective timeout (60 s), and their message names only the call they were in.

Run it
    torchrun --nproc-per-node 4 lessons/broken/asleep.py

What you should see
    After 8 s (--stuck-after) one rank prints where every rank is. Ranks 0-2 are in
    all_reduce; rank 3 is "at lessons/broken/asleep.py:NN: time.sleep(0.1)", in no call: the
    rank to look at.

The fix
    Wait for what another rank does through torch.distributed (a barrier, a broadcast of a
    flag), with a timeout, never by polling for a side effect.
"""

import os
import tempfile
import time

import torch
import torch.distributed as dist

from course.ranks import AT_LEAST_2, parser, print_rank, setup

NEEDS = AT_LEAST_2


# --8<-- [start:main]
def main():
    args = parser(__doc__).parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        folder = tempfile.gettempdir()
        if ctx.rank == 0:
            open(os.path.join(folder, f"ready-{os.getppid()}"), "w").close()
        if ctx.rank == ctx.world_size - 1:
            while not os.path.exists(os.path.join(folder, f"ready.{os.getppid()}")):  # the slip
                time.sleep(0.1)
        x = torch.ones(4, device=ctx.device)
        dist.all_reduce(x)
        print_rank(f"sum: {x.tolist()}")
    # --8<-- [end:main]


if __name__ == "__main__":
    main()
