"""Lesson 10's machinery: a weight update from a Megatron-style TP x PP x DP trainer into a
vLLM-style engine of another TP, in one torchrun world (trainer ranks first, engine ranks after).

    plan_transfers  the planner, pure: every trainer rank's Spans (megatron.py) x every engine
                    rank's (vllm_layout.py) -> per engine rank, which trainer rank sends which
                    slab of which tensor into which slab of its own; DP replicas (and ranks
                    holding a copy of a norm) each send a disjoint share
    check_plan      its invariants: every destination element written exactly once
    routes          the three ways to move the bytes: "gather" (all to trainer rank 0, which
                    pushes), "direct" (every trainer rank to the engine ranks that need its
                    pieces) and "two-stage" (ChatLearn's: one engine rank per replica receives,
                    and forwards the others' slices inside the engine)
    update          one update: shapes and dtypes checked on every rank before a byte moves,
                    pieces packed in the engine's layout and dtype with a checksum each, moved,
                    verified (checksums, coverage), an all-engine-ranks vote, an atomic commit
                    and a version bump; or nothing changes and every engine rank says why

Lesson 13 adds the expert axis (a mixture of experts, moe.py): World's ep / etp place the routed
experts on the trainer (megatron.py), experts_by on the engine (vllm_layout.py), and before the
update the trainer regroups its experts among its ranks (regroup.py, by all_to_all or
all_gather); the regrouped layout is again Spans, so the same planner plans both steps.

Ranks: torchrun's default group; p2p with batch_isend_irecv, so gloo and NCCL (device from
LOCAL_RANK, as course.ranks.setup picks it) run the same code."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

from weight_sync.megatron import (
    expert_rank,
    megatron_spans,
    tensor_shapes,
    trainer_rank,
)
from weight_sync.model import LlamaShape, Weights
from weight_sync.moe import is_moe
from weight_sync.vllm_layout import Span, check_engine_tp, hf_specs, vllm_spans

Spans = dict[int, list[Span]]  # world rank -> what it holds
ALIGN = 8  # bytes: each piece starts at a multiple of this in a bucket (checksums read int64)


class PlanError(ValueError):
    """Two layouts that cannot be mapped; the message names the rule."""


class RankDied(RuntimeError):
    """Tests: raised by a trainer rank told to die mid-update (it then closes its connections)."""


class Transfer(NamedTuple):
    """src sends its tensor src_name's [src_start, +length) along dim into dst's tensor
    dst_name at [dst_start, +length) (the other dim whole): a part of HF tensor hf_name."""

    src: int
    src_name: str
    dst: int
    dst_name: str
    dim: int
    src_start: int
    dst_start: int
    length: int
    hf_name: str


class World(NamedTuple):
    """Who is who in one torchrun world: trainer ranks 0..T-1, then each engine replica. Of a
    mixture of experts: the trainer's EP and expert TP (0: its TP, Megatron's default), and
    whether the engine splits its experts by TP or by EP."""

    tp: int
    pp: int
    dp: int
    engine_tp: int
    replicas: int = 1
    ep: int = 1
    etp: int = 0
    experts_by: str = "tp"

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def trainers(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def size(self) -> int:
        return self.trainers + self.engine_tp * self.replicas

    def engine_ranks(self, replica: int) -> list[int]:
        first = self.trainers + replica * self.engine_tp
        return list(range(first, first + self.engine_tp))

    def is_trainer(self, rank: int) -> bool:
        return rank < self.trainers


def trainer_spans(shape: LlamaShape, world: World) -> Spans:
    """Every trainer rank's Megatron spans (DP replicas hold the same; of a mixture of experts,
    each rank its EP rank's experts)."""
    check_experts(shape, world)
    out = {}
    for rank in range(world.trainers):
        t, p, _ = trainer_rank(rank, world.tp, world.pp, world.dp)
        e = expert_rank(rank, world.tp, world.dp, world.ep, world.expert_tp)
        experts = (e.ep_rank, world.ep, e.etp_rank, world.expert_tp)
        out[rank] = megatron_spans(shape, t, world.tp, p, world.pp, experts)
    return out


