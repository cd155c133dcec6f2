"""Lesson 07 - processes: fork vs spawn, threads vs processes, and a world of your own.

The idea
    Real systems start processes from inside a rank: a teacher or an inference engine is a child
    with a process group, a "world", of its own. fork copies the parent: memory, globals and
    torch.distributed's bookkeeping, but not the group's threads and connections, nor a usable
    CUDA context. spawn starts a fresh interpreter: clean, for an `import torch` per child. The
    GIL runs one thread's Python at a time, so compute needs processes, but a thread waiting in a
    collective lets the others run. Without torchrun: torch.multiprocessing.start_processes, and
    init_process_group(init_method="tcp://HOST:PORT", rank=r, world_size=n) in each child.

Run it
    torchrun --nproc-per-node 4 lessons/07_processes.py
    python lessons/07_processes.py --nproc 2          # plain python: starts torchrun for you
    torchrun --nproc-per-node 4 lessons/07_processes.py --children fork    # see the refusal

What you should see (4 ranks, no GPU; pids and timings are yours)
    [rank 0] no GPU: using gloo on CPU
    [rank 0] what the child sees   spawned                 forked
    [rank 0] MARK                  'as imported'           'changed by rank 0'
    [rank 0] dist.is_initialized() False                   True
    [rank 0] a world of its own    created: rank 0 of 1    ValueError: trying to initialize the
             default process group twice!
    [rank 0] CUDA                  not tried: no GPU       not tried: no GPU
    [rank 0] both dropped the torchrun variables they inherited: ['GROUP_RANK', ...
             'TORCHELASTIC_USE_AGENT_STORE', 'WORLD_SIZE']
    [rank 0] checked: fork inherits memory and the group's bookkeeping, spawn starts fresh
    [rank 0] checked: children [21889, 21890] saw parents [0, 0], sum 3
    [rank 0] GIL: 4 Python loops in 1 thread 0.63 s, 4 threads 0.60 s, 4 processes 0.38 s (2 cores)
    [rank 0] processes took 0.63 of the threads' time: ...  <- in parallel, or why not here
    [rank 0] meanwhile a thread waited in dist.recv for a tensor sent at 1.00 s: 1.97 s in all,
             not 2.91
    [rank 0] checked: the tensor received in a thread matches what rank 1 sent
    [rank 0] Next: exercise 07.1 (start_role_world above). Check it: python -m lessons.check 07
    [rank 1] checked: children [21858, 21861] saw parents [1, 1], sum 30
Rank setup comes from course/ranks.py (lesson 00 writes it out); starting children is this lesson.
"""

import contextlib
import importlib
import multiprocessing
import os
import random
import socket
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from course.ranks import EVEN, parser, print0, print_rank, setup, usage_error

NEEDS = EVEN  # the exercise splits the ranks into two roles of equal size
CHILDREN = 2  # children in each demonstration world; each spawned one pays for `import torch`
TIMEOUT = timedelta(seconds=60)  # the longest a child's rendezvous or collective may wait
LOOP = 1_000_000  # a pure-Python loop of about 0.1 s, run WORKERS times in the GIL measurement
WORKERS = 4  # threads vs processes: how many of each
WAIT_S = 1.0  # how long rank 1 makes rank 0's waiting thread wait for its tensor
MARK = "as imported"  # a module global; rank 0 changes it, then forks
# torchrun's variables, and TORCHELASTIC_*: with its parent's RANK a child takes itself for it; with
# TORCHELASTIC_USE_AGENT_STORE its tcp:// rendezvous waits for a store that nobody hosts.
TORCHRUN_VARS = """RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE
    ROLE_RANK ROLE_NAME ROLE_WORLD_SIZE MASTER_ADDR MASTER_PORT""".split()


def free_port():
    """Never a fixed number; below Linux's ephemeral ports (32768 up): no connection takes it."""
    for port in random.sample(range(20000, 32768), 1000):
        with contextlib.suppress(OSError), socket.create_server(("127.0.0.1", port)):
            return port


def importable(fn):  # fn as a spawned child can import it (this file is __main__ under torchrun)
    return getattr(importlib.import_module("lessons.07_processes"), fn.__name__)


# --8<-- [start:child]
def drop_torchrun_vars():
    """In a child: forget the torchrun variables inherited from the parent; returns their names."""
    dropped = sorted(k for k in os.environ if k in TORCHRUN_VARS or k.startswith("TORCHELASTIC_"))
    for k in dropped:
        del os.environ[k]
    return dropped


