"""The plan of the fast path: where every tensor of an engine rank lives in one flat byte buffer
(Layout), the buffer cut in buckets (cut_buckets), what the trainer and the engine agree on
(Plan), a checksum per piece, and single-process references (checksum table, sha256 digest)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from itertools import zip_longest
from typing import NamedTuple

import torch

from weight_sync.model import LlamaShape, Weights, llama_specs, make_weights
from weight_sync.vllm_layout import Span, narrow, vllm_tensors

ALIGN = 256  # bytes: each tensor starts at a multiple of this in a flat buffer
Tensors = Iterable[tuple[str, tuple[int, ...], list[Span]]]  # (name, shard shape, its Spans)


class Entry(NamedTuple):
    name: str  # the engine's tensor (vLLM's name, e.g. a fused qkv_proj)
    shape: tuple  # this rank's shard
    spans: tuple  # Spans: which part of which HF tensor each part of it holds
    offset: int  # bytes from the start of the flat buffer, a multiple of ALIGN
    nbytes: int  # without the padding after it


class Layout:
    """Where each tensor of one engine rank lives in one flat byte buffer; views, no copies.
    Layout.vllm: an engine rank's tensors as vLLM holds them; Layout.hf: HF's full tensors."""

    def __init__(self, tensors: Tensors, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1):
        self.dtype, self.tp_rank, self.tp_size = dtype, tp_rank, tp_size
        self.entries, offset = [], 0
        for name, shape, spans in tensors:
            nbytes = math.prod(shape) * dtype.itemsize
            row_bytes = nbytes // shape[0]
            for s in spans:  # checksums read int64: every span's bytes start and end on one
                at = (s.start if s.dim == 0 else 0) * row_bytes
                size = nbytes if s.dim else (s.stop - s.start) * row_bytes
                if at % 8 or size % 8:
                    raise ValueError(
                        f"{name}: its part from {s.hf_name} takes bytes {at}:{at + size}, not "
                        "whole multiples of 8 (checksums read int64)"
                    )
            self.entries.append(Entry(name, tuple(shape), tuple(spans), offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        self.size = offset
        self.by_name = {e.name: e for e in self.entries}

    @classmethod
    def vllm(cls, shape: LlamaShape, dtype: torch.dtype, tp_rank: int, tp_size: int) -> Layout:
        return cls(vllm_tensors(shape, tp_rank, tp_size), dtype, tp_rank, tp_size)

    @classmethod
    def hf(cls, shape: LlamaShape, dtype: torch.dtype) -> Layout:
        return cls(
            [
                (n, full, [Span(n, 0, 0, full[0], n, 0, full[0])])
                for n, full, _ in llama_specs(shape)
            ],
            dtype,
        )

    def views(self, flat: torch.Tensor) -> Weights:
        return {
            e.name: flat[e.offset : e.offset + e.nbytes].view(self.dtype).view(e.shape)
            for e in self.entries
        }

    def allocate(self, device: torch.device | str) -> tuple[torch.Tensor, Weights]:
        flat = torch.zeros(self.size, dtype=torch.uint8, device=device)
        return flat, self.views(flat)

    def hf_views(self, flat: torch.Tensor) -> Weights:
        """TP 1 only: HF's tensors as views of `flat` laid out as this layout (a fused qkv_proj
        is q, k and v back to back): a trainer holding its weights so sends them with no copy."""
        if self.tp_size != 1:
            raise ValueError("hf_views: at TP > 1 a rank holds parts of HF's tensors, not them")
        views = self.views(flat)
        return {
            s.hf_name: narrow(views[e.name], s.dim, s.start, s.stop)
            for e in self.entries
            for s in e.spans
        }


class Piece(NamedTuple):
    """Rows start:stop of engine tensor `name` on engine rank tp_rank (elements of a 1-D one), at
    `offset` in a bucket: the part weights[hf_name][hf_index] of HF's tensor hf_name."""

    name: str  # the engine's tensor (vLLM's name) it lands in
    start: int
    stop: int
    hf_name: str  # the HF tensor it comes from
    hf_index: tuple  # slices: which rows (and columns) of that HF tensor
    tp_rank: int  # the engine rank whose shard this is
    dtype: torch.dtype  # the engine's dtype: what goes on the wire
    offset: int  # bytes from the start of the bucket
    nbytes: int


class Bucket(NamedTuple):
    """One transfer: bytes start:end of engine rank tp_rank's flat buffer."""

    dst: int | None  # the weight-update rank it goes to; None: a broadcast to every engine rank
    tp_rank: int
    start: int
    end: int
    pieces: tuple

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _runs(e: Entry):
    """(first row, rows, HF name, index of the HF tensor for rows a:b) of each Span of e."""
    for s in e.spans:
        if s.dim == 0:  # rows s.start:s.stop hold HF rows s.hf_start:s.hf_stop
            yield (
                s.start,
                s.stop - s.start,
                s.hf_name,
                lambda a, b, s=s: (slice(s.hf_start + a - s.start, s.hf_start + b - s.start),),
            )
        else:  # every row, the HF tensor's columns s.hf_start:s.hf_stop
            if len(e.spans) > 1:
                raise ValueError(f"{e.name}: a column span must be its tensor's only span")
            yield (
                0,
                e.shape[0],
                s.hf_name,
                lambda a, b, s=s: (
                    slice(a, b),
                    slice(s.hf_start, s.hf_stop),
                ),
            )