def check_experts(shape, world: World) -> None:
    """Refuse (PlanError, naming the rule) a trainer's expert layout Megatron cannot hold."""
    etp, ep, e_all = world.expert_tp, world.ep, getattr(shape, "experts", 0)
    rules = [
        (not is_moe(shape) and (ep, world.etp) != (1, 0), "EP needs a mixture of experts"),
        (is_moe(shape) and e_all % ep, f"EP {ep} must divide the {e_all} experts (each EP rank "
         "holds whole experts, as many as the others)"),
        (is_moe(shape) and getattr(shape, "expert_intermediate", 0) % etp,
         f"expert TP {etp} must divide the experts' intermediate size"),
        ((world.tp * world.dp) % (etp * ep), f"expert TP x EP ({etp} x {ep}) must divide TP x DP "
         f"({world.tp} x {world.dp}): Megatron folds the expert axes onto a stage's ranks"),
    ]  # fmt: skip
    for broken, rule in rules:
        if broken:
            raise PlanError(f"trainer layout: {rule}")


def engine_spans(shape: LlamaShape, world: World) -> Spans:
    """Every engine rank's vLLM spans, by world rank."""
    check_engine_tp(shape, world.engine_tp, world.experts_by)
    return {
        rank: vllm_spans(shape, r, world.engine_tp, world.experts_by)
        for replica in range(world.replicas)
        for r, rank in enumerate(world.engine_ranks(replica))
    }


def plan_span(dst: int, span: Span, holders: list[tuple[int, Span]], turn: int = 0):
    """The transfers that fill one destination span: cut its HF range where any holder's range
    starts or stops; each cut piece is held whole by some trainer ranks (DP replicas, or TP
    ranks holding a copy), and each of them sends an equal, disjoint share of it."""
    lo, hi = span.hf_start, span.hf_stop
    cuts = sorted(
        {lo, hi, *(c for _, h in holders for c in (h.hf_start, h.hf_stop) if lo < c < hi)}
    )
    out = []
    for a, b in zip(cuts, cuts[1:]):
        who = [(r, h) for r, h in holders if h.hf_start <= a and b <= h.hf_stop]
        if not who:
            raise PlanError(
                f"coverage: no trainer rank holds {span.hf_name} [{a}:{b}) along dim "
                f"{span.dim}, which engine rank {dst} needs in {span.name}"
            )
        shares = min(len(who), b - a)  # an equal share per holder, none empty
        for i in range(shares):
            start, stop = a + (b - a) * i // shares, a + (b - a) * (i + 1) // shares
            rank, h = who[(i + turn) % len(who)]  # `turn`: small pieces rotate over holders
            out.append(
                Transfer(rank, h.name, dst, span.name, span.dim, h.start + start - h.hf_start,
                         span.start + start - span.hf_start, stop - start, span.hf_name)
            )  # fmt: skip
    return out


def plan_transfers(
    sources: Spans, destinations: Spans, core: Callable = plan_span
) -> dict[int, list[Transfer]]:
    """The plan: for every destination rank, its transfers. Pure; refuses (PlanError) a pair of
    layouts that cannot map, naming the rule, before anything runs."""
    holders = collections.defaultdict(list)
    for rank, spans in sorted(sources.items()):
        for s in spans:
            holders[s.hf_name].append((rank, s))
    wanted = {s.hf_name for spans in destinations.values() for s in spans}
    lost = sorted(n for n in wanted - set(holders) if ".mlp.experts." in n)
    if lost:
        raise PlanError(
            f"an expert missing on the trainer: no trainer rank holds {lost[:2]} (every routed "
            "expert must live on one EP rank of each expert group)"
        )
    for only, side in ((set(holders) - wanted, "trainer"), (wanted - set(holders), "engine")):
        if only:
            raise PlanError(
                f"name on one side only: the {side} has {sorted(only)[:3]} and the other side "
                "does not (both sides must hold the same HF tensors)"
            )
    plan = {}
    for dst, spans in sorted(destinations.items()):
        plan[dst] = []
        for s in spans:
            dims = {h.dim for _, h in holders[s.hf_name]}
            if dims != {s.dim}:
                raise PlanError(
                    f"{s.hf_name} is split along dim {sorted(dims)} by the trainer and dim "
                    f"{s.dim} by the engine: a span must run along the same dim on both sides"
                )
            plan[dst] += core(dst, s, holders[s.hf_name], dst + len(plan[dst]))
    return plan


def apply_plan(plan, sources: dict[int, Weights], destinations: dict[int, Weights]) -> None:
    """Carry out a plan in one process: the single-process reference of an update."""
    for dst, transfers in plan.items():
        for t in transfers:
            slab = sources[t.src][t.src_name].narrow(t.dim, t.src_start, t.length)
            destinations[dst][t.dst_name].narrow(t.dim, t.dst_start, t.length).copy_(slab)


