"""Checks for lesson 05's exercises (lessons/05_hooks.py). Run them: python -m lessons.check 05

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without collectives. It also watches how your function
gets there (unittest.mock: dist.all_reduce works as before and notes when it was called), so
that an answer which skips what the exercise teaches fails, saying why.
"""

import inspect
import time
from unittest import mock

import torch
import torch.distributed as dist

from course.check import lesson_module

lesson = lesson_module("05")

# Buckets of up to 300 kB: a 256 x 256 fp32 weight is 262 kB, a bias 1 kB, so the 8 parameters,
# last layer first, fill 4 buckets of unequal sizes (the first takes two biases): the check holds
# each all_reduce's size, so the bucketing rule is tested, the order (last layer first) too.
BUCKET_BYTES = 300_000
STEPS = 2  # the second step shows whether finish() got the buckets ready for the next one


def buckets_of(model, bucket_bytes):
    """The buckets the rule in bucketed_ddp's docstring makes: [names] each, in launch order."""
    buckets, used = [], 0
    for name, p in reversed(list(model.named_parameters())):
        size = p.numel() * p.element_size()
        if not buckets or used + size > bucket_bytes:
            buckets, used = buckets + [[]], 0
        buckets[-1].append(name)
        used += size
    return buckets


def spans(events):
    """step -> (backward starts, backward returns), from the lesson's log."""
    out = {}
    for e in events:
        if len(e) == 4 and e[1:3] in (("backward", "starts"), ("backward", "returns")):
            out.setdefault(e[0], []).append(e[3])
    return out


def all_reduces_per_bucket(events, calls, want):
    """True if every step started one async all_reduce per bucket, of the bucket's size, in
    bucket order, all inside backward; else what it did instead. `calls`: (time, async_op,
    elements) of each dist.all_reduce your code made; `want`: each bucket's elements."""
    inside = [[c for c in calls if s[0] <= c[0] <= s[-1]] for s in spans(events).values()]
    after = len(calls) - sum(map(len, inside))
    sizes = [[n for _, a, n in step if a] for step in inside]
    if after == 0 and all(s == want and len(s) == len(step) for s, step in zip(sizes, inside)):
        return True
    counts = [len(step) for step in inside]
    return (
        f"no: dist.all_reduce calls inside backward, by step: {counts} ({sum(map(len, sizes))} "
        f"async, of {sizes[-1] if sizes else []} elements), and {after} outside it; the "
        f"exercise starts one async all_reduce per bucket, of {want} elements, in that order"
    )


def overlaps(events, calls, waits, hooked, buckets):
    """True if, every step, each bucket's all_reduce starts before the next bucket's first
    gradient arrives (it runs while backward goes on) and nothing is waited for before backward
    returns. `hooked`: name -> times its gradient arrived; `waits`: times of Work.wait() calls.
    With another number of all_reduces than buckets: True here (all_reduces_per_bucket says)."""
    for first, returned in spans(events).values():
        starts = [t for t, a, _ in calls if a and first <= t <= returned]
        if len(starts) != len(buckets):
            return True
        arrived = [min(t for n in names for t in hooked[n] if first <= t <= returned)
                   for names in buckets]  # fmt: skip
        late = [i for i in range(len(buckets) - 1) if starts[i] > arrived[i + 1]]
        early = sum(first <= t <= returned for t in waits)
        if late:
            return (f"no: bucket {late[0]}'s all_reduce started after bucket {late[0] + 1}'s "
                    "first gradient: start each bucket in the hook that completes it")  # fmt: skip
        if early:
            return (f"no: {early} wait() before backward returned: the all_reduce no longer "
                    "runs beside backward; wait in finish()")  # fmt: skip
    return True


