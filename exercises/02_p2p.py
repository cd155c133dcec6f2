"""Checks for lesson 02's exercises (lessons/02_p2p.py). Run them: python -m lessons.check 02

Each check runs on every rank, calls the learner's functions and returns (yours, expected), the
expected value computed in one process, without collectives.
"""

import datetime

import torch
import torch.distributed as dist

from course.check import lesson_module
from course.header import HEADER

lesson = lesson_module("02")  # lessons/02_p2p.py, for sample(): the tensors rank r sends


def check_send_recv(ctx, send_tensor, recv_tensor):
    """Runs on every rank: the even rank of each pair sends each case, the odd one receives it."""
    partner = ctx.rank ^ 1 if ctx.rank ^ 1 < ctx.world_size else None  # pairs 0-1, 2-3, ...
    sample = lesson.sample
    cases = {
        "0-d float64": sample(1, (), torch.float64),
        "1-D int64": sample(1, (5,), torch.int64),
        "empty 0x3": sample(1, (0, 3)),
        "2-D bfloat16": sample(1, (2, 3), torch.bfloat16),
        "4-D bool": sample(0, (1, 2, 3, 4), torch.bool),
        "8-D uint8": sample(0, (2, 1) * 4, torch.uint8),
        "transposed int32": sample(1, (2, 3), torch.int32).t(),  # not contiguous
        # Bad: send_tensor must refuse these two, and both sides raise ValueError.
        "complex64": torch.zeros(2, dtype=torch.complex64),
        "9-D": torch.zeros((1,) * 9),
        # Bad: the check sends a payload where a header belongs; recv_tensor must refuse it.
        "not a header": None,
    }
    bad = ("complex64", "9-D", "not a header")
    # Every rank first makes every group, in one order: a pair group per case, so that a case
    # that goes wrong leaves nothing behind for the next (and its 10 s timeout ends a wait for a
    # payload never sent), and a pair group to wait for each other in between.
    pairs = [[r, r + 1] for r in range(0, ctx.world_size - 1, 2)]
    case_timeout = datetime.timedelta(seconds=10)
    groups = {
        name: [dist.new_group(pair, timeout=case_timeout) for pair in pairs] for name in cases
    }
    in_step = [dist.new_group(pair, timeout=datetime.timedelta(seconds=30)) for pair in pairs]
    if partner is None:  # an odd one out: nothing to send or receive
        return {}, {}
    sending, yours, expected = ctx.rank % 2 == 0, {}, {}
    for name, tensor in cases.items():
        group = groups[name][ctx.rank // 2]
        try:
            if not sending:
                result = recv_tensor(partner, ctx.device, group)
            elif tensor is None:
                result = dist.send(torch.arange(len(HEADER), device=ctx.device), partner, group)
            else:
                result = send_tensor(tensor.to(ctx.device), partner, group)
        except NotImplementedError:
            raise
        except Exception as err:  # any other failure is the learner's to see, side by side
            result = err
        failed = isinstance(result, Exception)
        why = str(result).split("] ", 1)[-1] if str(result).startswith("[/") else str(result)
        said = f"raised {type(result).__name__}: {why}"[:200] if failed else "returned"
        role = "send_tensor" if sending else "recv_tensor"
        if name in bad and not (sending and tensor is None):  # (the check's own send: skip)
            key = f"{name}: {role} raised ValueError"
            yours[key], expected[key] = isinstance(result, ValueError) or said, True
        elif name not in bad:
            key = f"{name}: {role}"
            yours[key] = said if failed else True if sending else result
            expected[key] = True if sending else tensor
        dist.barrier(group=in_step[ctx.rank // 2])  # a stuck receiver ends its case first
    return yours, expected


def check_ring_all_reduce(ctx, ring_all_reduce):
    """Runs on every rank: yours against the single-process sum, and against dist.all_reduce."""
    # 10 numbers per rank: on 4 ranks the chunks have unequal sizes (3, 3, 2, 2)
    inputs = [lesson.sample(r, (2, 5), device=ctx.device) for r in range(ctx.world_size)]
    x = inputs[ctx.rank].clone()
    yours = ring_all_reduce(x)
    theirs = inputs[ctx.rank].clone()
    dist.all_reduce(theirs)
    reference = torch.stack(inputs).sum(dim=0)  # whole numbers: exact in any order of addition
    same = torch.equal(yours, theirs)
    return (
        {"result": yours, "x afterwards": x, "same as dist.all_reduce": same},
        {"result": reference, "x afterwards": inputs[ctx.rank], "same as dist.all_reduce": True},
    )


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {
    "02.1": (check_send_recv, "send_tensor", "recv_tensor"),
    "02.2": (check_ring_all_reduce, "ring_all_reduce"),
}
