"""Checks for lesson 08's exercises (lessons/08_rpc.py). Run them: python -m lessons.check 08

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without RPC.
"""

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from course.check import lesson_module

lesson = lesson_module("08")


def check_prefetching(ctx, train_prefetching):
    """Runs on every rank. Here every rank is a student and hosts the next rank's teacher, so
    every rank has losses to compare with the single-process reference."""
    devices = [None] * ctx.world_size
    dist.all_gather_object(devices, str(ctx.device))
    address = f"127.0.0.1:{lesson.rpc_port(0)}"
    lesson.start_rpc(f"worker{ctx.rank}", ctx.rank, ctx.world_size, address, "lo", 30)
    try:
        owner = (ctx.rank + 1) % ctx.world_size
        teacher = rpc.remote(f"worker{owner}", lesson.Teacher, args=(devices[owner],))
        yours = train_prefetching(*lesson.new_student(), teacher, lesson.make_batches(ctx.rank))
        expected = lesson.reference_losses(ctx.rank, ctx.device)  # compared with a float
        return {"losses": torch.tensor(yours)}, {"losses": torch.tensor(expected)}  # tolerance
    finally:  # every rank gets here, stub or not: the graceful shutdown is a meeting of all
        rpc.shutdown(graceful=True, timeout=lesson.SHUTDOWN_TIMEOUT_S)


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"08.1": (check_prefetching, "train_prefetching")}
