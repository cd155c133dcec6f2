"""Checks for lesson 03's exercises (lessons/03_collectives.py): python -m lessons.check 03

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without collectives. It also watches how your function
gets there (unittest.mock: dist.all_reduce works as before and keeps a list of its calls), so
that an answer which skips what the exercise teaches fails, saying why.
"""

import contextlib
from unittest import mock

import torch
import torch.distributed as dist

from course.check import lesson_module

lesson = lesson_module("03")  # lessons/03_collectives.py, for SEED and VECTOR_LEN
# What else could move numbers between ranks: none of it may be called here.
OTHERS = [
    name
    for name in (
        *("all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object"),
        *("broadcast", "gather", "scatter", "reduce", "reduce_scatter", "reduce_scatter_tensor"),
        *("all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv"),
        "batch_isend_irecv",
    )
    if hasattr(dist, name)
]


def sharded(function, shard, rows):
    """Your function on this rank's shard, and whether it shared only what the exercise asks
    for: two all_reduces, a MAX then a SUM, of one number per row, and nothing else (never the
    numbers themselves). Returns (its result, True or what it did instead)."""
    with contextlib.ExitStack() as stack:
        patch = lambda name: stack.enter_context(  # noqa: E731
            mock.patch.object(dist, name, wraps=getattr(dist, name))
        )
        all_reduce, others = patch("all_reduce"), {name: patch(name) for name in OTHERS}
        result = function(shard)
    calls = all_reduce.call_args_list
    sizes = [
        getattr(call.args[0] if call.args else call.kwargs.get("tensor"), "numel", int)()
        for call in calls
    ]
    ops = [call.kwargs.get("op", call.args[1] if len(call.args) > 1 else "SUM") for call in calls]
    ops = [str(op).split(".")[-1] for op in ops]  # RedOpType.MAX -> MAX
    used = [name for name, m in others.items() if m.call_count]
    if len(sizes) == 2 and max(sizes) <= rows and ops == ["MAX", "SUM"] and not used:
        return result, True
    each = "1 number each" if rows == 1 else f"{rows} numbers each, one per row"
    return result, (
        f"no: it called dist.all_reduce {len(sizes)} times"
        + (f", on {sizes} numbers, ops {ops}" if sizes else "")
        + (f", and dist.{', dist.'.join(used)}" if used else "")
        + f"; the exercise shares only a max and a sum (two all_reduces, MAX then SUM, of "
        f"{each}), never the shards themselves"
    )


def check_sharded_softmax(ctx, sharded_softmax):
    """Runs on every rank: your piece of the softmax against torch.softmax of the whole vector."""
    g = torch.Generator().manual_seed(lesson.SEED + 1)
    full = torch.randn(lesson.VECTOR_LEN, generator=g) * 3 + 100  # exp() of these overflows
    full[::5] -= 200  # a wide range too: shifted by the min (or the mean), exp() overflows
    shard = full.tensor_split(ctx.world_size)[ctx.rank]
    yours, shared = sharded(sharded_softmax, shard.to(ctx.device), rows=1)
    expected = torch.softmax(full.double(), 0).float().tensor_split(ctx.world_size)[ctx.rank]
    return (
        {"result": yours, "shared only a max and a sum": shared},
        {"result": expected, "shared only a max and a sum": True},
    )


def check_vocab_parallel_logsumexp(ctx, vocab_parallel_logsumexp):
    """Runs on every rank: your [batch] result against torch.logsumexp over the whole vocabulary."""
    g = torch.Generator().manual_seed(lesson.SEED + 2)
    full = torch.randn(3, 40, generator=g) * 3 + 100  # 3 rows, a vocabulary of 40
    full += torch.tensor([[100.0], [0.0], [-100.0]])  # far apart: one shift for all rows fails
    mine = full.tensor_split(ctx.world_size, dim=1)[ctx.rank]
    yours, shared = sharded(vocab_parallel_logsumexp, mine.to(ctx.device), rows=3)
    return (
        {"result": yours, "shared only a max and a sum per row": shared},
        {
            "result": torch.logsumexp(full.double(), dim=1).float(),
            "shared only a max and a sum per row": True,
        },
    )


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {
    "03.1": (check_sharded_softmax, "sharded_softmax"),
    "03.2": (check_vocab_parallel_logsumexp, "vocab_parallel_logsumexp"),
}
# The checks run on 4 ranks, then on 3 (an odd world): an answer written for 4 only fails.
WORLD_SIZES = (4, 3)
