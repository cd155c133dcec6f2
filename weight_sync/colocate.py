"""Colocated weight updates (lesson 11): the trainer and the engine share a GPU, taking turns.

NCCL cannot send between two ranks of one GPU, so the weights move through memory handles: the
trainer shares its storage (CUDA IPC; on CPU, shared memory plays the part), the engine opens
the handle and copies. This module holds what lesson 11 and benchmarks/colocate.py need and do
not teach:

    EngineLayout, Buffers   the engine's tensors as views of one flat byte buffer, padded to
                       whole checksum chunks; chunk_sums, the checksum table in that layout
    share, open_shared, gpu_id   handles keyed by the physical GPU, opened on the right device
    Pair               control messages between a trainer rank and its engine rank (a local
                       socket: a dead peer closes it; a waiting gloo recv would hang)
    designs            (a) fresh handle per tensor per update (OpenRLHF), (b) one flat bucket
                       shared once (verl), (c) the course's: handles opened once, one fused pull,
                       verified, committed atomically
    two_stage_plan     ChatLearn's route when some trainer and engine ranks share a GPU
"""

from __future__ import annotations

import math
import os
import pickle
import time
from multiprocessing.connection import Client, Listener
from multiprocessing.reduction import ForkingPickler
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing
from torch.multiprocessing.reductions import reduce_tensor

from weight_sync.model import LlamaShape, Weights, llama_specs, make_weights, one_weight
from weight_sync.vllm_layout import Span, vllm_spans  # the engine's layout: one copy


class LayoutMismatch(ValueError):
    """The trainer's tensors cannot fill the engine's layout: refused before any copy."""


class WrongDevice(RuntimeError):
    """A handle for memory on another GPU than the one this process is on."""


class InFlight(RuntimeError):
    """A second update started before the engine acknowledged the first."""


# --------------------------------------------------------------------------- the engine's layout
class Entry(NamedTuple):
    name: str
    shape: tuple
    offset: int  # bytes from the start of the flat buffer, a whole number of chunks
    nbytes: int


