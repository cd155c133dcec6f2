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

from weight_sync.model import LlamaShape, Spec, Weights, llama_specs, make_weights, shard_of

ALIGN = 256  # bytes: each tensor starts at a multiple of this in a flat buffer


class Entry(NamedTuple):
    name: str
    shape: tuple  # this rank's shard
    split_dim: int | None
    offset: int  # bytes from the start of the flat buffer, a multiple of ALIGN
    nbytes: int  # without the padding after it


class Layout:
    """Where each tensor of one engine rank lives in one flat byte buffer; views, no copies."""

    def __init__(
        self, specs: Iterable[Spec], dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        self.dtype, self.tp_rank, self.tp_size = dtype, tp_rank, tp_size
        self.entries, offset = [], 0
        for name, full, split in specs:
            shape = list(full)
            if split is not None:
                if full[split] % tp_size:
                    raise ValueError(
                        f"{name}: dim {split} of {tuple(full)} does not split into "
                        f"{tp_size} equal TP shards; pick a TP size that divides it"
                    )
                shape[split] //= tp_size
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes % 8:
                raise ValueError(
                    f"{name}: its shard is {nbytes} bytes, not a multiple of 8 "
                    "(checksums read int64)"
                )
            self.entries.append(Entry(name, tuple(shape), split, offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        self.size = offset
        self.by_name = {e.name: e for e in self.entries}

    def views(self, flat: torch.Tensor) -> Weights:
        return {
            e.name: flat[e.offset : e.offset + e.nbytes].view(self.dtype).view(e.shape)
            for e in self.entries
        }

    def allocate(self, device: torch.device | str) -> tuple[torch.Tensor, Weights]:
        flat = torch.zeros(self.size, dtype=torch.uint8, device=device)
        return flat, self.views(flat)


class Piece(NamedTuple):
    """Rows start:stop of a tensor's shard (elements for a 1-D tensor), at `offset` in a bucket."""

    name: str
    split_dim: int | None  # the dim of the full tensor split across TP ranks (None: replicated)
    tp_rank: int  # the engine rank whose shard this is
    tp_size: int
    start: int
    stop: int
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


def cut_buckets(layout: Layout, bucket_bytes: int, dst: int | None) -> list[Bucket]:
    """Cut a layout into buckets of at most bucket_bytes; a tensor that does not fit in what is
    left of a bucket goes on in the next one, cut between rows."""
    buckets, pieces, start = [], [], 0
    for e in layout.entries:
        rows = e.shape[0]
        row_bytes = e.nbytes // rows
        step = 8 // math.gcd(row_bytes, 8)  # cut every `step` rows: pieces of whole int64s
        if step * row_bytes > bucket_bytes:
            raise ValueError(
                f"{step} row(s) of {e.name} take {step * row_bytes} bytes, more than "
                f"a bucket ({bucket_bytes}): use larger buckets"
            )
        row = 0
        while row < rows:
            at = e.offset + row * row_bytes
            fit = min(rows - row, (start + bucket_bytes - at) // row_bytes)
            if fit < rows - row:
                fit -= fit % step
            if fit <= 0:  # this bucket is full: close it where the next piece starts
                buckets.append(Bucket(dst, layout.tp_rank, start, at, tuple(pieces)))
                pieces, start = [], at
                continue
            pieces.append(
                Piece(
                    e.name,
                    e.split_dim,
                    layout.tp_rank,
                    layout.tp_size,
                    row,
                    row + fit,
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
    once): every engine rank's layout, and the buckets in the order they go on the wire.

    resharding "shard": each engine rank gets only its shard, point to point (TP 1: a broadcast).
    resharding "broadcast": the full tensors go to every engine rank, which slices its shard."""

    def __init__(
        self,
        specs: Iterable[Spec],
        dtype: torch.dtype,
        tp_size: int,
        bucket_bytes: int,
        resharding: str = "shard",
    ) -> None:
        if resharding not in ("shard", "broadcast"):
            raise ValueError(f"resharding {resharding!r}: use 'shard' or 'broadcast'")
        self.specs = [(name, tuple(full), split) for name, full, split in specs]
        self.dtype, self.tp_size, self.resharding = dtype, tp_size, resharding
        self.layouts = [Layout(self.specs, dtype, r, tp_size) for r in range(tp_size)]
        self.rank_buckets = [
            cut_buckets(layout, bucket_bytes, None if tp_size == 1 else 1 + r)
            for r, layout in enumerate(self.layouts)
        ]
        self.slices_after_broadcast = resharding == "broadcast" and tp_size > 1
        if self.slices_after_broadcast:
            self.wire = Layout(self.specs, dtype)  # the full tensors, laid out for TP 1
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
        engine's dtype, the same offsets), that buffer as bytes: a bucket is then a slice of it,
        no copy at all. Megatron and FSDP2 keep parameters in such buffers. Else None."""
        if self.tp_size > 1:
            return None
        layout = self.layouts[0]
        first, last = (weights[layout.entries[i].name] for i in (0, -1))
        key = (id(weights), first.data_ptr(), last.data_ptr())
        if getattr(self, "_flat_key", None) == key:  # checked already: 291 tensors take ~1 ms
            return self._flat
        self._flat_key, self._flat = key, self._find_flat(weights)
        return self._flat

    def _find_flat(self, weights):
        layout = self.layouts[0]
        storage = weights[layout.entries[0].name].untyped_storage()
        for e in layout.entries:
            w = weights[e.name]
            if (
                w.dtype != self.dtype
                or tuple(w.shape) != e.shape
                or not w.is_contiguous()
                or w.untyped_storage().data_ptr() != storage.data_ptr()
                or w.storage_offset() * w.element_size() != e.offset
            ):
                return None
        if storage.nbytes() < layout.size:
            return None
        device = weights[layout.entries[0].name].device
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
    """Copy each whole shard of the full tensors `weights` into its place in `flat`."""
    views = layout.views(flat)
    for e in layout.entries:
        views[e.name].copy_(shard_of(weights[e.name], e.split_dim, layout.tp_rank, layout.tp_size))


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
    layout = Layout(llama_specs(shape), dtype, tp_rank, tp_size)
    flat = torch.zeros(layout.size, dtype=torch.uint8)
    lay_out_shards(layout, make_weights(shape, seed, "cpu"), flat)
    return digest(layout, flat)
