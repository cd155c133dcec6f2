"""Checks for lesson 02's exercises (lessons/02_p2p.py). Run them: python -m lessons.check 02

Each check runs on every rank, calls the learner's functions and returns (yours, expected), the
expected value computed in one process, without collectives. It also watches how your functions
get there (watched(): every message they send or receive, and any collective they call), so
that an answer which skips what the exercise teaches fails, saying why.
"""

import contextlib
import datetime
import inspect
from unittest import mock

import torch
import torch.distributed as dist

from course.check import lesson_module
from course.header import DTYPES, HEADER, MAX_NDIM, REFUSED, TENSOR

lesson = lesson_module("02")  # lessons/02_p2p.py, for sample(): the tensors rank r sends
P2P = {"send": "send", "isend": "send", "recv": "recv", "irecv": "recv"}  # function: direction
OTHERS = [  # the functions that are not one message to one peer: collectives, pickled objects
    name
    for name in (
        *("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "gather"),
        *("reduce_scatter", "reduce_scatter_tensor", "scatter", "all_to_all", "all_to_all_single"),
        *("send_object_list", "recv_object_list", "broadcast_object_list", "all_gather_object"),
        *("all_gather_single", "reduce_scatter_single", "gather_object", "scatter_object_list"),
        *("all_reduce_coalesced", "all_gather_coalesced"),
    )
    if hasattr(dist, name)  # the newer names only where this torch has them
]


@contextlib.contextmanager
def watched():
    """For a `with` block: what your code sends and receives, [("send" or "recv", peer, a copy
    of the tensor)], and the names of the OTHERS it calls. Each works as before: it is only
    watched. (P2POp accepts only the real isend and irecv: it is handed those.)"""
    messages, others = [], []
    real = {name: getattr(dist, name) for name in (*P2P, *OTHERS, "batch_isend_irecv", "P2POp")}

    def note(kind, peer, tensor):  # a send's numbers are kept; of a recv, its shape will do
        messages.append((kind, peer, tensor.detach().clone() if kind == "send" else tensor))

    def p2p(name):
        def call(*args, **kwargs):
            done = real[name](*args, **kwargs)  # first: torch says what is wrong with the call
            arguments = inspect.signature(real[name]).bind(*args, **kwargs).arguments
            peers = [arguments.get(k) for k in ("dst", "src", "group_dst", "group_src")]
            note(P2P[name], next((p for p in peers if p is not None), None), arguments["tensor"])
            return done

        return call

    def other(name):
        def call(*args, **kwargs):
            others.append(name)
            return real[name](*args, **kwargs)

        return call

    def batch_isend_irecv(p2p_op_list):
        works = real["batch_isend_irecv"](p2p_op_list)
        for op in p2p_op_list:
            note("send" if op.op is real["isend"] else "recv", op.peer, op.tensor)
        return works

    spies = {name: p2p(name) for name in P2P} | {name: other(name) for name in OTHERS}
    unwrap = {spies["isend"]: real["isend"], spies["irecv"]: real["irecv"]}
    p2p_op = lambda op, *args, **kwargs: real["P2POp"](unwrap.get(op, op), *args, **kwargs)
    with mock.patch.multiple(dist, **spies, batch_isend_irecv=batch_isend_irecv, P2POp=p2p_op):
        yield messages, others


def listed(messages):
    """[("send", 1, tensor), ...] -> '[send int64[11], ...]': what went, without the numbers"""
    return "[" + ", ".join(f"{k} {str(t.dtype)[6:]}[{t.numel()}]" for k, _, t in messages) + "]"


def protocol(sending, tensor, messages, others):
    """True if one side of one case sent or received what lesson 02's protocol says (a HEADER,
    then the payload; a REFUSED or wrong header alone), else what it did instead, in words.
    `tensor`: the case's tensor, None for the check's payload where a header belongs."""
    kind = "send" if sending else "recv"
    good = tensor is not None and tensor.dtype in DTYPES and tensor.dim() <= MAX_NDIM
    if good:
        want = [TENSOR, DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
        want += [0] * (len(HEADER) - len(want))  # unused sizes are 0
        header = f"the header {want}" if sending else f"a header ({len(HEADER)} int64s)"
        protocol = f"{header}, then the payload ({tensor.numel()} {str(tensor.dtype)[6:]})"
    else:
        header = f"a REFUSED header [{REFUSED}, ...]" if sending else "a header"
        protocol = f"{header}, and nothing after it"
    head, rest = (messages[0], messages[1:]) if messages else ((None, None, None), [])
    if others:
        return f"no: it called dist.{others[0]}; the protocol is {protocol}"
    is_header = head[0] == kind and head[2].dtype == torch.int64 and head[2].numel() == len(HEADER)
    if not is_header:
        return f"no: its messages were {listed(messages)}; the protocol is {protocol}"
    values = head[2].tolist()
    if sending and (values != want if good else values[0] != REFUSED):
        return f"no: its header was {values}; the protocol is {protocol}"
    if good:  # the payload in one message, or in several: all of it, nothing else
        same = all(k == kind and t.dtype == tensor.dtype for k, _, t in rest)
        wrong = not same or sum(t.numel() for *_, t in rest) != tensor.numel()
    else:
        wrong = bool(rest)
    return (
        f"no: its messages were {listed(messages)}; the protocol is {protocol}" if wrong else True
    )


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
        # Bad: the check sends these where a header belongs; recv_tensor must refuse each.
        "not a header": None,
        "a header with dtype code 99": None,
        "a header with 9 dims": None,
        "a header with a size of -1": None,
    }
    forged = {  # what the check sends for those, one int64 message of HEADER's length
        "not a header": list(range(len(HEADER))),
        "a header with dtype code 99": [TENSOR, 99, 1, 2],
        "a header with 9 dims": [TENSOR, 0, MAX_NDIM + 1, *[1] * MAX_NDIM],
        "a header with a size of -1": [TENSOR, 0, 2, 3, -1],
    }
    bad = ("complex64", "9-D", *forged)
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
    role = "send_tensor" if sending else "recv_tensor"
    yours[f"{role} follows the protocol"] = expected[f"{role} follows the protocol"] = True
    for name, tensor in cases.items():
        group = groups[name][ctx.rank // 2]
        try:
            with watched() as (messages, others):  # what your function sends or receives
                if not sending:
                    result = recv_tensor(partner, ctx.device, group)
                elif tensor is None:
                    payload = torch.zeros(len(HEADER), dtype=torch.int64, device=ctx.device)
                    payload[: len(forged[name])] = torch.tensor(forged[name])
                    result = dist.send(payload, partner, group)
                else:
                    result = send_tensor(tensor.to(ctx.device), partner, group)
        except NotImplementedError:
            raise
        except Exception as err:  # any other failure is the learner's to see, side by side
            result = err
        failed = isinstance(result, Exception)
        why = str(result).split("] ", 1)[-1] if str(result).startswith("[/") else str(result)
        said = f"raised {type(result).__name__}: {why}"[:200] if failed else "returned"
        if not (sending and tensor is None):  # (the check's own send: not yours)
            went = protocol(sending, tensor, messages, others)
            if went is not True and yours[f"{role} follows the protocol"] is True:
                yours[f"{role} follows the protocol"] = f"no, case {name}: {went[4:]}"
        if name in bad and not (sending and tensor is None):
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
    with watched() as (messages, others):  # what your function sends, receives and calls
        yours = ring_all_reduce(x)
    theirs = inputs[ctx.rank].clone()
    dist.all_reduce(theirs)
    reference = torch.stack(inputs).sum(dim=0)  # whole numbers: exact in any order of addition
    same = isinstance(yours, torch.Tensor) and yours.shape == theirs.shape
    same = same and yours.dtype == theirs.dtype and torch.equal(yours.to(theirs.device), theirs)
    return (
        {
            "result": yours,
            "x afterwards": x,
            "same as dist.all_reduce": same,
            "a ring of isend/irecv": ring(
                ctx.rank, ctx.world_size, reference.numel(), messages, others
            ),
        },
        {
            "result": reference,
            "x afterwards": inputs[ctx.rank],
            "same as dist.all_reduce": True,
            "a ring of isend/irecv": True,
        },
    )


def ring(rank, world_size, numel, messages, others):
    """True if this rank's messages make a ring all-reduce of `numel` numbers, else why not."""
    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    chunk = -(-numel // world_size)  # the largest chunk: numel / world_size, rounded up
    most = 2 * (world_size - 1) * chunk  # reduce-scatter, then all-gather: a chunk per step
    stray = [
        (k, peer) for k, peer, _ in messages if (k, peer) not in {("send", right), ("recv", left)}
    ]
    sent = sum(t.numel() for k, _, t in messages if k == "send")
    if others:
        return f"no: it called dist.{others[0]}; the exercise builds the sum from isend/irecv alone"
    if stray:
        kind, peer = stray[0]
        return (
            f"no: it {'sent to' if kind == 'send' else 'received from'} rank {peer}; in a ring, "
            f"rank {rank} sends only to rank {right} and receives only from rank {left}"
        )
    if sent > most:
        return (
            f"no: it sent {sent} numbers; a ring all-reduce sends one chunk (at most {chunk} "
            f"numbers) per step, 2 x {world_size - 1} steps: {most} at most"
        )
    sends, recvs = (sum(k == kind for k, _, _ in messages) for kind in ("send", "recv"))
    least = 2 * (numel - chunk)  # every chunk but one goes round, twice
    steps = 2 * (world_size - 1)
    if world_size > 1 and (sends != steps or recvs != steps or sent < least):
        return (
            f"no: it sent {sends} messages ({sent} numbers) to rank {right} and received {recvs} "
            f"from rank {left}; a ring all-reduce takes 2 x {world_size - 1} steps, one chunk "
            f"sent and one received in each ({least} numbers at least)"
        )
    return True


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {
    "02.1": (check_send_recv, "send_tensor", "recv_tensor"),
    "02.2": (check_ring_all_reduce, "ring_all_reduce"),
}
# The checks run on 4 ranks, then on 3 (an odd world): an answer written for 4 only fails.
WORLD_SIZES = (4, 3)
