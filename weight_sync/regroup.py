"""Lesson 13's regroup: before the update, the trainer's routed experts move among its own ranks
(all_to_all or all_gather over its expert groups), so that each trainer rank then holds what
lesson 10's planner can send straight into the engine's layout. The regrouped layout is Spans
again, and the same planner (reshard.plan_transfers) plans both the regroup and the update."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from weight_sync.megatron import (
    expert_rank,
    megatron_spans,
    stage_layers,
    tensor_shapes,
    trainer_rank,
)
from weight_sync.moe import is_moe
from weight_sync.reshard import (
    Moved,
    PlanError,
    Spans,
    Transfer,
    World,
    kept_buffer,
    plan_transfers,
    trainer_spans,
    transfer_numel,
)
from weight_sync.vllm_layout import Span, hf_specs, vllm_spans

# torch 2.13 renamed all_gather_into_tensor to all_gather_single and warns at the old name
ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REGROUPS = ("all_to_all", "all_gather")


def is_expert(span: Span) -> bool:
    return ".mlp.experts." in span.hf_name


def expert_group(world: World, rank: int, ep_only: bool = False) -> list[int]:
    """The trainer ranks sharing rank's stage and expert-DP index (its etp x ep expert group),
    in Megatron's order; ep_only: those also sharing its expert-TP rank (its EP group)."""
    args = (world.tp, world.dp, world.ep, world.expert_tp)
    me, stage = expert_rank(rank, *args), rank // (world.tp * world.dp)
    return [
        r
        for r in range(world.trainers)
        if r // (world.tp * world.dp) == stage
        and expert_rank(r, *args).edp_rank == me.edp_rank
        and (not ep_only or expert_rank(r, *args).etp_rank == me.etp_rank)
    ]


def check_regroup(world: World, how: str) -> None:
    if how not in REGROUPS:
        raise PlanError(f"regroup {how!r}: use {' or '.join(REGROUPS)}")
    m = world.expert_tp * world.ep
    if how == "all_to_all" and m != world.engine_tp:
        raise PlanError(
            f"all_to_all regroup needs the trainer's expert TP x EP ({world.expert_tp} x "
            f"{world.ep} = {m}) to equal the engine's TP ({world.engine_tp}): then each rank of "
            "an expert group collects exactly one engine rank's experts. Use all_gather"
        )


def serves(world: World, rank: int) -> int:
    """all_to_all: the engine TP rank whose experts trainer `rank` collects. Experts by TP:
    slice a*ep+b, inside its own ETP slice a (the exchange stays in its EP group); by EP: the
    experts of engine rank b*etp+a all live on its EP rank b."""
    a, b, _ = expert_rank(rank, world.tp, world.dp, world.ep, world.expert_tp)
    return a * world.ep + b if world.experts_by == "tp" else b * world.expert_tp + a


def regrouped_spans(shape, world: World, how: str, rank: int) -> list[Span]:
    """The expert spans `rank` holds after the regroup. all_gather (over its EP group): every
    expert, its ETP slice, as a trainer of EP 1 would. all_to_all (over its expert group): the
    experts of engine rank serves(rank), in the engine's layout, of its stage's layers."""
    t = trainer_rank(rank, world.tp, world.pp, world.dp)
    if how == "all_gather":
        a = expert_rank(rank, world.tp, world.dp, world.ep, world.expert_tp).etp_rank
        held = megatron_spans(shape, t.tp_rank, world.tp, t.pp_rank, world.pp,
                              (0, 1, a, world.expert_tp))  # fmt: skip
        return [s for s in held if is_expert(s)]
    layers = stage_layers(shape.layers, t.pp_rank, world.pp)
    engine = vllm_spans(shape, serves(world, rank), world.engine_tp, world.experts_by)
    return [s for s in engine if is_expert(s) and int(s.hf_name.split(".")[2]) in layers]


def sources(shape, world: World, how: str | None = None) -> Spans:
    """Every trainer rank's spans for the update: as held (how None), or after the regroup."""
    held = trainer_spans(shape, world)
    if how is None or not is_moe(shape):
        return held
    check_regroup(world, how)
    return {
        r: [s for s in spans if not is_expert(s)] + regrouped_spans(shape, world, how, r)
        for r, spans in held.items()
    }


_PLANS = {}  # (shape, world, rank) -> regroup_plan's answer: pure, so made once


def regroup_plan(shape, world: World, rank: int) -> dict[int, list[Transfer]]:
    """all_to_all's plan, made by the same planner: rank's expert group, from what each member
    holds to what it collects (pure; every member computes the same)."""
    if (shape, world, rank) not in _PLANS:
        _PLANS[shape, world, rank] = _regroup_plan(shape, world, rank)
    return _PLANS[shape, world, rank]