def child_world(i, port, size, parent, mine, reports):
    """Child i of rank `parent`: join a world of `size` children on `port` as rank mine[i][0],
    add mine[i][1] there, and report what it saw. An error ends the child: its parent raises it."""
    index, value = mine[i]
    drop_torchrun_vars()
    url = f"tcp://127.0.0.1:{port}"  # rank 0 of this world hosts the store there; the rest join
    dist.init_process_group("gloo", init_method=url, rank=index, world_size=size, timeout=TIMEOUT)
    try:
        parents = [None] * size
        dist.all_gather_object(parents, parent)  # who started each child of this world?
        total = torch.tensor([value])
        dist.all_reduce(total)
        reports.put({"index": index, "pid": os.getpid(), "parents": parents, "sum": total.item()})
    finally:
        dist.destroy_process_group()


def start_children(method, port, size, values):
    """One child per entry of `values` ({its rank in a world of `size` on `port`: what it adds}),
    started by `method`; their reports. A child's error is raised here, the others stopped."""
    reports = multiprocessing.get_context(method).SimpleQueue()  # each child puts one report
    args = (port, size, dist.get_rank(), list(values.items()), reports)
    torch_mp.start_processes(importable(child_world), args, len(values), start_method=method)
    return sorted((reports.get() for _ in values), key=lambda report: report["index"])
    # --8<-- [end:child]


# --8<-- [start:fork]
def why_not_fork():
    """None if a child forked now could make a world of its own; else what stops it, and the fix."""
    problems = []
    if dist.is_initialized():  # its init_process_group: "... default process group twice!"
        problems.append("this rank joined a process group: a forked child inherits its bookkeeping")
    if torch.cuda.is_initialized():  # the way to know before you fork
        problems.append("CUDA is initialised in this rank: a forked child cannot use it")
    fix = "Start children with spawn (--children spawn, the default), or fork them before "
    fix += "init_process_group and before the first CUDA call."
    return f"{'; and '.join(problems)}. {fix}" if problems else None


def probe():
    """In a child: what did it inherit? (Never run a collective in a forked child: the group's
    sockets are the parent's, and writing to them would corrupt the parent's traffic.)"""
    dropped = drop_torchrun_vars()
    seen = {"MARK": repr(MARK), "dist.is_initialized()": dist.is_initialized()}
    try:  # in a forked child this fails at once, before any connection is attempted
        url = f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group("gloo", init_method=url, rank=0, world_size=1)
        seen["a world of its own"] = f"created: rank {dist.get_rank()} of {dist.get_world_size()}"
        dist.destroy_process_group()
    except ValueError as err:
        seen["a world of its own"] = f"ValueError: {err}"
    seen["CUDA"] = "not tried: no GPU"
    try:  # a forked child of a rank that has initialised CUDA gets the error, live
        if torch.cuda.is_available():
            seen["CUDA"] = f"works: {torch.zeros(1, device='cuda').device}"
    except RuntimeError as err:
        seen["CUDA"] = f"RuntimeError: {str(err).splitlines()[0]}"
    return seen, dropped


def fork_vs_spawn():
    """Rank 0: change a global, start a child each way (a pool of one), compare what they see."""
    global MARK
    MARK = "changed by rank 0"
    seen = {}
    for method in ("spawn", "fork"):
        with multiprocessing.get_context(method).Pool(1) as child:  # `with` ends: child stopped
            fn = probe if method == "fork" else importable(probe)  # fork: this module, as it is
            asked = child.apply_async(fn)
            seen[method], dropped = asked.get(TIMEOUT.total_seconds())
    assert seen["fork"]["MARK"] == repr(MARK) and seen["fork"]["dist.is_initialized()"], seen
    assert seen["spawn"]["MARK"] == "'as imported'" and not seen["spawn"]["dist.is_initialized()"]
    print0(f"{'what the child sees':<22}{'spawned':<24}forked")
    for key, spawned in seen["spawn"].items():
        print0(f"{key:<22}{spawned!s:<24}{seen['fork'][key]}")
    print0(f"both dropped the torchrun variables they inherited: {dropped}")
    print0("checked: fork inherits memory and the group's bookkeeping, spawn starts fresh")
    # --8<-- [end:fork]


# --8<-- [start:gil]
def spin(n):  # pure Python: holds the GIL the whole time
    return sum(i * i for i in range(n))


