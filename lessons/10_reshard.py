"""Lesson 10 - resharding: a weight update from a TP x PP x DP trainer into an engine of another TP.

The idea
    A real trainer holds its model the way Megatron-LM does: split over TP ranks (a fused QKV
    per rank laid out per query group, [q heads of the group, k, v], a fused [gate; up]), each
    pipeline stage owning some layers under stage-local numbers, and DP replicas of all that.
    The engine holds it the way vLLM does: per TP rank [Q_r | K_r | V_r] and [gate_r | up_r],
    KV heads replicated when its TP exceeds them. Neither side's layout is the other's, and
    their TP sizes differ. ChatLearn's parameter sync solves it with a plan: both layouts are
    written as Spans ("rows a:b of my tensor hold rows c:d of HF tensor X"), and the planner
    intersects them: for every engine rank, which trainer rank sends which slab into which
    slab of its buffers. Every destination element written exactly once; each DP replica sends
    its own share. Then the bytes move (three ways, measured), are checksummed, voted on and
    committed atomically. And the bug no check of the bytes can see: a wrong q/k/v interleave.

Run it
    torchrun --nproc-per-node 6 lessons/10_reshard.py   # trainer TP2 x PP2 + engine TP2
    torchrun --nproc-per-node 8 lessons/10_reshard.py   # trainer TP2 x DP2 + engine TP4
    torchrun --nproc-per-node 6 lessons/10_reshard.py --trainer 1,1,2 --engine 4 --kv-heads 2
    python -m lessons.check 10                          # exercises 10.1 and 10.2

What you should see (4 ranks, no GPU: trainer TP1 x PP2 + engine TP2; times are yours)
    [rank 0] no GPU: using gloo on CPU
    [rank 0] trainer TP 1 x PP 2 x DP 1 (ranks 0..1), engine TP 2 x 1 replica(s) (ranks 2..3)
    [rank 0] layer 0's fused QKV by head_dim rows (q3: query head 3, k1: KV head 1):
    [rank 0]   trainer 0 (tp 0) linear_qkv: q0 q1 k0 v0 q2 q3 k1 v1 q4 q5 k2 v2 q6 q7 k3 v3
    [rank 0]   engine 2 (tp 0) qkv_proj:   q0 q1 q2 q3 k0 k1 v0 v1
    [rank 0]   engine 3 (tp 1) qkv_proj:   q4 q5 q6 q7 k2 k3 v2 v3
    [rank 0] saved out/10_layouts.png
    [rank 0] plan: 102 transfers; bytes sent by trainer rank: 0: 181.2 kB, 1: 181.5 kB
    [rank 0] checked: every element of every engine tensor is written exactly once
    [rank 0] path            ms   out of busiest rank   into each engine rank   extra memory
    [rank 0] gather         4.0              363.6 kB      181.8 kB, 181.8 kB       545.2 kB
    [rank 0] direct         2.4              181.9 kB      181.8 kB, 181.8 kB       181.9 kB
    [rank 0] two-stage      1.0              181.9 kB      272.6 kB, 272.7 kB       363.8 kB
    [rank 0] checked: each update committed on every engine rank: versions 1, 2, 3
    [rank 0] checked: after each (B, C, A) the engine's next token and logits equal one process's
    [rank 0] wrong q/k/v interleave: committed, version 4, every checksum and coverage passed
    [rank 0] checked: ...yet the engine's next token went from 94 to 21 (one process says 94)
    [rank 0] Next: exercises 10.1 and 10.2. Check them: python -m lessons.check 10
The planner, the three paths and the verified commit are weight_sync/reshard.py; the two
layouts are weight_sync/megatron.py and weight_sync/vllm_layout.py.
"""

from pathlib import Path

import torch

from course.plots import reshard_layouts
from course.ranks import AT_LEAST_2, parser, print0, setup, usage_error
from weight_sync import reshard as rs
from weight_sync.megatron import hf_to_megatron, trainer_rank
from weight_sync.model import LlamaShape, forward, make_weights
from weight_sync.vllm_layout import hf_to_vllm

