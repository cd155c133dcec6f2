"""Checks for lesson 10's exercises (lessons/10_reshard.py). Run them: python -m lessons.check 10

Both exercises are pure functions: every rank runs the same check, on several layouts, and
compares with the single-process conversions of weight_sync (megatron.py, vllm_layout.py).
"""

import torch

from course.check import lesson_module
from weight_sync import reshard as rs
from weight_sync.megatron import hf_to_megatron, trainer_rank
from weight_sync.model import LlamaShape, make_weights
from weight_sync.vllm_layout import hf_to_vllm

lesson = lesson_module("10")
QKV = "model.layers.0.self_attn.qkv_proj.weight"
RIGHT = "every row as the engine holds it, written once"


def shape_of(kv_heads):
    return LlamaShape(vocab=256, hidden=64, intermediate=128, layers=4, heads=8, kv_heads=kv_heads)


# --8<-- [start:check-1]
def check_qkv(ctx, megatron_qkv_to_vllm):
    """For each (KV heads, trainer TP, engine TP): every trainer rank's fused QKV shard, cut
    by your function, written into NaN-filled engine qkv_proj tensors; each must equal
    hf_to_vllm's, every row written exactly once (replicated KV heads included)."""
    cases = [(4, 1, 2), (4, 2, 1), (4, 4, 2), (4, 2, 4), (2, 2, 4), (4, 2, 8)]
    yours, expected = {}, {}
    for kv, tp, etp in cases:
        key = f"KV heads {kv}, trainer TP {tp} -> engine TP {etp}"
        expected[key] = RIGHT
        try:
            yours[key] = qkv_case(megatron_qkv_to_vllm, shape_of(kv), tp, etp)
        except NotImplementedError:
            raise  # the stub: "not attempted"
        except Exception as err:  # a wrong answer's crash is a verdict, not the check's crash
            yours[key] = f"raised {type(err).__name__}: {str(err)[:120]}"
    return yours, expected
    # --8<-- [end:check-1]


def qkv_case(fn, shape, tp, etp):
    hf = make_weights(shape, 1, "cpu")
    want = [hf_to_vllm(hf, shape, e, etp)[QKV] for e in range(etp)]
    got = [torch.full_like(w, float("nan")) for w in want]
    written = [torch.zeros(w.shape[0], dtype=torch.int32) for w in want]
    for t in range(tp):
        shard = hf_to_megatron(hf, shape, t, tp)[
            "decoder.layers.0.self_attention.linear_qkv.weight"
        ]
        for item in fn(shard.clone(), shape, t, tp, etp) or []:
            e, row, rows = item
            if not (0 <= e < etp and 0 <= row and row + len(rows) <= want[e].shape[0]):
                return f"trainer rank {t}: ({e}, {row}, {len(rows)} rows) is outside the engine"
            got[e][row : row + len(rows)] = rows
            written[e][row : row + len(rows)] += 1
    for e in range(etp):
        if not bool((written[e] == 1).all()):
            rows = (written[e] != 1).nonzero().flatten().tolist()
            return f"engine rank {e}: rows {rows[:4]}... written {written[e][rows[0]]} times"
        if not torch.equal(got[e], want[e]):
            hd = shape.hidden // shape.heads
            bad = (got[e] != want[e]).any(1).nonzero().flatten().tolist()
            heads = f"heads {bad[0] // hd}..{bad[-1] // hd}"
            return (f"engine rank {e}: rows {bad[0]}..{bad[-1]} ({heads} of its qkv_proj) hold "
                    "another head's weights: the q/k/v interleave?")  # fmt: skip
    return RIGHT


