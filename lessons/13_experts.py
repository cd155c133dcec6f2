"""Lesson 13 - experts: lesson 10's update, for a mixture of experts. It continues lesson 10.

The idea
    Most large models trained with RL are mixtures of experts: each layer's MLP is a router
    and N routed experts, each token sent through its top k. Megatron holds the routed experts
    on expert-parallel (EP) ranks, EP rank b the experts b*N/ep.., each one possibly split again
    over expert-TP ranks; the engine holds them by TP (a slice of every expert, vLLM's fused
    w13 = [gate | up] and w2) or by EP (whole experts per rank), a flag. Lesson 10's planner
    needs no new idea: the experts are more Spans. What is new is the step ChatLearn takes
    before sending: the trainer regroups its experts among its own ranks so that each trainer
    rank then feeds one engine rank. Two ways: all_to_all (each rank receives exactly the
    pieces it forwards, valid only when the trainer's expert TP x EP equals the engine's TP)
    and all_gather (every rank gets all its EP group's experts: always valid, EP times the
    memory). The regrouped layout is again Spans, so the one planner plans both steps. The bug
    no check of the bytes sees: experts in the wrong order.

Run it
    torchrun --nproc-per-node 4 lessons/13_experts.py   # trainer DP2 = EP2 + engine TP2
    torchrun --nproc-per-node 4 lessons/13_experts.py --experts-by ep   # engine EP2
    torchrun --nproc-per-node 8 lessons/13_experts.py   # trainer TP2 x DP2, EP2 + engine TP4
    torchrun --nproc-per-node 6 lessons/13_experts.py --trainer 2,1,2,2,1 --engine 2
    python -m lessons.check 13                          # exercise 13.1

What you should see (4 ranks, no GPU: trainer TP1 x DP2 with EP2 + engine TP2; times are yours)
    [rank 0] no GPU: using gloo on CPU
    [rank 0] trainer TP 1 x PP 1 x DP 2, EP 2 x expert TP 1 (ranks 0..1); engine TP 2 x 1
        replica(s), experts by tp (ranks 2..3)
    [rank 0] layer 0's experts (e5: expert 5 whole, e5.1: its slice 1 of 2):
    [rank 0]   trainer 0 holds          e0 e1 e2 e3
    [rank 0]   trainer 1 holds          e4 e5 e6 e7
    [rank 0]   engine 2 holds           e0.0 e1.0 e2.0 e3.0 e4.0 e5.0 e6.0 e7.0
    [rank 0]   engine 3 holds           e0.1 e1.1 e2.1 e3.1 e4.1 e5.1 e6.1 e7.1
    [rank 0]   all_to_all: trainer 0    e0.0 e1.0 e2.0 e3.0 e4.0 e5.0 e6.0 e7.0  -> engine 2
    [rank 0]   all_gather: trainer 0    e0 e1 e2 e3 e4 e5 e6 e7
    [rank 0] checked: every element of every engine tensor is written exactly once, each plan
    [rank 0] regroup      ms   moved out   extra memory   update ms   engine ranks fed by each
    [rank 0] none        0.0      0.0 kB         0.0 kB         4.4   2, 2
    [rank 0] all_to_all  9.0     98.3 kB       393.2 kB         5.6   1, 1
    [rank 0] all_gather  4.2    196.6 kB       393.2 kB         5.2   2, 2
    [rank 0] checked: the prompt routes tokens to every expert of every layer
    [rank 0] checked: after each of 3 updates (each a new model) the engine's logits at every
             position equal one process's MoE forward
    [rank 0] wrong expert order: committed, version 4, every checksum and coverage passed
    [rank 0] checked: ...yet its logits are 0.0352 away from one process's (allowed: 0.0001): caught
    [rank 0] Next: exercise 13.1. Check it: python -m lessons.check 13
The regroup is weight_sync/regroup.py, the planner weight_sync/reshard.py, the model
weight_sync/moe.py.
"""

