"""One TP rank of the inference engine (Engine), and a torchrun rank serving one (serve_engine).

Requests come over the control plane (control.py) and are the Engine's op_* methods; those of
the fast path (prepare, receive, verify, commit) are in fast_path.py, a base class of Engine.
The weights are the model's shards (model.py) in one flat buffer (plan.py's Layout); the
weight-update groups are built from the trainer's store (groups.py)."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from course.ranks import print_rank
from weight_sync.control import Heartbeat, Refused, parse_dtype
from weight_sync.fast_path import FastPath
from weight_sync.groups import (
    Group,
    _sessions,
    listening_store,
    make_group,
    seconds,
    store_client,
    torchrun_store,
)
from weight_sync.model import PRESETS, forward, llama_specs, model_name, one_weight, shard_of
from weight_sync.plan import Layout, digest
from weight_sync.timing import broadcast_timing

POLL_S = 0.002  # the naive engine's nap between two looks for a request


class Engine(FastPath):
    """One TP rank of the inference engine: its shards of the model, served on request.

    Weights live in one flat buffer (`live`) with a view per tensor; the fast path receives into
    a second one (`staging`) and a commit swaps the two, so a failed update leaves `live` alone.
    Requests: the op_* methods, called with the request's JSON arguments."""

    def __init__(
        self,
        tp_group: Group,
        backend: str,
        device: torch.device | str,
        address: str,
        timeout_s: float,
        poll_s: float | None = None,
    ) -> None:
        self.tp, self.tp_rank, self.tp_size = tp_group, tp_group.rank, tp_group.size
        self.backend, self.device, self.address = backend, torch.device(device), address
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.store = store_client(address, seconds(timeout_s))
        self.heartbeat = Heartbeat(address, self.tp_rank, seconds(timeout_s))
        self.heartbeat.start()
        self.groups, self.plans, self.fault, self.stopping = {}, {}, None, False
        self.next_request, self.version = 1, 0

    def log(self, text: str) -> None:
        print_rank(f"engine rank {self.tp_rank}: {text}")

    # -- serving
    def serve(self, idle_s: float) -> None:
        """Answer requests in order until shutdown, or until none came for idle_s seconds."""
        while not self.stopping:
            key = f"req/{self.next_request}"
            if not self._wait_for(key, idle_s):
                self.log(f"no request for {idle_s:g} s: stopping")
                break
            request = json.loads(self.store.get(key))
            reply = self.handle(request["op"], request["args"])
            self.store.set(f"rep/{self.next_request}/{self.tp_rank}", json.dumps(reply))
            self.next_request += 1
        if self.stopping and self.tp_rank == 0:  # keep the control plane up until the client has
            with contextlib.suppress(RuntimeError):  # read every answer
                self.store.wait([f"bye/{self.next_request - 1}"], seconds(10))

    def _wait_for(self, key, idle_s):
        if self.poll_s:  # the naive engine: look, nap, look again
            deadline = time.monotonic() + idle_s
            while not self.store.check([key]):
                if time.monotonic() > deadline:
                    return False
                time.sleep(self.poll_s)
            return True
        try:  # the store wakes us as soon as the request is there
            self.store.wait([key], seconds(idle_s))
            return True
        except RuntimeError:
            return False

    def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        method = getattr(self, "op_" + op, None)
        if method is None:
            known = sorted(name[3:] for name in dir(self) if name.startswith("op_"))
            return {"ok": False, "error": f"unknown request {op!r}; this engine answers {known}"}
        try:
            return {"ok": True, "result": method(**args)}
        except Refused as err:
            return {"ok": False, "error": str(err)}
        except Exception as err:  # a bug or a broken transfer: say so, keep serving
            self.log(f"{op} failed: {type(err).__name__}: {err}")
            return {"ok": False, "error": f"{type(err).__name__}: {err}"}

    def close(self) -> None:
        # Stop the heartbeat and wait for it: a daemon thread still inside a store call when the
        # interpreter exits is ended mid-C++, which can abort the process ("terminate called
        # without an active exception") after its work is done. Its wait wakes at once; a store
        # call in flight ends within the store's timeout.
        self.heartbeat.stopped.set()
        self.heartbeat.join(timeout=self.heartbeat.store.timeout.total_seconds())
        for group in self.groups.values():
            group.close()
        self.groups.clear()

    # -- the model
    def op_load_model(self, preset: str, seed: int, dtype: str) -> dict[str, int]:
        """Start over with model `seed` of shape `preset` (PRESETS), version 0."""
        self.shape, self.dtype = PRESETS[preset], parse_dtype(dtype)
        self.specs = llama_specs(self.shape)
        self.layout = Layout(self.specs, self.dtype, self.tp_rank, self.tp_size)
        self.live = self.staging = self.weights = self.staged = self.wire = None  # free it first
        self.plans.clear()
        self.live, self.weights = self.layout.allocate(self.device)
        for name, _, split in self.specs:
            full = one_weight(self.shape, name, seed, self.device)
            self.weights[name].copy_(shard_of(full, split, self.tp_rank, self.tp_size))
        self.staging, self.staged = self.layout.allocate(self.device)  # staged: its views
        self.version = 0
        return {"tensors": len(self.specs), "bytes": self.layout.size}

    def op_generate(self, tokens: list[int]) -> dict[str, Any]:
        """Greedy next token after `tokens` (every TP rank takes part in the forward pass)."""
        logits = forward(self.weights, self.shape, tokens, self.tp_rank, self.tp_size, self.tp)
        return {
            "token": int(logits.argmax()),
            "logit": float(logits.max()),
            "version": self.version,
        }

    def op_get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[Any]:
        """SGLang's: the first truncate_size rows of the full tensor, gathered over TP ranks."""
        entry = self._entry(name)
        shard = self.weights[name]
        rows = min(truncate_size, shard.shape[0] * (self.tp_size if entry.split_dim == 0 else 1))
        if entry.split_dim is None or self.tp_size == 1:
            part = shard[:rows]
        else:
            mine = shard[: min(rows, shard.shape[0])].contiguous()
            parts = [torch.empty_like(mine) for _ in range(self.tp_size)]
            self.tp.all_gather(parts, mine).wait()
            part = torch.cat(parts, dim=entry.split_dim)[:rows]
        return part.float().cpu().tolist()

    def op_get_version(self) -> dict[str, int]:
        return {"version": self.version}

    def op_weights_digest(self) -> dict[str, Any]:
        """sha256 of this rank's live weights, byte for byte, and the version."""
        return {"sha256": digest(self.layout, self.live), "version": self.version}

    # -- weight-update groups (SGLang's API)
    def op_init_weight_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
        warmup: bool = False,
    ) -> dict[str, int]:
        """Join the trainer's group `group_name` as rank rank_offset + tp_rank."""
        if group_name in self.groups:
            raise Refused(
                f"a weight-update group named {group_name!r} already exists on this "
                "engine: destroy it first (destroy_weights_update_group) or pick another"
            )
        if world_size != rank_offset + self.tp_size:
            raise Refused(
                f"world_size {world_size} does not fit: rank_offset {rank_offset} + "
                f"{self.tp_size} engine ranks = {rank_offset + self.tp_size}"
            )
        if backend != self.backend:
            raise Refused(
                f"backend {backend!r}: this engine's weights are on {self.device}, "
                f"use {self.backend!r}"
            )
        address = f"{master_address}:{master_port}"
        store = store_client(address, seconds(min(10, self.timeout_s)))
        if not store.check([f"announce/{group_name}"]):
            announced = store.get("announced").decode() if store.check(["announced"]) else "none"
            raise Refused(
                f"the trainer at {address} created no weight-update group named "
                f"{group_name!r} (it created: {announced})"
            )
        rank = rank_offset + self.tp_rank
        store.set(f"{group_name}/joining/{rank}", "1")
        group = make_group(
            dist.PrefixStore(f"{group_name}/", store),
            rank,
            world_size,
            backend,
            self.device,
            seconds(self.timeout_s),
            group_name,
        )
        group.store = store  # the group's connection to its store lives as long as the group
        if warmup:
            group.warm_up()
        self.groups[group_name] = group
        return {"rank": rank}

    def op_destroy_weights_update_group(self, group_name: str) -> dict[str, Any]:
        self._group(group_name).close()
        del self.groups[group_name]
        self.plans.pop(group_name, None)
        return {}

    def _group(self, group_name):
        if group_name not in self.groups:
            raise Refused(
                f"no weight-update group named {group_name!r} on this engine (it has: "
                f"{sorted(self.groups) or 'none'}); create it with "
                "init_weight_update_group"
            )
        return self.groups[group_name]

    def _entry(self, name):
        if name not in self.layout.by_name:
            near = difflib.get_close_matches(name, list(self.layout.by_name), n=1)
            raise Refused(
                f"name mismatch: this engine has no tensor {name!r}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
            )
        return self.layout.by_name[name]

    def _mismatch(self, name, dtype, shape, wire):
        """Why the tensor `name` as declared cannot go in (None if it can). wire: it goes on the
        wire in the engine's dtype (the fast path); else it is converted once here (naive)."""
        try:
            self._entry(name)
        except Refused as err:
            return str(err)
        full = next(full for n, full, _ in self.specs if n == name)
        if tuple(shape) != tuple(full):
            return (
                f"shape mismatch for {name}: the engine's is {tuple(full)}, the update's "
                f"{tuple(shape)}"
            )
        if (wire and dtype != self.dtype) or not dtype.is_floating_point:
            return (
                f"dtype mismatch for {name}: the engine holds {self.dtype}, the update "
                f"declares {dtype}" + ("; convert on send" if wire else "")
            )
        return None

    # -- the naive path: SGLang's first update_weights_from_distributed
    def op_update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str
    ) -> dict[str, list[float]]:
        """Receive each declared tensor by broadcast, then copy this rank's shard into the live
        weights, one by one: no staging, no checksum, no version (an update is torn if it fails
        half way). A tensor that does not fit is received and dropped, never copied in."""
        group = self._group(group_name)
        if not len(names) == len(dtypes) == len(shapes):
            raise Refused(
                f"{len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes: "
                "one of each per tensor"
            )
        recv_s, load_s = [], []
        for name, dtype, shape in zip(names, dtypes, shapes):
            dtype = parse_dtype(dtype)
            incoming = torch.empty(shape, dtype=dtype, device=self.device)
            start = time.perf_counter()
            group.broadcast(incoming, 0).wait()
            group.sync()
            recv_s.append(time.perf_counter() - start)
            problem = self._mismatch(name, dtype, shape, wire=False)
            if problem:
                raise Refused(problem + " (received and dropped: the live weights are untouched)")
            start = time.perf_counter()
            entry = self.layout.by_name[name]
            self.weights[name].copy_(
                shard_of(incoming, entry.split_dim, self.tp_rank, self.tp_size)
            )
            group.sync()
            load_s.append(time.perf_counter() - start)
        return {"recv_s": recv_s, "load_s": load_s}

    # -- measurement and test hooks
    def op_broadcast_sweep(self, group_name: str, sizes: list[int], repeats: int) -> list[float]:
        """The engine's half of broadcast_timing for each size (the trainer runs the other)."""
        group = self._group(group_name)
        return [broadcast_timing(group, size, repeats) for size in sizes]

    def op_configure(self, poll_s: float | None = None) -> dict[str, Any]:
        """poll_s: nap between looks for a request (the naive engine); None: wait on the store."""
        self.poll_s = poll_s
        return {}

    def op_inject_fault(self, kind: str, tp_rank: int, after_buckets: int = 1) -> dict[str, Any]:
        """Tests only: kind 'die' makes engine rank tp_rank exit during the next fast update."""
        if kind != "die":
            raise Refused(f"unknown fault {kind!r}: the only one is 'die'")
        self.fault = {"tp_rank": tp_rank, "after_buckets": after_buckets}
        return {}

    def op_shutdown(self) -> dict[str, Any]:
        self.stopping = True
        return {}


