"""Test program: rank 1 starts a child in a session of its own and exits without ending it."""

import subprocess
import sys

import torch.distributed as dist

from course.ranks import parser, print_rank, setup

args = parser(__doc__).parse_args()
with setup(args, relaunch=True, trace=args.trace) as ctx:
    if ctx.rank == 1:  # its output goes nowhere: it does not hold the launcher's pipe open
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        print_rank("started a child that sleeps for 10 minutes")
    dist.barrier()  # the ranks leave together: none is still connecting when another has gone