import torch
import torch.distributed as dist

from course.ranks import AT_LEAST_2, parser, print0, setup, usage_error
from weight_sync import regroup as rg
from weight_sync import reshard as rs
from weight_sync.megatron import from_hf
from weight_sync.moe import PRESETS, experts_missed, forward, make_moe_weights
from weight_sync.vllm_layout import hf_to_vllm

NEEDS = AT_LEAST_2  # trainer ranks first, engine ranks after
DEFAULTS = {2: "1,1,1,1 1", 4: "1,1,2,2 2", 6: "1,2,2,2 2", 8: "2,1,2,2 4"}  # world -> layouts
SHAPE = PRESETS["tiny-moe"]  # 8 experts of 32 rows, top 2, a shared expert, 2 layers
SEED_A, SEED_B, SEED_C = 1, 2, 3  # the engine starts with model A; the trainer holds B and C
ENGINE_DTYPE = torch.bfloat16  # the engine's; the trainer keeps float32, converted on send
TOLERANCE = 1e-4  # the engine's logits vs one process's: the same math, sums in another order
PROMPT = [152, 144, 40, 34, 89, 73, 136, 150, 135, 158, 243, 192, 79, 24, 185, 46]  # every expert


def labels(spans, layer=0):
    """Layer `layer`'s routed experts in `spans`: e5 (whole), e5.1 (its slice 1)."""
    out = []
    for s in spans:
        if f"layers.{layer}.mlp.experts." in s.hf_name and "gate_proj" in s.hf_name:
            e, n = int(s.hf_name.split(".")[5]), s.hf_stop - s.hf_start
            whole = n == SHAPE.expert_intermediate
            out.append(f"e{e}" if whole else f"e{e}.{s.hf_start // n}")
    return " ".join(sorted(set(out), key=lambda x: [int(v) for v in x[1:].split(".")]))


