"""Lesson 00 - hello, distributed world: how N processes find each other and agree who is who.

The idea
    A distributed PyTorch program is N copies of one script. A launcher (torchrun) starts the
    copies and tells each one, through environment variables, who it is (RANK), how many there
    are (WORLD_SIZE), which copy it is on its own machine (LOCAL_RANK) and where to meet
    (MASTER_ADDR:MASTER_PORT). `init_process_group` uses that to connect them; from then on
    every collective (all_reduce, gather, ...) is a call that all ranks make together.

Run it
    torchrun --nproc-per-node 4 lessons/00_hello.py     # 4 ranks on this machine
    python lessons/00_hello.py --nproc 2                # plain python: starts 2 ranks for you
    torchrun --nproc-per-node 2 lessons/00_hello.py --init-method tcp://127.0.0.1:29400
    Two machines: on each, with its own --node-rank (README, "Several nodes"):
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 \\
             --rdzv-backend c10d --rdzv-endpoint HOST0:29400 lessons/00_hello.py

torchrun's flags
    --nproc-per-node N   ranks to start on this machine (one per GPU on a GPU box)
    --nnodes M           machines taking part; --node-rank K: which one this is (0..M-1)
    --rdzv-endpoint H:P  where the machines meet (the "rendezvous"); --rdzv-backend c10d
    --standalone         one machine: pick a free port on localhost, no endpoint needed

What you should see (4 ranks, no GPU; the port, host names and pids are yours)
    [rank 0] torchrun set RANK=0 LOCAL_RANK=0 WORLD_SIZE=4 LOCAL_WORLD_SIZE=4 GROUP_RANK=0
             MASTER_ADDR=127.0.0.1 MASTER_PORT=29500
    [rank 0] no GPU: using gloo on CPU
    [rank 0] backend gloo, world size 4
    [rank 0] checked: all_reduce(SUM) of rank+1 on 4 ranks = 10, the formula 4*5/2 gives 10
    [rank 0] checked: seeded weights are identical on all 4 ranks (with a seed per rank they
             differ by up to 0.645)
    [rank 0]       rank  local_rank  node  host    pid  device  gpu   <- gathered to rank 0
    [rank 0]          0           0     0    vm   4177     cpu    -
    [rank 0]          1           1     0    vm   4178     cpu    -
    [rank 0]          2           2     0    vm   4179     cpu    -
    [rank 0]          3           3     0    vm   4180     cpu    -
    [rank 0] Next: exercise 00.1 (mean_over_ranks above). Check it: python -m lessons.check 00
    [rank 1] torchrun set RANK=1 LOCAL_RANK=1 WORLD_SIZE=4 LOCAL_WORLD_SIZE=4 GROUP_RANK=0 ...
    ...
This lesson writes its setup out in full. Later lessons call course/ranks.py for it.
"""

import datetime
import os
import socket

import torch
import torch.distributed as dist

from course import trace

# spread(t): max minus min of t over the ranks, two all_reduce(MAX) (course/ranks.py).
from course.ranks import parser, print0, print_rank, spread, start_ranks, usage_error

SEED = 1234  # every rank seeds with the same number, so every rank builds the same weights
# What torchrun puts in each rank's environment (GROUP_RANK is the node's index).
TORCHRUN_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


# --8<-- [start:init]
def init_distributed(backend_flag, init_method, timeout_s):
    """Join the process group. Returns (rank, local_rank, world_size, device)."""
    rank = int(os.environ["RANK"])  # who I am among all ranks: my identity
    local_rank = int(os.environ["LOCAL_RANK"])  # who I am on this machine: picks my GPU
    world_size = int(os.environ["WORLD_SIZE"])
    local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])

    # NCCL moves GPU tensors and needs one GPU per rank (it refuses two ranks on one GPU);
    # gloo moves CPU tensors and runs anywhere. So: NCCL only if every local rank gets a GPU.
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend_flag == "nccl" and gpus < local_world_size:
        usage_error(
            f"--backend nccl needs one GPU per local rank: {local_world_size} local "
            f"ranks but {gpus} GPUs. "
            + (
                f"Start at most {gpus} ranks, or use --backend gloo."
                if gpus
                else "Use --backend gloo, or auto."
            )
        )
    use_nccl = backend_flag == "nccl" or (backend_flag == "auto" and 0 < local_world_size <= gpus)
    if use_nccl:
        device = torch.device("cuda", local_rank)  # LOCAL_RANK, not RANK: node 2 has GPU 0 too
        torch.cuda.set_device(device)  # before any CUDA work, so nothing lands on GPU 0
    else:
        device = torch.device("cpu")
        if backend_flag == "auto":
            print0(
                "no GPU: using gloo on CPU"
                if gpus == 0
                else f"{local_world_size} local ranks but {gpus} GPUs: using gloo on CPU"
            )

    # env:// (the default) meets at MASTER_ADDR:MASTER_PORT, the store torchrun already runs.
    # tcp://host:port names a meeting point yourself: rank 0 listens there, the others connect.
    # Under torchrun every rank would be a client of that address, waiting for a store nobody
    # starts, so say that rank 0 hosts it, as it does when you start processes yourself (07).
    if init_method.startswith("tcp://"):
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    try:
        dist.init_process_group(
            "nccl" if use_nccl else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if use_nccl else None,
        )  # device_id: create NCCL's communicator now
    except dist.DistNetworkError as err:
        if "EADDRINUSE" in str(err):
            usage_error(
                f"{init_method}: that port is already in use on this machine. Pick "
                "another port, or leave out --init-method and let torchrun --standalone "
                "pick a free one.",
                every_rank=False,
            )  # only rank 0 listens there
        raise
    if use_nccl:
        # The first NCCL collective sets up connections (~150 ms); pay that here, not in the
        # first thing you time. device_ids tells barrier which GPU this rank uses.
        dist.barrier(device_ids=[local_rank])
    return rank, local_rank, world_size, device


