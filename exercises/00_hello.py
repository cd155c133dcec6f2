"""Checks for lesson 00's exercises (lessons/00_hello.py). Run them: python -m lessons.check 00

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without collectives.
"""

import torch


def check_mean_over_ranks(ctx, mean_over_ranks):
    """Runs on every rank: your function against the single-process mean of every rank's input."""
    inputs = [
        torch.arange(6.0, device=ctx.device).reshape(2, 3) * (r + 1) for r in range(ctx.world_size)
    ]  # rank r holds inputs[r]
    x = inputs[ctx.rank].clone()
    yours = mean_over_ranks(x)
    expected = torch.stack(inputs).mean(dim=0)
    return (
        {"result": yours, "x afterwards": x},
        {"result": expected, "x afterwards": inputs[ctx.rank]},
    )


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"00.1": (check_mean_over_ranks, "mean_over_ranks")}
