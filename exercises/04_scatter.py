"""Checks for lesson 04's exercises (lessons/04_scatter.py): python -m lessons.check 04

Each check runs on every rank, calls the learner's functions and returns (yours, expected), the
expected value computed in one process, without collectives.
"""

import torch

from course.check import lesson_module

lesson = lesson_module("04")  # lessons/04_scatter.py, for SEED and held_bytes()


def check_shard_rows(ctx, shard_rows, unshard_rows):
    """Shard a [4n, 6] tensor from the last rank, reassemble it; check the data and the bytes."""
    n, rank = ctx.world_size, ctx.rank
    full = torch.randn(4 * n, 6, generator=torch.Generator().manual_seed(lesson.SEED))
    src = n - 1  # not rank 0: your code must use src
    piece = shard_rows(
        full.to(ctx.device) if rank == src else None, torch.empty(4, 6, device=ctx.device), src
    )
    back = unshard_rows(piece)
    yours = {"piece": piece, "bytes behind the piece": lesson.held_bytes([piece]), "whole": back}
    expected = {"piece": full.chunk(n)[rank], "bytes behind the piece": 4 * 6 * 4, "whole": full}
    return yours, expected


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"04.1": (check_shard_rows, "shard_rows", "unshard_rows")}
