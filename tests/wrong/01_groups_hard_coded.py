"""A wrong answer to exercise 01.1 that skips its point: the groups are written out for 4 ranks
and TP size 2 (the check's own numbers), not computed from tp_size and the world size. Right at
tp_size 2 on 4 ranks; the check must see it fail at other TP sizes."""

import torch.distributed as dist


def tp_dp_groups(tp_size, timeout):
    rank = dist.get_rank()
    mine = []
    for layout in ([[0, 1], [2, 3]], [[0, 2], [1, 3]]):  # every group, on every rank, in order
        groups = [dist.new_group(ranks, timeout=timeout) for ranks in layout]
        mine.append(next(g for g, ranks in zip(groups, layout) if rank in ranks))
    return tuple(mine)