# --8<-- [start:wrong]
def wrong_order(spans, ep):
    """The bug: take EP rank b's local expert k for expert k*ep + b (round-robin placement, as
    some frameworks do) instead of b*N/ep + k. Same shapes, same bytes; the experts swapped."""
    local, out = SHAPE.experts // ep, []
    for s in spans:
        if rg.is_expert(s) and "local_experts." in s.name:
            parts = s.hf_name.split(".")
            e = int(parts[5])
            parts[5] = str(e % local * ep + e // local)
            s = s._replace(hf_name=".".join(parts))
        out.append(s)
    return out
    # --8<-- [end:wrong]


# --8<-- [start:ex-13-1]
def split_experts(local, shape, ep_rank, ep, etp_rank, etp, engine_tp, experts_by):
    """Exercise 13.1: cut one trainer rank's routed experts (one layer) into the engine's pieces.

    local: {k: (fc1, fc2)}, this rank's local expert k (expert ep_rank * experts // ep + k),
    its expert-TP slice etp_rank of etp: fc1 = [gate; up] rows (each intermediate // etp), fc2
    = down's columns. Return [(engine rank t, its local expert j, "w13" or "w2", start, slab)]:
    slab goes into t's w13_weight.{j} at row `start` (its gate rows, then its up rows) or into
    its w2_weight.{j} at column `start`. experts_by "tp": every engine rank holds rows
    t * intermediate // engine_tp.. of every expert (j = the expert); "ep": whole experts,
    experts // engine_tp per rank from t's first (j counts from there).
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 13.1: cut a trainer rank's experts into engine pieces (about 20 lines)"
    )
    # --8<-- [end:ex-13-1]


def parse_world(args, world_size):
    trainer, engine = args.trainer, args.engine
    if trainer is None or engine is None:
        if world_size not in DEFAULTS:
            usage_error(f"no default split of {world_size} ranks: pass --trainer tp,pp,dp,ep "
                        "--engine tp that add up, or: torchrun --nproc-per-node 4 "
                        "lessons/13_experts.py")  # fmt: skip
        trainer, engine = (x or d for x, d in zip((trainer, engine), DEFAULTS[world_size].split()))
    sizes = [int(x) for x in trainer.split(",")]
    tp, pp, dp, ep, etp = sizes + [1, 0][len(sizes) - 3 :]  # ep 1, expert TP = TP by default
    engine_tp, replicas = (int(x) for x in (engine + ",1").split(",")[:2])
    world = rs.World(tp, pp, dp, engine_tp, replicas, ep, etp, args.experts_by)
    if world.size != world_size:
        usage_error(f"trainer {tp}x{pp}x{dp} + engine {engine_tp}x{replicas} = {world.size} "
                    f"ranks, not {world_size}: torchrun --nproc-per-node {world.size} "
                    f"lessons/13_experts.py --trainer {trainer} --engine {engine}")  # fmt: skip
    return world


def main():
    p = parser(__doc__)
    p.add_argument("--trainer", help="tp,pp,dp,ep[,etp] of the trainer (etp: its TP by default)")
    p.add_argument("--engine", help="tp[,replicas] of the engine (default: by world size)")
    p.add_argument("--experts-by", choices=("tp", "ep"), default="tp", help="engine experts by")
    args = p.parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        world = parse_world(args, ctx.world_size)
        regroups = ["none", *rg.REGROUPS]
        try:  # pure, on every rank alike: a layout that cannot map is refused by all, at once
            destinations, plans = rs.engine_spans(SHAPE, world), {}
            for how in list(regroups):
                try:
                    sources = rg.sources(SHAPE, world, None if how == "none" else how)
                except rs.PlanError as err:  # all_to_all's rule: say why, run the others
                    if "all_to_all regroup needs" not in str(err):
                        raise
                    regroups.remove(how)
                    print0(f"no all_to_all: {str(err).split(': then')[0]}")
                    continue
                plans[how] = (sources, rs.plan_transfers(sources, destinations))
                rs.check_plan(plans[how][1], destinations, SHAPE)
        except ValueError as err:
            usage_error(str(err))
        held = plans["none"][0]
        print0(f"trainer TP {world.tp} x PP {world.pp} x DP {world.dp}, EP {world.ep} x expert "
               f"TP {world.expert_tp} (ranks 0..{world.trainers - 1}); engine TP "
               f"{world.engine_tp} x {world.replicas} replica(s), experts by {world.experts_by} "
               f"(ranks {world.trainers}..{world.size - 1})")  # fmt: skip
        print0("layer 0's experts (e5: expert 5 whole, e5.1: its slice 1 of 2):")
        for r in range(min(world.trainers, world.expert_tp * world.ep)):
            print0(f"  trainer {r} holds          {labels(held[r])}")
        for r in world.engine_ranks(0):
            print0(f"  engine {r} holds           {labels(destinations[r])}")
        for how in regroups[1:]:
            to = (
                f"  -> engine {world.trainers + rg.serves(world, 0)}" if how == "all_to_all" else ""
            )
            print0(f"  {how}: trainer 0    {labels(plans[how][0][0])}{to}")
        print0("checked: every element of every engine tensor is written exactly once, each plan")
        run(ctx, world, plans, regroups)
        print0("Next: exercise 13.1. Check it: python -m lessons.check 13")


def run(ctx, world, plans, regroups):
    group, tp_rank = rs.engine_world(world, ctx.device)
    groups = rg.expert_world(world)
    hf = {seed: make_moe_weights(SHAPE, seed) for seed in (SEED_A, SEED_B, SEED_C)}
    engine, mine = None, {}
    if world.is_trainer(ctx.rank):  # both models as this trainer rank holds them, float32
        for seed, full in hf.items():
            mine[seed] = {n: w.to(ctx.device) for n, w in from_hf(plans["none"][0][ctx.rank],
                                                                  SHAPE, full).items()}  # fmt: skip
    else:
        live = hf_to_vllm(hf[SEED_A], SHAPE, tp_rank, world.engine_tp, world.experts_by)
        live = {n: w.to(ctx.device, ENGINE_DTYPE) for n, w in live.items()}
        engine = rs.Engine(SHAPE, tp_rank, world.engine_tp, live, group, world.experts_by)
    print0("regroup      ms   moved out   extra memory   update ms   engine ranks fed by each")
    # each update changes the model, never to what staging still holds (the one before last)
    for how, seed in zip(regroups, (SEED_B, SEED_C, SEED_A)):
        sources, plan = plans[how]
        weights, regrouped = mine.get(seed), rs.Moved(0.0, 0, 0, 0)
        if weights is not None and how != "none":
            weights, regrouped = rg.regroup(how, SHAPE, world, ctx.rank, weights, groups,
                                            ctx.device)  # fmt: skip
        result = update(plan, world, ctx, weights, engine, sources)
        assert result.ok, result.why
        r, u = rs.slowest(regrouped, ctx.device), rs.slowest(result.moved, ctx.device)
        fed = {t: len({x.dst for ts in plan.values() for x in ts if x.src == t and "experts"
                       in x.hf_name}) for t in range(world.trainers)}  # fmt: skip
        print0(f"{how:<10} {r['seconds'] * 1e3:4.1f} {max(r['sent']) / 1e3:8.1f} kB "
               f"{max(r['extra']) / 1e3:11.1f} kB {u['seconds'] * 1e3:11.1f}   "
               f"{', '.join(str(fed[t]) for t in range(world.trainers))}")  # fmt: skip
        assert gap(engine, hf[seed], ctx, world) < TOLERANCE  # float32 math, TP sums reordered
    print0("checked: the prompt routes tokens to every expert of every layer")
    print0(f"checked: after each of {len(regroups)} updates (each a new model) the engine's "
           "logits at every position equal one process's MoE forward")  # fmt: skip
    ep = max(world.ep, 2)  # with one EP rank the bug is a no-op: pretend two
    wrong = {r: wrong_order(s, ep) for r, s in plans["none"][0].items()}
    plan = rs.plan_transfers(wrong, rs.engine_spans(SHAPE, world))
    result = update(plan, world, ctx, mine.get(SEED_B), engine, wrong)
    print0(f"wrong expert order: {'committed' if result.ok else 'refused'}, version "
           f"{result.version}, every checksum and coverage passed")  # fmt: skip
    bad = gap(engine, hf[SEED_B], ctx, world)
    assert result.ok and bad > 100 * TOLERANCE, "the wrong order should commit, and be seen"
    print0(f"checked: ...yet its logits are {bad:.4f} away from one process's (allowed: "
           f"{TOLERANCE}): caught")  # fmt: skip


def update(plan, world, ctx, weights, engine, sources):
    spans = sources.get(ctx.rank) if engine is None else None
    return rs.update("direct", plan, world, ctx.rank, SHAPE, weights, ENGINE_DTYPE, ctx.device,
                     engine, spans=spans)  # fmt: skip


def gap(engine, hf, ctx, world):
    """How far the engine's logits at every position of PROMPT are from one process's MoE
    forward of `hf` (in bf16): every position, so every token's experts count, in the last layer
    too; the largest difference over every engine rank (every replica), on all ranks."""
    diff = torch.zeros(1, dtype=torch.float64, device=ctx.device)
    if engine is not None:
        in_bf16 = {k: v.to(ENGINE_DTYPE) for k, v in hf.items()}
        missed = experts_missed(in_bf16, SHAPE, PROMPT)
        assert not missed, f"the prompt misses {missed[:3]}: the check could not see them"
        mine = engine.logits(PROMPT, every_position=True).cpu()
        diff[0] = (mine - forward(in_bf16, SHAPE, PROMPT, every_position=True)).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)  # trainers add 0
    return diff.item()


if __name__ == "__main__":
    main()
