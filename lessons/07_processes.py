"""Lesson 07 - processes: fork vs spawn, threads vs processes, and a world of your own.

The idea
    A rank can start processes too, and real systems do: a teacher or an inference engine is a
    child process with a process group, a "world", of its own. How the child is started decides
    what it gets. fork copies the parent: memory, globals, and torch.distributed's bookkeeping
    (dist.is_initialized() says True), but not the group's threads and connections, and not a
    usable CUDA context. spawn starts a fresh interpreter that imports what it needs: an
    `import torch` per child (1-2 s here), but clean. Threads? The GIL runs one thread's Python
    at a time, so compute needs processes; but a thread waiting on a socket or a collective
    releases the GIL: weight-sync code drives many transfers from a thread pool.
    Without torchrun: multiprocessing.Process + init_process_group(init_method="tcp://HOST:PORT",
    rank=r, world_size=n), or torch.multiprocessing.spawn(fn, nprocs=n), whose join() re-raises
    a child's error and stops the rest. torchrun adds the rendezvous, restarts, and stopping
    every rank when one dies.

Run it
    torchrun --nproc-per-node 4 lessons/07_processes.py
    python lessons/07_processes.py --nproc 2          # plain python: starts torchrun for you
    torchrun --nproc-per-node 4 lessons/07_processes.py --children fork    # see the refusal

What you should see (4 ranks, no GPU; pids, ports and timings are yours)
    [rank 0] forked child: MARK='changed by rank 0', dist.is_initialized()=True, dist.get_rank()=0
    [rank 0] checked: a forked child inherits memory and the group's bookkeeping, a spawned ...
    [rank 0]     rank 1  torch.multiprocessing.spawn      0      2  [1, 1]                30
    [rank 0] GIL: one pure-Python loop 4 times: in 1 thread 0.40 s, in 4 threads 0.41 s, ...
Rank setup comes from course/ranks.py (lesson 00 writes it out); starting children is this lesson.
"""
import importlib
import multiprocessing
import os
import queue
import socket
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from course.ranks import EVEN, parser, print0, setup, usage_error

NEEDS = EVEN  # the exercise splits the ranks into two roles of equal size
CHILDREN = 2  # children in each demonstration world; each spawned one pays for `import torch`
CHILD_TIMEOUT_S = 60  # the longest a child may take to start, meet its world and report
UNIT_S = 0.1  # seconds of pure Python each worker runs in the GIL measurement
WORKERS = 4  # threads vs processes: how many of each
WAIT_S = 0.3  # how long rank 1 makes rank 0 wait for a tensor in the threads-for-waiting demo
MARK = "as imported"  # a module global; rank 0 changes it, then forks
# torchrun's variables. A child inherits its parent's environment; with these in it, the child
# would take itself for that rank (RANK, MASTER_PORT), and TORCHELASTIC_USE_AGENT_STORE would make
# every child a client of a tcp:// store that nobody hosts, waiting for it until its timeout.
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT")  # and every TORCHELASTIC_* variable


def free_port():
    """A port nobody listens on now: the OS picks it (port 0). Never a fixed number."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_or_stop(children):
    """Join every child; one still running after CHILD_TIMEOUT_S is terminated: none outlives us."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.terminate()
            child.join()


def importable(fn):
    """spawn sends a child the function's module and name, and the child imports it. This file
    runs as __main__ under torchrun and under another name in exercise checks; the name that
    imports anywhere is lessons.07_processes (importlib allows the leading digit)."""
    return getattr(importlib.import_module("lessons.07_processes"), fn.__name__)


# --8<-- [start:child]
def child_world(index, port, size, parent, values, reports):
    """In the child: join a world of `size` children on `port` as rank `index`, and report."""
    dropped = sorted(k for k in os.environ if k in TORCHRUN_VARS or k.startswith("TORCHELASTIC_"))
    for k in dropped:
        del os.environ[k]
    report = {"index": index, "parent": parent, "pid": os.getpid(), "MARK": MARK,
              "initialised at start": dist.is_initialized(), "dropped": dropped}
    try:  # tcp://: rank 0 of this world hosts the store on `port`; the others connect to it
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=index,
                                world_size=size, timeout=timedelta(seconds=CHILD_TIMEOUT_S))
        parents = [None] * size
        dist.all_gather_object(parents, parent)  # who started each child of this world?
        total = torch.tensor([values[index]])
        dist.all_reduce(total)
        report.update(world=dist.get_world_size(), parents=parents, sum=total.item())
    except Exception as err:  # reported: the parent names this child and what went wrong
        report["error"] = f"{type(err).__name__}: {err}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    reports.put(report)


