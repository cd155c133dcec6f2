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
# last layer first, fill 4 buckets, one weight in each: the bucketing rule is tested.
BUCKET_BYTES = 300_000
STEPS = 2  # the second step shows whether finish() got the buckets ready for the next one


def buckets_of(model, bucket_bytes):
    """How many buckets the rule in bucketed_ddp's docstring makes."""
    buckets, used = 0, None
    for p in reversed(list(model.parameters())):
        size = p.numel() * p.element_size()
        if used is None or used + size > bucket_bytes:
            buckets, used = buckets + 1, size
        else:
            used += size
    return buckets


def all_reduces_per_bucket(events, calls, buckets):
    """True if every step started one async all_reduce per bucket, all inside backward; else
    what it did instead. `calls`: (time, async_op) of each dist.all_reduce your code made."""
    span = {}  # step -> [backward starts, backward returns]
    for e in events:
        if len(e) == 4 and e[1:3] in (("backward", "starts"), ("backward", "returns")):
            span.setdefault(e[0], []).append(e[3])
    inside = [[a for t, a in calls if s[0] <= t <= s[-1]] for s in span.values()]
    after = len(calls) - sum(map(len, inside))
    if after == 0 and all(len(step) == buckets and all(step) for step in inside):
        return True
    counts = [len(step) for step in inside]
    return (
        f"no: dist.all_reduce calls inside backward, by step: {counts} ({sum(map(sum, inside))} "
        f"async), and {after} outside it; the exercise starts one async all_reduce per bucket "
        f"({buckets} a step), in the hook that completes the bucket, while backward goes on"
    )


def no_gradient(ctx, bucketed_ddp):
    """A model with a head that takes no part in the loss: finish() must raise, naming it."""
    torch.manual_seed(lesson.SEED)
    model = torch.nn.ModuleDict({"body": torch.nn.Linear(8, 8), "aux_head": torch.nn.Linear(8, 1)})
    unused = ["aux_head.weight", "aux_head.bias"]  # bucket 0 (of 300 bytes), with body.bias
    try:
        finish = bucketed_ddp(model.to(ctx.device), 300, lambda *what: None)
        model["body"](torch.ones(2, 8, device=ctx.device)).sum().backward()
        finish()
    except NotImplementedError:
        raise
    except Exception as err:  # yours raised: it must say which parameters got no gradient
        if all(name in str(err) for name in unused):
            return True
        said = f"{type(err).__name__}: {err}"[:120]
        return f"no: it raised {said}, without naming both of {unused}"
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

    def make_ddp(net, log):
        returned.append(bucketed_ddp(net, BUCKET_BYTES, log))
        return returned[0] if callable(returned[0]) else lambda: None

    calls, real = [], dist.all_reduce  # (time, async_op) of each all_reduce your code makes

    def all_reduce(*args, **kwargs):
        arguments = inspect.signature(real).bind(*args, **kwargs).arguments
        calls.append((time.perf_counter(), bool(arguments.get("async_op"))))
        return real(*args, **kwargs)

    with mock.patch.object(dist, "all_reduce", all_reduce):
        model, events, grads = lesson.train(ctx, make_ddp, steps=STEPS)
    names = [name for name, _ in model.named_parameters()]
    steps = range(STEPS)
    hooks = [[sum(e[:3] == (s, "hook", n) for e in events) for n in names] for s in steps]
    launched = [[e[2] for e in events if e[:2] == (s, "launch")] for s in steps]  # in order
    returns = {e[0]: i for i, e in enumerate(events) if e[1:3] == ("backward", "returns")}
    late = sum(e[1:2] == ("launch",) and i > returns.get(e[0], -1) for i, e in enumerate(events))
    buckets = buckets_of(model, BUCKET_BYTES)
    yours = {
        "hook calls per parameter": hooks,
        "buckets launched": launched,
        "launched after backward returned": late,
        "one async all_reduce per bucket": all_reduces_per_bucket(events, calls, buckets),
        **{k: g for k, (g, _) in grads.items()},
        "finish() when a parameter got no gradient": no_gradient(ctx, bucketed_ddp),
    }
    expected = {
        "hook calls per parameter": [[1] * len(names)] * STEPS,
        "buckets launched": [list(range(buckets))] * STEPS,
        "launched after backward returned": 0,
        "one async all_reduce per bucket": True,
        **{k: g for k, (_, g) in grads.items()},
        "finish() when a parameter got no gradient": True,
    }
    if not callable(returned[0]):
        yours["bucketed_ddp returned"] = f"{returned[0]!r}, not a function"[:100]
        expected["bucketed_ddp returned"] = "finish()"
    return yours, expected


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"05.1": (check_bucketed_ddp, "bucketed_ddp")}
