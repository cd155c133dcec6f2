"""Reference solutions for lessons/03_collectives.py.
Check them: python -m lessons.check 03 --solution

Each function runs in the lesson's namespace: torch, dist and the lesson's helpers are in scope.
"""

import torch
import torch.distributed as dist


# --8<-- [start:ex-03-1]
def sharded_softmax(shard: torch.Tensor) -> torch.Tensor:
    """Exercise 03.1: softmax of a vector split across the ranks. `shard` is this rank's piece
    (the pieces in rank order make the vector); return this rank's piece of softmax(vector).

    Entries are around 100, and exp(100) overflows float32. Subtract the largest entry of the
    whole vector first, as torch.softmax does.
    """
    # YOUR CODE BELOW
    largest = shard.max().reshape(1)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)  # the same shift on every rank, or the
    exps = (shard - largest).exp()  # pieces of the sum below would not add up
    total = exps.sum().reshape(1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return exps / total
    # --8<-- [end:ex-03-1]


# --8<-- [start:ex-03-2]
def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """Exercise 03.2: `logits` is [batch, this rank's slice of the vocabulary] (the slices in
    rank order make the vocabulary). Return [batch], the same on every rank: for each row,
    log(sum of exp(logit) over the whole vocabulary), the denominator of a cross-entropy
    whose output layer is split across ranks (Megatron's vocab-parallel cross-entropy).

    Logits are around 100: stay finite the way 03.1 does.
    """
    # YOUR CODE BELOW
    largest = logits.max(dim=1).values  # [batch]: one shift per row
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    sums = (logits - largest[:, None]).exp().sum(dim=1)  # every term <= 1: no overflow
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return largest + sums.log()
    # --8<-- [end:ex-03-2]