def collect(reports, processes, count):
    """Wait for `count` reports, bounded; fail at once, naming the child, if one dies first."""
    got, deadline = [], time.monotonic() + CHILD_TIMEOUT_S
    while len(got) < count:
        try:
            got.append(reports.get(timeout=0.2))
        except queue.Empty:
            dead = [p.pid for p in processes if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"rank {dist.get_rank()}: child process(es) {dead or 'all'} "
                                   f"did not report within {CHILD_TIMEOUT_S} s") from None
    if errors := [f"child {r['index']}: {r['error']}" for r in got if "error" in r]:
        raise RuntimeError(f"rank {dist.get_rank()}: " + "; ".join(errors))
    return sorted(got, key=lambda r: r["index"])


def start_children(method, port, size, values):
    """One child per entry of `values` ({rank in the new world: the number it adds to the
    all_reduce}), in a world of `size` on `port`; returns their reports. Two ways to start them:
    multiprocessing.Process with start method `method` ("spawn" or "fork"), or, for method
    "torch.multiprocessing.spawn", that function: child_world(i, ...) for i in range(size), each
    in a fresh interpreter. join=False: this rank collects the reports while they run (its
    join() would re-raise a child's exception; here the children report their own errors)."""
    args, children = (port, size, dist.get_rank(), values), []
    try:
        if method == "torch.multiprocessing.spawn":
            reports = torch_mp.get_context("spawn").Queue()
            children = torch_mp.spawn(importable(child_world), nprocs=size, join=False,
                                      args=(*args, reports)).processes
        else:
            context = multiprocessing.get_context(method)
            reports = context.Queue()
            children = [context.Process(target=importable(child_world), args=(i, *args, reports))
                        for i in values]
            for child in children:
                child.start()
        return collect(reports, children, len(children))
    finally:  # every child joined, or stopped: none outlives this rank
        join_or_stop(children)
# --8<-- [end:child]


# --8<-- [start:fork]
def why_not_fork():
    """None if a child forked now could make a world of its own; else what stops it, and the fix."""
    problems = []
    if dist.is_initialized():
        problems.append("this rank has joined a process group, and a forked child inherits its "
                        "bookkeeping: init_process_group in the child fails with 'trying to "
                        "initialize the default process group twice!'")
    if torch.cuda.is_initialized():  # the way to know before you fork
        problems.append("CUDA is initialised in this rank, and a forked child cannot use it: "
                        "'Cannot re-initialize CUDA in forked subprocess'")
    if not problems:
        return None
    return ("; and ".join(problems) + ". Start children with spawn (--children spawn, the "
            "default), or fork them before init_process_group and before the first CUDA call.")


def fork_probe(conn, try_cuda):
    """In a forked child: what did it inherit? (Never run a collective here: the group's
    sockets are the parent's, and writing to them would corrupt the parent's traffic.)"""
    seen = {"MARK": MARK, "initialised": dist.is_initialized(), "rank": dist.get_rank()}
    try:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:1", rank=0, world_size=1)
        seen["own world"] = "created"
    except ValueError as err:  # raised before any connection is attempted
        seen["own world"] = f"ValueError: {err}"
    if try_cuda:  # the parent had initialised CUDA: the error, live
        try:
            torch.zeros(1, device="cuda")
            seen["cuda"] = "worked"
        except RuntimeError as err:
            seen["cuda"] = f"RuntimeError: {str(err).splitlines()[0]}"
    conn.send(seen)


def fork_and_look():
    """Rank 0 changes a global, forks a child and asks it what it sees."""
    global MARK
    MARK = "changed by rank 0"
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    # No pickling: the child is a copy of this process, fork_probe included.
    child = context.Process(target=fork_probe, args=(theirs, torch.cuda.is_initialized()))
    child.start()
    try:
        if not ours.poll(CHILD_TIMEOUT_S):
            raise RuntimeError(f"the forked child {child.pid} said nothing in {CHILD_TIMEOUT_S} s")
        return ours.recv()
    finally:
        join_or_stop([child])