class EngineLayout:
    """One TP rank's tensors in the engine's dtype, as views of one flat byte buffer. Each
    tensor starts on a checksum chunk (the padding is zeros and counts for nothing), so a
    tensor's checksum is the sum of its chunks': one pass over the buffer, then one index_add."""

    def __init__(self, shape: LlamaShape, spans: list[Span], dtype, chunk_bytes: int) -> None:
        self.hf_shapes = {name: tuple(f) for name, f, _ in llama_specs(shape)}
        sizes: dict[str, list[int]] = {}
        for s in spans:  # each tensor: its first HF tensor's shape, as long as its spans reach
            sizes.setdefault(s.name, list(self.hf_shapes[s.hf_name]))[s.dim] = s.stop
        self.dtype, self.chunk_bytes, self.spans = dtype, chunk_bytes, spans
        self.entries, owner, offset = [], [], 0
        for i, (name, dims) in enumerate(sizes.items()):
            nbytes = math.prod(dims) * dtype.itemsize
            chunks = -(-nbytes // chunk_bytes)
            self.entries.append(Entry(name, tuple(dims), offset, nbytes))
            owner += [i] * chunks
            offset += chunks * chunk_bytes
        self.size, self.owner = offset, torch.tensor(owner)
        self.index = {e.name: i for i, e in enumerate(self.entries)}

    def views(self, flat: torch.Tensor) -> Weights:
        return {
            e.name: flat[e.offset : e.offset + e.nbytes].view(self.dtype).view(e.shape)
            for e in self.entries
        }

    def table(self, flat: torch.Tensor, chunks: torch.Tensor | None = None) -> torch.Tensor:
        """The checksum table of a buffer in this layout: one int64 per tensor (from its chunks'
        checksums, if they are already taken)."""
        if self.owner.device != flat.device:  # once: a layout serves one device
            self.owner = self.owner.to(flat.device)
        sums = torch.zeros(len(self.entries), dtype=torch.int64, device=flat.device)
        chunks = chunk_sums(flat, self.chunk_bytes) if chunks is None else chunks
        return sums.index_add_(0, self.owner, chunks)

    def names_at(self, indices: list[int]) -> list[str]:
        return [self.entries[i].name for i in indices]

    def places(self, span: Span, device) -> torch.Tensor:
        """Where span's int64 words go in the flat buffer, counted in words, row by row: rows
        [start, stop) along dim 0 (one run), or columns [start, stop) of every row along dim 1."""
        entry = self.entries[self.index[span.name]]
        per_word = 8 // self.dtype.itemsize  # elements in one int64 word
        first = entry.offset // 8
        if span.dim == 0:
            inner = math.prod(entry.shape[1:])  # elements per row (1 for a 1-D tensor)
            run = (span.start * inner // per_word, span.stop * inner // per_word)
            return first + torch.arange(*run, device=device)
        row_words = entry.shape[1] // per_word
        cols = torch.arange(span.start // per_word, span.stop // per_word, device=device)
        return first + torch.arange(entry.shape[0], device=device)[:, None] * row_words + cols


class Buffers(NamedTuple):
    """A flat byte buffer in an EngineLayout and its tensors (views)."""

    flat: torch.Tensor
    views: Weights
    layout: EngineLayout

    @classmethod
    def allocate(cls, layout: EngineLayout, device) -> Buffers:
        flat = torch.zeros(layout.size, dtype=torch.uint8, device=device)
        return cls(flat, layout.views(flat), layout)

    def names_at(self, indices: list[int]) -> list[str]:
        """The names of the tensors at these places of the checksum table."""
        return self.layout.names_at(indices)


# --8<-- [start:checksum]
def placed_sum(words: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """The checksum of int64 words at these places of the engine's flat buffer (in words): each
    word times 2 * place + 1, summed. The weight makes a word in the wrong place count (gate and
    up rows swapped, q and k in each other's rows); the sum wraps around and the additions may
    come in any order, so every kernel and device agrees bit for bit."""
    return (words.flatten() * (places.flatten() * 2 + 1)).sum()


def chunk_sums(
    flat: torch.Tensor, chunk_bytes: int, slab: int | None = None, first: int = 0
) -> torch.Tensor:
    """placed_sum of each chunk of `flat` (an engine buffer, or the part of one that starts at
    chunk `first`), as 2cW * sum(words) + sum(words * (2j + 1)) for chunk c of W words, j a
    word's place in its chunk; `slab` chunks at a time, so the temporary stays small (on CPU,
    4 MB: in cache; on a GPU, 256 MB: few launches)."""
    if slab is None:
        slab = max(1, (4 << 20 if flat.device.type == "cpu" else 256 << 20) // chunk_bytes)
    words = flat.view(torch.int64).view(-1, chunk_bytes // 8)
    odd = torch.arange(words.shape[1], device=flat.device) * 2 + 1
    sums = torch.empty(words.shape[0], dtype=torch.int64, device=flat.device)
    for c in range(0, words.shape[0], slab):
        part, out = words[c : c + slab], sums[c : c + slab]
        at = torch.arange(first + c, first + c + part.shape[0], device=flat.device)
        torch.sum(part * odd, 1, out=out).add_(at * (2 * words.shape[1]) * part.sum(1))  # no copy
    return sums
    # --8<-- [end:checksum]


def lay_out(spans: list[Span], weights: Weights, views: Weights) -> None:
    """Fill the engine's tensors `views` from HF tensors `weights`, converting the dtype."""
    for s in spans:
        n = s.stop - s.start
        views[s.name].narrow(s.dim, s.start, n).copy_(
            weights[s.hf_name].narrow(s.dim, s.hf_start, n)
        )


def load(spans: list[Span], shape: LlamaShape, seed: int, device, views: Weights) -> None:
    """Fill the engine's tensors `views` with model `seed`, one HF tensor at a time: the model is
    never whole in float32 (an 8B one would be 32 GB beside the engine's two bf16 copies)."""
    for name, _, _ in llama_specs(shape):
        mine = [s for s in spans if s.hf_name == name]
        if mine:
            lay_out(mine, {name: one_weight(shape, name, seed, device)}, views)


def reference(shape, seed, tp_rank, tp_size, dtype, chunk_bytes, device="cpu") -> Buffers:
    """What engine rank tp_rank holds after loading model `seed`, made in one process (on a
    device of the trainer's type: CPU and CUDA draw different numbers from one seed)."""
    layout = EngineLayout(shape, vllm_spans(shape, tp_rank, tp_size), dtype, chunk_bytes)
    out = Buffers.allocate(layout, device)
    load(layout.spans, shape, seed, device, out.views)
    return out


def check_layout(spans: list[Span], meta: dict[str, tuple], layout: EngineLayout) -> None:
    """Every HF tensor the engine's spans read exists in the trainer (meta: {name: (shape,
    dtype, offset)}) with the model's shape and a float dtype: else LayoutMismatch, before a
    single byte is copied."""
    problems = []
    for name in dict.fromkeys(s.hf_name for s in spans):
        need = layout.hf_shapes[name]
        if name not in meta:
            problems.append(f"{name} is missing from the trainer's tensors")
        elif tuple(meta[name][0]) != need or "float" not in meta[name][1]:
            have = f"{tuple(meta[name][0])} {meta[name][1]}"
            problems.append(f"{name} is {have} in the trainer, the engine needs {need}")
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise LayoutMismatch("layout mismatch: " + "; ".join(problems[:2]) + more)


# --------------------------------------------------------------------------- handles
def gpu_id(device: torch.device, gpu_map: list[int] | None = None) -> str:
    """The physical GPU, as every process names it alike: its UUID. Device indexes are not: under
    different CUDA_VISIBLE_DEVICES, cuda:0 is another GPU in each process. On CPU, the simulated
    GPU of this rank (gpu_map[rank])."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_properties(device).uuid)
    return f"simulated-gpu-{gpu_map[dist.get_rank()] if gpu_map else 0}"


def use_shared_memory() -> None:
    """On CPU, handles are shared-memory file names: any process can open them, torchrun's too
    (the default, file descriptors, only passes to children started by this process)."""
    torch.multiprocessing.set_sharing_strategy("file_system")


def share(tensor: torch.Tensor) -> bytes:
    """A handle to `tensor`'s memory, as bytes for any channel: CUDA IPC (cudaIpcGetMemHandle of
    its allocation, an offset, the device index) or, on CPU, a shared-memory file and offset."""
    if tensor.device.type == "cpu" and not tensor.is_shared():
        tensor.share_memory_()
    return bytes(ForkingPickler.dumps(reduce_tensor(tensor)))


# --8<-- [start:open]
def open_shared(handles: dict[str, bytes], mine: str, device: torch.device) -> torch.Tensor:
    """Open the handle of this process's GPU: keyed by UUID, then re-aimed at this process's own
    index of that GPU (the trainer's index may name another GPU here). No copy: the tensor
    returned is the trainer's memory."""
    if mine not in handles:
        raise WrongDevice(
            f"no handle for this engine's GPU {mine}: the trainer shared from "
            f"{sorted(handles)}. A handle opens only on the GPU holding the memory; key handles "
            "by the GPU's UUID, never by a device index or a rank"
        )
    rebuild, args = pickle.loads(handles[mine])
    if device.type == "cuda":
        args = list(args)
        args[6] = device.index  # the storage's device: this process's index of that GPU
    return rebuild(*args)
    # --8<-- [end:open]


# --------------------------------------------------------------------------- control messages
class Pair:
    """Control messages between one trainer rank and its engine rank: a local socket (the two
    share a host), set up once over the default group. A peer that dies closes it, and the
    other side's recv() fails at once (a gloo recv already waiting would wait forever). Messages
    are small tuples; the weights never go through it."""

    def __init__(self, peer: int, listen: bool) -> None:
        if listen:  # the engine: listen on a free port, tell the trainer where and the key
            key = os.urandom(16)
            with Listener(("127.0.0.1", 0), authkey=key) as listener:
                dist.send_object_list([listener.address, key], peer)
                self.conn = listener.accept()
        else:
            where = [None, None]
            dist.recv_object_list(where, peer)
            self.conn = Client(tuple(where[0]), authkey=where[1])

    def send(self, op: int, version: int = 0, a: int = 0, obj: object = None) -> None:
        self.conn.send((op, version, a, obj))

    def recv(self) -> tuple[int, int, int, object]:
        """The next message; ConnectionError if the peer is gone."""
        try:
            return self.conn.recv()
        except (EOFError, OSError) as err:
            raise ConnectionError(
                f"the peer closed the connection ({type(err).__name__})"
            ) from None


STOP, OPEN, FRESH, BUCKET, RELEASE, CHECK, PULL, ACK, REFUSED = range(
    9
)  # the ops of a Pair's messages


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the engine
class Engine:
    """One TP rank of a colocated engine: live weights it serves, staging it fills, a version.
    An update lands in staging, is verified, then becomes live by a swap: the engine serves the
    old version or the new one, never a mix (the cost: a second copy of its weights)."""

    def __init__(self, shape, tp_rank, tp_size, dtype, device, seed, chunk_bytes) -> None:
        self.spans = vllm_spans(shape, tp_rank, tp_size)
        self.layout = EngineLayout(shape, self.spans, dtype, chunk_bytes)
        self.device, self.version = device, 0
        self.layout.owner = self.layout.owner.to(device)
        self.live = Buffers.allocate(self.layout, device)
        self.staging = Buffers.allocate(self.layout, device)
        load(self.spans, shape, seed, device, self.live.views)
        self.trainer: Weights | None = None  # the trainer's tensors, opened once (design c)
        self.trainer_flat: torch.Tensor | None = None  # the buffer they are views of
        self.bucket: Weights | None = None  # verl's shared bucket, opened once (design b)

    # --8<-- [start:commit]
    def commit(self, version: int, bad: list[str]) -> bool:
        """Verified: staging becomes live (a swap, no copy). Else the live version stays."""
        if bad:
            return False
        self.live, self.staging = self.staging, self.live
        self.version = version
        return True
        # --8<-- [end:commit]

    @property
    def weights(self) -> Weights:
        return self.live.views


# --8<-- [start:trainer_table]
def trainer_table(spans: list[Span], weights: Weights, layout: EngineLayout) -> torch.Tensor:
    """The trainer's checksum table in the engine's layout, without building the engine's
    tensors: a fused tensor's checksum is the sum of its spans', each span's words weighted by
    the places they will have in the engine's buffer. One span at a time, converted (a
    transient copy of one span)."""
    device = next(iter(weights.values())).device
    table = torch.zeros(len(layout.entries), dtype=torch.int64, device=device)
    for s in spans:
        part = weights[s.hf_name].narrow(s.dim, s.hf_start, s.hf_stop - s.hf_start)
        words = part.to(layout.dtype).contiguous().view(torch.int64)
        table[layout.index[s.name]] += placed_sum(words, layout.places(s, device))
    return table
    # --8<-- [end:trainer_table]


def flat_weights(
    shape: LlamaShape, seed: int, device, dtype=torch.float32
) -> tuple[torch.Tensor, Weights]:
    """The trainer's model `seed` in one flat buffer (as Megatron and FSDP2 keep parameters): one
    allocation, so one handle, and an optimizer that steps in place keeps it valid."""
    specs = llama_specs(shape)
    total = sum(math.prod(full) for _, full, _ in specs)
    flat = torch.empty(total, dtype=dtype, device=device)
    if device.type == "cpu":
        flat.share_memory_()
    views, at = {}, 0
    for name, full, _ in specs:
        views[name] = flat[at : at + math.prod(full)].view(full)
        at += math.prod(full)
    return flat, make_weights(shape, seed, device, into=views)


# --------------------------------------------------------------------------- the three designs
# --8<-- [start:fresh]
def fresh_handles(trainer: Trainer, gpu: str) -> None:
    """(a) OpenRLHF: every update, clone each tensor and send a fresh handle per tensor; the
    engine opens each (one cudaIpcOpenMemHandle apiece), copies it in, and lets go. The clones
    are freed after the ack; ipc_collect returns what the engine has let go of."""
    clones = {name: t.clone() for name, t in trainer.weights.items()}  # the model, once more
    sync(trainer.device)
    trainer.pair.send(FRESH, obj={n: {gpu: share(t)} for n, t in clones.items()})
    op, *_ = trainer.pair.recv()
    del clones
    if trainer.device.type == "cuda":
        torch.cuda.ipc_collect()
    assert op == ACK
    # --8<-- [end:fresh]


class Bucket:
    """(b) verl: one flat bucket in the engine's dtype, shared once (its handle goes with the
    first update); each update the trainer packs every tensor into it in one fused copy and the
    engine copies them out into its own layout."""

    def __init__(self, pair: Pair, weights: Weights, gpu: str, dtype) -> None:
        self.pair, self.names, at, where = pair, list(weights), 0, {}
        for name, t in weights.items():
            where[name], at = (at, tuple(t.shape)), at + t.numel()
        device = next(iter(weights.values())).device
        self.flat = torch.zeros(at, dtype=dtype, device=device)
        self.nbytes, self.device = self.flat.numel() * dtype.itemsize, device
        self.views = bucket_views(self.flat, where)
        self.sources = [weights[n] for n in self.names]
        self.first = ({gpu: share(self.flat)}, where)

    def update(self) -> None:
        torch._foreach_copy_([self.views[n] for n in self.names], self.sources)
        sync(self.device)
        self.pair.send(BUCKET, obj=self.first)
        self.first = None  # the handle goes once
        op, *_ = self.pair.recv()
        assert op == ACK


def engine_fresh_handles(engine: Engine, handles: dict, gpu: str) -> None:
    opened = {name: open_shared(h, gpu, engine.device) for name, h in handles.items()}
    lay_out(engine.spans, opened, engine.live.views)  # straight into live, as OpenRLHF does
    sync(engine.device)
    del opened  # the trainer may now free its clones


def engine_bucket(engine: Engine, bucket_views: Weights) -> None:
    lay_out(engine.spans, bucket_views, engine.live.views)
    sync(engine.device)


def bucket_views(bucket: torch.Tensor, where: dict) -> Weights:
    return {n: bucket[a : a + math.prod(s)].view(s) for n, (a, s) in where.items()}


# --------------------------------------------------------------------------- both sides' loops
class Trainer:
    """The trainer's end of a Pair: its weights (one flat buffer, shared once) and at most one
    update in flight. While one is, the engine is reading the trainer's memory: starting another,
    or stepping the optimizer, would tear what the engine reads."""

    def __init__(self, pair: Pair, flat: torch.Tensor, weights: Weights, device) -> None:
        self.pair, self.flat, self.weights, self.device = pair, flat, weights, device
        self.in_flight: int | None = None

    def open(self, handles: dict[str, bytes], meta: dict | None = None) -> str | None:
        """Send every GPU's handle and this trainer's tensors' layout; None, or why refused."""
        self.pair.send(OPEN, obj=(handles, self.meta() if meta is None else meta))
        op, _, _, why = self.pair.recv()
        return why if op == REFUSED else None

    def meta(self) -> dict[str, tuple]:
        """{name: (shape, dtype, offset in the flat buffer in elements)}: what the engine checks
        and views the opened buffer by."""
        base = self.flat.data_ptr()
        return {
            n: (tuple(t.shape), str(t.dtype), (t.data_ptr() - base) // t.element_size())
            for n, t in self.weights.items()
        }

    def start(self, version: int, table: torch.Tensor) -> None:
        if self.in_flight is not None:
            raise InFlight(
                f"update {version} started while update {self.in_flight} is in flight: wait for "
                "the engine's ack first (it is reading your weights: no optimizer step either)"
            )
        sync(self.device)  # the weights and the table are written before the engine reads them
        self.pair.send(PULL, version, obj=table.tolist())
        self.in_flight = version

    def finish(self) -> tuple[int, list[str]]:
        """Wait for the engine's answer: (the version it serves now, tensors refused)."""
        op, version, _, bad = self.pair.recv()
        self.in_flight = None
        return version, (bad or []) if op == REFUSED else []

    def stop(self) -> None:
        """The last message: the engine lets go of the handles, then the trainer may free."""
        self.pair.send(STOP)
        self.pair.recv()
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()


def serve(engine: Engine, pair: Pair, gpu: str, on_pull, say) -> None:
    """The engine's loop: answer the trainer until it says stop, or is gone. on_pull(engine,
    table, version) -> tensors refused ([]: committed). If the trainer dies, its handles go and
    the engine keeps serving its last committed version."""
    while True:
        try:
            op, version, _, obj = pair.recv()
        except ConnectionError as err:  # the trainer died: its socket closed
            engine.trainer = engine.trainer_flat = engine.bucket = None  # never read it again
            say(
                f"the trainer is gone ({err}): its handles dropped, still serving version "
                f"{engine.version}, verified when it was committed"
            )
            return
        if op == STOP:  # let go of every handle first, so the trainer may free its memory
            engine.trainer = engine.trainer_flat = engine.bucket = None
            sync(engine.device)
            pair.send(ACK, engine.version)
            return
        if op == OPEN:
            handles, meta = obj
            try:
                engine.trainer = open_trainer(engine, handles, meta, gpu)
                pair.send(ACK, engine.version)
            except (LayoutMismatch, WrongDevice) as err:
                why = f"{err} (nothing copied; version {engine.version} kept)"
                pair.send(REFUSED, engine.version, obj=why)
        elif op == FRESH:
            engine_fresh_handles(engine, obj, gpu)
            pair.send(ACK, version)
        elif op == BUCKET:
            if obj is not None:  # the bucket's handle and layout, sent once
                engine.bucket = bucket_views(open_shared(obj[0], gpu, engine.device), obj[1])
            engine_bucket(engine, engine.bucket)
            pair.send(ACK, version)
        elif op == RELEASE:  # let go of the bucket, so the trainer can free it
            engine.bucket = None
            sync(engine.device)
            pair.send(ACK, version)
        elif op == CHECK:  # does the live version match this table?
            live = engine.layout.table(engine.live.flat).tolist()
            bad = engine.layout.names_at([i for i, (a, b) in enumerate(zip(live, obj)) if a != b])
            pair.send(REFUSED if bad else ACK, engine.version, obj=bad or None)
        elif op == PULL:
            bad = on_pull(engine, torch.tensor(obj, device=engine.device), version)
            pair.send(REFUSED if bad else ACK, engine.version, obj=bad or None)


def open_trainer(engine: Engine, handles: dict, meta: dict, gpu: str) -> Weights:
    """The trainer's tensors, as views of its flat buffer opened once; refused before any copy
    if they cannot fill this engine's layout."""
    check_layout(engine.spans, meta, engine.layout)
    flat = engine.trainer_flat = open_shared(handles, gpu, engine.device)
    return {n: flat[at : at + math.prod(shape)].view(shape) for n, (shape, _, at) in meta.items()}


def nccl_refusal(device: torch.device, timeout_s: float = 30.0) -> str:
    """Try NCCL between every rank: on one GPU shared by two ranks, NCCL's own error. Every rank
    must call it. On CPU, what would happen, in words."""
    if device.type != "cuda":
        return (
            "no GPU here; on one, NCCL fails at its first collective with 'Duplicate GPU "
            "detected : rank 0 and rank 1 both on CUDA device ...': NCCL builds one link per "
            "pair of GPUs, and a pair of ranks on one GPU has none"
        )
    import datetime

    group = dist.new_group(backend="nccl", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        dist.all_reduce(torch.ones(1, device=device), group=group)
        torch.cuda.synchronize(device)
        return "NCCL accepted it: the ranks are on different GPUs"
    except Exception as err:  # torch.distributed.DistBackendError
        text = str(err)
        at = text.find("Duplicate GPU")
        return "NCCL: " + (text[at : at + 120] if at >= 0 else text.splitlines()[0][:160])


# --------------------------------------------------------------------------- the two-stage route
# --8<-- [start:two_stage]
def two_stage_plan(trainer_gpus: list[int], engine_gpus: list[int]) -> list[tuple]:
    """ChatLearn's two-stage sync for trainer ranks holding the full weights and an engine of
    TP = len(engine_gpus): stage 1, a trainer rank sends to an engine rank on ANOTHER GPU (NCCL
    p2p between two GPUs); stage 2, that engine rank broadcasts in the engine's own group (one
    GPU per engine rank). Every engine rank that shares a GPU with a trainer rank could take an
    IPC handle instead; this route never needs one. Returns [("send", trainer rank, engine
    rank), ("broadcast", engine rank, [engine ranks])]; raises ValueError for an infeasible map."""
    if len(set(engine_gpus)) < len(engine_gpus):
        dup = next(g for g in engine_gpus if engine_gpus.count(g) > 1)
        raise ValueError(
            f"engine ranks {[r for r, g in enumerate(engine_gpus) if g == dup]} share GPU {dup}: "
            "the engine's own broadcast group cannot use NCCL; give each engine rank its own GPU"
        )
    for t, tg in enumerate(trainer_gpus):
        relay = next((e for e, eg in enumerate(engine_gpus) if eg != tg), None)
        if relay is not None:
            return [("send", t, relay), ("broadcast", relay, list(range(len(engine_gpus))))]
    raise ValueError(
        f"no engine rank is on a GPU without a trainer rank (trainer GPUs {trainer_gpus}, engine "
        f"GPUs {engine_gpus}): NCCL cannot pair two ranks of one GPU, so no first stage exists; "
        "use CUDA IPC handles (this lesson) instead"
    )
    # --8<-- [end:two_stage]


def run_two_stage(plan: list[tuple], trainer_ranks: list[int], engine_ranks: list[int], flat):
    """Carry out a two_stage_plan over the default group (gloo here, NCCL on GPUs): `flat`, the
    trainer's full weights in one buffer, lands in the same buffer of every engine rank. Every
    rank must call it (new_group is a collective)."""
    (_, t, relay), (_, _, ranks) = plan
    src, hub = trainer_ranks[t], engine_ranks[relay]
    engine_group = dist.new_group([engine_ranks[r] for r in ranks])
    rank = dist.get_rank()
    if rank == src:  # stage 1: between two GPUs
        dist.send(flat, hub)
    elif rank == hub:
        dist.recv(flat, src)
    if rank in engine_ranks:  # stage 2: inside the engine, one GPU per rank
        dist.broadcast(flat, hub, group=engine_group)


def pairs_over_nccl(plan: list[tuple], trainer_gpus: list[int], engine_gpus: list[int]) -> list:
    """Every (GPU, GPU) pair that the plan's NCCL operations connect."""
    out = []
    for op, src, dst in plan:
        if op == "send":
            out.append((trainer_gpus[src], engine_gpus[dst]))
        else:
            out += [(engine_gpus[src], engine_gpus[d]) for d in dst if d != src]
    return out


def two_stage_demo(say) -> None:
    """Lesson 11's two-stage section: a plan for a mixed map, then an infeasible map refused."""
    trainer_gpus, engine_gpus = [0, 1], [0, 1, 2]
    plan = two_stage_plan(trainer_gpus, engine_gpus)
    (_, t, relay), (_, _, ranks) = plan
    say(
        f"two-stage route for trainer GPUs {trainer_gpus}, engine GPUs {engine_gpus}: send "
        f"trainer {t} ->\n    engine {relay} (GPU {trainer_gpus[t]} -> {engine_gpus[relay]}), "
        f"then broadcast from engine {relay} to engine ranks {ranks}"
    )
    same_gpu = [(a, b) for a, b in pairs_over_nccl(plan, trainer_gpus, engine_gpus) if a == b]
    if same_gpu:
        raise RuntimeError(f"the two-stage plan pairs ranks of one GPU over NCCL: {same_gpu}")
    try:
        two_stage_plan([0], [0])
    except ValueError as err:
        say(
            "checked: the two-stage plan pairs no two ranks of one GPU over NCCL; with one GPU\n"
            f"    for both, it is refused: {str(err)[:45]}..."
        )
    else:
        raise RuntimeError("the two-stage plan accepted one GPU for the trainer and the engine")


def colocated_device(local_rank: int) -> torch.device:
    """Ranks 2p and 2p+1 of a node share its GPU p (the device from LOCAL_RANK); every rank
    shares GPU 0 when there are fewer GPUs. No GPU: the CPU, with shared-memory handles."""
    if not torch.cuda.is_available():
        use_shared_memory()
        return torch.device("cpu")
    device = torch.device("cuda", local_rank // 2 % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def median_ms(times: list[float]) -> float:
    times = sorted(times)
    return 1e3 * times[len(times) // 2]


def clock() -> float:
    return time.perf_counter()
