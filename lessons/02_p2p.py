"""Lesson 02 - point to point: send and recv between two ranks, and the shape handshake.

The idea
    send(tensor, dst) and recv(buffer, src) move one tensor from one rank to one other; only
    the two take part. The receiver passes a buffer it allocated itself, so it must know the
    shape and dtype before the data arrives. Guessing is not safe (gloo, torch 2.13, measured):
    a buffer too small kills the receiving process, one too big is filled in part without a
    word, a wrong dtype of the same byte size gives garbage. When the receiver cannot know (a
    batch whose size varies), the sender first sends a small header that describes the
    tensor: the shape handshake. Later lessons use the header layout HEADER defined here.
    A send may finish only once the peer has posted the matching recv (gloo's send() always
    waits for it; NCCL's may), so two ranks that both send first can wait for each other
    forever: the send-send deadlock. The fixes: order the pair (the even rank sends first), or
    post the sends and recvs together with batch_isend_irecv (one fused call on NCCL).
    isend/irecv return at once with a handle to wait() on: the transfer overlaps other work.
    gloo lets you post them in any order; NCCL runs a pair's operations in the order posted,
    so there an exchange still needs an order, or batch_isend_irecv.

Run it
    torchrun --nproc-per-node 4 lessons/02_p2p.py
    python lessons/02_p2p.py --nproc 2                  # plain python: starts torchrun for you
    torchrun --nproc-per-node 2 lessons/02_p2p.py --broken deadlock   # send-send: fails in ~2 s

What you should see (4 ranks, no GPU)
    [rank 0] checked: blocking send/recv in pairs: each odd rank got its partner's tensor ...
    [rank 0] checked: shape handshake: each odd rank allocated its partner's (2 + rank) x 3 ...
    [rank 0] checked: isend/irecv, overlapped with other work: each rank got its partner's ...
    [rank 0] rank  tensors seen, in order (3 steps of batch_isend_irecv)
    [rank 0]    0  [0, 3, 2, 1]              <- one row per rank, gathered to rank 0
    [rank 0] checked: in a ring of 4 ranks every rank has seen every rank's tensor ...
Ranks pair up 0-1, 2-3, ...; with an odd number the last rank sits out the pair steps and only
joins the ring. Setup comes from course/ranks.py.
"""
import datetime
import math

import torch
import torch.distributed as dist

# The shape handshake's header layout, kinds and dtype codes, shared with lesson 06 and
# distill_demo: HEADER, MAX_NDIM, TENSOR, REFUSED, DTYPES (course/header.py, shown below).
from course.header import DTYPES, HEADER, MAX_NDIM, REFUSED, TENSOR  # noqa: F401 (exercise 02.1)
from course.ranks import AT_LEAST_2, parser, print0, print_rank, setup

NEEDS = AT_LEAST_2
COLS = 3  # the handshake demo sends (rows, COLS) batches; only the sender knows `rows`
BROKEN_TIMEOUT_S = 2.0  # --broken deadlock: how long a send may wait before it fails



def partner_of(rank, world_size):
    """0-1, 2-3, ...: the other rank of this rank's pair, or None for an odd one out."""
    partner = rank ^ 1  # flips the last bit: 0 <-> 1, 2 <-> 3
    return partner if partner < world_size else None


def sample(rank, shape, dtype=torch.float32, device="cpu"):
    """The tensor rank `rank` sends: any rank can build it again, as the reference."""
    values = torch.arange(math.prod(shape), dtype=torch.float32) + 100 * rank
    return values.reshape(shape).to(dtype).to(device)


