"""Reference solutions for lessons/07_processes.py. Check: python -m lessons.check 07 --solution

Each function runs in the lesson's namespace: torch, dist and the lesson's helpers are in scope.
"""

import torch.distributed as dist


# --8<-- [start:ex-07-1]
def start_role_world(role_ranks, value):
    """Exercise 07.1: every rank calls this at once. With start_children(), start one child in
    a world of one child per rank of `role_ranks` (this rank's role, this rank among them), on a
    free port of that role's own; it adds `value` there. Return {"parents": the parent ranks the
    child saw, "sum": its all_reduce result}."""
    # YOUR CODE BELOW
    ports = [None] * dist.get_world_size()  # every rank offers one; a role takes its first rank's
    dist.all_gather_object(ports, free_port())
    port = ports[role_ranks[0]]  # same port within a role, a different one for the other role
    index = role_ranks.index(dist.get_rank())  # this rank's child's rank in the new world
    (report,) = start_children("spawn", port, len(role_ranks), {index: value})
    return {"parents": report["parents"], "sum": report["sum"]}
    # --8<-- [end:ex-07-1]
