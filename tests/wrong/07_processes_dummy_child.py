"""An answer to lesson 07's exercise that gets the right numbers but skips what the exercise
teaches: it starts one child per rank, as asked, but the child does nothing, in no world; the
parents do the work in a group of their role. The check must catch it and say why
(tests/test_checks_catch.py)."""

import time

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp


def start_role_world(role_ranks, value):
    # Skips the point: a throwaway child (time.sleep(0), its index the only argument), started
    # only to be counted; the parents gather and sum in a group of their role instead.
    torch_mp.start_processes(time.sleep, (), 1, start_method="fork")
    world = dist.get_world_size()
    halves = [list(range(world // 2)), list(range(world // 2, world))]
    groups = [dist.new_group(half) for half in halves]  # every rank makes both, in one order
    mine = groups[halves.index(list(role_ranks))]
    parents = [None] * len(role_ranks)
    dist.all_gather_object(parents, dist.get_rank(), group=mine)
    total = torch.tensor([value])
    dist.all_reduce(total, group=mine)
    return {"parents": parents, "sum": total.item()}
