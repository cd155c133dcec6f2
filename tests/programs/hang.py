"""Test program: rank 2 never joins the all_reduce the others wait in (it sleeps instead)."""

import os
import pathlib
import time

import torch
import torch.distributed as dist

from course.ranks import parser, print_rank, setup

args = parser(__doc__).parse_args()
with setup(args, relaunch=True, trace=args.trace) as ctx:
    if "PIDS" in os.environ:  # a test watches the ranks from outside: each says who it is
        pathlib.Path(os.environ["PIDS"], str(os.getpid())).touch()
    print_rank("before the all_reduce")
    if ctx.rank == 2:
        time.sleep(600)
    else:
        dist.all_reduce(torch.ones(3))