def check_plan(plan: dict[int, list[Transfer]], destinations: Spans, shape: LlamaShape) -> None:
    """Coverage: every element of every destination tensor is written exactly once. Raises."""
    for dst, spans in destinations.items():
        counts = {n: torch.zeros(s[d], dtype=torch.int32) for n, s, d in _dims(spans, shape)}
        for t in plan.get(dst, []):
            counts[t.dst_name][t.dst_start : t.dst_start + t.length] += 1
        for name, c in counts.items():
            if not bool((c == 1).all()):
                bad = (c != 1).nonzero().flatten().tolist()
                raise PlanError(f"coverage: engine rank {dst}'s {name} rows {bad[:4]} are "
                                f"written {c[bad[0]].item()} times, not once")  # fmt: skip


def _dims(spans, shape):
    shapes, dims = tensor_shapes(spans, shape), {s.name: s.dim for s in spans}
    return [(n, shapes[n], dims[n]) for n in shapes]


def sent_by(
    plan: dict[int, list[Transfer]], shape: LlamaShape, itemsize: int
) -> collections.Counter:
    """Bytes each trainer rank sends (in the engine's dtype)."""
    full, out = {n: f for n, f, _ in hf_specs(shape)}, collections.Counter()
    for transfers in plan.values():
        for t in transfers:
            out[t.src] += transfer_numel(t, full) * itemsize
    return out


def transfer_numel(t, full):
    f = full[t.hf_name]
    return t.length * (f[1 - t.dim] if len(f) == 2 else 1)


# ---------------------------------------------------------------------------------------------
# buckets: every (trainer rank, engine rank) pair's pieces in one flat message
class Bucket(NamedTuple):
    src: int
    dst: int
    pieces: tuple  # (Transfer, byte offset, nbytes)
    nbytes: int  # pieces, then one int64 checksum per piece


