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

What you should see (4 ranks, no GPU): one `checked:` line per collective, then a table of
what each rank held after each one (a few columns shown), then the L2 normalisation.
    [rank 0] rank  x  SUM  MAX  AVG    all_gather         [t]*4  ...  reduce to 0   gather to 0
    [rank 0]    0  1   10    4  2.5  [1, 2, 3, 4]  [4, 4, 4, 4]  ...           10  [1, 2, 3, 4]
    [rank 0]    1  2   10    4  2.5  [1, 2, 3, 4]  [4, 4, 4, 4]  ...          (9)          None
    [rank 0] checked: L2 normalisation of a vector split over 4 ranks (MAX then SUM) matches ...

Ring, tree, double binary tree (pictured in docs/figures/03_algorithms.png)
    Ring: the ranks pass chunks round a circle. all_reduce cuts the tensor into N chunks; in N-1
    steps each rank adds the chunk from its left neighbour and passes it on (reduce-scatter),
    in N-1 more it passes the finished chunks round (all-gather). Every rank sends 2(N-1)/N of
    the tensor whatever N is, the least possible, but waits 2(N-1) steps: best for big messages.
    Tree: reduce up a binary tree to the root, broadcast back down, in pipelined chunks: log2(N)
    steps, good for small messages; but a leaf only sends up, so half the links idle.
    Double binary tree (NCCL): two trees, each carrying half the data, built so that a rank
    that is a leaf in one is inside the other: every link busy, still log2(N) steps. NCCL uses
    trees between nodes; inside one node it runs chains. With 2 ranks ring, tree and chain are
    all one link each way: each rank sends half the tensor twice, the whole tensor in all.
    busbw (nccl-tests) = algbw * that traffic factor, 2(N-1)/N for all_reduce (1.0 for N=2),
    1 for broadcast: the rate on each rank's link, to compare with the hardware's peak.
