"""Lesson 02 - point to point: send and recv between two ranks, and the shape handshake.

The idea
    send(tensor, dst) and recv(buffer, src) move one tensor between two ranks; no other rank
    takes part. The receiver passes a buffer it allocated, so it must know shape and dtype in
    advance. Guessing is not safe (gloo, torch 2.13, measured): a buffer too small kills the
    receiving process, one too big is filled in part without a word, a wrong dtype of the same
    byte size gives garbage. When the receiver cannot know (a batch whose size varies), the
    sender first sends a small header that describes the tensor: the shape handshake (its
    general layout, HEADER, is in course/header.py). A send may finish only once the peer has
    posted the matching recv (gloo's send() always waits for it; NCCL's may), so two ranks that
    both send first wait for each other forever: the send-send deadlock. The fixes: order the
    pair (the even rank sends first), or post sends and recvs together with batch_isend_irecv
    (one fused call on NCCL). isend/irecv return at once with a handle to wait() on: the
    transfer overlaps other work.

Run it
    torchrun --nproc-per-node 4 lessons/02_p2p.py
    python lessons/02_p2p.py --nproc 2                  # plain python: starts torchrun for you
    torchrun --nproc-per-node 2 lessons/02_p2p.py --broken deadlock   # send-send: fails in ~2 s

What you should see (4 ranks, no GPU)
    [rank 0] no GPU: using gloo on CPU
    [rank 0] checked: blocking send/recv in pairs: each odd rank got its partner's tensor and
             each even rank got it back doubled, as built locally
    [rank 0] checked: shape handshake: each odd rank allocated its partner's (2 + rank) x 3
             batch from the header and received it, equal to the batch built locally
    [rank 0] checked: isend/irecv, overlapped with other work: each rank got its partner's
             tensor, as built locally
    [rank 0] rank  tensors seen, in order   <- one row per rank, gathered to rank 0
    [rank 0]    0            [0, 3, 2, 1]   <- step s brought rank - s's tensor
    [rank 0]    1            [1, 0, 3, 2]
    [rank 0]    2            [2, 1, 0, 3]
    [rank 0]    3            [3, 2, 1, 0]
    [rank 0] checked: in a ring of 4 ranks every rank has seen every rank's tensor, one per step
             of batch_isend_irecv, each equal to the one built locally
    [rank 0] Next: exercises 02.1 and 02.2 above. Check them: python -m lessons.check 02
Ranks pair up 0-1, 2-3, ...; an odd last rank joins only the ring. Setup: course/ranks.py.
"""

import datetime
import math

import torch
import torch.distributed as dist

# The handshake's layout, kinds and dtype codes, in scope for exercise 02.1 (lesson 06 uses them)
from course.header import DTYPES, HEADER, MAX_NDIM, REFUSED, TENSOR  # noqa: F401
from course.ranks import AT_LEAST_2, parser, print0, print_rank, print_table0, setup

NEEDS = AT_LEAST_2
COLS = 3  # the handshake demo sends (rows, COLS) batches; only the sender knows `rows`
BROKEN_TIMEOUT = datetime.timedelta(seconds=2)  # --broken deadlock: how long a send may wait


def sample(rank, shape, dtype=torch.float32, device="cpu"):
    """The tensor rank `rank` sends: any rank can build it again, as the reference."""
    values = torch.arange(math.prod(shape), dtype=torch.float32) + 100 * rank
    return values.reshape(shape).to(dtype).to(device)


# --8<-- [start:blocking]
def blocking_pairs(ctx, partner):
    """The even rank sends, then receives the reply; the odd rank receives, then replies."""
    shape = (2, 4)  # agreed in advance, and the dtype (float32): the receiver must know both
    got = torch.empty(shape, device=ctx.device)  # allocated before recv
    if ctx.rank % 2 == 0:
        dist.send(sample(ctx.rank, shape, device=ctx.device), dst=partner)
        dist.recv(got, src=partner)  # blocks until the reply is in `got`
        expected = 2 * sample(ctx.rank, shape, device=ctx.device)  # ours, doubled
    else:
        dist.recv(got, src=partner)  # blocks until the data is in `got`
        dist.send(2 * got, dst=partner)
        expected = sample(partner, shape, device=ctx.device)
    assert torch.equal(got, expected), f"rank {ctx.rank}: got {got}, not {expected}"
    print0(
        "checked: blocking send/recv in pairs: each odd rank got its partner's tensor and "
        "each even rank got it back doubled, as built locally"
    )
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
            dist.isend(torch.ones(1), partner, group).wait(BROKEN_TIMEOUT)  # waits for a recv...
            dist.recv(torch.empty(1), src=partner, group=group)  # ...never posted: it is sending
            outcome = "finished (unexpected)"
        except RuntimeError as err:  # gloo's first sentence, without the source file it names
            outcome = "send failed: " + str(err).split("] ")[-1].split(". ")[0]
    print0(  # the world group is unharmed: rank 0 says why, every rank what happened to it
        "What went wrong: each rank sent first, and send() waits for the peer's recv, which the\n"
        "peer posts after its own send. Fix: the even rank sends first, or batch_isend_irecv."
    )
    print_rank(
        f"error: --broken deadlock: {outcome}. Both ranks of each pair called send() first and "
        f"waited for each other until the {BROKEN_TIMEOUT.seconds} s timeout (send-send deadlock)"
    )
    dist.barrier()  # leave together: torchrun stops the other ranks as soon as one exits
    raise SystemExit(1)
    # --8<-- [end:deadlock]


