"""The worlds a process of rpc_demo lives in: its role's process group (students with students,
teachers with teachers) and the RPC world that joins them. Every join is bounded in time, and a
worker that never arrives is named by the ones waiting for it.

The launcher shares a small array with its children, the roll: each process writes its stage
there, so a process that waits for others can say which of them never came (and the launcher
can say where each one was when something failed). A process that ends before it is done cannot
write that: the launcher writes DEAD for it, and whoever waits for it fails at once.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import warnings
from collections.abc import Iterator, MutableSequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from course.ranks import print_rank
from distill_demo.comms import Layout
from distill_demo.train import Config

# A process's stage, in its slot of the roll (a multiprocessing array shared by the launcher).
STAGES = (
    "not started",
    "starting",
    "joining a process group",
    "in a process group",
    "preparing its model",
    "its model ready",
    "joining RPC",
    "in RPC",
    "done",
    "dead",  # written by the launcher: the process ended before it was done
)
STARTING, JOINING_WORLD, IN_WORLD, PREPARING, READY, JOINING_RPC, IN_RPC, DONE, DEAD = range(1, 10)
WATCH_S = 0.25  # how often a process joining RPC looks at the roll
SHUTDOWN_TIMEOUT_S = 30  # rpc.shutdown(graceful=True) waits this long for the others at most
# TensorPipe's transports (a private option of TensorPipeRpcBackendOptions, `_transports`):
# "shm", shared memory, is its default on one machine, and its reactor thread spins while it
# polls for data: after a message, a whole core per process, even with nothing to do (--bench
# measures it). Nothing on a GPU server with cores to spare; a lot on a 2-core laptop, where
# the student and the teacher compute on those cores. "uv" (TCP on loopback) sleeps until
# data comes. --rpc-transport auto: uv on CPU, TensorPipe's default (shm first) on GPUs; the
# launcher decides, once for all processes.
TRANSPORTS = {"shm": None, "uv": ["uv"]}  # None: TensorPipe's own list, shm first
Roll = MutableSequence[int]  # the launcher's shared array: each process's stage, by rank


@dataclass(frozen=True)
class Worker:
    """One process of rpc_demo, as fixed for its whole life: who it is, what it trains with
    (distill_demo's Config, its device included) and how long it waits for the others."""

    rank: int  # in the RPC world: students first, as in distill_demo
    layout: Layout  # who teaches whom (distill_demo.comms.Layout)
    cfg: Config
    timeout: float  # --timeout: seconds a collective in its role's world may wait
    rpc_timeout: float  # --rpc-timeout: seconds to join RPC, and for each call
    rpc_transport: str = "uv"  # how TensorPipe moves bytes (TRANSPORTS)

    @property
    def device(self) -> torch.device:
        return self.cfg.device

    @property
    def names(self) -> list[str]:
        """Every process's RPC name, by rank."""
        return [worker_name(self.layout, r) for r in self.layout.students + self.layout.teachers]


class Failed(RuntimeError):
    """A failure this process can name: printed as one line, exit code 1."""


def taken(err: Exception, what: str, port: int) -> None:
    """Failed, if `err` says the port was in use: another program took it after the launcher
    found it free."""
    if "EADDRINUSE" in str(err) or "ddress already in use" in str(err):
        raise Failed(
            f"{what}: port {port} is in use: another program took it after the launcher "
            "found it free. Run again (or choose free ports: --student-port, "
            "--teacher-port, --rpc-port)"
        ) from None


def worker_name(layout: Layout, rank: int) -> str:
    """The RPC name of process `rank` (students first, as in distill_demo): student0, teacher1."""
    if rank in layout.students:
        return f"student{rank}"
    return f"teacher{rank - len(layout.students)}"


# --8<-- [start:role-world]
@contextlib.contextmanager
def role_world(what: str, members: list[int], port: int, me: Worker, roll: Roll) -> Iterator[None]:
    """Join the world of `members` (global ranks) on 127.0.0.1:`port` for a `with` block: a
    default process group of its own, with its own store (its first member hosts it)."""
    nccl = me.device.type == "cuda"  # NCCL on GPUs, gloo on CPU
    roll[me.rank] = JOINING_WORLD
    try:
        dist.init_process_group(
            "nccl" if nccl else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=members.index(me.rank),
            world_size=len(members),
            timeout=datetime.timedelta(seconds=me.timeout),
            device_id=me.device if nccl else None,
        )
    except RuntimeError as err:  # bounded by --timeout: name who never came
        taken(err, what, port)
        missing = [
            f"{worker_name(me.layout, r)} (rank {r}, {STAGES[roll[r]]})"
            for r in members
            if roll[r] < JOINING_WORLD or roll[r] == DEAD
        ]
        raise Failed(
            f"{what} on 127.0.0.1:{port} did not form within --timeout "
            f"{me.timeout:g} s; missing: {', '.join(missing) or 'none known'} "
            f"({str(err).strip().splitlines()[0]})"
        ) from None
    roll[me.rank] = IN_WORLD
    try:
        if nccl:  # create the communicator now, not inside the first timed step
            dist.barrier(device_ids=[me.device.index])
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --8<-- [end:role-world]


# --8<-- [start:start-rpc]
def start_rpc(
    rank: int,
    names: list[str],
    port: int,
    timeout_s: float,
    roll: Roll,
    transport: str = "shm",
    device_maps: dict | None = None,
) -> None:
    """Join the RPC world as names[rank], with its own rendezvous on 127.0.0.1:`port` (names[0],
    student0, hosts it). Joining, and every call after it, fails after timeout_s. `transport`:
    how TensorPipe moves bytes between processes (see TRANSPORTS)."""
    # TensorPipe, and the gloo group init_rpc builds inside, listen on the loopback interface,
    # not on the address the hostname resolves to (which may face a network): RPC runs the
    # functions it is sent, so it must not be reachable from outside. Read at the first init_rpc.
    os.environ["TP_SOCKET_IFNAME"] = os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    # A tcp:// rendezvous under torchrun would wait for torchrun's store instead of hosting its
    # own (lesson 00). The launcher refuses torchrun; this keeps the rule if it is ever lifted.
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    options = rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{port}",
        rpc_timeout=timeout_s,
        device_maps=device_maps,
        _transports=TRANSPORTS[transport],
    )
    roll[rank] = JOINING_RPC
    joined = threading.Event()

    def watch():  # init_rpc waits for a missing worker without limit: this bounds it
        waited = patient = 0.0
        while not joined.wait(WATCH_S):
            dead = [f"{names[r]} (rank {r})" for r in range(len(names)) if roll[r] == DEAD]
            if dead:  # it will never join, whatever it was doing: preparing is no excuse now
                print_rank(
                    f"error: {names[rank]}: {', '.join(dead)} ended without joining the RPC "
                    f"world (the launcher saw {'its process' if len(dead) == 1 else 'them'} exit)"
                )
                os._exit(1)
            missing = [r for r in range(len(names)) if roll[r] < JOINING_RPC]
            # Startup is not liveness: a teacher pretraining (or loading a checkpoint) is slow,
            # not gone, and one still forming its role's world is bounded there, by --timeout
            # (it fails, and is DEAD above). The clock runs while someone is missing for any
            # other reason: not started yet, or ready and not joining.
            preparing = [r for r in missing if JOINING_WORLD <= roll[r] <= PREPARING]
            if missing and len(preparing) == len(missing):
                patient += WATCH_S
                if patient - WATCH_S < timeout_s <= patient:  # say so once, when it matters
                    who = ", ".join(
                        f"{names[r]} (rank {r}"
                        + ("" if roll[r] == PREPARING else f", {STAGES[roll[r]]}")
                        + ")"
                        for r in preparing
                    )
                    print_rank(
                        f"{names[rank]}: {who} still preparing after {timeout_s:g} s "
                        f"(--rpc-timeout); waiting, as that is not a fault"
                    )
                continue
            waited += WATCH_S
            if waited >= timeout_s:
                late = [f"{names[r]} (rank {r}, {STAGES[roll[r]]})" for r in missing]
                print_rank(
                    f"error: {names[rank]}: {', '.join(late) or 'a worker'} never joined "
                    f"the RPC world within {timeout_s:g} s (--rpc-timeout): is it "
                    f"running?"
                )
                os._exit(1)  # this thread cannot interrupt init_rpc; end the process, not hang

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    try:
        with warnings.catch_warnings():
            # init_rpc's own code hands c10d a raw gloo backend where c10d wants a group, and
            # c10d warns ("You are using a Backend ... as a ProcessGroup"): not ours to fix.
            warnings.filterwarnings("ignore", "You are using a Backend", UserWarning)
            rpc.init_rpc(names[rank], rank=rank, world_size=len(names), rpc_backend_options=options)
    except RuntimeError as err:  # e.g. the rendezvous's host (student0) gave up and left
        taken(err, "the RPC world", port)
        raise Failed(
            f"could not join the RPC world at 127.0.0.1:{port}, which "
            f"{names[0]} hosts ({str(err).strip().splitlines()[0]})"
        ) from None
    finally:
        joined.set()
    roll[rank] = IN_RPC


