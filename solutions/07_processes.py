"""Reference solutions for lessons/07_processes.py. Check them: python -m lessons.check 07 --solution

Each function runs in the lesson's namespace: torch, dist and the lesson's helpers are in scope.
"""
import torch.distributed as dist



# --8<-- [start:ex-07-1]
def start_role_world(role_ranks, value):
    """Exercise 07.1: one world per role, started from inside each rank.

    `role_ranks` lists the ranks that share this rank's role (students or teachers), this rank
    among them. With start_children(), start one child that joins a world of exactly one child
    per rank in `role_ranks`, on a free port of that role's own, and adds `value` there. Return
    {"parents": the parent ranks the child saw, "sum": its all_reduce result}. Every rank of the
    default group calls this at the same time.
    """
    # YOUR CODE BELOW
    ports = [None] * dist.get_world_size()
    dist.all_gather_object(ports, free_port())  # every rank offers one; a role takes its first rank's
    port = ports[role_ranks[0]]  # same port within a role, a different one for the other role
    index = role_ranks.index(dist.get_rank())  # this rank's child's rank in the new world
    report, = start_children("spawn", port, len(role_ranks), {index: value})
    return {"parents": report["parents"], "sum": report["sum"]}
# --8<-- [end:ex-07-1]