def serve_engine(
    tp_rank: int,
    tp_size: int,
    backend: str,
    device: torch.device | str,
    *,
    preset: str,
    seed: int,
    dtype: torch.dtype | str,
    timeout_s: float,
    idle_s: float | None = None,
    poll_s: float | None = None,
    host: str = "127.0.0.1",
    port_file: str | None = None,
    quiet: bool = False,
) -> Engine:
    """Run one engine rank of this torchrun job until shutdown; returns the Engine (its weights,
    its version). Engine rank 0 hosts the control plane on host:<free port> and says where in
    torchrun's store (and in port_file, if given)."""
    timeout = seconds(timeout_s)
    session = next(_sessions)
    meeting = torchrun_store(timeout)
    tp_group = make_group(
        dist.PrefixStore(f"course09/{session}/engine/", meeting),
        tp_rank,
        tp_size,
        backend,
        device,
        timeout,
        "engine",
    )  # the engine's own world
    key, server = f"course09/{session}/control", None
    if tp_rank == 0:
        server, port = listening_store(host, 0, timeout)
        server.set("tp_size", str(tp_size))
        meeting.set(key, f"{host}:{port}")
        if port_file:  # written whole, then renamed: a reader never sees half an address
            with open(f"{port_file}.tmp", "w") as f:
                f.write(f"{host}:{port}")
            os.replace(f"{port_file}.tmp", port_file)
    meeting.wait([key])
    engine = Engine(tp_group, backend, device, meeting.get(key).decode(), timeout_s, poll_s)
    loaded = engine.op_load_model(preset, seed, str(dtype))
    if not quiet:
        engine.log(
            f"{model_name(seed)} ({preset}), {loaded['tensors']} tensors, "
            f"{loaded['bytes'] / 1e3:.1f} kB of {engine.dtype}, as much staging"
        )
    try:
        engine.serve(idle_s or max(120.0, 4 * timeout_s))
    finally:
        engine.close()
        tp_group.close()
        del server  # the control plane goes last
    return engine
