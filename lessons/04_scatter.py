"""Lesson 04 - scatter vs broadcast: who ends up holding what, and how many bytes that costs.

The idea
    broadcast copies one tensor to every rank: every rank then holds all of it. scatter cuts it
    into world-size pieces and sends piece r to rank r: each rank holds a quarter (4 ranks).
    gather is scatter run backwards. all_to_all is every rank scattering at once: rank r's
    piece j goes to rank j, a transpose of who holds what (mixture-of-experts routing, Ulysses
    attention). reduce_scatter sums the ranks' tensors and scatters the sum: rank r gets the
    sum of everyone's piece r (how ZeRO and FSDP shard gradients); all_reduce is a
    reduce_scatter followed by an all_gather.

Run it
    torchrun --nproc-per-node 4 lessons/04_scatter.py
    python lessons/04_scatter.py --nproc 2           # plain python: starts torchrun for you

What you should see (4 ranks, no GPU)
    [rank 0] no GPU: using gloo on CPU
    [rank 0] rank 0 sends a [1000, 1000] float32 tensor (4000000 bytes). Bytes each rank holds:
    [rank 0] rank  broadcast  scatter
    [rank 0]    0    4000000  5000000     <- rank 0 keeps the whole tensor, and its own piece
    [rank 0]    1    4000000  1000000
    [rank 0]    2    4000000  1000000
    [rank 0]    3    4000000  1000000
    [rank 0] checked: broadcast gives every rank the whole tensor, scatter only its 250 rows; the
             bytes held match [rows, cols] * 4 on all 4 ranks
    [rank 0] checked: gather to rank 0 puts the 4 pieces back together
    [rank 0] rank             sends         receives
    [rank 0]    0      [0, 1, 2, 3]  [0, 10, 20, 30]   <- 10*r + j: from rank r, for rank j
    [rank 0]    1  [10, 11, 12, 13]  [1, 11, 21, 31]
    [rank 0]    2  [20, 21, 22, 23]  [2, 12, 22, 32]
    [rank 0]    3  [30, 31, 32, 33]  [3, 13, 23, 33]
    [rank 0] checked: all_to_all on 4 ranks: rank r receives element r of every rank, in rank
             order (a transpose)
    [rank 0] rank                           grad  reduce_scatter keeps
    [rank 0]    0       [0, 1, 2, 3, 4, 5, 6, 7]               [0, 10]
    [rank 0]    1    [0, 2, 4, 6, 8, 10, 12, 14]              [20, 30]
    [rank 0]    2   [0, 3, 6, 9, 12, 15, 18, 21]              [40, 50]
    [rank 0]    3  [0, 4, 8, 12, 16, 20, 24, 28]              [60, 70]
    [rank 0] checked: reduce_scatter on 4 ranks leaves piece r of the sum on rank r, the same as
             all_reduce then chunk (gloo's way)
    [rank 0] Next: exercise 04.1 (shard_rows, unshard_rows). Check it: python -m lessons.check 04
Bytes are measured: the storage behind the tensors a rank keeps (views of one storage count
once) and, on GPU, what the CUDA allocator handed out (torch.cuda.memory_allocated).
"""

import torch
import torch.distributed as dist

from course.ranks import parser, print0, print_table0, setup