# --8<-- [start:check-2]
def check_plan(ctx, plan_span):
    """Plans made with your plan_span for several layouts (DP replicas, PP, shrinking and
    growing TP, replicated KV heads), carried out in one process: every engine tensor must
    equal hf_to_vllm's, every element written once; each DP replica sends its share; a span
    no trainer rank holds is refused with rs.PlanError."""
    worlds = [
        rs.World(2, 1, 2, 2),
        rs.World(4, 1, 1, 2),
        rs.World(1, 2, 1, 4),
        rs.World(2, 2, 1, 8),
    ]
    yours, expected = {}, {}
    for world in worlds:
        key = f"trainer {world.tp}x{world.pp}x{world.dp} -> engine TP {world.engine_tp}"
        expected[key] = RIGHT
        try:
            yours[key] = plan_case(plan_span, shape_of(4), world)
        except NotImplementedError:
            raise
        except Exception as err:
            yours[key] = f"raised {type(err).__name__}: {str(err)[:120]}"
    expected["DP replicas' shares"] = "each DP replica sends half the bytes (within 10%)"
    yours["DP replicas' shares"] = dp_shares(plan_span)
    expected["a piece smaller than its holders"] = ROTATED
    yours["a piece smaller than its holders"] = rotation(plan_span)
    expected["a span nobody holds"] = "refused: PlanError"
    span = rs.Span("lm_head.weight", 0, 0, 64, "lm_head.weight", 0, 64)
    try:
        got = plan_span(2, span, [])
        yours["a span nobody holds"] = f"returned {got!r}"[:100]
    except rs.PlanError:
        yours["a span nobody holds"] = "refused: PlanError"
    except Exception as err:
        yours["a span nobody holds"] = f"raised {type(err).__name__}, not rs.PlanError"
    return yours, expected
    # --8<-- [end:check-2]


def plan_case(core, shape, world):
    sources, destinations = rs.trainer_spans(shape, world), rs.engine_spans(shape, world)
    plan = rs.plan_transfers(sources, destinations, core=core)
    hf = make_weights(shape, 1, "cpu")
    held = {}
    for r in sources:
        t = trainer_rank(r, world.tp, world.pp, world.dp)
        held[r] = hf_to_megatron(hf, shape, t.tp_rank, world.tp, t.pp_rank, world.pp)
    ranks = world.engine_ranks(0)
    want = {d: hf_to_vllm(hf, shape, i, world.engine_tp) for i, d in enumerate(ranks)}
    got = {d: {n: torch.full_like(w, float("nan")) for n, w in want[d].items()} for d in ranks}
    try:
        rs.check_plan(plan, destinations, shape)
    except rs.PlanError as err:
        return str(err)
    rs.apply_plan(plan, held, got)
    wrong = [
        f"{n} of engine rank {d}"
        for d in ranks
        for n in want[d]
        if not torch.equal(got[d][n], want[d][n])
    ]
    return f"wrong values in {', '.join(wrong[:2])}" if wrong else RIGHT


def dp_shares(core):
    """Bytes each DP replica sends in trainer TP2 x DP2 -> engine TP2: half each?"""
    world, shape = rs.World(2, 1, 2, 2), shape_of(4)
    try:
        plan = rs.plan_transfers(
            rs.trainer_spans(shape, world), rs.engine_spans(shape, world), core
        )
        sent = rs.sent_by(plan, shape, 2)
    except Exception as err:
        return f"raised {type(err).__name__}: {str(err)[:100]}"
    by_replica = [
        sum(sent[r] for r in range(4) if trainer_rank(r, 2, 1, 2).dp_rank == k) for k in (0, 1)
    ]
    if min(by_replica) < 0.9 * max(by_replica):
        return (f"DP replicas send {by_replica[0]} and {by_replica[1]} bytes: spread each piece "
                "over every rank holding it, not all from replica 0")  # fmt: skip
    return "each DP replica sends half the bytes (within 10%)"


ROTATED = "over 4 turns, each of its 4 holders sends"


def rotation(core):
    """A 2-row span held whole by 4 trainer ranks (DP replicas), planned at turns 0..3 (one per
    tensor, as plan_transfers does): the sending must rotate over all 4, not fall on 2 always."""
    span = rs.Span("model.norm.weight", 0, 0, 2, "model.norm.weight", 0, 2)
    try:
        senders = {
            t.src for turn in range(4) for t in core(4, span, [(r, span) for r in range(4)], turn)
        }
    except Exception as err:
        return f"raised {type(err).__name__}: {str(err)[:100]}"
    if senders != {0, 1, 2, 3}:
        return f"only trainer ranks {sorted(senders)} send over 4 turns: rotate who sends by `turn`"
    return ROTATED


# Exercise id -> (its check, the function you write, defined in the lesson).
EXERCISES = {"10.1": (check_qkv, "megatron_qkv_to_vllm"), "10.2": (check_plan, "plan_span")}