def _regroup_plan(shape, world, rank):
    group, held = expert_group(world, rank), trainer_spans(shape, world)
    have = {r: [s for s in held[r] if is_expert(s)] for r in group}
    want = {r: regrouped_spans(shape, world, "all_to_all", r) for r in group}
    return plan_transfers(have, want)


def expert_world(world: World) -> dict:
    """Collective, every rank: the process groups of the regroup, {"experts": this rank's expert
    group, "ep": its EP group} (None on engine ranks)."""
    mine = {"experts": None, "ep": None}
    for rank in range(world.trainers):
        for key, ep_only in (("experts", False), ("ep", True)):
            ranks = expert_group(world, rank, ep_only)
            if ranks[0] == rank:  # each group made once, in the same order on every rank
                pg = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    mine[key] = pg
    return mine


# --8<-- [start:regroup]
def regroup(how, shape, world, rank, weights, groups, device):
    """Collective over rank's expert group: this trainer rank's tensors to send, the routed
    experts regrouped (the dense ones as they are), and a Moved (bytes in and out, the size of
    its buffers, kept from one update to the next as the update's are). all_gather: each rank
    gathers its EP group's experts, every one of them. all_to_all: each rank sends every other
    member exactly the pieces it collects."""
    experts = sorted(n for n in weights if ".mlp.experts." in n)
    out = {n: w for n, w in weights.items() if n not in experts}
    some, size = weights[experts[0]], 0
    start = time.perf_counter()
    if how == "all_gather":
        numel, me = sum(weights[n].numel() for n in experts), dist.get_rank(groups["ep"])
        gathered = kept_buffer(
            ("gathered", rank), numel * world.ep, some
        )  # my part packed in place
        torch.cat([weights[n].reshape(-1) for n in experts], out=gathered.chunk(world.ep)[me])
        # Into one tensor, in place: the list form stages a flat copy of the whole output
        ALL_GATHER_SINGLE(gathered, gathered.chunk(world.ep)[me], group=groups["ep"])
        local, at = shape.experts // world.ep, 0
        for b in range(world.ep):  # EP rank b's local expert k is expert b * local + k
            for n in experts:
                k = int(n.split("local_experts.")[1].split(".")[0])
                name = n.replace(f"local_experts.{k}.", f"local_experts.{b * local + k}.")
                out[name] = gathered[at : at + weights[n].numel()].view(weights[n].shape)
                at += weights[n].numel()  # views: the gathered buffer is the regrouped experts
        sent = received = numel * (world.ep - 1)
        size = gathered.numel()
    else:
        plan, group = regroup_plan(shape, world, rank), expert_group(world, rank)
        full = {n: f for n, f, _ in hf_specs(shape)}
        shapes = tensor_shapes(regrouped_spans(shape, world, how, rank), shape)
        flat, at = (
            kept_buffer(("regrouped", rank), sum(math.prod(s) for s in shapes.values()), some),
            0,
        )
        mine = {}
        for n, dims in shapes.items():  # views of one buffer, kept from one update to the next
            mine[n], at = flat[at : at + math.prod(dims)].view(dims), at + math.prod(dims)
        for t in (t for t in plan[rank] if t.src == rank):  # what stays here: copied, not sent
            slab = weights[t.src_name].narrow(t.dim, t.src_start, t.length)
            mine[t.dst_name].narrow(t.dim, t.dst_start, t.length).copy_(slab)
        to = [[t for t in plan[d] if t.src == rank != d] for d in group]  # what I send to each
        came = [[t for t in plan[rank] if t.src == s != rank] for s in group]  # each sends me
        slabs = [weights[t.src_name].narrow(t.dim, t.src_start, t.length) for ts in to for t in ts]
        splits_in = [sum(transfer_numel(t, full) for t in ts) for ts in to]
        splits_out = [sum(transfer_numel(t, full) for t in ts) for ts in came]
        data = kept_buffer(("a2a out", rank), sum(splits_in), some)
        if slabs:
            torch.cat([x.reshape(-1) for x in slabs], out=data)
        buffer = kept_buffer(("a2a in", rank), sum(splits_out), some)
        dist.all_to_all_single(buffer, data, splits_out, splits_in, group=groups["experts"])
        at = 0
        for t in (t for ts in came for t in ts):  # the same order the senders packed in
            there = mine[t.dst_name].narrow(t.dim, t.dst_start, t.length)
            there.copy_(buffer[at : at + there.numel()].view(there.shape))
            at += there.numel()
        out.update(mine)
        sent, received = data.numel(), buffer.numel()
        size = data.numel() + buffer.numel() + sum(m.numel() for m in mine.values())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, b = time.perf_counter() - start, some.element_size()
    return out, Moved(seconds, sent * b, received * b, size * b)
    # --8<-- [end:regroup]
