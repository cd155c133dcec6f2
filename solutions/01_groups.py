"""Reference solutions for lessons/01_groups.py. Check them: python -m lessons.check 01 --solution

Each function runs in the lesson's namespace: torch, dist and the lesson's helpers (groups_for)
are in scope.
"""

import datetime

import torch.distributed as dist


# --8<-- [start:ex-01-1]
def tp_dp_groups(tp_size: int, timeout: datetime.timedelta):
    """Exercise 01.1: split the world into tensor-parallel (TP) and data-parallel (DP) groups.

    TP groups are blocks of `tp_size` consecutive ranks ([0, 1], [2, 3], ... for tp_size 2);
    a DP group holds the ranks at the same position in every block ([0, 2], [1, 3], ...).
    Create all of them on every rank (pass `timeout` to new_group) and return
    (tp_group, dp_group): the two groups this rank is in.
    """
    # YOUR CODE BELOW
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size % tp_size:  # every rank raises alike, before any collective
        raise ValueError(
            f"tp_size {tp_size} does not divide the world size {world_size}: "
            "pick a tp_size that does"
        )
    tp_layout = [list(range(start, start + tp_size)) for start in range(0, world_size, tp_size)]
    dp_layout = [list(range(position, world_size, tp_size)) for position in range(tp_size)]
    # Create all, keep yours: every rank makes all TP groups, then all DP groups, in this order.
    return groups_for(tp_layout, rank, timeout), groups_for(dp_layout, rank, timeout)
    # --8<-- [end:ex-01-1]
