"""Checks for lesson 07's exercises (lessons/07_processes.py). Run them: python -m lessons.check 07

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without collectives. It also watches how your function
gets there (unittest.mock: torch.multiprocessing.start_processes, which start_children calls,
works as before and counts the children it starts), so that an answer which skips what the
exercise teaches, a world of children of their own, fails, saying why.
"""

from unittest import mock

import torch.multiprocessing as torch_mp


def check_role_worlds(ctx, start_role_world):
    """Runs on every rank: the first half are students, the second half teachers. Each rank's
    child must see exactly its role's parents and sum exactly their values."""
    half = ctx.world_size // 2
    role_ranks = list(range(half)) if ctx.rank < half else list(range(half, ctx.world_size))
    value = 10.0**ctx.rank  # the sum's digits say which ranks' children were in the world
    started = mock.patch.object(torch_mp, "start_processes", wraps=torch_mp.start_processes)
    with started as start_processes:
        yours = start_role_world(role_ranks, value)
    children = sum(
        call.kwargs.get("nprocs", call.args[2] if len(call.args) > 2 else 1)
        for call in start_processes.call_args_list
    )
    one_child = children == 1 or (
        f"no: it started {children} children (torch.multiprocessing.start_processes, which "
        "start_children calls); the exercise starts one child per rank, and the children, in a "
        "world of their role's own, gather the parents and sum the values"
    )
    if isinstance(yours, dict):
        yours = {**yours, "one child per rank": one_child}
    expected = {
        "parents": role_ranks,
        "sum": sum(10.0**r for r in role_ranks),
        "one child per rank": True,
    }
    return yours, expected


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"07.1": (check_role_worlds, "start_role_world")}