def make_buckets(plan, shape: LlamaShape, dtype: torch.dtype) -> dict[tuple[int, int], Bucket]:
    full, out = {n: f for n, f, _ in hf_specs(shape)}, {}
    pairs = collections.defaultdict(list)
    for dst in sorted(plan):
        for t in plan[dst]:
            pairs[t.src, dst].append(t)
    for (src, dst), transfers in sorted(pairs.items()):
        pieces, at = [], 0
        for t in transfers:
            nbytes = transfer_numel(t, full) * dtype.itemsize
            pieces.append((t, at, nbytes))
            at += -(-nbytes // ALIGN) * ALIGN
        out[src, dst] = Bucket(src, dst, tuple(pieces), at + 8 * len(pieces))
    return out


def checksums(bucket: Bucket, data: torch.Tensor) -> torch.Tensor:
    """One int64 per piece: its bytes (padded to 8) read as int64 and summed (wraps, exact)."""
    return torch.stack(
        [data[o : o + -(-n // ALIGN) * ALIGN].view(torch.int64).sum() for _, o, n in bucket.pieces]
    )


def pack(bucket: Bucket, weights: Weights, out: torch.Tensor, dtype: torch.dtype) -> None:
    """The trainer's pieces, converted to the engine's dtype, then their checksums at the end:
    computed by the sender, in the destination's layout."""
    out.zero_()
    for t, offset, nbytes in bucket.pieces:
        slab = weights[t.src_name].narrow(t.dim, t.src_start, t.length)
        out[offset : offset + nbytes].view(dtype).view(slab.shape).copy_(slab)
    n = len(bucket.pieces)
    out[bucket.nbytes - 8 * n :].view(torch.int64).copy_(checksums(bucket, out))


def unpack(bucket: Bucket, data: torch.Tensor, staging: Weights, counts: dict) -> str | None:
    """Check each piece's checksum, then copy it into staging; None, or what is wrong."""
    n = len(bucket.pieces)
    theirs = data[bucket.nbytes - 8 * n :].view(torch.int64)
    bad = (checksums(bucket, data) != theirs).nonzero().flatten().tolist()
    if bad:
        t = bucket.pieces[bad[0]][0]
        return (f"checksum mismatch in {len(bad)} piece(s) from rank {bucket.src}, first "
                f"{t.dst_name} [{t.dst_start}:{t.dst_start + t.length})")  # fmt: skip
    for t, offset, nbytes in bucket.pieces:
        there = staging[t.dst_name].narrow(t.dim, t.dst_start, t.length)
        there.copy_(data[offset : offset + nbytes].view(there.dtype).view(there.shape))
        counts[t.dst_name][t.dst_start : t.dst_start + t.length] += 1
    return None


# ---------------------------------------------------------------------------------------------
# routes: the same buckets, three ways over the wire
def route(path: str, src: int, dsts: list[int], world: World) -> list[tuple[int, list[int]]]:
    """Where trainer rank `src`'s buckets go first: [(via, [final destinations])]. A bucket
    whose via is not its destination is forwarded by `via` in a second stage."""
    if path == "direct":  # straight to each engine rank: many senders at once
        return [(d, [d]) for d in dsts]
    if path == "gather":  # everything to trainer rank 0 first, which pushes it all
        return [(0, dsts)]
    if path == "two-stage":  # one engine rank per replica receives, then forwards inside
        out = []
        for replica in range(world.replicas):
            ranks = world.engine_ranks(replica)
            mine = [d for d in dsts if d in ranks]
            if mine:
                out.append((ranks[src % len(ranks)], mine))
        return out
    raise ValueError(f"path {path!r}: use direct, gather or two-stage")


class Moved(NamedTuple):
    seconds: float  # this rank's time moving bytes (both stages)
    sent: int  # bytes this rank put on the wire
    received: int
    extra: int  # bytes of buffers this rank allocated for the move (not counting staging)


# --8<-- [start:move]
def move(path, buckets, world, rank, packed, device, die_after=None):
    """Move every bucket to its engine rank along `path`. packed: this trainer rank's buckets
    {dst: bytes}. Returns ({src: bytes} of the buckets for this rank, {src: error}, Moved).
    Two batches of isend/irecv, each holding every rank's sends and receives of one stage, so
    no rank waits for a message that is queued behind its own wait (NCCL needs this)."""
    by_src = collections.defaultdict(list)
    for src, dst in buckets:
        by_src[src].append(dst)
    stage1, errors, mine, sent, received, extra = [], {}, {}, 0, 0, 0
    first = {}  # (src, via) -> (buffer, its destinations)
    for src, dsts in sorted(by_src.items()):
        for via, finals in route(path, src, sorted(dsts), world):
            if rank not in (src, via):
                continue
            if src == via:  # gather: rank 0's own buckets stay put
                first[src, via] = (_cat([packed[d] for d in finals], ("own", src)), finals)
                extra += first[src, via][0].numel()
            elif rank == src:
                many = len(finals) > 1  # one message to `via` carrying several buckets
                data = (
                    _cat([packed[d] for d in finals], ("out", src, via))
                    if many
                    else packed[finals[0]]
                )
                extra += data.numel() if len(finals) > 1 else 0
                stage1.append(dist.P2POp(dist.isend, data, via, tag=src))
                sent += data.numel()
            else:
                data = _buffer(
                    ("in", src, via), sum(buckets[src, d].nbytes for d in finals), device
                )
                extra += data.numel()
                stage1.append(dist.P2POp(dist.irecv, data, src, tag=src))
                first[src, via] = (data, finals)
                received += data.numel()
    start = time.perf_counter()
    if rank == die_after:  # tests: a trainer rank that dies after its first message
        dist.batch_isend_irecv(stage1[:1])[0].wait()
        raise RankDied(f"rank {rank}: dying on purpose after one message")
    stage2 = []
    _wait(stage1, errors)
    for (src, _), (data, finals) in first.items():  # forward what is not mine
        at = 0
        for d in finals:
            piece = data[at : at + buckets[src, d].nbytes]
            at += buckets[src, d].nbytes
            if d == rank:
                mine[src] = piece
            else:  # even if it never arrived whole: its checksums then say so, not a hang
                stage2.append(dist.P2POp(dist.isend, piece, d, tag=src))
                sent += piece.numel()
    for src, dsts in by_src.items():  # what reaches me in the second stage
        for via, finals in route(path, src, sorted(dsts), world):
            if rank in finals and via != rank:
                data = _buffer(("fwd", src, via), buckets[src, rank].nbytes, device)
                stage2.append(dist.P2POp(dist.irecv, data, via, tag=src))
                mine[src], extra, received = data, extra + data.numel(), received + data.numel()
    _wait(stage2, errors)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return mine, errors, Moved(time.perf_counter() - start, sent, received, extra)


_BUFFERS = {}  # kept from one update to the next, as an engine keeps its receive buffers


def _buffer(key, nbytes, device):
    """A byte buffer for `key`, the same one at every update: memory the kernel hands out fresh
    is zeroed at first touch, which on CPU costs about as much as the copy itself."""
    if key not in _BUFFERS or _BUFFERS[key].numel() != nbytes or _BUFFERS[key].device != device:
        _BUFFERS[key] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return _BUFFERS[key]


def kept_buffer(key, numel, like):
    """A kept buffer of `numel` elements of like's dtype (see _buffer)."""
    return _buffer(key, numel * like.element_size(), like.device).view(like.dtype)


def _cat(parts, key):
    out = _buffer(key, sum(p.numel() for p in parts), parts[0].device)
    torch.cat(parts, out=out)
    return out


def _wait(ops, errors):
    """Launch a batch and wait for each op; a failed one is recorded by its peer's tag (the
    trainer rank whose bytes it carried), the others still waited for."""
    if not ops:
        return
    for op, work in zip(ops, dist.batch_isend_irecv(ops)):
        try:
            work.wait()
        except RuntimeError as err:
            errors[op.tag] = str(err).split("] ")[-1].split(". ")[0]
    # --8<-- [end:move]


# ---------------------------------------------------------------------------------------------
# one update, verified
class Engine:
    """One engine rank's weights: live and staging (vLLM layout), a version, its TP group."""

    def __init__(self, shape, tp_rank, tp_size, weights, group, experts_by="tp"):
        self.shape, self.tp_rank, self.tp_size, self.group = shape, tp_rank, tp_size, group
        self.experts_by = experts_by
        self.live, self.version = weights, 0
        self.staging = {n: torch.empty_like(w) for n, w in weights.items()}

    def logits(self, tokens, every_position: bool = False):
        from weight_sync import model, moe

        tp = (self.tp_rank, self.tp_size, self.group)
        if is_moe(self.shape):
            return moe.forward(self.live, self.shape, tokens, *tp, self.experts_by,
                               every_position=every_position)  # fmt: skip
        return model.forward(self.live, self.shape, tokens, *tp, every_position)


class Result(NamedTuple):
    ok: bool
    version: int
    why: str
    moved: Moved


def preflight(world, rank, shape, weights, spans, dtype):
    """Shapes and dtypes on every rank, before any byte moves: [what is wrong], from all ranks."""
    problems = []
    side = "trainer" if world.is_trainer(rank) else "engine"
    want = tensor_shapes(spans, shape)
    for name in sorted(set(want) | set(weights)):
        w = weights.get(name)
        if w is None or name not in want:
            where = "the layout" if w is None else "what it holds"
            problems.append(f"{side} rank {rank}: {name} is missing from {where}")
        elif tuple(w.shape) != want[name]:
            problems.append(f"{side} rank {rank}: {name} is {tuple(w.shape)}, the layout says "
                            f"{want[name]}")  # fmt: skip
        elif not w.dtype.is_floating_point or (side == "engine" and w.dtype != dtype):
            problems.append(f"{side} rank {rank}: {name} is {w.dtype}, the update moves {dtype}")
    everyone = [None] * world.size
    dist.all_gather_object(everyone, problems)
    return [p for ps in everyone for p in ps]


def update(
    path, plan, world, rank, shape, weights, dtype, device, engine=None, die_after=None, spans=None
):
    """One update along `path`. Trainer ranks pass their Megatron `weights` (and their `spans`
    when not trainer_spans': after a regroup), engine ranks their Engine. Every rank returns a
    Result: the vote's outcome, the engine's version, why not."""
    if engine is None and spans is None:
        spans = trainer_spans(shape, world)[rank]
    if engine is not None:
        spans = vllm_spans(shape, engine.tp_rank, world.engine_tp, world.experts_by)
    held = weights if engine is None else engine.staging
    problems = preflight(world, rank, shape, held, spans, dtype)
    if problems:
        raise PlanError("nothing moved, every rank keeps its weights: " + "; ".join(problems[:3]))
    buckets = make_buckets(plan, shape, dtype)
    packed = {}
    for (src, dst), b in buckets.items():
        if src == rank:
            packed[dst] = _buffer(("pack", src, dst), b.nbytes, device)
            pack(b, weights, packed[dst], dtype)
    dist.barrier()  # everybody starts the move together: the times compare
    mine, errors, moved = move(path, buckets, world, rank, packed, device, die_after)
    moved = moved._replace(extra=moved.extra + sum(p.numel() for p in packed.values()))
    if engine is None:
        return _hear_verdict(world, rank, device, moved)
    why = [f"trainer rank {src} failed mid-update ({err})" for src, err in sorted(errors.items())]
    dims = {s.name: s.dim for s in spans}
    counts = {
        n: torch.zeros(engine.staging[n].shape[d], dtype=torch.int32) for n, d in dims.items()
    }
    for src, data in sorted(mine.items()):
        if src not in errors and (
            problem := unpack(buckets[src, rank], data, engine.staging, counts)
        ):
            why.append(problem)
    short = [n for n, c in counts.items() if not bool((c == 1).all())]
    if short:
        why.append(f"coverage: {len(short)} tensor(s) not fully written, e.g. {short[0]}")
    # --8<-- [start:commit]
    said = [None] * (world.size - world.trainers)  # the vote: every engine rank's reasons
    dist.all_gather_object(said, (why, sorted(errors)), group=_engine_group(world))
    ok = not any(reasons for reasons, _ in said)
    why = [f"engine rank {world.trainers + i}: {w}" for i, (ws, _) in enumerate(said) for w in ws]
    if ok:  # the commit: a swap, nothing copied
        engine.live, engine.staging = engine.staging, engine.live
        engine.version += 1
    verdict = torch.tensor([int(ok), engine.version], device=device)
    dead = {src for _, failed in said for src in failed}  # a send to them could block forever
    if rank == world.trainers:  # the first engine rank tells every trainer rank still there
        for t in sorted(set(range(world.trainers)) - dead):
            dist.send(verdict, t)
    # --8<-- [end:commit]
    return Result(ok, engine.version, "; ".join(why), moved)


_GROUPS = {}


def _engine_group(world):
    """Every engine rank of every replica: the vote. Made once, by every rank of the world (in
    engine_world()), so this only looks it up."""
    return _GROUPS[world]


def engine_world(world: World, device: torch.device):
    """Collective, every rank: the groups of the engine (the vote's, and each replica's TP
    group for its forward pass). Returns (this rank's TP Group or None, its TP rank)."""
    from weight_sync.groups import Group

    everyone = [r for i in range(world.replicas) for r in world.engine_ranks(i)]
    _GROUPS[world] = dist.new_group(everyone)
    mine, tp_rank = None, 0
    for replica in range(world.replicas):
        ranks = world.engine_ranks(replica)
        pg = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            tp_rank = ranks.index(dist.get_rank())
            mine = Group(pg, tp_rank, len(ranks), device, f"engine {replica}")
    return mine, tp_rank


def _hear_verdict(world, rank, device, moved):
    verdict = torch.zeros(2, dtype=torch.int64, device=device)
    dist.recv(verdict, world.trainers)
    ok, version = (int(v) for v in verdict.tolist())
    return Result(bool(ok), version, "" if ok else "the engine rejected it", moved)


# ---------------------------------------------------------------------------------------------
# measuring the three paths, same run
PATHS = ("gather", "direct", "two-stage")


def link_baseline(world: World, nbytes: int, device: torch.device, repeats: int = 3) -> float:
    """Collective, every rank: seconds for one p2p send of nbytes from trainer rank 0 to the
    first engine rank (the median of `repeats`, after a warm-up), the same run's baseline."""
    data = torch.ones(max(nbytes, 8), dtype=torch.uint8, device=device)
    times, rank, peer = [], dist.get_rank(), world.trainers
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(data, peer)
        elif rank == peer:
            dist.recv(data, 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start if rank in (0, peer) else 0.0)
    t = torch.tensor(times[1:], dtype=torch.float64, device=device)
    dist.all_reduce(t, dist.ReduceOp.MAX)  # each repeat's slower end
    return t.median().item()


def slowest(moved: Moved, device: torch.device) -> dict[str, list[int] | float]:
    """Collective: every rank's Moved, gathered: the slowest time and each rank's bytes."""
    row = torch.tensor([moved.seconds, moved.sent, moved.received, moved.extra],
                       dtype=torch.float64, device=device)  # fmt: skip
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    rows = torch.stack(rows).cpu()
    columns = {
        k: rows[:, i + 1].long().tolist() for i, k in enumerate(("sent", "received", "extra"))
    }
    return {"seconds": rows[:, 0].max().item(), **columns}