# --8<-- [start:blocking]
def blocking_pairs(ctx, partner):
    """The even rank sends, then receives the reply; the odd rank receives, then replies."""
    shape, dtype = (2, 4), torch.float32  # agreed in advance: the receiver must know both
    if ctx.rank % 2 == 0:
        dist.send(sample(ctx.rank, shape, device=ctx.device), dst=partner)
        reply = torch.empty(shape, dtype=dtype, device=ctx.device)  # allocated before recv
        dist.recv(reply, src=partner)
        expected = 2 * sample(ctx.rank, shape, device=ctx.device)
        assert torch.equal(reply, expected), f"rank {ctx.rank}: reply {reply}, not {expected}"
    else:
        got = torch.empty(shape, dtype=dtype, device=ctx.device)
        dist.recv(got, src=partner)  # blocks until the data is in `got`
        expected = sample(partner, shape, device=ctx.device)
        assert torch.equal(got, expected), f"rank {ctx.rank}: got {got}, not {expected}"
        dist.send(2 * got, dst=partner)
    print0("checked: blocking send/recv in pairs: each odd rank got its partner's tensor and "
           "each even rank got it back doubled, as built locally")
# --8<-- [end:blocking]


# --8<-- [start:deadlock]
def send_send_deadlock(ctx, partner):
    """--broken deadlock: both ranks of each pair send first. Neither send can finish."""
    # On a gloo group of all ranks (every rank a member, whatever the world's backend), as
    # send() is: isend().wait(), with a timeout on the wait so that the deadlock ends by itself.
    group = dist.new_group(backend="gloo", timeout=ctx.timeout)
    outcome = "no partner: sat out"
    if partner is not None:
        try:
            timeout = datetime.timedelta(seconds=BROKEN_TIMEOUT_S)
            dist.isend(torch.ones(1), partner, group).wait(timeout)  # waits for partner's recv...
            dist.recv(torch.empty(1), src=partner, group=group)  # ...never posted: it is sending
            outcome = "finished (unexpected)"
        except RuntimeError as err:  # gloo's first sentence, without the source file it names
            outcome = "send failed: " + str(err).split("] ")[-1].split(". ")[0]
    reports = [None] * ctx.world_size
    dist.all_gather_object(reports, outcome)  # the world group is unharmed
    print0("rank  what happened")
    for r, said in enumerate(reports):
        print0(f"{r:>4}  {said}")
    print0("What went wrong: each rank sent first, and gloo's send() returns only once the "
           "peer has posted its recv;\nboth waited in send() for a recv that came only after the "
           "other's send. Fix: order the pair\n(blocking_pairs: the even rank sends first), or "
           "post send and recv together with batch_isend_irecv.")
    print_rank("error: --broken deadlock: both ranks of each pair called send() first and "
               f"waited for each other until the {BROKEN_TIMEOUT_S:g} s timeout (send-send "
               "deadlock, explained on rank 0)")
    raise SystemExit(1)
# --8<-- [end:deadlock]


# --8<-- [start:handshake]
def shape_handshake(ctx, partner):
    """The even rank sends a batch whose row count only it knows: first the shape, then the data.

    Here dtype and ndim are agreed in advance, so the header is just the 2 sizes. HEADER above
    is the general form: any dtype, any ndim up to MAX_NDIM (exercise 02.1).
    """
    if ctx.rank % 2 == 0:
        batch = sample(ctx.rank, (2 + ctx.rank, COLS), device=ctx.device)
        dist.send(torch.tensor(batch.shape, device=ctx.device), dst=partner)  # the header
        dist.send(batch, dst=partner)  # the payload: same pair, so it arrives after the header
    else:
        header = torch.empty(2, dtype=torch.int64, device=ctx.device)  # fixed size: allocatable
        dist.recv(header, src=partner)
        rows, cols = header.tolist()
        batch = torch.empty(rows, cols, device=ctx.device)  # now the payload can be allocated
        dist.recv(batch, src=partner)
        expected = sample(partner, (2 + partner, COLS), device=ctx.device)
        assert torch.equal(batch, expected), f"rank {ctx.rank}: got {batch}, not {expected}"
    print0(f"checked: shape handshake: each odd rank allocated its partner's (2 + rank) x {COLS} "
           "batch from the header and received it, equal to the batch built locally")
# --8<-- [end:handshake]


