"""rpc_demo's launcher: starts every student and teacher as a child process, watches them, and
makes sure none outlives it.

Why its own launcher, not torchrun? torchrun makes ONE world and stops every rank as soon as one
dies. rpc_demo needs two worlds (and RPC between them), and when a teacher dies its students
must live long enough to notice and name it. The launcher picks a port for each world, forks
the processes (fast: they inherit the imported torch), and when something fails it waits for
the students (they fail on their own within --rpc-timeout), then stops the teachers.
Everything runs on this machine, on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import socket
import sys
import time
from collections.abc import MutableSequence
from multiprocessing.process import BaseProcess
from typing import NoReturn

import torch
import torch.distributed as dist

from rpc_demo.worlds import DEAD, DONE, SHUTDOWN_TIMEOUT_S, STAGES

GRACE_S = 5.0  # beyond the students' own bounds, before the launcher stops what is left
STOP_S = 5.0  # after SIGTERM, how long a process has to end before SIGKILL


def say(message: str) -> None:
    sys.stdout.write(f"[launcher] {message}\n")
    sys.stdout.flush()


def refuse(message: str) -> NoReturn:
    """A mistake in how rpc_demo was started: said before any process starts, exit code 2."""
    say(f"error: {message}")
    raise SystemExit(2)


# --8<-- [start:why-not-fork]
def why_not_fork() -> str | None:
    """None if children forked now can build worlds of their own; else what stops them, and
    the fix. (Lesson 07 shows both failures live.)"""
    problems = []
    if torch.cuda.is_initialized():  # e.g. a notebook that used the GPU, then called launch()
        problems.append(
            "CUDA is initialised in this process, and a forked child cannot use it "
            "('Cannot re-initialize CUDA in forked subprocess')"
        )
    if dist.is_initialized():
        problems.append(
            "this process has joined a process group, and a forked child inherits "
            "its bookkeeping ('trying to initialize the default process group "
            "twice!')"
        )
    if not problems:
        return None
    return (
        "; and ".join(problems) + ". Fix: start the processes with spawn (--start spawn, "
        "or args.start = 'spawn'), or launch before anything touches CUDA or joins a group"
    )


# --8<-- [end:why-not-fork]


def choose_backend(requested: str, args: argparse.Namespace) -> str:
    """NCCL (a GPU per process, GPU index = rank) if there are enough GPUs, else gloo on CPU.
    --backend nccl with fewer GPUs: students and teachers share them (worlds.gpu_index), as
    long as each role's world has a GPU per process; not for --bench, whose p2p half puts
    everyone in one NCCL world. device_count() asks NVML, which leaves CUDA uninitialised
    here: the children can fork."""
    gpus, processes = torch.cuda.device_count(), args.students + args.teachers
    if requested == "nccl" and gpus < processes and args.bench:
        refuse(
            f"--backend nccl --bench needs a GPU per process (its p2p half is one NCCL world "
            f"of all {processes}), and there are {gpus}. Start fewer students and teachers, "
            "train without --bench (students and teachers then share GPUs), or use "
            "--backend gloo"
        )
    if requested == "nccl" and gpus < max(args.students, args.teachers):
        refuse(
            f"--backend nccl needs a GPU per student and per teacher at least (with fewer "
            f"than {processes} GPUs they share them): {args.students} students, "
            f"{args.teachers} teachers, {gpus} GPUs. Start fewer, or use --backend gloo"
        )
    if requested == "nccl" or (requested == "auto" and 0 < processes <= gpus):
        return "nccl"
    return "gloo"


def bind(sock: socket.socket, port: int) -> None:
    """Bind `port`; for 0, a free port outside the range Linux takes outgoing connections' ports
    from (32768-60999), where port 0's come from too: any connection made before the world binds
    its port (hundreds, when tests run side by side) could take it first."""
    for _ in range(0 if port else 50):
        with contextlib.suppress(OSError):
            return sock.bind(("", random.randrange(20000, 32000)))
    sock.bind(("", port))


def pick_ports(args: argparse.Namespace) -> list[dict[str, int]]:
    """A port for each world, for each round of the benchmark (a world is made afresh each
    round, on a port of its own): the one asked for if it is free, else a free one (port 0)."""
    asked = {
        "students": ("--student-port", args.student_port),
        "teachers": ("--teacher-port", args.teacher_port),
        "rpc": ("--rpc-port", args.rpc_port),
    }
    given = [(flag, port) for flag, port in asked.values() if port]
    for _, port in given:
        if [p for _, p in given].count(port) > 1:
            same = [f for f, p in given if p == port]
            refuse(
                f"{' and '.join(same)} are {'both' if len(same) == 2 else 'all'} {port}: each "
                "world needs a port of its own. Leave them out to get free ones"
            )
    if args.bench:
        asked["p2p"] = ("", 0)
    rounds = args.rounds if args.bench else 1
    held, ports = [], [{} for _ in range(rounds)]
    try:  # hold every socket until all are picked, so no two worlds get the same free port
        for i, world in ((i, w) for i in range(rounds) for w in asked):
            flag, port = asked[world]
            held.append(socket.socket())
            try:  # the stores bind every interface: test the same
                bind(held[-1], port if i == 0 else 0)
            except OSError as err:
                refuse(
                    f"{flag} {port}: that port is in use on this machine ({err.strerror}). "
                    f"Pick another, or leave {flag} out to get a free one"
                )
            ports[i][world] = held[-1].getsockname()[1]
    finally:
        for s in held:
            s.close()
    return ports


# --8<-- [start:launch]
def launch(args: argparse.Namespace) -> int:
    """Start args.students + args.teachers processes, wait for them, return the exit code."""
    n = args.students + args.teachers
    backend = choose_backend(args.backend, args)
    if args.start == "fork" and (why := why_not_fork()):
        refuse(f"--start fork: {why}")
    ports = pick_ports(args)
    if args.rpc_transport == "auto":  # see worlds.TRANSPORTS: no polling threads on a CPU
        args.rpc_transport = "uv" if backend == "gloo" else "shm"
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: one thread a process
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off in children
    # torch.cuda.is_available() initialises the CUDA driver, and a forked child then cannot use
    # CUDA; with this set it asks NVML instead (device_count() already does).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    context = multiprocessing.get_context(args.start)
    roll = context.RawArray("i", n)  # each process's stage (worlds.STAGES), shared
    from rpc_demo.worker import run_worker  # the children's code, imported before forking

    if backend == "gloo" and args.start == "fork":
        # The first optimizer a process builds imports torch._dynamo (800 modules: seconds on
        # a busy laptop, inside the children's join timeouts). Imported here once, every forked
        # child has it. Not on GPUs: nothing that might touch CUDA runs here before the fork.
        import torch._dynamo  # noqa: F401
    children = [
        context.Process(target=run_worker, args=(rank, args, backend, ports, roll))
        for rank in range(n)
    ]
    previous = signal.signal(signal.SIGTERM, interrupted)  # stopped from outside: stop them too
    try:
        for child in children:
            child.start()
        return watch(children, args, roll)
    except KeyboardInterrupt:
        say("interrupted: stopping every student and teacher")
        return 130
    finally:
        stop([c for c in children if c.pid is not None])
        signal.signal(signal.SIGTERM, previous)


# --8<-- [end:launch]


def interrupted(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def name(rank: int, args: argparse.Namespace) -> str:
    return f"student{rank}" if rank < args.students else f"teacher{rank - args.students}"


# --8<-- [start:watch]
def watch(children: list[BaseProcess], args: argparse.Namespace, roll: MutableSequence[int]) -> int:
    """Wait for the children. All exit 0: done. One fails: the students get --rpc-timeout (plus
    a little) to notice and say why; once no student is left, the teachers are stopped. A child
    that ends before it is done is marked DEAD in the roll: whoever waits for it stops waiting."""
    students = children[: args.students]
    deadline, stopped, last_stage = None, [], {}  # last_stage: where each dead child was
    while any(c.exitcode is None for c in children):
        for rank, child in enumerate(children):
            if child.exitcode is not None and rank not in last_stage and roll[rank] != DONE:
                last_stage[rank], roll[rank] = roll[rank], DEAD
        now = time.monotonic()
        failed = any(c.exitcode not in (None, 0) for c in children)
        students_left = any(c.exitcode is None for c in students)
        if failed and deadline is None:
            deadline = now + args.rpc_timeout + GRACE_S
        if not students_left:  # nobody left to teach: the teachers end (gracefully, if all
            end = now if failed else now + SHUTDOWN_TIMEOUT_S + GRACE_S  # went well)
            deadline = end if deadline is None else min(deadline, end)
        if deadline is not None and now >= deadline:
            stopped = [c for c in children if c.exitcode is None]
            stop(stopped)
            break
        alive = [c.sentinel for c in children if c.exitcode is None]
        multiprocessing.connection.wait(
            alive, timeout=0.2 if deadline is None else max(0.0, min(0.2, deadline - now))
        )
    problems = []
    for rank, child in enumerate(children):
        code, where = child.exitcode, STAGES[last_stage.get(rank, roll[rank])]
        if child in stopped:
            problems.append(f"stopped {name(rank, args)} (rank {rank}), {where}")
        elif code and code < 0:
            problems.append(
                f"{name(rank, args)} (rank {rank}) was killed by "
                f"{signal.Signals(-code).name}, {where}"
            )
        elif code:
            problems.append(f"{name(rank, args)} (rank {rank}) exited with {code}, {where}")
    if problems:
        say("failed: " + "; ".join(problems))
    return 1 if problems else 0


# --8<-- [end:watch]


def stop(children: list[BaseProcess]) -> None:
    """SIGTERM, then SIGKILL for any still there after STOP_S; every child joined."""
    for child in children:
        if child.exitcode is None:
            child.terminate()
    deadline = time.monotonic() + STOP_S
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
        if child.exitcode is None:
            child.kill()
            child.join()
