"""Test program: rank 1 forks a helper (as a data prefetcher would) that sleeps, then waits for
it at exit; the others wait in a barrier. Stopped by the launcher, each process is shown as what
it is: rank 1 in waitpid, its child in sleep."""

import os
import time

import torch.distributed as dist

from course.ranks import parser, print_rank, setup

args = parser(__doc__).parse_args()
with setup(args, relaunch=True, trace=args.trace) as ctx:
    if ctx.rank == 1:
        child = os.fork()
        if child == 0:
            time.sleep(600)  # the helper, forked by rank 1
            os._exit(0)
        print_rank("forked a helper")
        os.waitpid(child, 0)  # rank 1 waits for its helper, which never ends
    dist.barrier()