def cut_buckets(layout: Layout, bucket_bytes: int, dst: int | None) -> list[Bucket]:
    """Cut a layout into buckets of at most bucket_bytes; a tensor that does not fit in what is
    left of a bucket goes on in the next one, cut between rows. A piece never crosses from one
    HF tensor to another (a fused qkv_proj is three pieces at least)."""
    buckets, pieces, start = [], [], 0
    for e in layout.entries:
        row_bytes = e.nbytes // e.shape[0]
        step = 8 // math.gcd(row_bytes, 8)  # cut every `step` rows: pieces of whole int64s
        if step * row_bytes > bucket_bytes:
            raise ValueError(
                f"{step} row(s) of {e.name} take {step * row_bytes} bytes, more than "
                f"a bucket ({bucket_bytes}): use larger buckets"
            )
        for first, rows, hf_name, index in _runs(e):
            row = first
            while row < first + rows:
                at = e.offset + row * row_bytes
                fit = min(first + rows - row, (start + bucket_bytes - at) // row_bytes)
                if fit < first + rows - row:
                    fit -= fit % step
                if fit <= 0:  # this bucket is full: close it where the next piece starts
                    buckets.append(Bucket(dst, layout.tp_rank, start, at, tuple(pieces)))
                    pieces, start = [], at
                    continue
                pieces.append(
                    Piece(
                        e.name,
                        row,
                        row + fit,
                        hf_name,
                        index(row, row + fit),
                        layout.tp_rank,
                        layout.dtype,
                        at - start,
                        fit * row_bytes,
                    )
                )
                row += fit
    buckets.append(Bucket(dst, layout.tp_rank, start, layout.size, tuple(pieces)))
    return buckets


# --8<-- [start:checksum]
def checksum_pieces(bucket: Bucket, data: torch.Tensor) -> torch.Tensor:
    """One int64 per piece of `bucket` (`data` holds the bucket's bytes): its bytes read as int64
    and summed. Integer addition wraps around and does not care about order, so the trainer and
    the engine agree bit for bit however their kernels split the sum."""
    return torch.stack(
        [data[p.offset : p.offset + p.nbytes].view(torch.int64).sum() for p in bucket.pieces]
    )


# --8<-- [end:checksum]


class Plan:
    """What the trainer and the engine agree on, each building it from the same metadata (sent
    once): every engine rank's layout (vLLM's: fused qkv_proj, gate_up_proj), and the buckets in
    the order they go on the wire. The trainer holds HF's tensors: each piece says which part.

    resharding "shard": each engine rank gets only its shard, point to point (TP 1: a broadcast).
    resharding "broadcast": the full tensors go to every engine rank, which slices its shard."""

    def __init__(
        self,
        shape: LlamaShape,
        dtype: torch.dtype,
        tp_size: int,
        bucket_bytes: int,
        resharding: str = "shard",
    ) -> None:
        if resharding not in ("shard", "broadcast"):
            raise ValueError(f"resharding {resharding!r}: use 'shard' or 'broadcast'")
        self.shape, self.specs = shape, llama_specs(shape)  # specs: the HF tensors to send
        self.dtype, self.tp_size, self.resharding = dtype, tp_size, resharding
        self.layouts = [Layout.vllm(shape, dtype, r, tp_size) for r in range(tp_size)]
        self.rank_buckets = [
            cut_buckets(layout, bucket_bytes, None if tp_size == 1 else 1 + r)
            for r, layout in enumerate(self.layouts)
        ]
        self.slices_after_broadcast = resharding == "broadcast" and tp_size > 1
        if self.slices_after_broadcast:
            self.wire = Layout.hf(shape, dtype)  # HF's full tensors, one after the other
            self.buckets = cut_buckets(self.wire, bucket_bytes, None)
            self.checksummed = [b for buckets in self.rank_buckets for b in buckets]
        else:  # one bucket for each rank in turn, so every rank is receiving from the start
            self.buckets = [b for row in zip_longest(*self.rank_buckets) for b in row if b]
            self.checksummed = self.buckets
        self.n_sums = sum(len(b.pieces) for b in self.checksummed)
        self.bucket_bytes = max(b.nbytes for b in self.buckets)

    def table_positions(self, tp_rank: int) -> list[tuple[Bucket, int]]:
        """[(bucket, index of its first piece in the checksum table)] for tp_rank's buckets."""
        out, at = [], 0
        for b in self.checksummed:
            if b.tp_rank == tp_rank:
                out.append((b, at))
            at += len(b.pieces)
        return out

    def bytes_received(self) -> int:
        """Bytes that land on engine ranks, all of them together (the checksums aside)."""
        if self.slices_after_broadcast:
            return self.tp_size * self.wire.size
        return sum(layout.size for layout in self.layouts)

    def new_buffers(self, device: torch.device | str, count: int = 2) -> list[torch.Tensor]:
        """`count` flat byte buffers of a bucket each: fill one while another is on the wire."""
        return [
            torch.zeros(self.bucket_bytes, dtype=torch.uint8, device=device) for _ in range(count)
        ]

    def flat_source(self, weights: Weights) -> torch.Tensor | None:
        """If `weights` are views of one flat buffer laid out exactly as the wire (TP 1, the
        engine's dtype, the same offsets: Layout.hf_views), that buffer as bytes: a bucket is
        then a slice of it, no copy at all. Megatron and FSDP2 keep parameters in such
        buffers. Else None."""
        if self.tp_size > 1 or self.slices_after_broadcast:
            return None
        # Checked already if no tensor moved (a tensor replaced in the dict has another address;
        # the first and the last alone would miss one in the middle): a few us, the check ~1 ms
        key = (id(weights), tuple(w.data_ptr() for w in weights.values()))
        if getattr(self, "_flat_key", None) == key:
            return self._flat
        self._flat_key, self._flat = key, self._find_flat(weights)
        return self._flat

    def _find_flat(self, weights):
        layout = self.layouts[0]
        storage = weights[layout.entries[0].spans[0].hf_name].untyped_storage()
        for e in layout.entries:
            row_bytes = e.nbytes // e.shape[0]
            for s in e.spans:  # at TP 1 each span is a whole HF tensor
                w = weights[s.hf_name]
                if (
                    w.dtype != self.dtype
                    or w.shape[s.dim] != s.stop - s.start
                    or not w.is_contiguous()
                    or w.untyped_storage().data_ptr() != storage.data_ptr()
                    or w.storage_offset() * w.element_size()
                    != e.offset + (s.start * row_bytes if s.dim == 0 else 0)
                ):
                    return None
        if storage.nbytes() < layout.size:
            return None
        device = weights[layout.entries[0].spans[0].hf_name].device
        return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (layout.size,))

    def shard_checksums(
        self, weights: Weights, pack_bucket: Callable[[Bucket, Weights, torch.Tensor], None]
    ) -> list[torch.Tensor]:
        """Broadcast-then-slice: what a rank holds is not what went on the wire, so pack every
        rank's shard once more, only to checksum it (a cost of that way of resharding)."""
        device = next(iter(weights.values())).device
        scratch = torch.zeros(
            max(b.nbytes for b in self.checksummed), dtype=torch.uint8, device=device
        )
        sums = []
        for b in self.checksummed:
            pack_bucket(b, weights, scratch[: b.nbytes])
            sums.append(checksum_pieces(b, scratch[: b.nbytes]))
        return sums