# --8<-- [start:nonblocking]
def isend_irecv_pairs(ctx, partner):
    """Each rank of a pair sends to the other and receives from it, without blocking."""
    outgoing = sample(ctx.rank, (4,), device=ctx.device)
    incoming = torch.empty(4, device=ctx.device)
    # gloo would take any order; NCCL runs one pair's operations in the order posted, so the
    # even rank's send meets the odd rank's recv first, as in blocking_pairs.
    if ctx.rank % 2 == 0:
        works = [dist.isend(outgoing, dst=partner), dist.irecv(incoming, src=partner)]
    else:
        works = [dist.irecv(incoming, src=partner), dist.isend(outgoing, dst=partner)]
    # Both calls returned at once. Until wait(): do not write to `outgoing` (it may still be
    # being sent) and do not read `incoming` (it may be half filled). Other work may overlap,
    # such as building the reference, which touches neither buffer:
    expected = sample(partner, (4,), device=ctx.device)
    for work in works:
        work.wait()  # gloo: the transfer is done; NCCL: later work on this stream waits for it
    assert torch.equal(incoming, expected), f"rank {ctx.rank}: got {incoming}, not {expected}"
    print0("checked: isend/irecv, overlapped with other work: each rank got its partner's "
           "tensor, as built locally")
# --8<-- [end:nonblocking]


# --8<-- [start:ring]
def ring_pass(ctx):
    """Each rank sends to its right neighbour and receives from its left, world_size-1 times.

    batch_isend_irecv takes the step's isend and irecv together: NCCL runs them as one fused
    call; gloo has no fusing and posts them one by one, which is fine as neither blocks.
    """
    right, left = (ctx.rank + 1) % ctx.world_size, (ctx.rank - 1) % ctx.world_size
    current = sample(ctx.rank, (2,), device=ctx.device)
    seen = [current]
    for _ in range(ctx.world_size - 1):
        incoming = torch.empty_like(current)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, current, right),
                                        dist.P2POp(dist.irecv, incoming, left)])
        for work in works:
            work.wait()
        current = incoming  # pass on, next step, what just came in
        seen.append(current)
    # Step s brought the tensor of rank - s: every rank's, once each.
    expected = [sample((ctx.rank - s) % ctx.world_size, (2,), device=ctx.device)
                for s in range(ctx.world_size)]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected)), f"rank {ctx.rank}: {seen}"
    senders = [int(t[0].item()) // 100 for t in seen]  # sample() puts 100 * rank in each entry
    rows = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object((ctx.rank, senders), rows, dst=0)
    steps = f"{ctx.world_size - 1} step" + "s" * (ctx.world_size > 2)
    print0(f"rank  tensors seen, in order ({steps} of batch_isend_irecv)")
    for r, who in rows or []:
        print0(f"{r:>4}  {who}")
    print0(f"checked: in a ring of {ctx.world_size} ranks every rank has seen every rank's "
           f"tensor (after {steps}), each equal to the one built locally")
# --8<-- [end:ring]


# --8<-- [start:ex-02-1]
def send_tensor(tensor: torch.Tensor, dst: int, group=None) -> None:
    """Exercise 02.1: send `tensor` to rank `dst` as a header (HEADER's layout), then the payload.

    Any dtype in DTYPES, 0 to MAX_NDIM dimensions, contiguous or not. Anything else: send a
    REFUSED header (so that the receiver fails now, not at its timeout), then raise ValueError.
    """
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 02.1: fill a header [TENSOR, dtype code, ndim, sizes...],"
                              " send it, then send the tensor (about 14 lines)")


def recv_tensor(src: int, device: torch.device, group=None) -> torch.Tensor:
    """Exercise 02.1: receive, on `device`, one tensor that send_tensor sent from rank `src`.

    Raise ValueError, saying what was wrong, for a REFUSED header or one that is not a header
    (a kind other than TENSOR, a dtype code outside DTYPES, ndim outside 0..MAX_NDIM, a
    negative size), and receive no payload then.
    """
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 02.1: receive a header, check it, allocate the tensor "
                              "it describes and receive into it (about 14 lines)")
# --8<-- [end:ex-02-1]


