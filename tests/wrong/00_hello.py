"""Plausible wrong answers to lesson 00's exercises: each check must catch them."""

import torch.distributed as dist


def mean_over_ranks(x):
    dist.all_reduce(x)  # wrong twice: changes the caller's x, and returns the sum
    return x
