"""Plausible wrong answers to lesson 07's exercises: each check must catch them."""

import torch.distributed as dist


def start_role_world(role_ranks, value):
    # Wrong: one world for every rank's child, not one per role. It runs, but students' children
    # meet teachers' children: each child sees every parent and sums every value.
    port = [free_port() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(port, src=0)
    (report,) = start_children("spawn", port[0], dist.get_world_size(), {dist.get_rank(): value})
    return {"parents": report["parents"], "sum": report["sum"]}