def check_send_recv(ctx, send_tensor, recv_tensor):
    """Runs on every rank: the even rank of each pair sends each case, the odd one receives it."""
    partner = partner_of(ctx.rank, ctx.world_size)
    cases = {"0-d float64": sample(1, (), torch.float64), "1-D int64": sample(1, (5,), torch.int64),
             "empty 0x3": sample(1, (0, 3)), "2-D bfloat16": sample(1, (2, 3), torch.bfloat16),
             "4-D bool": sample(0, (1, 2, 3, 4), torch.bool),
             "8-D uint8": sample(0, (2, 1) * 4, torch.uint8),
             "transposed int32": sample(1, (2, 3), torch.int32).t(),  # not contiguous
             # Bad: send_tensor must refuse these two, and both sides raise ValueError.
             "complex64": torch.zeros(2, dtype=torch.complex64), "9-D": torch.zeros((1,) * 9),
             # Bad: the check sends a payload where a header belongs; recv_tensor must refuse it.
             "not a header": None}
    bad = ("complex64", "9-D", "not a header")
    # Every rank first makes every group, in one order: a pair group per case, so that a case
    # that goes wrong leaves nothing behind for the next (and its 10 s timeout ends a wait for a
    # payload never sent), and a pair group to wait for each other in between.
    pairs = [[r, r + 1] for r in range(0, ctx.world_size - 1, 2)]
    groups = {name: [dist.new_group(pair, timeout=datetime.timedelta(seconds=10)) for pair in pairs]
              for name in cases}
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


# --8<-- [start:ex-02-2]
def ring_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Exercise 02.2: the sum of `x` over all ranks, on every rank, from isend/irecv in a ring.

    Cut a flat copy of x into world_size chunks. Reduce-scatter: world_size-1 steps, each
    sending one chunk right and adding the one from the left into yours. All-gather:
    world_size-1 more steps passing the finished chunks round. Post each step's isend and
    irecv as one batch_isend_irecv (on NCCL, all ranks sending first could deadlock).
    Leave `x` as it was.
    """
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 02.2: a ring all-reduce: reduce-scatter then all-gather "
                              "of world_size chunks, each step an isend and an irecv "
                              "(about 16 lines)")
# --8<-- [end:ex-02-2]


def check_ring_all_reduce(ctx, ring_all_reduce):
    """Runs on every rank: yours against the single-process sum, and against dist.all_reduce."""
    # 10 numbers per rank: on 4 ranks the chunks have unequal sizes (3, 3, 2, 2)
    inputs = [sample(r, (2, 5), device=ctx.device) for r in range(ctx.world_size)]
    x = inputs[ctx.rank].clone()
    yours = ring_all_reduce(x)
    theirs = inputs[ctx.rank].clone()
    dist.all_reduce(theirs)
    reference = torch.stack(inputs).sum(dim=0)  # whole numbers: exact in any order of addition
    same = torch.equal(yours, theirs)
    return ({"result": yours, "x afterwards": x, "same as dist.all_reduce": same},
            {"result": reference, "x afterwards": inputs[ctx.rank],
             "same as dist.all_reduce": True})


# Exercise id -> (its check, the function(s) you write). Check: python -m lessons.check 02
EXERCISES = {"02.1": (check_send_recv, "send_tensor", "recv_tensor"),
             "02.2": (check_ring_all_reduce, "ring_all_reduce")}


def main():
    p = parser(__doc__)
    p.add_argument("--broken", choices=["deadlock"],
                   help="deadlock: both ranks of each pair send first (fails in ~2 s, explains)")
    args = p.parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:  # init, backend, device and teardown: course/ranks.py
        partner = partner_of(ctx.rank, ctx.world_size)
        if args.broken:
            send_send_deadlock(ctx, partner)
        if partner is not None:  # an odd one out skips the pair steps (p2p: no one else waits)
            blocking_pairs(ctx, partner)
            shape_handshake(ctx, partner)
            isend_irecv_pairs(ctx, partner)
        ring_pass(ctx)
        print0("Next: exercises 02.1 (send_tensor, recv_tensor) and 02.2 (ring_all_reduce). "
               "Check them: python -m lessons.check 02")


if __name__ == "__main__":
    main()
