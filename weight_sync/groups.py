"""Process groups built straight from a store (no default group needed, neither side's own world
is touched), the ops lesson 09 uses on them (each returns a Work), a stand-in that records a dry
run, and the TCPStores the groups meet in: a server bound to one host, a client, torchrun's."""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import socket
from collections.abc import Iterable
from typing import Protocol

import torch
import torch.distributed as dist

OPS_LOG = os.environ.get("COURSE09_OPS_LOG")  # tests: log every op of every Group (see _log)


class Work(Protocol):
    """What every op of a Group returns: wait() until it is done (see Group for what "done" is)."""

    def wait(self) -> bool: ...


def seconds(s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=s)


# --8<-- [start:make_group]
def make_group(
    store: dist.Store,
    rank: int,
    size: int,
    backend: str,
    device: torch.device | str,
    timeout: datetime.timedelta,
    name: str,
) -> Group:
    """A process group made straight from a store, the way vLLM's stateless groups are.

    SGLang's init_custom_process_group instead copies torch's private _new_process_group_helper
    (whose arguments changed between releases) so that dist.broadcast(group=...) accepts the
    group. Constructing the backend is public and identical on torch 2.11 and 2.13 (it is what
    init_process_group itself does), needs no default group, and touches neither side's world.
    The price: dist.* functions do not know this group, so Group calls its ops directly."""
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout  # as init_process_group sets it
        options.is_high_priority_stream = False
        pg = dist.ProcessGroupNCCL(store, rank, size, options)
    else:
        pg = dist.ProcessGroupGloo(store, rank, size, timeout)
    return Group(pg, rank, size, torch.device(device), name)


# --8<-- [end:make_group]


class _Done:
    def wait(self, *args: object) -> bool:
        return True


class _Work:
    """A Work that may be waited for more than once: gloo's send/recv Works wait for one more
    completion at each wait(), so a second wait would block until the timeout."""

    def __init__(self, work: dist.Work) -> None:
        self.work, self.done = work, False

    def wait(self) -> bool:
        if not self.done:
            self.work.wait()
            self.done = True
        return True


class Group:
    """A process group and the ops lesson 09 uses. Each op returns a Work at once: wait() blocks
    the host under gloo, but under NCCL only makes the current stream wait (see sync())."""

    def __init__(
        self, pg: dist.ProcessGroup, rank: int, size: int, device: torch.device, name: str
    ) -> None:
        self.pg, self.rank, self.size, self.device, self.name = pg, rank, size, device, name

    def _log(self, op, tensor, peer):
        """Tests: every op's dtype and size, to check on gloo what NCCL insists on (each rank's
        tensors of one collective agree in dtype and count; gloo only counts bytes)."""
        if OPS_LOG:
            with open(f"{OPS_LOG}.{os.getpid()}", "a") as f:
                f.write(f"{self.name} {self.rank} {op} {peer} {tensor.dtype} {tensor.numel()}\n")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Work:
        self._log("broadcast", tensor, src)
        options = dist.BroadcastOptions()
        options.rootRank = src
        return _Work(self.pg.broadcast([tensor], options))

    def send(self, tensor: torch.Tensor, dst: int | None) -> Work:
        """dst None: a broadcast from rank 0 (the trainer) to all; else point to point."""
        if dst is None:
            return self.broadcast(tensor, 0)
        self._log("send", tensor, dst)
        return _Work(self.pg.send([tensor], dst, 0))

    def recv(self, tensor: torch.Tensor, src: int = 0) -> Work:
        self._log("recv", tensor, src)
        return _Work(self.pg.recv([tensor], src, 0))

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Work:
        self._log("all_reduce", tensor, None)
        options = dist.AllreduceOptions()
        options.reduceOp = op
        return _Work(self.pg.allreduce([tensor], options))

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> Work:
        self._log("all_gather", tensor, None)
        return _Work(self.pg.allgather([outputs], [tensor]))

    def sync(self) -> None:
        """Wait until this rank's GPU has done everything queued (nothing to do on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        self.all_reduce(torch.ones(1, device=self.device)).wait()
        self.sync()

    def slowest(self, value: float) -> float:
        """The largest `value` over the ranks of this group: the slowest rank's time."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self.all_reduce(t, dist.ReduceOp.MAX).wait()
        return t.item()

    def warm_up(self, peers: Iterable[int] = ()) -> None:
        """Set up connections now, not inside the first timed transfer (NCCL: ~150 ms a group,
        and again for each pair that sends point to point: `peers`). A small broadcast and a
        16 MiB one: NCCL (2.22 and newer) connects each protocol at its first use."""
        tiny = torch.zeros(1, device=self.device)
        self.broadcast(tiny, 0).wait()
        self.broadcast(torch.zeros(1 << 22, device=self.device), 0).wait()
        for peer in peers:
            if self.rank == 0:
                self.send(tiny, peer).wait()
            elif self.rank == peer:
                self.recv(tiny, 0).wait()
        self.sync()

    def close(self) -> None:
        """Let go of the group's connections. NCCL: abort (nothing is in flight when we close,
        and it never waits for the other side); gloo: shutdown."""
        names = ("abort", "shutdown") if self.device.type == "cuda" else ("shutdown", "abort")
        stop = next((getattr(self.pg, n) for n in names if hasattr(self.pg, n)), None)
        with contextlib.suppress(Exception):
            if stop:
                stop()


class RecordingGroup:
    """A stand-in for the weight-update group that moves nothing and records what would go on
    the wire: a dry run of a push, and how bytes on the wire are counted."""

    def __init__(self, device: torch.device | str, tp_size: int) -> None:
        self.device, self.tp_size = torch.device(device), tp_size
        self.rank, self.name = 0, "dry run"
        self.sent = []  # (dst or None for a broadcast, bytes)

    def send(self, tensor: torch.Tensor, dst: int | None) -> Work:
        self.sent.append((dst, tensor.numel() * tensor.element_size()))
        return _Done()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Work:
        return self.send(tensor, None)

    def sync(self) -> None:
        pass

    def received(self) -> int:
        """Bytes that land on engine ranks: a broadcast lands on each of them."""
        return sum(n * (self.tp_size if dst is None else 1) for dst, n in self.sent)


def listening_store(host: str, port: int, timeout: datetime.timedelta) -> tuple[dist.TCPStore, int]:
    """A TCPStore server listening on host:port only (port 0: a free one); returns (store, port).
    Given just a port, TCPStore listens on every interface; handed a socket bound to `host`
    (127.0.0.1 by default), the control plane and a group's store are not reachable from other
    machines."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    port = sock.getsockname()[1]
    fd = sock.detach()  # from here the store owns the socket
    spare = os.dup(fd)
    try:
        store = dist.TCPStore(
            host, port, is_master=True, wait_for_workers=False, timeout=timeout, master_listen_fd=fd
        )
    except (RuntimeError, ValueError):  # a torch whose libuv store cannot take a socket
        store = dist.TCPStore(
            host,
            port,
            is_master=True,
            wait_for_workers=False,
            timeout=timeout,
            master_listen_fd=spare,
            use_libuv=False,
        )
    else:
        os.close(spare)
    return store, port


def store_client(address: str, timeout: datetime.timedelta) -> dist.TCPStore:
    host, port = address.rsplit(":", 1)
    return dist.TCPStore(host, int(port), is_master=False, timeout=timeout)


_sessions = itertools.count()  # one per trainer-engine session in this process: keys never clash


def torchrun_store(timeout: datetime.timedelta) -> dist.TCPStore:
    """A client of the store torchrun started: only to meet, never for the roles' collectives."""
    return store_client(f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", timeout)