NEEDS = AT_LEAST_2  # trainer ranks first, engine ranks after
DEFAULTS = {2: "1,1,1 1", 4: "1,2,1 2", 6: "2,2,1 2", 8: "2,1,2 4"}  # world -> trainer, engine
SEED_A, SEED_B, SEED_C = 1, 2, 3  # the engine starts with model A; the trainer holds B and C
ENGINE_DTYPE = torch.bfloat16  # the engine's; the trainer keeps float32, converted on send
PROMPT = [5, 17, 42, 101]  # the engine's greedy next token after these must be one process's


def shape_of(kv_heads):  # 8 query heads in kv_heads groups, 4 layers: PP up to 4
    return LlamaShape(vocab=256, hidden=64, intermediate=128, layers=4, heads=8, kv_heads=kv_heads)


def heads_picture(spans, shape):
    """One layer-0 QKV tensor's rows, one label per head_dim rows: which HF head lands where."""
    hd, labels = shape.hidden // shape.heads, []
    for s in sorted(spans, key=lambda s: s.start):
        kind = s.hf_name.split(".")[-2][0]  # q_proj -> q
        labels += [f"{kind}{h}" for h in range(s.hf_start // hd, s.hf_stop // hd)]
    return labels


# --8<-- [start:wrong]
def wrong_interleave(spans):
    """The classic bug: read Megatron's fused QKV as if it were [all q | all k | all v]. Same
    shapes, same bytes moved, every checksum of what was sent right; the engine's heads wrong."""
    qkv = [s for s in spans if s.name.endswith("linear_qkv.weight")]
    out = [s for s in spans if s not in qkv]
    for name in dict.fromkeys(s.name for s in qkv):
        at = 0
        for kind in ("q_proj", "k_proj", "v_proj"):
            for s in (s for s in qkv if s.name == name and kind in s.hf_name):
                out.append(s._replace(start=at, stop=at + s.stop - s.start))
                at += s.stop - s.start
    return out
    # --8<-- [end:wrong]


# --8<-- [start:ex-10-1]
def megatron_qkv_to_vllm(shard, shape, tp_rank, tp_size, engine_tp):
    """Exercise 10.1: cut one Megatron TP rank's fused QKV shard into the engine ranks' slices.

    shard: trainer rank tp_rank's linear_qkv (of tp_size), rows per query group g of this rank:
    [q heads of g (heads // kv_heads of them), k_g, v_g], head_dim rows each. Return a list of
    (engine rank, first row in its qkv_proj, rows) for every piece of `shard` some engine rank
    of engine_tp holds. Engine rank e's qkv_proj is [Q_e | K_e | V_e]: query heads
    e * heads // engine_tp onwards, then its KV heads: kv_heads // engine_tp of them from
    e * that, or, when engine_tp > kv_heads, one: head e // (engine_tp // kv_heads).
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 10.1: cut a fused QKV shard into the engine's slices (about 18 lines)"
    )
    # --8<-- [end:ex-10-1]


# --8<-- [start:ex-10-2]
def plan_span(dst, span, holders, turn=0):
    """Exercise 10.2: the planner's core. Return the Transfers that fill one destination span.

    span: a Span of engine rank dst (its tensor span.name's [start:stop) along span.dim holds
    HF tensor span.hf_name's [hf_start:hf_stop)); holders: [(trainer rank, Span)] of every
    trainer span of the same HF tensor. Cut the HF range wherever a holder's range starts or
    stops; each cut piece must be held whole by at least one rank (else raise rs.PlanError);
    split it into equal shares, one per holder, so DP replicas share the work (use `turn` to
    rotate who sends when there are fewer rows than holders). A Transfer names (src, src_name,
    dst, dst_name, dim, src_start, dst_start, length, hf_name), starts in each side's tensor.
    """
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 10.2: intersect spans into transfers (about 20 lines)")
    # --8<-- [end:ex-10-2]


def parse_world(args, world_size):
    """The split of this world into trainer and engine ranks, from flags or DEFAULTS."""
    trainer, engine = args.trainer, args.engine
    if trainer is None or engine is None:
        if world_size not in DEFAULTS:
            usage_error(f"no default split of {world_size} ranks: pass --trainer tp,pp,dp "
                        "--engine tp that add up, or: torchrun --nproc-per-node 6 "
                        "lessons/10_reshard.py")  # fmt: skip
        default = DEFAULTS[world_size].split()
        trainer, engine = trainer or default[0], engine or default[1]
    tp, pp, dp = (int(x) for x in trainer.split(","))
    engine_tp, replicas = (int(x) for x in (engine + ",1").split(",")[:2])
    world = rs.World(tp, pp, dp, engine_tp, replicas)
    if world.size != world_size:
        usage_error(f"trainer {tp}x{pp}x{dp} + engine {engine_tp}x{replicas} = {world.size} "
                    f"ranks, not {world_size}: torchrun --nproc-per-node {world.size} "
                    f"lessons/10_reshard.py --trainer {trainer} --engine {engine}")  # fmt: skip
    return world


def main():
    p = parser(__doc__)
    p.add_argument("--trainer", help="tp,pp,dp of the trainer (default: by world size)")
    p.add_argument("--engine", help="tp[,replicas] of the engine (default: by world size)")
    p.add_argument("--kv-heads", type=int, default=4, help="KV heads of the model (4)")
    args = p.parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:  # only to start everybody
        world, shape = parse_world(args, ctx.world_size), shape_of(args.kv_heads)
        try:  # pure, on every rank alike: a layout that cannot map is refused by all
            sources, destinations = rs.trainer_spans(shape, world), rs.engine_spans(shape, world)
            plan = rs.plan_transfers(sources, destinations)
            rs.check_plan(plan, destinations, shape)
        except ValueError as err:
            usage_error(str(err))
        trainers = world.trainers
        print0(f"trainer TP {world.tp} x PP {world.pp} x DP {world.dp} (ranks 0..{trainers - 1})"
               f", engine TP {world.engine_tp} x {world.replicas} replica(s) (ranks "
               f"{trainers}..{world.size - 1})")  # fmt: skip
        print0("layer 0's fused QKV by head_dim rows (q3: query head 3, k1: KV head 1):")
        columns, held = [], sources | destinations  # layer 0: on trainer ranks 0..tp-1
        for rank in [*range(world.tp), *world.engine_ranks(0)]:
            spans = [s for s in held[rank] if "qkv" in s.name and ".0." in s.name]
            who = (f"trainer {rank} (tp {rank}) linear_qkv:" if world.is_trainer(rank) else
                   f"engine {rank} (tp {rank - world.trainers}) qkv_proj:  ")  # fmt: skip
            columns.append((who.split(" (")[0], heads_picture(spans, shape)))
            print0(f"  {who} {' '.join(columns[-1][1])}")
        if ctx.rank == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            reshard_layouts(columns, Path(args.out) / "10_layouts.png", "layer 0's fused QKV")
            print0(f"saved {args.out}/10_layouts.png")
        sent = rs.sent_by(plan, shape, ENGINE_DTYPE.itemsize)
        print0(f"plan: {sum(map(len, plan.values()))} transfers; bytes sent by trainer rank: "
               + ", ".join(f"{r}: {sent[r] / 1e3:.1f} kB" for r in sorted(sent)))  # fmt: skip
        print0("checked: every element of every engine tensor is written exactly once")
        run(ctx, world, shape, sources, plan)
        print0("Next: exercises 10.1 and 10.2. Check them: python -m lessons.check 10")


def run(ctx, world, shape, sources, plan):
    group, tp_rank = rs.engine_world(world, ctx.device)
    hf = {seed: make_weights(shape, seed, "cpu") for seed in (SEED_A, SEED_B, SEED_C)}
    engine, held = None, {}
    if world.is_trainer(ctx.rank):  # both models as this trainer rank holds them, float32
        t = trainer_rank(ctx.rank, world.tp, world.pp, world.dp)
        for seed, full in hf.items():
            mine = hf_to_megatron(full, shape, t.tp_rank, world.tp, t.pp_rank, world.pp)
            held[seed] = {n: w.to(ctx.device) for n, w in mine.items()}
    else:  # the engine starts with model A, in bf16
        live = hf_to_vllm(hf[SEED_A], shape, tp_rank, world.engine_tp)
        live = {n: w.to(ctx.device, ENGINE_DTYPE) for n, w in live.items()}
        engine = rs.Engine(shape, tp_rank, world.engine_tp, live, group)
    print0(f"{'path':<10} {'ms':>7}   out of busiest rank   into each engine rank   extra memory")
    # Each update changes the engine's model, and never to what its staging still holds (the
    # model before last): a path that wrote nothing would fail the check that follows it.
    versions, models = [], (SEED_B, SEED_C, SEED_A)
    for path, seed in zip(rs.PATHS, models):
        result = rs.update(
            path, plan, world, ctx.rank, shape, held.get(seed), ENGINE_DTYPE, ctx.device, engine
        )
        stats = rs.slowest(result.moved, ctx.device)
        into = ", ".join(
            f"{stats['received'][r] / 1e3:.1f} kB" for r in range(world.trainers, world.size)
        )
        print0(f"{path:<10} {stats['seconds'] * 1e3:7.1f}   {max(stats['sent']) / 1e3:16.1f} kB   "
               f"{into:>21}   {max(stats['extra']) / 1e3:9.1f} kB")  # fmt: skip
        versions.append(result.version if result.ok else f"refused ({result.why})")
        held_in_bf16 = {k: v.to(ENGINE_DTYPE) for k, v in hf[seed].items()}
        token = next_token(engine, forward(held_in_bf16, shape, PROMPT), ctx, world)
    assert versions == [1, 2, 3], versions
    print0("checked: each update committed on every engine rank: versions 1, 2, 3")
    print0("checked: after each (B, C, A) the engine's next token and logits equal one process's")
    wrong_sources = {r: wrong_interleave(s) for r, s in sources.items()}
    if all(set(wrong_sources[r]) == set(sources[r]) for r in sources):  # one group per rank:
        print0("wrong q/k/v interleave: one query group per trainer rank, nothing differs")
        return  # [q_g, k_g, v_g] is [all q | all k | all v]
    wrong = rs.plan_transfers(wrong_sources, rs.engine_spans(shape, world))
    result = rs.update(
        "direct", wrong, world, ctx.rank, shape, held.get(SEED_A), ENGINE_DTYPE, ctx.device, engine
    )
    print0(f"wrong q/k/v interleave: {'committed' if result.ok else 'refused'}, version "
           f"{result.version}, every checksum and coverage passed")  # fmt: skip
    bad = next_token(engine, None, ctx, world)
    assert result.ok and bad != token, "the wrong interleave should commit and change the token"
    print0(f"checked: ...yet the engine's next token went from {token} to {bad} (one process "
           f"says {token})")  # fmt: skip


def next_token(engine, reference, ctx, world):
    """The engine's greedy next token (every engine rank computes it and holds its logits
    against `reference`; the first tells every rank)."""
    import torch.distributed as dist

    token = torch.zeros(1, dtype=torch.int64, device=ctx.device)
    if engine is not None:
        logits = engine.logits(PROMPT)
        if reference is not None:  # float32 math; TP adds partial sums in another order
            torch.testing.assert_close(logits.cpu(), reference, rtol=1e-4, atol=1e-4)
        token[0] = int(logits.argmax())
    dist.broadcast(token, src=world.trainers)
    return int(token.item())


if __name__ == "__main__":
    main()
