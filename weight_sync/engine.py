"""One TP rank of the inference engine (Engine), and a torchrun rank serving one (serve_engine).

Requests come over the control plane (control.py) and are the Engine's op_* methods; those of
the fast path (prepare, receive, verify, commit) are in fast_path.py, a base class of Engine.
The weights are the model's shards as vLLM holds them (vllm_layout.py: fused qkv_proj and
gate_up_proj, KV heads replicated when TP exceeds them) in one flat buffer (plan.py's Layout);
requests name HF's tensors, and the engine converts on load as vLLM's load_weights does. The
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
from weight_sync.model import PRESETS, LlamaShape, forward, llama_specs, model_name, one_weight
from weight_sync.plan import Layout, digest
from weight_sync.timing import broadcast_timing
from weight_sync.vllm_layout import check_engine_tp, narrow, vllm_spans

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
        if preset not in PRESETS:
            raise Refused(f"no preset {preset!r}: use one of {sorted(PRESETS)}")
        try:
            check_engine_tp(PRESETS[preset], self.tp_size)
        except ValueError as err:
            raise Refused(f"{preset}: {err}") from None
        self._load(PRESETS[preset], parse_dtype(dtype))
        for name, _, _ in self.specs:  # HF's tensors one by one, each converted on load
            self._load_hf(name, one_weight(self.shape, name, seed, self.device))
        self.version = 0
        return {"tensors": len(self.layout.entries), "bytes": self.layout.size}

    def _load(self, shape: LlamaShape, dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype
        self.specs = llama_specs(shape)  # HF's tensors: what requests name
        self.full = {name: full for name, full, _ in self.specs}
        self.layout = Layout.vllm(shape, dtype, self.tp_rank, self.tp_size)
        self.hf_spans = {}  # HF name -> the Spans of this rank's tensors that hold part of it
        for e in self.layout.entries:
            for span in e.spans:
                self.hf_spans.setdefault(span.hf_name, []).append(span)
        self.live = self.staging = self.weights = self.staged = None  # free them first
        self.plans.clear()
        self.live, self.weights = self.layout.allocate(self.device)
        self.staging, self.staged = self.layout.allocate(self.device)  # staged: its views

    def _load_hf(self, name: str, full: torch.Tensor) -> None:
        """vLLM's load_weights for one HF tensor: copy each part this rank holds into place."""
        for s in self.hf_spans[name]:
            narrow(self.weights[s.name], s.dim, s.start, s.stop).copy_(
                narrow(full, s.dim, s.hf_start, s.hf_stop)
            )

    def op_generate(self, tokens: list[int], logits: bool = False) -> dict[str, Any]:
        """Greedy next token after `tokens` (every TP rank takes part in the forward pass);
        logits: also every logit of that position, gathered over the TP ranks."""
        vocab = self.shape.vocab
        bad = [t for t in tokens if not (isinstance(t, int) and 0 <= t < vocab)]
        if not tokens or bad:  # the embedding's shards would mask them to zeros, silently
            raise Refused(
                f"tokens {tokens}: give at least one token id, each in 0..{vocab - 1}"
                + (f" ({bad[0]!r} is not)" if bad else "")
            )
        out = forward(self.weights, self.shape, tokens, self.tp_rank, self.tp_size, self.tp)
        answer = {"token": int(out.argmax()), "logit": float(out.max()), "version": self.version}
        return {**answer, "logits": out.tolist()} if logits else answer

    def op_get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[Any]:
        """SGLang's: the first truncate_size rows of HF's full tensor `name`, gathered over TP
        ranks. Each rank writes the parts it is the first to hold (a KV head or a norm held by
        several is written once) into zeros, and a sum over the ranks puts them together."""
        self._check_name(name)
        full = self.full[name]
        rows = min(truncate_size, full[0])
        part = torch.zeros((rows, *full[1:]), dtype=torch.float32, device=self.device)
        for s in self.hf_spans[name]:
            if self.tp_size > 1 and self._held_before(s):
                continue
            if s.dim == 0:  # HF rows hf_start:hf_stop, of which the first `rows`
                end = min(s.hf_stop, rows)
                if end > s.hf_start:
                    mine = self.weights[s.name][s.start : s.start + end - s.hf_start]
                    part[s.hf_start : end] = mine.float()
            else:
                part[:, s.hf_start : s.hf_stop] = self.weights[s.name][:rows].float()
        if self.tp_size > 1:
            self.tp.all_reduce(part).wait()  # zeros elsewhere: the sum is exact
        return part.cpu().tolist()

    def _held_before(self, span):
        """Does a lower TP rank hold this same part of the HF tensor (a replicated one)?"""
        key = (span.hf_name, span.dim, span.hf_start, span.hf_stop)
        return any(
            (s.hf_name, s.dim, s.hf_start, s.hf_stop) == key
            for r in range(self.tp_rank)
            for s in vllm_spans(self.shape, r, self.tp_size)
            if s.hf_name == span.hf_name
        )

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
        self._group(group_name)
        self._drop_group(group_name)
        return {}

    def _drop_group(self, group_name):
        """Close the group and forget it, and every update prepared on it."""
        self.groups.pop(group_name).close()
        for key in [key for key in self.plans if key[0] == group_name]:
            del self.plans[key]

    def _group(self, group_name):
        if group_name not in self.groups:
            raise Refused(
                f"no weight-update group named {group_name!r} on this engine (it has: "
                f"{sorted(self.groups) or 'none'}); create it with "
                "init_weight_update_group"
            )
        return self.groups[group_name]

    def _check_name(self, name):
        """Requests name HF's tensors; the engine's own (fused) names are not among them."""
        if name not in self.full:
            near = difflib.get_close_matches(name, list(self.full), n=1)
            raise Refused(
                f"name mismatch: this engine has no tensor {name!r}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + (" (updates name HF's tensors; the engine fuses them)" if not near else "")
            )

    def _mismatch(self, name, dtype, shape, wire):
        """Why the HF tensor `name` as declared cannot go in (None if it can). wire: it goes on
        the wire in the engine's dtype (the fast path); else it is converted once here (naive)."""
        try:
            self._check_name(name)
        except Refused as err:
            return str(err)
        full = self.full[name]
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
        """Receive each declared HF tensor by broadcast, then copy the parts this rank holds
        into its live (fused) tensors, one by one: no staging, no checksum, no version (an
        update is torn if it fails half way). A tensor that does not fit, or holds a NaN or an
        Inf, is received and dropped, never copied in, and so is every tensor after it: the
        trainer broadcasts them all, and the group stays in step for the next request."""
        group = self._group(group_name)
        try:  # what the receives need: one dtype and shape per name
            if not len(names) == len(dtypes) == len(shapes):
                raise Refused(
                    f"{len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes: "
                    "one of each per tensor"
                )
            declared = [(n, parse_dtype(d), s) for n, d, s in zip(names, dtypes, shapes)]
            if any(not isinstance(size, int) or size < 0 for _, _, s in declared for size in s):
                raise Refused(f"shapes {shapes}: each is a list of sizes of 0 or more")
        except Refused as err:  # nothing can be received, so the trainer's broadcasts would
            self._drop_group(group_name)  # wait for a receiver: closed, they fail at once
            raise Refused(
                f"{err} (nothing received; group {group_name!r} dropped, so the trainer's "
                "broadcasts fail now instead of waiting: create a new one)"
            ) from None
        recv_s, load_s, problem, went_in = [], [], None, 0
        for name, dtype, shape in declared:
            incoming = torch.empty(shape, dtype=dtype, device=self.device)
            start = time.perf_counter()
            group.broadcast(incoming, 0).wait()
            group.sync()
            recv_s.append(time.perf_counter() - start)
            if problem:  # received to keep in step with the trainer, and dropped
                continue
            problem = self._mismatch(name, dtype, shape, wire=False)
            if problem is None and not bool(torch.isfinite(incoming).all()):
                problem = f"non-finite value (NaN or Inf) in {name}"
            if problem:
                continue
            start = time.perf_counter()
            self._load_hf(name, incoming)  # this rank's parts of it, into the fused tensors
            group.sync()
            load_s.append(time.perf_counter() - start)
            went_in += 1
        if problem:
            after = len(declared) - went_in - 1
            raise Refused(
                f"{problem} (received and dropped"
                + (f", with the {after} tensor(s) after it" if after else "")
                + (
                    f"; the {went_in} before it went in: the update is torn"
                    if went_in
                    else ": the live weights are untouched"
                )
                + ")"
            )
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
    engine_type: type[Engine] | None = None,
    **extra: Any,
) -> Engine:
    """Run one engine rank of this torchrun job until shutdown; returns the Engine (its weights,
    its version). Engine rank 0 hosts the control plane on host:<free port> and says where in
    torchrun's store (and in port_file, if given). engine_type: a subclass of Engine to serve
    (lesson 12's LiveEngine), given `extra` as keyword arguments."""
    check_engine_tp(PRESETS[preset], tp_size)  # ValueError on every rank, before anything runs
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
    engine = (engine_type or Engine)(
        tp_group, backend, device, meeting.get(key).decode(), timeout_s, poll_s, **extra
    )
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
