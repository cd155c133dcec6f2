"""Answers to lesson 00's exercises that get the right numbers but skip what the exercise
teaches: each check must catch them and say why (tests/test_checks_catch.py)."""

import torch
import torch.distributed as dist


def mean_over_ranks(x):
    # Skips the point: one all_reduce is the exercise; this gathers every rank's whole x instead.
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, x)
    return torch.stack(pieces).mean(dim=0)
