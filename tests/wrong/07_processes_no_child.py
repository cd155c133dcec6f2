"""An answer to lesson 07's exercise that gets the right numbers but skips what the exercise
teaches: each check must catch it and say why (tests/test_checks_catch.py)."""

import torch
import torch.distributed as dist


def start_role_world(role_ranks, value):
    # Skips the point: no child, no world of its own; the parents compute it in a group of
    # their role, inside the world they already are in.
    world = dist.get_world_size()
    halves = [list(range(world // 2)), list(range(world // 2, world))]
    groups = [dist.new_group(half) for half in halves]  # every rank makes both, in one order
    mine = groups[halves.index(list(role_ranks))]
    parents = [None] * len(role_ranks)
    dist.all_gather_object(parents, dist.get_rank(), group=mine)
    total = torch.tensor([value])
    dist.all_reduce(total, group=mine)
    return {"parents": parents, "sum": total.item()}