# --8<-- [end:init]


# --8<-- [start:all_reduce]
def all_reduce_check(rank, world_size, device):
    """Every rank contributes rank+1; SUM gives 1+2+...+N = N(N+1)/2 on every rank."""
    value = torch.tensor([rank + 1.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.SUM)  # in place: `value` now holds the sum
    expected = world_size * (world_size + 1) / 2  # the single-process answer
    assert value.item() == expected, f"rank {rank}: all_reduce gave {value.item()}, not {expected}"
    print0(
        f"checked: all_reduce(SUM) of rank+1 on {world_size} ranks = {value.item():g}, "
        f"the formula {world_size}*{world_size + 1}/2 gives {expected:g}"
    )


# --8<-- [end:all_reduce]


# --8<-- [start:seeding]
def seeding_check(rank, world_size, device):
    """Same seed on every rank -> same initial weights: no broadcast needed to start in sync."""
    torch.manual_seed(SEED + rank)  # the mistake: a different seed per rank
    unseeded = torch.nn.Linear(8, 8).to(device).weight.detach()
    torch.manual_seed(SEED)  # the fix: one seed for all ranks
    seeded = torch.nn.Linear(8, 8).to(device).weight.detach()
    assert spread(seeded) == 0.0, f"rank {rank}: seeded weights differ across ranks"
    assert world_size == 1 or spread(unseeded) > 0.0
    print0(
        f"checked: seeded weights are identical on all {world_size} ranks "
        f"(with a seed per rank they differ by up to {spread(unseeded):.3f})"
    )


# --8<-- [end:seeding]


# --8<-- [start:gather]
def gather_host_info(rank, local_rank, device):
    """Every rank describes itself; gather_object collects the descriptions on rank 0."""
    me = {
        "rank": rank,
        "local_rank": local_rank,
        "node": int(os.environ.get("GROUP_RANK", 0)),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "-",
    }
    everyone = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(me, everyone, dst=0)  # a collective: every rank must call it
    if rank == 0:
        keys = list(me)
        print0("  ".join(f"{k:>10}" for k in keys))
        for row in everyone:
            print0("  ".join(f"{str(row[k]):>10}" for k in keys))


# --8<-- [end:gather]


# --8<-- [start:ex-00-1]
def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Exercise 00.1: return the element-wise mean of `x` over all ranks, on every rank.

    Leave the caller's `x` as it was: all_reduce works in place.
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 00.1: average x over all ranks with one all_reduce, "
        "without changing x (about 3 lines)"
    )


# --8<-- [end:ex-00-1]


def main():
    p = parser(__doc__)
    p.add_argument(
        "--init-method",
        default="env://",
        help="env:// (torchrun's MASTER_ADDR/PORT) or tcp://HOST:PORT",
    )
    args = p.parse_args()
    if "RANK" not in os.environ:  # plain python: run this file on N ranks, as torchrun would
        start_ranks(args.nproc)
    print_rank("torchrun set " + " ".join(f"{k}={os.environ.get(k)}" for k in TORCHRUN_VARS))
    if args.debug:  # name mismatched collectives; read at import, so set the level directly
        os.environ["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
        dist.set_debug_level(dist.DebugLevel.DETAIL)
    # --timeout (60 s by default): a collective that waits longer fails instead of hanging.
    rank, local_rank, world_size, device = init_distributed(
        args.backend, args.init_method, 10 if args.debug else args.timeout
    )
    try:  # teardown below runs however this block ends
        with trace.recording(args.trace):  # --trace DIR: a timeline of the collectives below
            print0(f"backend {dist.get_backend()}, world size {dist.get_world_size()}")
            all_reduce_check(rank, world_size, device)
            seeding_check(rank, world_size, device)
            gather_host_info(rank, local_rank, device)
            print0(
                "Next: exercise 00.1 (mean_over_ranks above). Check it: python -m lessons.check 00"
            )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
