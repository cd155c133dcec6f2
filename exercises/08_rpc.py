"""Checks for lesson 08's exercises (lessons/08_rpc.py). Run them: python -m lessons.check 08

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without RPC. It also watches how your function gets
there: the teacher it is handed stands in for the RRef, passes every call on, and notes how many
of the student's optimizer steps had run when each request left and when its answer was waited
for, so that an answer which waits for each answer before training on the batch before
(synchronous in disguise) fails, saying why.
"""

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from course.check import lesson_module

lesson = lesson_module("08")
WAITS = "waits after the step on the batch before"  # a key of yours/expected


class Watched(torch.futures.Future):
    """The Future a request returns, as your function sees it: a real Future (then(), done(),
    torch.futures.wait_all work) that takes the RPC's value or error, and notes in `waited`
    how many student steps had run when wait() or value() was first called on it."""

    def __init__(self, future, steps):
        super().__init__()
        self.steps, self.waited = steps, None
        future.add_done_callback(self._take)  # runs on an RPC thread when the answer arrives

    def _take(self, future):
        try:
            self.set_result(future.value())
        except Exception as err:  # the teacher's failure reaches your wait(), as without us
            self.set_exception(err)

    def _note(self):
        if self.waited is None:  # the first wait is when the student stopped for the answer
            self.waited = self.steps[0]

    def wait(self):
        self._note()
        return super().wait()

    def value(self):
        self._note()
        return super().value()


class Asking:
    """What teacher.rpc_async() or rpc_sync() gives your function: each method call is a request
    to the teacher, noted in the stand-in when it leaves; rpc_async's answer comes Watched."""

    def __init__(self, stand_in, kind, proxy):
        self.stand_in, self.kind, self.proxy = stand_in, kind, proxy

    def __getattr__(self, name):
        method = getattr(self.proxy, name)

        def call(*args, **kwargs):
            self.stand_in.asked.append((self.kind, self.stand_in.steps[0]))
            answer = method(*args, **kwargs)
            if self.kind == "rpc_async":
                answer = Watched(answer, self.stand_in.steps)
                self.stand_in.futures.append(answer)
            return answer

        return call


class StandIn:
    """The teacher's RRef as your function sees it: each call goes on to the real one, and
    `asked` notes (how it asked, how many student steps had run by then); `futures` holds
    rpc_async's answers in the order they were asked for."""

    def __init__(self, rref, steps):
        self.rref, self.steps, self.asked, self.futures = rref, steps, [], []

    def rpc_async(self, *args, **kwargs):
        return Asking(self, "rpc_async", self.rref.rpc_async(*args, **kwargs))

    def rpc_sync(self, *args, **kwargs):
        return Asking(self, "rpc_sync", self.rref.rpc_sync(*args, **kwargs))

    def __getattr__(self, name):  # owner(), to_here(), remote(), ...: the RRef's own
        return getattr(self.rref, name)


def ahead(asked, steps):
    """True if the request for batch i+1 left before the student's step on batch i (after at
    most i steps), by rpc_async; else what it did instead."""
    kinds, seen = [kind for kind, _ in asked], [done for _, done in asked]
    if kinds == ["rpc_async"] * steps and all(n <= max(i - 1, 0) for i, n in enumerate(seen)):
        return True
    return (
        f"no: it asked {len(kinds)} times ({', '.join(sorted(set(kinds))) or 'never'}) for "
        f"{steps} batches, after {seen} of the student's steps; prefetching asks (rpc_async) "
        "for batch i+1 before the student's step on batch i, after at most i steps"
    )


def waits_late(futures):
    """True if the answer for batch i+1 was first waited for after the student's step on batch
    i (after at least i+1 steps): the student trained while the teacher worked. Requests are
    matched to batches in the order they left; ahead() judges how many there were."""
    waited = [future.waited for future in futures[1:]]
    if all(n is not None and n >= i for i, n in enumerate(waited, start=1)):
        return True
    return (
        f"no: it first waited for the answers for batches 1-{len(futures) - 1} after {waited} "
        "of the student's steps (None: never by wait() or value()); waiting for batch i+1's "
        "logits before the step on batch i leaves the student idle while the teacher works "
        "(synchronous in disguise): wait after that step, after at least i+1 steps"
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
        steps = [0]  # the student's optimizer steps so far: no direct call of forward skips it
        student, optimizer = lesson.new_student()
        optimizer.register_step_pre_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
        batches = lesson.make_batches(ctx.rank)
        teacher = StandIn(
            rpc.remote(f"worker{owner}", lesson.Teacher, args=(devices[owner],)), steps
        )
        yours = train_prefetching(student, optimizer, teacher, batches)
        expected = lesson.reference_losses(ctx.rank, ctx.device)
        if isinstance(yours, list) and all(isinstance(x, float) for x in yours):
            yours = torch.tensor(yours)  # compared with a tolerance
        said = ahead(teacher.asked, len(batches))
        late = waits_late(teacher.futures)
        return (
            {"losses": yours, "asks one batch ahead": said, WAITS: late},
            {"losses": torch.tensor(expected), "asks one batch ahead": True, WAITS: True},
        )
    finally:  # every rank gets here, stub or not: the graceful shutdown is a meeting of all
        rpc.shutdown(graceful=True, timeout=lesson.SHUTDOWN_TIMEOUT_S)


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"08.1": (check_prefetching, "train_prefetching")}
# The checks run on 4 ranks, then on 2: an answer written for 4 ranks only fails.
WORLD_SIZES = (4, 2)
