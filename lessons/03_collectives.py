"""Lesson 03 - collectives: what all_reduce, all_gather, broadcast, reduce, gather and barrier
leave on which rank, how to compose them, and how fast they are.

The idea
    A collective is one call that every rank of a group makes together. It returns None (a Work
    handle if you pass async_op=True): its result is written into tensors you pass. all_reduce,
    all_gather and broadcast leave the result on every rank; reduce and gather only on `dst`.
    Two collectives in a row compute things no single one does: the L2 norm of a vector that is
    spread over the ranks needs its largest entry (MAX) and then its sum of squares (SUM).
    Softmax over such a vector is the same pattern: exercise 03.1.

Run it
    torchrun --nproc-per-node 4 lessons/03_collectives.py
    python lessons/03_collectives.py --nproc 2           # plain python: starts torchrun for you
    torchrun --nproc-per-node 4 lessons/03_collectives.py --bench   # bandwidth sweep and plots
    python benchmarks/collectives.py --nproc 2           # NCCL_ALGO Ring vs Tree, on GPUs

What you should see (4 ranks, no GPU; reduce's unspecified result off dst in brackets)
    [rank 0] no GPU: using gloo on CPU
    [rank 0] checked: all_reduce SUM, MAX and AVG of rank+1 on 4 ranks match sum, max and mean
    [rank 0] checked: all_gather and all_gather_single give every rank all 4 inputs, in order
    [rank 0] checked: with [t] * 4 as the output list every slot shows the last rank's value
    [rank 0] checked: broadcast from rank 0, then from rank 1, leaves that rank's x on every rank
    [rank 0] checked: reduce and gather leave the sum and the list on rank 0 only
    [rank 0] rank  x  SUM  MAX  AVG  all_gather      [t]*4  bcast 0, 1  reduce to 0  gather to 0
    [rank 0]    0  1   10    4  2.5   [1,2,3,4]  [4,4,4,4]        1, 2           10    [1,2,3,4]
    [rank 0]    1  2   10    4  2.5   [1,2,3,4]  [4,4,4,4]        1, 2          (9)         None
    [rank 0]    2  3   10    4  2.5   [1,2,3,4]  [4,4,4,4]        1, 2          (7)         None
    [rank 0]    3  4   10    4  2.5   [1,2,3,4]  [4,4,4,4]        1, 2          (4)         None
    [rank 0] checked: barrier kept the others waiting 0.30 s for the last, 0.3 s late
    [rank 0] checked: L2 normalisation of a vector split over 4 ranks (MAX then SUM) matches the
             single-process float64 result
    [rank 0] without the MAX step the sum of squares of entries ~1e20 is inf
    [rank 0] Next: exercises 03.1 and 03.2 above. Check them: python -m lessons.check 03

Bandwidth (--bench)
    busbw (nccl-tests) = algbw * the share of the tensor each rank's link carries: 2(N-1)/N for
    a ring all_reduce (1.0 for N=2), 1 for broadcast. Compare it with the hardware's peak. Ring,
    tree, double binary tree: docs/lessons/03_collectives.md and docs/figures/03_algorithms.png.
"""

import time

import torch
import torch.distributed as dist

from course import plots
from course.ranks import AT_LEAST_2, parser, print0, print_table0, setup, usage_error

NEEDS = AT_LEAST_2  # the lesson broadcasts from rank 1 too
SEED = 0  # the sharded vectors are drawn from this seed, the same on every rank
VECTOR_LEN = 30  # length of the sharded vector; any world size up to 30 can split it
SLEEP_S = 0.3  # barrier demo: the last rank arrives this late; the others wait for it
WARMUP = 3  # --bench: untimed calls per size, the first ones set up buffers and connections
BYTES_PER_POINT = {"cpu": 2**25, "cuda": 2**33}  # --bench: timed traffic per size, 5-50 calls
# busbw / algbw (nccl-tests' formulas): how much each rank's link carries per byte of tensor.
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "broadcast": lambda n: 1.0}
# torch 2.13 renamed all_gather_into_tensor to all_gather_single and warns at the old name;
# torch 2.11 (the GPU machines) may only have the old one. Same collective either way.
ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def fmt(t):
    """A one-number tensor, a list of them, or None, as short text: '4', '[1,2,3,4]', 'None'."""
    if isinstance(t, list):
        return "[" + ",".join(map(fmt, t)) + "]"
    return "None" if t is None else f"{t.item():g}"