# --8<-- [end:fork]


# --8<-- [start:gil]
def spin(n):
    """Pure Python: holds the GIL the whole time."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def gil_timings():
    """WORKERS x UNIT_S of pure Python three ways: one thread doing it all, WORKERS threads,
    WORKERS processes. Returns the loop length that takes UNIT_S here, and the three times."""
    start = time.perf_counter()
    spin(100_000)
    n = int(100_000 * UNIT_S / (time.perf_counter() - start))
    fork = multiprocessing.get_context("fork")  # cheap here: the children touch no torch state
    times = []
    for workers in ([threading.Thread(target=lambda: [spin(n) for _ in range(WORKERS)])],
                    [threading.Thread(target=spin, args=(n,)) for _ in range(WORKERS)],
                    [fork.Process(target=spin, args=(n,)) for _ in range(WORKERS)]):
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=CHILD_TIMEOUT_S)  # a thread or process, spinning for UNIT_S
        times.append(time.perf_counter() - start)
        join_or_stop([w for w in workers if isinstance(w, multiprocessing.process.BaseProcess)])
    return n, times


def wait_in_a_thread(rank, group, unit_n):
    """Rank 0 receives in a thread while its main thread computes; rank 1 sends after WAIT_S.
    Returns (what rank 0 got, seconds of Python, seconds in all) on rank 0, None elsewhere."""
    payload = torch.arange(4.0)
    dist.barrier(group=group)  # start the clock together
    if rank == 1:
        time.sleep(WAIT_S)  # rank 1 is slow: its tensor is ready after WAIT_S
        dist.send(payload, dst=0, group=group)
    if rank != 0:
        return None
    got = torch.zeros(4)
    start = time.perf_counter()
    receiver = threading.Thread(target=dist.recv, args=(got,), kwargs={"src": 1, "group": group})
    receiver.start()
    spin(int(unit_n * WAIT_S / UNIT_S))  # meanwhile, ~WAIT_S of Python; the waiting thread lets it
    computed = time.perf_counter() - start
    receiver.join(timeout=CHILD_TIMEOUT_S)
    return got, computed, time.perf_counter() - start
# --8<-- [end:gil]


# --8<-- [start:ex-07-1]
def start_role_world(role_ranks, value):
    """Exercise 07.1: one world per role, started from inside each rank.

    `role_ranks` lists the ranks that share this rank's role (students or teachers), this rank
    among them. With start_children(), start one child that joins a world of exactly one child
    per rank in `role_ranks`, on a free port of that role's own, and adds `value` there. Return
    {"parents": the parent ranks the child saw, "sum": its all_reduce result}. Every rank of the
    default group calls this at the same time.
    """
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 07.1: agree on one free port per role through the default "
                              "group, then start_children(\"spawn\", ...) (about 5 lines)")
# --8<-- [end:ex-07-1]


def check_role_worlds(ctx, start_role_world):
    """Runs on every rank: the first half are students, the second half teachers."""
    half = ctx.world_size // 2
    role_ranks = list(range(half)) if ctx.rank < half else list(range(half, ctx.world_size))
    value = 10.0 ** ctx.rank  # the sum's digits say which ranks' children were in the world
    yours = start_role_world(role_ranks, value)
    expected = {"parents": role_ranks, "sum": sum(10.0 ** r for r in role_ranks)}
    return yours, expected


# Exercise id -> (its check, the function(s) you write). Check: python -m lessons.check 07
EXERCISES = {"07.1": (check_role_worlds, "start_role_world")}


def main():
    p = parser(__doc__)
    p.add_argument("--children", choices=["spawn", "fork"], default="spawn",
                   help="how ranks start their children (fork: see why it is refused)")
    args = p.parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        if args.children == "fork" and (why := why_not_fork()):  # each rank, before any child
            usage_error(f"--children fork: {why}")
        # Threads-for-waiting sends CPU tensors: under NCCL that needs a gloo group of its own.
        cpu_group = (dist.new_group(backend="gloo", timeout=ctx.timeout)
                     if ctx.backend == "nccl" else None)

        if ctx.rank == 0:  # fork anyway, to see what a forked child inherits
            print0(f"before forking, why_not_fork() says: {why_not_fork()}")
            seen = fork_and_look()
            print0(f"forked child: MARK={seen['MARK']!r}, dist.is_initialized()="
                   f"{seen['initialised']}, dist.get_rank()={seen['rank']}")
            print0(f"forked child: its own init_process_group -> {seen['own world']}")
            print0(f"forked child: CUDA -> {seen['cuda']}" if "cuda" in seen else
                   "forked child: CUDA not tried: not initialised here (no GPU). On a GPU rank "
                   "it is, and the child gets 'Cannot re-initialize CUDA in forked subprocess'")

        # Two worlds of children at once, next to this one: rank 0 starts its children with
        # multiprocessing.Process, rank 1 with torch.multiprocessing.spawn. Child i adds
        # (i+1) * 10^rank. Ports: free ones, picked by rank 0 and shared through this world.
        ports = [free_port(), free_port()] if ctx.rank == 0 else [None, None]
        dist.broadcast_object_list(ports, src=0)
        values = {i: (i + 1) * 10.0 ** ctx.rank for i in range(CHILDREN)}
        method = {0: args.children, 1: "torch.multiprocessing.spawn"}.get(ctx.rank)
        mine = start_children(method, ports[ctx.rank], CHILDREN, values) if method else []
        everyone = [None] * ctx.world_size if ctx.rank == 0 else None
        dist.gather_object(mine, everyone, dst=0)

        if ctx.rank == 0:
            spawned = everyone[0][0]
            assert seen["MARK"] == "changed by rank 0" and seen["initialised"], f"rank 0: {seen}"
            assert spawned["MARK"] == "as imported" and not spawned["initialised at start"]
            print0(f"spawned child: MARK={spawned['MARK']!r}, dist.is_initialized()=False; it "
                   f"dropped the torchrun variables it inherited: {', '.join(spawned['dropped'])}")
            print0("checked: a forked child inherits memory and the group's bookkeeping, a "
                   "spawned one starts fresh")
            print0(f"{'started by':>10}  {'with':<28} child  world  parents seen  all_reduce")
            for parent, how in ((0, "multiprocessing.Process"), (1, "torch.multiprocessing.spawn")):
                expected = sum((i + 1) * 10.0 ** parent for i in range(CHILDREN))
                for r in everyone[parent]:
                    assert r["parents"] == [parent] * CHILDREN and r["sum"] == expected, \
                        f"rank 0: child {r['index']} of rank {parent}: {r}, expected {expected}"
                    print0(f"{'rank ' + str(parent):>10}  {how:<28} {r['index']:>5}  "
                           f"{r['world']:>5}  {str(r['parents']):<12}  {r['sum']:>10g}")
            print0(f"child pids: {[r['pid'] for rows in everyone[:2] for r in rows]}")
            print0(f"checked: 2 worlds of {CHILDREN} children next to this world of "
                   f"{ctx.world_size}: each saw only its own parents and summed only its own "
                   "values")

        unit_n = None
        if ctx.rank == 0:  # the others wait at the barrier in wait_in_a_thread, using no CPU
            unit_n, (serial, threads, processes) = gil_timings()
            print0(f"GIL: one pure-Python loop {WORKERS} times: in 1 thread {serial:.2f} s, in "
                   f"{WORKERS} threads {threads:.2f} s, in {WORKERS} processes {processes:.2f} s "
                   f"({len(os.sched_getaffinity(0))} cores)")
        waited = wait_in_a_thread(ctx.rank, cpu_group, unit_n)
        if ctx.rank == 0:
            got, computed, took = waited
            assert torch.equal(got, torch.arange(4.0)), f"rank 0: received {got}"
            print0(f"a thread waited in dist.recv for a tensor sent after {WAIT_S:.2f} s while the "
                   f"main thread ran {computed:.2f} s of Python: {took:.2f} s in all, not "
                   f"{WAIT_S + computed:.2f}")
            print0("checked: the tensor received in a thread matches what rank 1 sent")
        print0("Next: exercise 07.1 (start_role_world above). Check it: python -m lessons.check 07")


if __name__ == "__main__":
    main()