def lay_out_shards(layout: Layout, weights: Weights, flat: torch.Tensor) -> None:
    """Copy each part of HF's full tensors `weights` that the layout's rank holds into its
    place in `flat` (HF -> vLLM for one rank, into a flat buffer)."""
    views = layout.views(flat)
    for e in layout.entries:
        for s in e.spans:
            narrow(views[e.name], s.dim, s.start, s.stop).copy_(
                narrow(weights[s.hf_name], s.dim, s.hf_start, s.hf_stop)
            )


def reference_checksums(plan: Plan, weights: Weights) -> torch.Tensor:
    """The checksum table of a push of `weights`, computed single-process on the CPU."""
    flats = []
    for layout in plan.layouts:
        flat = torch.zeros(layout.size, dtype=torch.uint8)
        lay_out_shards(layout, {k: v.cpu() for k, v in weights.items()}, flat)
        flats.append(flat)
    return torch.cat(
        [checksum_pieces(b, flats[b.tp_rank][b.start : b.end]) for b in plan.checksummed]
    )


def digest(layout: Layout, flat: torch.Tensor) -> str:
    """sha256 of every tensor's bytes in `flat` (the padding between them left out)."""
    data = flat.cpu().numpy()
    h = hashlib.sha256()
    for e in layout.entries:
        h.update(data[e.offset : e.offset + e.nbytes].tobytes())
    return h.hexdigest()


def reference_digest(
    shape: LlamaShape, seed: int, dtype: torch.dtype, tp_rank: int, tp_size: int
) -> str:
    """digest() of what an engine rank holds after loading model `seed`, single-process."""
    layout = Layout.vllm(shape, dtype, tp_rank, tp_size)
    flat = torch.zeros(layout.size, dtype=torch.uint8)
    lay_out_shards(layout, make_weights(shape, seed, "cpu"), flat)
    return digest(layout, flat)