def tour(ctx):
    """Each collective on one number per rank, x = rank + 1, checked against the list of inputs."""
    rank, n, device = ctx.rank, ctx.world_size, ctx.device
    inputs = [float(r + 1) for r in range(n)]  # the single-process reference: everyone's input
    x = torch.tensor([inputs[rank]], device=device)
    row = {"rank": rank, "x": fmt(x)}  # what this rank holds after each collective: a table

    # --8<-- [start:all_reduce]
    for op, expected in (("SUM", sum(inputs)), ("MAX", max(inputs)), ("AVG", sum(inputs) / n)):
        t = x.clone()  # all_reduce overwrites its argument: keep x for what follows
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))  # gloo has AVG since torch 2.8
        assert abs(t.item() - expected) < 1e-5, f"rank {rank}: {op} gave {t.item()}, not {expected}"
        row[op] = fmt(t)
    print0(f"checked: all_reduce SUM, MAX and AVG of rank+1 on {n} ranks match sum, max and mean")
    # --8<-- [end:all_reduce]

    # --8<-- [start:all_gather]
    gathered = [torch.empty_like(x) for _ in range(n)]  # n tensors: one slot per rank
    dist.all_gather(gathered, x)
    assert [g.item() for g in gathered] == inputs, f"rank {rank}: all_gather gave {gathered}"
    flat = torch.empty(n, device=device)  # or one tensor of n slots, filled in rank order
    ALL_GATHER_SINGLE(flat, x)
    assert flat.tolist() == inputs, f"rank {rank}: all_gather_single gave {flat}"
    print0(f"checked: all_gather and all_gather_single give every rank all {n} inputs, in order")
    # The pitfall: [t] * n is a list holding ONE tensor n times. all_gather writes rank 0's
    # value into it, then rank 1's over it, ...: only the last rank's survives, in every slot.
    aliased = [torch.empty_like(x)] * n
    dist.all_gather(aliased, x)
    assert all(a is aliased[0] for a in aliased) and aliased[0].item() == inputs[-1]
    print0(f"checked: with [t] * {n} as the output list every slot shows the last rank's value")
    row["all_gather"], row[f"[t]*{n}"] = fmt(gathered), fmt(aliased)
    # --8<-- [end:all_gather]

    # --8<-- [start:broadcast]
    got = []
    for src in (0, 1):
        t = x.clone()
        dist.broadcast(t, src=src)  # src's tensor is sent; every other rank's is overwritten
        assert t.item() == inputs[src], f"rank {rank}: broadcast from {src} gave {t.item()}"
        got.append(fmt(t))
    row["bcast 0, 1"] = ", ".join(got)
    print0("checked: broadcast from rank 0, then from rank 1, leaves that rank's x on every rank")
    # --8<-- [end:broadcast]

    # --8<-- [start:reduce_gather]
    t = x.clone()
    dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)  # like all_reduce, but only dst gets the sum;
    if rank == 0:  # the others' t is unspecified (gloo leaves partial sums in it): don't use it
        assert t.item() == sum(inputs), f"rank 0: reduce gave {t.item()}, not {sum(inputs)}"
    row["reduce to 0"] = fmt(t) if rank == 0 else f"({fmt(t)})"
    slots = [torch.empty_like(x) for _ in range(n)] if rank == 0 else None  # only dst has slots
    dist.gather(x, slots, dst=0)
    if rank == 0:
        assert [s.item() for s in slots] == inputs, f"rank 0: gather gave {slots}"
    row["gather to 0"] = fmt(slots)
    print0("checked: reduce and gather leave the sum and the list on rank 0 only")
    # --8<-- [end:reduce_gather]

    # --8<-- [start:barrier]
    dist.barrier()  # leave together...
    if rank == n - 1:
        time.sleep(SLEEP_S)  # ...then the last rank dawdles
    start = time.perf_counter()
    dist.barrier()  # nobody gets past this until every rank has reached it
    waited = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    waits = [torch.empty_like(waited) for _ in range(n)]
    dist.all_gather(waits, waited)
    assert max(w.item() for w in waits[:-1]) > SLEEP_S / 2, f"rank {rank}: nobody waited"
    # --8<-- [end:barrier]
    print_table0(row)  # reduce's unspecified result on the ranks other than dst: in brackets
    least = min(w.item() for w in waits[:-1])  # the shortest wait of the ranks on time
    print0(f"checked: barrier kept the others waiting {least:.2f} s for the last, {SLEEP_S} s late")


