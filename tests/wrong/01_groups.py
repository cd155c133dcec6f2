"""Plausible wrong answers to lesson 01's exercises: each check must catch them."""

import torch.distributed as dist


def tp_dp_groups(tp_size, timeout):
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # Wrong: the two axes swapped. TP taken as every tp_size-th rank, DP as consecutive blocks.
    tp_layout = [list(range(position, world_size, tp_size)) for position in range(tp_size)]
    dp_layout = [list(range(start, start + tp_size)) for start in range(0, world_size, tp_size)]
    return groups_for(tp_layout, rank, timeout), groups_for(dp_layout, rank, timeout)