def threads_or_processes(rank, group):
    """Rank 0 runs WORKERS pure-Python loops in 1 thread, WORKERS threads, WORKERS processes
    (start-up included), while a thread waits in dist.recv for what rank 1 sends after WAIT_S.
    The others wait in a barrier: all measuring at once, they would take the cores it needs."""
    pair = dist.new_group([0, 1], backend="gloo", timeout=TIMEOUT)  # p2p apart: --debug counts
    dist.barrier(group=group)  # start the clock together
    if rank == 1:
        time.sleep(WAIT_S)  # rank 1 is slow: its tensor is ready after WAIT_S
        dist.send(torch.arange(4.0), dst=0, group=pair)
    if rank != 0:
        return dist.barrier(group=group)  # idle until rank 0 has measured
    got, start = torch.zeros(4), time.perf_counter()
    receiver = threading.Thread(target=dist.recv, args=(got, 1, pair))
    receiver.start()  # it waits, without the GIL, while this thread runs the loops
    fork = multiprocessing.get_context("fork")  # cheap here: the children touch no torch state
    pools = ThreadPoolExecutor(1), ThreadPoolExecutor(WORKERS), ProcessPoolExecutor(WORKERS, fork)
    times = []
    for pool in pools:
        with pool:
            lap = time.perf_counter()
            list(pool.map(spin, [LOOP] * WORKERS))
            times.append(time.perf_counter() - lap)
    receiver.join(timeout=TIMEOUT.total_seconds())
    took = time.perf_counter() - start
    dist.barrier(group=group)  # the others may go on
    assert torch.equal(got, torch.arange(4.0)), f"rank 0: received {got}"
    cores, ratio = len(os.sched_getaffinity(0)), times[2] / times[1]
    loops = f"{WORKERS} Python loops in 1 thread {times[0]:.2f} s, {WORKERS} threads"
    print0(f"GIL: {loops} {times[1]:.2f} s, {WORKERS} processes {times[2]:.2f} s ({cores} cores)")
    why = f"no faster here: {cores} core(s), shared with whatever else runs, and each process "
    why += "starts up; on free cores processes run at once, threads never do"  # what we measured
    why = "they ran in parallel, threads took turns at the GIL" if ratio < 0.9 else why
    print0(f"processes took {ratio:.2f} of the threads' time: {why}")
    late = f"a tensor sent at {WAIT_S:.2f} s: {took:.2f} s in all, not {sum(times) + WAIT_S:.2f}"
    print0(f"meanwhile a thread waited in dist.recv for {late}")
    print0("checked: the tensor received in a thread matches what rank 1 sent")
    # --8<-- [end:gil]


# --8<-- [start:ex-07-1]
def start_role_world(role_ranks, value):
    """Exercise 07.1: every rank calls this at once. With start_children(), start one child in
    a world of one child per rank of `role_ranks` (this rank's role, this rank among them), on a
    free port of that role's own; it adds `value` there. Return {"parents": the parent ranks the
    child saw, "sum": its all_reduce result}."""
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 07.1: a port per role, then start_children (about 5 lines)")
    # --8<-- [end:ex-07-1]


def main():
    p = parser(__doc__)
    p.add_argument("--children", choices=["spawn", "fork"], default="spawn", help="fork: refused")
    args = p.parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        if args.children == "fork" and (why := why_not_fork()):  # each rank, before any child
            usage_error(f"--children fork: {why}")
        if ctx.rank == 0:
            fork_vs_spawn()

        # Ranks 0 and 1 each start a world of children, on a free port; child i adds (i+1)*10^rank.
        if ctx.rank < 2:
            values = {i: (i + 1) * 10.0**ctx.rank for i in range(CHILDREN)}
            mine = start_children(args.children, free_port(), CHILDREN, values)
            parents, sums = {str(r["parents"]) for r in mine}, {r["sum"] for r in mine}
            assert parents == {str([ctx.rank] * CHILDREN)} and sums == {sum(values.values())}
            pids = [r["pid"] for r in mine]
            print_rank(f"checked: children {pids} saw parents {parents.pop()}, sum {sums.pop():g}")

        cpu_group = dist.new_group(backend="gloo", timeout=ctx.timeout)  # CPU tensors, even on NCCL
        threads_or_processes(ctx.rank, cpu_group)
        print0("Next: exercise 07.1 (start_role_world above). Check it: python -m lessons.check 07")


if __name__ == "__main__":
    main()
