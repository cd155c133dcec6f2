"""Checks for lesson 07's exercises (lessons/07_processes.py). Run them: python -m lessons.check 07

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without collectives.
"""


def check_role_worlds(ctx, start_role_world):
    """Runs on every rank: the first half are students, the second half teachers. Each rank's
    child must see exactly its role's parents and sum exactly their values."""
    half = ctx.world_size // 2
    role_ranks = list(range(half)) if ctx.rank < half else list(range(half, ctx.world_size))
    value = 10.0**ctx.rank  # the sum's digits say which ranks' children were in the world
    yours = start_role_world(role_ranks, value)
    expected = {"parents": role_ranks, "sum": sum(10.0**r for r in role_ranks)}
    return yours, expected


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"07.1": (check_role_worlds, "start_role_world")}
