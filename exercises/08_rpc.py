"""Checks for lesson 08's exercises (lessons/08_rpc.py). Run them: python -m lessons.check 08

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without RPC. It also watches how your function gets
there: the teacher it is handed stands in for the RRef, passes every call on, and notes how many
of the student's forwards had run when each request left, so that an answer which waits for each
answer before asking for the next (synchronous in disguise) fails, saying why.
"""

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from course.check import lesson_module

lesson = lesson_module("08")


class StandIn:
    """The teacher's RRef as your function sees it: each call goes on to the real one, and
    `asked` notes (how it asked, how many student forwards had run by then)."""

    def __init__(self, rref, forwards):
        self.rref, self.forwards, self.asked = rref, forwards, []

    def rpc_async(self, *args, **kwargs):
        self.asked.append(("rpc_async", self.forwards[0]))
        return self.rref.rpc_async(*args, **kwargs)

    def rpc_sync(self, *args, **kwargs):
        self.asked.append(("rpc_sync", self.forwards[0]))
        return self.rref.rpc_sync(*args, **kwargs)

    def __getattr__(self, name):  # owner(), to_here(), remote(), ...: the RRef's own
        return getattr(self.rref, name)


def ahead(asked, steps):
    """True if the request for batch i+1 left before the student's forward on batch i (after at
    most i forwards), by rpc_async; else what it did instead."""
    kinds, seen = [kind for kind, _ in asked], [forwards for _, forwards in asked]
    if kinds == ["rpc_async"] * steps and all(n <= max(i - 1, 0) for i, n in enumerate(seen)):
        return True
    return (
        f"no: it asked {len(kinds)} times ({', '.join(sorted(set(kinds))) or 'never'}) for "
        f"{steps} batches, after {seen} of the student's forwards; prefetching asks (rpc_async) "
        "for batch i+1 before the student's forward on batch i, after at most i forwards"
    )


def check_prefetching(ctx, train_prefetching):
    """Runs on every rank. Here every rank is a student and hosts the next rank's teacher, so
    every rank has losses to compare with the single-process reference."""
    devices = [None] * ctx.world_size
    dist.all_gather_object(devices, str(ctx.device))
    address = f"127.0.0.1:{lesson.rpc_port(0)}"
    lesson.start_rpc(f"worker{ctx.rank}", ctx.rank, ctx.world_size, address, "lo", 30)
    try:
        owner = (ctx.rank + 1) % ctx.world_size
        forwards = [0]  # the student's forwards so far, counted by a hook
        student, optimizer = lesson.new_student()
        student.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        batches = lesson.make_batches(ctx.rank)
        teacher = StandIn(
            rpc.remote(f"worker{owner}", lesson.Teacher, args=(devices[owner],)), forwards
        )
        yours = train_prefetching(student, optimizer, teacher, batches)
        expected = lesson.reference_losses(ctx.rank, ctx.device)
        if isinstance(yours, list) and all(isinstance(x, float) for x in yours):
            yours = torch.tensor(yours)  # compared with a tolerance
        said = ahead(teacher.asked, len(batches))
        return (
            {"losses": yours, "asks one batch ahead": said},
            {"losses": torch.tensor(expected), "asks one batch ahead": True},
        )
    finally:  # every rank gets here, stub or not: the graceful shutdown is a meeting of all
        rpc.shutdown(graceful=True, timeout=lesson.SHUTDOWN_TIMEOUT_S)


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"08.1": (check_prefetching, "train_prefetching")}