# --8<-- [start:handshake]
def shape_handshake(ctx, partner):
    """The even rank sends a batch whose row count only it knows: first the shape, then the data.
    dtype and ndim are agreed in advance, so the header is just the 2 sizes; HEADER is the
    general form: any dtype, any ndim up to MAX_NDIM (exercise 02.1)."""
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
    print0(
        f"checked: shape handshake: each odd rank allocated its partner's (2 + rank) x {COLS} "
        "batch from the header and received it, equal to the batch built locally"
    )
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
    print0(
        "checked: isend/irecv, overlapped with other work: each rank got its partner's "
        "tensor, as built locally"
    )
    # --8<-- [end:nonblocking]


# --8<-- [start:ring]
def ring_pass(ctx):
    """Each rank sends to its right neighbour and receives from its left, world_size-1 times."""
    n = ctx.world_size
    right, left = (ctx.rank + 1) % n, (ctx.rank - 1) % n
    current = sample(ctx.rank, (2,), device=ctx.device)
    senders = [ctx.rank]
    for step in range(1, n):
        incoming = torch.empty_like(current)
        # The step's isend and irecv together: NCCL runs them as one fused call; gloo has no
        # fusing and posts them one by one, which is fine as neither blocks.
        ops = [dist.P2POp(dist.isend, current, right), dist.P2POp(dist.irecv, incoming, left)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        current = incoming  # pass on, next step, what just came in
        expected = sample((ctx.rank - step) % n, (2,), device=ctx.device)  # step s: rank - s's
        assert torch.equal(current, expected), f"rank {ctx.rank}, step {step}: got {current}"
        senders.append(int(current[0].item()) // 100)  # sample() puts 100 * rank in each entry
    print_table0({"rank": ctx.rank, "tensors seen, in order": str(senders)})  # on rank 0
    print0(
        f"checked: in a ring of {n} ranks every rank has seen every rank's tensor, one per step "
        "of batch_isend_irecv, each equal to the one built locally"
    )
    # --8<-- [end:ring]


# --8<-- [start:ex-02-1]
def send_tensor(tensor: torch.Tensor, dst: int, group=None) -> None:
    """Exercise 02.1: send `tensor` to rank `dst` as a header (HEADER's layout), then the payload.

    Any dtype in DTYPES, 0 to MAX_NDIM dimensions, contiguous or not. Anything else: send a
    REFUSED header (so that the receiver fails now, not at its timeout), then raise ValueError.
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 02.1: fill a header [TENSOR, dtype code, ndim, sizes...],"
        " send it, then send the tensor (about 14 lines)"
    )


def recv_tensor(src: int, device: torch.device, group=None) -> torch.Tensor:
    """Exercise 02.1: receive, on `device`, one tensor that send_tensor sent from rank `src`.

    Raise ValueError, saying what was wrong, for a REFUSED header or one that is not a header
    (a kind other than TENSOR, a dtype code outside DTYPES, ndim outside 0..MAX_NDIM, a
    negative size), and receive no payload then.
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 02.1: receive a header, check it, allocate the tensor "
        "it describes and receive into it (about 14 lines)"
    )
    # --8<-- [end:ex-02-1]


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
    raise NotImplementedError(
        "Exercise 02.2: a ring all-reduce: reduce-scatter then all-gather of world_size "
        "chunks, each step an isend and an irecv (about 16 lines)"
    )
    # --8<-- [end:ex-02-2]


def main():
    p = parser(__doc__)
    p.add_argument("--broken", choices=["deadlock"], help="send-send: fails in ~2 s, explains")
    args = p.parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        partner = ctx.rank ^ 1  # pairs 0-1, 2-3, ...: flipping the last bit finds the other
        partner = partner if partner < ctx.world_size else None  # None: the odd one out
        if args.broken:
            send_send_deadlock(ctx, partner)
        if partner is not None:  # an odd one out skips the pair steps (p2p: no one else waits)
            blocking_pairs(ctx, partner)
            shape_handshake(ctx, partner)
            isend_irecv_pairs(ctx, partner)
        ring_pass(ctx)
        print0("Next: exercises 02.1 and 02.2 above. Check them: python -m lessons.check 02")


if __name__ == "__main__":
    main()
