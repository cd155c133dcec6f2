"""Checks for lesson 05's exercises (lessons/05_hooks.py). Run them: python -m lessons.check 05

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without collectives.
"""

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


def check_bucketed_ddp(ctx, bucketed_ddp):
    """Two SGD steps through your buckets (the lesson's train()), next to one process's
    gradients; from the log: each parameter's hook calls, the buckets launched, and whether
    any launch came after backward had returned."""
    model, events, grads = lesson.train(
        ctx, lambda net, log: bucketed_ddp(net, BUCKET_BYTES, log), steps=STEPS
    )
    names = [name for name, _ in model.named_parameters()]
    steps = range(STEPS)
    hooks = [[sum(e[:3] == (s, "hook", n) for e in events) for n in names] for s in steps]
    launched = [sorted(e[2] for e in events if e[:2] == (s, "launch")) for s in steps]
    returned = {e[0]: i for i, e in enumerate(events) if e[1:3] == ("backward", "returns")}
    late = sum(e[1] == "launch" and i > returned[e[0]] for i, e in enumerate(events))
    yours = {
        "hook calls per parameter": hooks,
        "buckets launched": launched,
        "launched after backward returned": late,
        **{k: g for k, (g, _) in grads.items()},
    }
    expected = {
        "hook calls per parameter": [[1] * len(names)] * STEPS,
        "buckets launched": [list(range(buckets_of(model, BUCKET_BYTES)))] * STEPS,
        "launched after backward returned": 0,
        **{k: g for k, (_, g) in grads.items()},
    }
    return yours, expected


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"05.1": (check_bucketed_ddp, "bucketed_ddp")}