SEED = 0  # the tensor rank 0 sends is drawn from this seed; every rank can redraw it to check
ROWS, COLS = 1000, 1000  # float32: 4 MB. Rows are cut among the ranks
SRC = 0  # the rank that holds the tensor at the start
# torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor to reduce_scatter_single /
# all_gather_single and warns at the old names; torch 2.11 may only have the old ones. (The
# second is for exercise 04.1.)
REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def held_bytes(tensors):
    """Bytes of memory behind these tensors: each storage once, however many views share it."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measured(ctx, run):
    """Call run() -> the tensors this rank keeps. Returns (them, their bytes, CUDA bytes
    allocated meanwhile or None on CPU): the second is exact, the third what the GPU paid."""
    cuda = ctx.device.type == "cuda"
    before = torch.cuda.memory_allocated(ctx.device) if cuda else 0
    kept = run()
    allocated = torch.cuda.memory_allocated(ctx.device) - before if cuda else None
    return kept, held_bytes(kept), allocated


def scatter_vs_broadcast(ctx, reference):
    """Rank SRC sends `reference` to everyone with broadcast, then with scatter."""
    rank, n, device = ctx.rank, ctx.world_size, ctx.device
    # scatter needs equal pieces: with 3 ranks pad 1000 rows to 1002 (FSDP pads the same way).
    rows = -(-ROWS // n) * n
    padded = torch.cat([reference, reference.new_zeros(rows - ROWS, COLS)])

    # --8<-- [start:broadcast]
    def broadcast():
        whole = reference.to(device) if rank == SRC else torch.empty(ROWS, COLS, device=device)
        dist.broadcast(whole, src=SRC)  # every rank needs room for all of it
        return [whole]

    # --8<-- [end:broadcast]

    # --8<-- [start:scatter]
    def scatter():
        piece = torch.empty(rows // n, COLS, device=device)  # room for our piece only
        whole = padded.to(device) if rank == SRC else None
        pieces = list(whole.chunk(n)) if rank == SRC else None  # only SRC has a list to send
        dist.scatter(piece, pieces, src=SRC)  # SRC's own piece is copied into its `piece` too
        return [piece] + ([whole] if rank == SRC else [])

    # --8<-- [end:scatter]

    (whole,), bcast_bytes, bcast_cuda = measured(ctx, broadcast)
    (piece, *_), scatter_bytes, scatter_cuda = measured(ctx, scatter)
    assert torch.equal(whole.cpu(), reference), f"rank {rank}: broadcast delivered other data"
    mine = padded.chunk(n)[rank]
    assert torch.equal(piece.cpu(), mine), f"rank {rank}: scatter gave {piece} instead of {mine}"
    # What the bytes must come to, from the shapes alone: the measurement has to agree.
    expect_bcast = ROWS * COLS * 4
    expect_scatter = mine.numel() * 4 + (rows * COLS * 4 if rank == SRC else 0)
    assert (bcast_bytes, scatter_bytes) == (expect_bcast, expect_scatter), (
        f"rank {rank}: holds {bcast_bytes} / {scatter_bytes} bytes, expected "
        f"{expect_bcast} / {expect_scatter}"
    )
    print0(
        f"rank {SRC} sends a [{ROWS}, {COLS}] float32 tensor ({expect_bcast} bytes)"
        + (f", padded to {rows} rows for scatter" if rows > ROWS else "")
        + ". Bytes each rank holds:"
    )
    row = {"rank": rank, "broadcast": bcast_bytes, "scatter": scatter_bytes}
    if bcast_cuda is not None:
        # The allocator rounds each block up to 512 bytes: a little more than the storage.
        row.update({"CUDA: broadcast": bcast_cuda, "CUDA: scatter": scatter_cuda})
    print_table0(row)
    print0(
        f"checked: broadcast gives every rank the whole tensor, scatter only its "
        f"{rows // n} rows; the bytes held match [rows, cols] * 4 on all {n} ranks"
    )
    return piece, padded


def gather_back(ctx, piece, padded):
    # --8<-- [start:gather]
    slots = [torch.empty_like(piece) for _ in range(ctx.world_size)] if ctx.rank == SRC else None
    dist.gather(piece, slots, dst=SRC)  # scatter backwards: SRC holds every piece again
    # --8<-- [end:gather]
    if ctx.rank == SRC:
        assert torch.equal(torch.cat(slots).cpu(), padded), "gather did not rebuild the tensor"
    print0(f"checked: gather to rank {SRC} puts the {ctx.world_size} pieces back together")


def all_to_all(ctx):
    rank, n = ctx.rank, ctx.world_size
    # --8<-- [start:all_to_all]
    # Rank r holds n numbers; number j is meant for rank j: 10*r + j reads "from r, for j".
    send = torch.tensor([10.0 * rank + j for j in range(n)], device=ctx.device)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send)  # cut in n equal parts: part j goes to rank j
    # --8<-- [end:all_to_all]
    expected = [10.0 * j + rank for j in range(n)]  # part j of what we hold came from rank j
    assert received.tolist() == expected, f"rank {rank}: got {received.tolist()}, not {expected}"
    print_table0(
        {"rank": rank, "sends": str(send.int().tolist()), "receives": str(received.int().tolist())}
    )
    print0(
        f"checked: all_to_all on {n} ranks: rank r receives element r of every rank, in rank "
        "order (a transpose)"
    )


def reduce_scatter(ctx):
    rank, n = ctx.rank, ctx.world_size
    per_rank = 2  # elements of the result each rank keeps
    # --8<-- [start:reduce_scatter]
    # Rank r's "gradient": (r + 1) * [0, 1, 2, ...]. The sum over ranks is n(n+1)/2 times that.
    grad = torch.arange(n * per_rank, dtype=torch.float32, device=ctx.device) * (rank + 1)
    mine = torch.empty(per_rank, device=ctx.device)
    REDUCE_SCATTER_SINGLE(mine, grad)  # mine = piece `rank` of the sum of every rank's grad
    # What torch's gloo backend does inside (and what you write on old releases whose gloo has
    # no reduce_scatter): all_reduce everything, keep your piece. Twice the traffic of NCCL's
    # ring reduce_scatter, which sends each rank (n-1)/n of the tensor, not 2(n-1)/n.
    everything = grad.clone()
    dist.all_reduce(everything)
    same = everything.chunk(n)[rank]
    # --8<-- [end:reduce_scatter]
    expected = (torch.arange(n * per_rank, dtype=torch.float32) * n * (n + 1) / 2).chunk(n)[rank]
    assert torch.equal(mine.cpu(), expected), f"rank {rank}: {mine} instead of {expected}"
    assert torch.equal(same.cpu(), expected), f"rank {rank}: all_reduce+chunk gave {same}"
    print_table0(
        {
            "rank": rank,
            "grad": str(grad.int().tolist()),
            "reduce_scatter keeps": str(mine.int().tolist()),
        }
    )
    print0(
        f"checked: reduce_scatter on {n} ranks leaves piece r of the sum on rank r, the same "
        "as all_reduce then chunk (gloo's way)"
    )


# --8<-- [start:ex-04-1]
def shard_rows(full, piece: torch.Tensor, src: int) -> torch.Tensor:
    """Exercise 04.1: rank `src` holds `full`, a [rows, cols] tensor whose rows split evenly
    among the ranks; every other rank passes full=None. `piece` is an empty [rows // world
    size, cols] tensor on every rank. Fill it, with one scatter, with this rank's block of rows
    (rank r gets the r-th block) and return it. No rank but `src` may hold the whole tensor.
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 04.1: scatter the row blocks of `full` from src into `piece` (about 3 lines)"
    )


def unshard_rows(piece: torch.Tensor) -> torch.Tensor:
    """Exercise 04.1: the way back. Every rank passes its block of rows; return the whole
    [rows, cols] tensor, on every rank, collected with all_gather (or all_gather_single).
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 04.1: all_gather every rank's piece and put them "
        "together in rank order (about 3 lines)"
    )
    # --8<-- [end:ex-04-1]


def main():
    args = parser(__doc__).parse_args()
    # No NEEDS: any world size (course/ranks.py: rank, device, init and teardown)
    with setup(args, relaunch=True, trace=args.trace) as ctx:
        reference = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(SEED))
        piece, padded = scatter_vs_broadcast(ctx, reference)
        gather_back(ctx, piece, padded)
        all_to_all(ctx)
        reduce_scatter(ctx)
        print0(
            "Next: exercise 04.1 (shard_rows, unshard_rows). Check it: python -m lessons.check 04"
        )


if __name__ == "__main__":
    main()