def no_gradient(ctx, bucketed_ddp):
    """A model with a head that takes no part in the loss: finish() must raise, naming it."""
    torch.manual_seed(lesson.SEED)
    model = torch.nn.ModuleDict({"body": torch.nn.Linear(8, 8), "aux_head": torch.nn.Linear(8, 1)})
    unused = ["aux_head.weight", "aux_head.bias"]  # bucket 0 (of 300 bytes), with body.bias
    try:
        finish = bucketed_ddp(model.to(ctx.device), 300, lambda *what: None)
        model["body"](torch.ones(2, 8, device=ctx.device)).sum().backward()
    except NotImplementedError:
        raise
    except Exception as err:  # before finish(): the model's backward itself must go through
        return f"no: it raised {type(err).__name__}: {str(err)[:90]} before finish() was called"
    try:
        finish()
    except RuntimeError as err:  # it must say which parameters got no gradient
        if all(name in str(err) for name in unused):
            return True
        return f"no: finish() raised {str(err)[:100]!r}, without naming both of {unused}"
    except Exception as err:
        return f"no: finish() raised {type(err).__name__}, not RuntimeError: {str(err)[:80]}"
    return (
        f"no: finish() returned, though {unused} got no gradient on any rank: its bucket, and "
        "every later one, never launched, and the ranks go on with gradients never averaged"
    )


def check_bucketed_ddp(ctx, bucketed_ddp):
    """Two SGD steps through your buckets (the lesson's train()), next to one process's
    gradients; from the log: each parameter's hook calls, the buckets launched, and whether
    any launch came after backward had returned; from dist.all_reduce: how many there were, and
    when. Then a model with a parameter that gets no gradient: finish() must say so."""
    returned = []  # what bucketed_ddp returned: finish(), or something else
    hooked = {}  # name -> when its gradient arrived (a hook of the check's own, on the tensor)

    def make_ddp(net, log):
        for name, p in net.named_parameters():
            hooked[name] = []
            p.register_post_accumulate_grad_hook(
                lambda _, name=name: hooked[name].append(time.perf_counter())
            )
        returned.append(bucketed_ddp(net, BUCKET_BYTES, log))
        return returned[0] if callable(returned[0]) else lambda: None

    calls, waits, real = [], [], dist.all_reduce  # (time, async_op, elements) of each call

    class Watched:  # the Work an async all_reduce returns, noting when it is waited for
        def __init__(self, work):
            self.work = work

        def wait(self, *args, **kwargs):
            waits.append(time.perf_counter())
            return self.work.wait(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.work, name)

    def all_reduce(*args, **kwargs):
        arguments = inspect.signature(real).bind(*args, **kwargs).arguments
        is_async, tensor = bool(arguments.get("async_op")), arguments.get("tensor")
        calls.append((time.perf_counter(), is_async, getattr(tensor, "numel", lambda: 0)()))
        work = real(*args, **kwargs)
        return Watched(work) if is_async else work

    with mock.patch.object(dist, "all_reduce", all_reduce):
        model, events, grads = lesson.train(ctx, make_ddp, steps=STEPS)
    names = [name for name, _ in model.named_parameters()]
    steps = range(STEPS)
    hooks = [[sum(e[:3] == (s, "hook", n) for e in events) for n in names] for s in steps]
    launched = [[e[2] for e in events if e[:2] == (s, "launch")] for s in steps]  # in order
    returns = {e[0]: i for i, e in enumerate(events) if e[1:3] == ("backward", "returns")}
    late = sum(e[1:2] == ("launch",) and i > returns.get(e[0], -1) for i, e in enumerate(events))
    buckets = buckets_of(model, BUCKET_BYTES)
    sizes = [sum(dict(model.named_parameters())[n].numel() for n in names) for names in buckets]
    yours = {
        "hook calls per parameter": hooks,
        "buckets launched": launched,
        "launched after backward returned": late,
        "one async all_reduce per bucket": all_reduces_per_bucket(events, calls, sizes),
        "overlaps backward": overlaps(events, calls, waits, hooked, buckets),
        **{k: g for k, (g, _) in grads.items()},
        "finish() when a parameter got no gradient": no_gradient(ctx, bucketed_ddp),
    }
    expected = {
        "hook calls per parameter": [[1] * len(names)] * STEPS,
        "buckets launched": [list(range(len(buckets)))] * STEPS,
        "launched after backward returned": 0,
        "one async all_reduce per bucket": True,
        "overlaps backward": True,
        **{k: g for k, (_, g) in grads.items()},
        "finish() when a parameter got no gradient": True,
    }
    if not callable(returned[0]):
        yours["bucketed_ddp returned"] = f"{returned[0]!r}, not a function"[:100]
        expected["bucketed_ddp returned"] = "finish()"
    return yours, expected


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"05.1": (check_bucketed_ddp, "bucketed_ddp")}
# The checks run on 4 ranks, then on 3 (an odd world): an answer written for 4 only fails.
WORLD_SIZES = (4, 3)
