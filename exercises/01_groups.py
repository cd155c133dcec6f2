"""Checks for lesson 01's exercises (lessons/01_groups.py). Run them: python -m lessons.check 01

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without collectives.
"""

import datetime

import torch
import torch.distributed as dist


def check_tp_dp_groups(ctx, tp_dp_groups):
    """Runs on every rank: the members of your groups, and all_reduce(rank+1) inside each."""
    tp_size = 2
    tp_ranks = [r for r in range(ctx.world_size) if r // tp_size == ctx.rank // tp_size]
    dp_ranks = [r for r in range(ctx.world_size) if r % tp_size == ctx.rank % tp_size]
    tp_group, dp_group = tp_dp_groups(tp_size, datetime.timedelta(seconds=10))
    yours = {}
    for axis, group in (("tp", tp_group), ("dp", dp_group)):
        yours[f"{axis} members"] = dist.get_process_group_ranks(group)
        total = torch.tensor([ctx.rank + 1.0], device=ctx.device)
        dist.all_reduce(total, group=group)
        yours[f"{axis} all_reduce of rank+1"] = total.item()
    expected = {
        "tp members": tp_ranks,
        "tp all_reduce of rank+1": sum(r + 1.0 for r in tp_ranks),
        "dp members": dp_ranks,
        "dp all_reduce of rank+1": sum(r + 1.0 for r in dp_ranks),
    }
    return yours, expected


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"01.1": (check_tp_dp_groups, "tp_dp_groups")}