@contextlib.contextmanager
def rpc_world(
    rank: int,
    names: list[str],
    port: int,
    timeout_s: float,
    roll: Roll,
    transport: str = "shm",
    device_maps: dict | None = None,
) -> Iterator[None]:
    """In the RPC world for a `with` block. Leaving it normally is a meeting of every worker
    (graceful shutdown, bounded); leaving on an error is not: the others may be gone."""
    start_rpc(rank, names, port, timeout_s, roll, transport, device_maps)
    done = False
    try:
        yield
        done = True
    finally:
        rpc.shutdown(graceful=done, timeout=SHUTDOWN_TIMEOUT_S)


# --8<-- [end:start-rpc]


def gpu_index(layout: Layout, rank: int) -> int:
    """The GPU of a process: its rank when there is a GPU per process; with fewer (--backend
    nccl, not --bench), its index among its role's ranks: students and teachers share GPUs,
    and within each role's NCCL world every GPU is still used once."""
    if torch.cuda.device_count() >= len(layout.students + layout.teachers):
        return rank
    role = layout.students if rank in layout.students else layout.teachers
    return role.index(rank)


def cuda_maps(
    layout: Layout, teachers: list[int], names: list[str], device: torch.device
) -> dict | None:
    """A student on a GPU maps its device to each of its teachers' (gpu_index), so RPC moves
    CUDA tensors directly; RPC derives the way back. None on CPU."""
    if device.type != "cuda":
        return None
    return {names[t]: {device: torch.device("cuda", gpu_index(layout, t))} for t in teachers}
