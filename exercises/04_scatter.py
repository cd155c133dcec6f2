"""Checks for lesson 04's exercises (lessons/04_scatter.py): python -m lessons.check 04

Each check runs on every rank, calls the learner's functions and returns (yours, expected), the
expected value computed in one process, without collectives. It also watches how your functions
get there (unittest.mock: each watched torch.distributed function works as before and counts
its calls), so that an answer which skips what the exercise teaches fails, saying why.
"""

from unittest import mock

import torch
import torch.distributed as dist

from course.check import lesson_module

lesson = lesson_module("04")  # lessons/04_scatter.py, for SEED and held_bytes()


def watching(*names):
    """For a `with` block: these torch.distributed functions work as before and count calls."""
    return mock.patch.multiple(
        dist, **{name: mock.Mock(wraps=getattr(dist, name)) for name in names}
    )


# (isend and irecv are not watched: P2POp accepts only the real functions; batch_isend_irecv is)
NOT_GATHER = ("all_reduce", "broadcast", "send", "recv", "batch_isend_irecv")
GATHER = ("all_gather", "all_gather_into_tensor", "all_gather_single")


def check_shard_rows(ctx, shard_rows, unshard_rows):
    """Shard a [4n, 6] tensor from the last rank, reassemble it; check the data, the bytes, and
    that scatter did the sharding and all_gather the way back."""
    n, rank = ctx.world_size, ctx.rank
    full = torch.randn(4 * n, 6, generator=torch.Generator().manual_seed(lesson.SEED))
    src = n - 1  # not rank 0: your code must use src
    with watching("scatter", "broadcast"):
        piece = shard_rows(
            full.to(ctx.device) if rank == src else None, torch.empty(4, 6, device=ctx.device), src
        )
        calls = {name: getattr(dist, name).call_count for name in ("scatter", "broadcast")}
    one_scatter = calls == {"scatter": 1, "broadcast": 0} or (
        f"no: calls made: {', '.join(f'dist.{k} {v}' for k, v in calls.items())}; the exercise "
        "fills `piece` with one scatter: each rank receives its own rows, never the whole tensor"
    )
    # The way back starts from the right piece, whatever yours was: each function on its own.
    # One all_gather (any of its forms, the lesson's ALL_GATHER_SINGLE too), and nothing else.
    names = [n for n in (*NOT_GATHER, *GATHER) if hasattr(dist, n)]
    mine = unshard_rows.__globals__  # the lesson's namespace, where the learner's code runs
    alias = mine.get("ALL_GATHER_SINGLE")
    with watching(*names), mock.patch.dict(mine, ALL_GATHER_SINGLE=mock.Mock(wraps=alias)):
        back = unshard_rows(full.chunk(n)[rank].clone().to(ctx.device))
        calls = {name: getattr(dist, name).call_count for name in names}
        calls["ALL_GATHER_SINGLE"] = mine["ALL_GATHER_SINGLE"].call_count if alias else 0
    gathers = sum(calls.pop(name, 0) for name in (*GATHER, "ALL_GATHER_SINGLE"))
    shown = [f"dist.{k} {v}" for k, v in calls.items() if v or k in NOT_GATHER[:2]]
    gathered = (gathers == 1 and not any(calls.values())) or (
        f"no: calls made: {', '.join(shown)}, all_gather {gathers}; the way back is one "
        "all_gather: each rank sends its own rows, and nothing is added up"
    )
    held = lesson.held_bytes([piece]) if isinstance(piece, torch.Tensor) else "not a tensor"
    yours = {"piece": piece, "bytes behind the piece": held, "one scatter": one_scatter}
    expected = {"piece": full.chunk(n)[rank], "bytes behind the piece": 4 * 6 * 4}
    yours |= {"whole": back, "all_gather, no all_reduce or broadcast": gathered}
    expected |= {"one scatter": True, "whole": full, "all_gather, no all_reduce or broadcast": True}
    return yours, expected


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"04.1": (check_shard_rows, "shard_rows", "unshard_rows")}
# The checks run on 4 ranks, then on 3 (an odd world): an answer written for 4 only fails.
WORLD_SIZES = (4, 3)
