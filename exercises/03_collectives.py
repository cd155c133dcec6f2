"""Checks for lesson 03's exercises (lessons/03_collectives.py): python -m lessons.check 03

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without collectives.
"""

import torch

from course.check import lesson_module

lesson = lesson_module("03")  # lessons/03_collectives.py, for SEED and VECTOR_LEN


def check_sharded_softmax(ctx, sharded_softmax):
    """Runs on every rank: your piece of the softmax against torch.softmax of the whole vector."""
    g = torch.Generator().manual_seed(lesson.SEED + 1)
    full = torch.randn(lesson.VECTOR_LEN, generator=g) * 3 + 100  # exp() of these overflows
    shard = full.tensor_split(ctx.world_size)[ctx.rank]
    yours = sharded_softmax(shard.to(ctx.device))
    expected = torch.softmax(full.double(), 0).float().tensor_split(ctx.world_size)[ctx.rank]
    return yours, expected


def check_vocab_parallel_logsumexp(ctx, vocab_parallel_logsumexp):
    """Runs on every rank: your [batch] result against torch.logsumexp over the whole vocabulary."""
    g = torch.Generator().manual_seed(lesson.SEED + 2)
    full = torch.randn(3, 40, generator=g) * 3 + 100  # 3 rows, a vocabulary of 40
    mine = full.tensor_split(ctx.world_size, dim=1)[ctx.rank]
    yours = vocab_parallel_logsumexp(mine.to(ctx.device))
    return yours, torch.logsumexp(full.double(), dim=1).float()


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {
    "03.1": (check_sharded_softmax, "sharded_softmax"),
    "03.2": (check_vocab_parallel_logsumexp, "vocab_parallel_logsumexp"),
}
