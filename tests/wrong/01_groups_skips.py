"""Answers to lesson 01's exercises that get the right groups but skip what the exercise
teaches: each check must catch them and say why (tests/test_checks_catch.py)."""

import torch.distributed as dist


def tp_dp_groups(tp_size, timeout):
    # Skips the point: "create all, keep yours" is the exercise. Here each rank makes only its own
    # two groups (local synchronization lets it), so no two ranks count their groups alike.
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tp = [r for r in range(world_size) if r // tp_size == rank // tp_size]
    dp = [r for r in range(world_size) if r % tp_size == rank % tp_size]
    return tuple(
        dist.new_group(ranks, timeout=timeout, use_local_synchronization=True) for ranks in (tp, dp)
    )
