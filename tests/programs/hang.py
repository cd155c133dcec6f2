"""Test program: rank 2 never joins the all_reduce the others wait in (it sleeps instead)."""

import time

import torch
import torch.distributed as dist

from course.ranks import parser, print_rank, setup

args = parser(__doc__).parse_args()
with setup(args, relaunch=True, trace=args.trace) as ctx:
    print_rank("before the all_reduce")
    if ctx.rank == 2:
        time.sleep(600)
    else:
        dist.all_reduce(torch.ones(3))
