"""Checks for lesson 00's exercises (lessons/00_hello.py). Run them: python -m lessons.check 00

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without collectives. It also watches how your function
gets there (unittest.mock: each watched torch.distributed function works as before and counts
its calls), so that an answer which skips what the exercise teaches fails, saying why.
"""

from unittest import mock

import torch
import torch.distributed as dist


def check_mean_over_ranks(ctx, mean_over_ranks):
    """Runs on every rank: your function against the single-process mean of every rank's input."""
    inputs = [
        torch.arange(6.0, device=ctx.device).reshape(2, 3) * (r + 1) for r in range(ctx.world_size)
    ]  # rank r holds inputs[r]
    x = inputs[ctx.rank].clone()
    with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce:
        yours = mean_over_ranks(x)
    one = all_reduce.call_count == 1 or (
        f"no: it called dist.all_reduce {all_reduce.call_count} times; the exercise asks for "
        "exactly one (every rank's x summed in one collective)"
    )
    expected = torch.stack(inputs).mean(dim=0)
    return (
        {"result": yours, "x afterwards": x, "one all_reduce": one},
        {"result": expected, "x afterwards": inputs[ctx.rank], "one all_reduce": True},
    )


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"00.1": (check_mean_over_ranks, "mean_over_ranks")}
# The checks run on 4 ranks, then on 3 (an odd world): an answer written for 4 only fails.
WORLD_SIZES = (4, 3)
