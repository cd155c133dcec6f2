"""Plausible wrong answers to lesson 03's exercises: each check must catch them."""

import torch.distributed as dist


def sharded_softmax(shard):
    exps = (shard - shard.max()).exp()  # wrong: each rank shifts by its own max, so the
    total = exps.sum().reshape(1)  # pieces of the sum are on different scales
    dist.all_reduce(total)
    return exps / total


def vocab_parallel_logsumexp(logits):
    sums = logits.exp().sum(dim=1)  # wrong: no shift, exp(100) is inf in float32
    dist.all_reduce(sums)
    return sums.log()