"""
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from course.ranks import AT_LEAST_2, parser, print0, print_table0, setup, usage_error

NEEDS = AT_LEAST_2  # the lesson broadcasts from rank 1 too

SEED = 0  # the sharded vectors are drawn from this seed, the same on every rank
VECTOR_LEN = 30  # length of the sharded vector; any world size up to 30 can split it
SLEEP_S = 0.3  # barrier demo: the last rank arrives this late; the others wait for it
# --bench: message sizes in bytes. gloo on loopback moves ~1-2 GB/s, NCCL on NVLink ~400.
CPU_SIZES = [2 ** k for k in range(12, 23, 2)]  # 4 KiB .. 4 MiB: seconds on 2 CPU cores
GPU_SIZES = [2 ** k for k in range(20, 33, 2)]  # 1 MiB .. 4 GiB
WARMUP = 3  # untimed calls per size: the first ones set up buffers and connections
BYTES_PER_POINT = {"cpu": 2 ** 25, "cuda": 2 ** 33}  # timed traffic per size, as 5-50 calls
# busbw / algbw (nccl-tests' formulas): how much each rank's link carries per byte of tensor.
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "broadcast": lambda n: 1.0}
# torch 2.13 renamed all_gather_into_tensor to all_gather_single and warns at the old name;
# torch 2.11 (the GPU machines) may only have the old one. Same collective either way.
ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def fmt(t):
    """A tensor (or list of them, or None) as short text: '4', '[1, 2, 3, 4]', 'None'."""
    if t is None:
        return "None"
    if isinstance(t, list):
        return "[" + ", ".join(fmt(x) for x in t) + "]"
    return ", ".join(f"{v:g}" for v in t.flatten().tolist())


def tour(ctx):
    """Each collective on one number per rank, x = rank + 1, checked against the list of inputs."""
    rank, n, device = ctx.rank, ctx.world_size, ctx.device
    inputs = [float(r + 1) for r in range(n)]  # the single-process reference: everyone's input
    x = torch.tensor([inputs[rank]], device=device)
    row = {"rank": rank, "x": fmt(x)}

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
    for src in (0, 1):
        t = x.clone()
        dist.broadcast(t, src=src)  # src's tensor is sent; every other rank's is overwritten
        assert t.item() == inputs[src], f"rank {rank}: broadcast from {src} gave {t.item()}"
        row[f"bcast {src}"] = fmt(t)
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
    print_table0(row)
    print0("(reduce's result on ranks other than dst is unspecified: shown in brackets)")
    print0(f"checked: barrier kept the other ranks waiting for the last, {SLEEP_S} s late")
    print0("barrier wait per rank: " + ", ".join(f"{w.item():.2f} s" for w in waits))


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
    print0(f"checked: L2 normalisation of a vector split over {ctx.world_size} ranks (MAX then SUM)"
           " matches the single-process float64 result")
    print0(f"without the MAX step the sum of squares of entries ~1e20 is {naive.item()}")


# --8<-- [start:bench]
def time_collective(ctx, op, nbytes):
    """Seconds per call of `op` on nbytes of float32, averaged over calls; the slowest rank's."""
    t = torch.zeros(nbytes // 4, device=ctx.device)  # zeros: sums stay 0 however often we add
    call = {"all_reduce": lambda: dist.all_reduce(t),
            "broadcast": lambda: dist.broadcast(t, src=0)}[op]
    calls = max(5, min(50, BYTES_PER_POINT[ctx.device.type] // nbytes))
    for _ in range(WARMUP):
        call()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()  # start the clock together
    start = time.perf_counter()
    for _ in range(calls):
        call()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()  # NCCL calls return once queued: wait for the GPU to finish
    took = torch.tensor([(time.perf_counter() - start) / calls], dtype=torch.float64,
                        device=ctx.device)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)  # a collective is as slow as its slowest rank
    return took.item()


def bench(ctx, ops, out):
    n = ctx.world_size
    sizes = GPU_SIZES if ctx.device.type == "cuda" else CPU_SIZES
    algo = os.environ.get("NCCL_ALGO", "NCCL's choice") if ctx.backend == "nccl" else None
    label = f"{ctx.backend}, {n} ranks" + (f", NCCL_ALGO={algo}" if algo else "")
    print0(f"bandwidth: {label}; busbw = algbw * "
           + ", ".join(f"{BUS_FACTOR[op](n):.2f} ({op})" for op in ops))
    print0(f"{'op':>10} {'size':>8} {'time us':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}")
    rows = []
    for op in ops:
        for nbytes in sizes:
            seconds = time_collective(ctx, op, nbytes)
            algbw = nbytes / seconds / 1e9  # tensor bytes per second, as nccl-tests reports it
            rows.append({"op": op, "bytes": nbytes, "seconds": seconds, "algbw": algbw,
                         "busbw": algbw * BUS_FACTOR[op](n)})
            print0(f"{op:>10} {size_text(nbytes):>8} {seconds * 1e6:10.1f} {algbw:11.3g} "
                   f"{rows[-1]['busbw']:11.3g}")
    # The timed tensors held zeros; check the largest size moves real data correctly too.
    t = torch.full((sizes[-1] // 4,), ctx.rank + 1.0, device=ctx.device)
    dist.all_reduce(t)
    assert bool((t == n * (n + 1) / 2).all()), f"rank {ctx.rank}: all_reduce of {sizes[-1]} B"
    print0(f"checked: all_reduce of {size_text(sizes[-1])} gives {n}*{n + 1}/2 in every element")
    if ctx.rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        meta = {"backend": ctx.backend, "world_size": n, "nccl_algo": algo, "label": label}
        (Path(out) / "03_bandwidth.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        plot_bandwidth(rows, meta, Path(out) / "03_bandwidth.png")
        print0(f"saved {out}/03_bandwidth.png and .json")
# --8<-- [end:bench]


def size_text(nbytes):
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def plot_bandwidth(rows, meta, path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        ax.plot([r["bytes"] for r in mine], [r["busbw"] for r in mine], "o-", label=op)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["bytes"] for r in rows], [size_text(r["bytes"]) for r in rows], rotation=45)
    ax.set(xlabel="message size", ylabel="busbw (GB/s)", title=meta["label"])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --8<-- [start:ex-03-1]
def sharded_softmax(shard: torch.Tensor) -> torch.Tensor:
    """Exercise 03.1: softmax of a vector split across the ranks. `shard` is this rank's piece
    (the pieces in rank order make the vector); return this rank's piece of softmax(vector).

    Entries are around 100, and exp(100) overflows float32. Subtract the largest entry of the
    whole vector first, as torch.softmax does.
    """
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 03.1: a MAX all_reduce, exp, a SUM all_reduce, "
                              "divide (about 7 lines)")
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
    raise NotImplementedError("Exercise 03.2: per-row MAX all_reduce, then a SUM all_reduce of "
                              "exp(logits - max) (about 7 lines)")
# --8<-- [end:ex-03-2]


def check_sharded_softmax(ctx, sharded_softmax):
    g = torch.Generator().manual_seed(SEED + 1)
    full = torch.randn(VECTOR_LEN, generator=g) * 3 + 100  # the whole vector: exp() overflows
    shard = full.tensor_split(ctx.world_size)[ctx.rank]
    yours = sharded_softmax(shard.to(ctx.device))
    expected = torch.softmax(full.double(), 0).float().tensor_split(ctx.world_size)[ctx.rank]
    return yours, expected


def check_vocab_parallel_logsumexp(ctx, vocab_parallel_logsumexp):
    g = torch.Generator().manual_seed(SEED + 2)
    full = torch.randn(3, 40, generator=g) * 3 + 100  # 3 rows, a vocabulary of 40
    mine = full.tensor_split(ctx.world_size, dim=1)[ctx.rank]
    yours = vocab_parallel_logsumexp(mine.to(ctx.device))
    return yours, torch.logsumexp(full.double(), dim=1).float()


# Exercise id -> (its check, the function you write). Check: python -m lessons.check 03
EXERCISES = {"03.1": (check_sharded_softmax, "sharded_softmax"),
             "03.2": (check_vocab_parallel_logsumexp, "vocab_parallel_logsumexp")}


def main():
    p = parser(__doc__)
    p.add_argument("--bench", action="store_true",
                   help="instead of the lesson: time collectives over message sizes, plot busbw")
    p.add_argument("--bench-ops", default="all_reduce,broadcast",
                   help="collectives to time, comma-separated (all_reduce,broadcast)")
    args = p.parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:  # course/ranks.py: rank, device, init, teardown
        # Checked after init, which the ranks leave together: torchrun stops the others soon
        # after one exits, and a rank still importing torch would never say what was wrong.
        ops = args.bench_ops.split(",")
        if unknown := [op for op in ops if op not in BUS_FACTOR]:
            usage_error(f"--bench-ops {args.bench_ops}: no collective called "
                        f"{', '.join(unknown)}. Choose from {','.join(BUS_FACTOR)}.")
        if args.bench:
            bench(ctx, ops, args.out)
            return
        tour(ctx)
        compose(ctx)
        print0("Next: exercises 03.1 and 03.2 above. Check them: python -m lessons.check 03")


if __name__ == "__main__":
    main()
