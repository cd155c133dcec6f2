"""Checks for lesson 01's exercises (lessons/01_groups.py). Run them: python -m lessons.check 01

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without collectives. It also watches how your function
gets there (unittest.mock: dist.new_group works as before and keeps a list of its calls), so
that an answer which skips what the exercise teaches fails, saying why.
"""

import datetime
import inspect
from unittest import mock

import torch
import torch.distributed as dist


def check_tp_dp_groups(ctx, tp_dp_groups):
    """Runs on every rank: the members of your groups, all_reduce(rank+1) inside each, and the
    new_group calls that made them: every group, on every rank, in one order, with the timeout."""
    tp_size, timeout = 2, datetime.timedelta(seconds=10)
    tp_layout = [list(range(s, s + tp_size)) for s in range(0, ctx.world_size, tp_size)]
    dp_layout = [list(range(p, ctx.world_size, tp_size)) for p in range(tp_size)]
    with mock.patch.object(dist, "new_group", wraps=dist.new_group) as new_group:
        returned = tp_dp_groups(tp_size, timeout)
    made = [
        inspect.signature(dist.new_group).bind(*c.args, **c.kwargs).arguments
        for c in new_group.call_args_list
    ]
    made = [(list(a.get("ranks") or range(ctx.world_size)), a.get("timeout")) for a in made]
    every_group = [ranks for ranks, _ in made] == tp_layout + dp_layout or (
        f"no: this rank's dist.new_group calls made {[ranks for ranks, _ in made]}; every rank "
        f"must make all of {tp_layout + dp_layout}, in this order (TP groups, then DP groups)"
    )
    untimed = [ranks for ranks, t in made if t != timeout]
    timed = not untimed or (
        f"no: dist.new_group({untimed[0]}) without timeout=timeout: a group does not inherit the "
        "world's timeout, so a lost peer would keep it waiting torch's default (30 min on gloo)"
    )
    yours = {"every group, in one order, on every rank": every_group, "timeout passed": timed}
    expected = {key: True for key in yours}
    groups = tuple(returned) if isinstance(returned, (tuple, list)) else (returned,)
    if len(groups) != 2 or not all(isinstance(g, dist.ProcessGroup) for g in groups):
        yours["returns (tp_group, dp_group)"] = f"no: it returned {returned!r}"[:200]
        return yours, {**expected, "returns (tp_group, dp_group)": True}
    tp_ranks = [r for r in range(ctx.world_size) if r // tp_size == ctx.rank // tp_size]
    dp_ranks = [r for r in range(ctx.world_size) if r % tp_size == ctx.rank % tp_size]
    for axis, group, ranks in (("tp", groups[0], tp_ranks), ("dp", groups[1], dp_ranks)):
        yours[f"{axis} members"] = dist.get_process_group_ranks(group)
        total = torch.tensor([ctx.rank + 1.0], device=ctx.device)
        try:  # groups that differ between ranks make their members wait for each other
            dist.all_reduce(total, group=group)
            yours[f"{axis} all_reduce of rank+1"] = total.item()
        except RuntimeError as err:
            yours[f"{axis} all_reduce of rank+1"] = f"failed: {err}"[:200]
        expected[f"{axis} members"] = ranks
        expected[f"{axis} all_reduce of rank+1"] = sum(r + 1.0 for r in ranks)
    if all(yours[k] == expected[k] for k in expected):  # right at 2: other sizes, not hard-coded
        for other in (1, ctx.world_size):
            key = f"members at tp_size {other}: tp and dp"
            yours[key], expected[key] = (
                members(tp_dp_groups(other, timeout)),
                (
                    [r for r in range(ctx.world_size) if r // other == ctx.rank // other],
                    [r for r in range(ctx.world_size) if r % other == ctx.rank % other],
                ),
            )
    return yours, expected


def members(returned):
    """The ranks of the (tp_group, dp_group) a call returned, or what it returned instead."""
    if not isinstance(returned, (tuple, list)) or len(returned) != 2:
        return f"it returned {returned!r}"[:100]
    return tuple(dist.get_process_group_ranks(g) for g in returned)


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"01.1": (check_tp_dp_groups, "tp_dp_groups")}
# The checks run on 4 ranks, then on 2: an answer written for 4 ranks only fails.
WORLD_SIZES = (4, 2)