# --8<-- [start:l2]
def l2_normalize(shard):
    """This rank's piece of v / |v|, where v is split across the ranks and `shard` is our piece."""
    # The squares of entries near 1e20 overflow float32 (max 3.4e38). So first divide by the
    # largest |entry| of the whole vector, which needs a MAX over ranks: softmax's trick.
    largest = shard.abs().max().reshape(1)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    scaled = shard / largest.clamp_min(torch.finfo(shard.dtype).tiny)  # all-zero v: stay 0
    sum_sq = (scaled * scaled).sum().reshape(1)  # this rank's part of the sum of squares
    dist.all_reduce(sum_sq, op=dist.ReduceOp.SUM)  # the whole vector's
    return scaled / sum_sq.sqrt()
    # --8<-- [end:l2]


def compose(ctx):
    g = torch.Generator().manual_seed(SEED)
    full = torch.randn(VECTOR_LEN, generator=g) * 1e20  # the whole vector, on every rank
    shard = full.tensor_split(ctx.world_size)[ctx.rank].to(ctx.device)  # our piece of it
    naive = shard.pow(2).sum().reshape(1)
    dist.all_reduce(naive)  # the sum of squares without scaling first: inf
    yours = l2_normalize(shard).cpu()
    expected = (full.double() / full.double().norm()).float().tensor_split(ctx.world_size)[ctx.rank]
    assert torch.allclose(yours, expected), f"rank {ctx.rank}: {yours} vs {expected}"
    print0(
        f"checked: L2 normalisation of a vector split over {ctx.world_size} ranks (MAX then SUM)"
        " matches the single-process float64 result"
    )
    print0(f"without the MAX step the sum of squares of entries ~1e20 is {naive.item()}")


# --8<-- [start:bench]
def time_collective(ctx, op, nbytes):
    """Seconds per call of `op` on nbytes of float32, averaged over calls; the slowest rank's."""
    t = torch.zeros(nbytes // 4, device=ctx.device)  # zeros: sums stay 0 however often we add
    args = {"all_reduce": (t,), "broadcast": (t, 0)}[op]  # broadcast from rank 0
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else lambda: None
    for _ in range(WARMUP):
        getattr(dist, op)(*args)
    sync()
    dist.barrier()  # start the clock together
    calls = max(5, min(50, BYTES_PER_POINT[ctx.device.type] // nbytes))
    start = time.perf_counter()
    for _ in range(calls):
        getattr(dist, op)(*args)
    sync()  # NCCL calls return once queued: wait for the GPU to finish
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)  # a collective is as slow as its slowest rank
    return took.item() / calls
    # --8<-- [end:bench]


# --8<-- [start:ex-03-1]
def sharded_softmax(shard: torch.Tensor) -> torch.Tensor:
    """Exercise 03.1: softmax of a vector split across the ranks. `shard` is this rank's piece
    (the pieces in rank order make the vector); return this rank's piece of softmax(vector).

    Entries are around 100, and exp(100) overflows float32. Subtract the largest entry of the
    whole vector first, as torch.softmax does.
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 03.1: a MAX all_reduce, exp, a SUM all_reduce, divide (about 7 lines)"
    )
    # --8<-- [end:ex-03-1]


# --8<-- [start:ex-03-2]
def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """Exercise 03.2: `logits` is [batch, this rank's slice of the vocabulary] (the slices in
    rank order make the vocabulary). Return [batch], the same on every rank: for each row,
    log(sum of exp(logit) over the whole vocabulary), the denominator of a cross-entropy
    whose output layer is split across ranks (Megatron's vocab-parallel cross-entropy).

    Logits are around 100: stay finite the way 03.1 does.
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 03.2: per-row MAX all_reduce, SUM all_reduce of exp(logits - max) (about 7 lines)"
    )
    # --8<-- [end:ex-03-2]


def main():
    p = parser(__doc__)
    p.add_argument("--bench", action="store_true", help="instead: time collectives, plot busbw")
    p.add_argument("--bench-ops", default="all_reduce,broadcast", help="collectives to time")
    args = p.parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:  # course/ranks.py
        # Checked after init, which the ranks leave together: torchrun stops the others soon
        # after one exits, and a rank still importing torch would never say what was wrong.
        ops = args.bench_ops.split(",")
        if unknown := [op for op in ops if op not in BUS_FACTOR]:
            usage_error(
                f"--bench-ops {args.bench_ops}: no collective called {', '.join(unknown)}. "
                f"Choose from {','.join(BUS_FACTOR)}."
            )
        if args.bench:
            plots.bandwidth_sweep(ctx, ops, BUS_FACTOR, args.out, time_collective)  # sizes, plot
            return
        tour(ctx)
        compose(ctx)
        print0("Next: exercises 03.1 and 03.2 above. Check them: python -m lessons.check 03")


if __name__ == "__main__":
    main()
