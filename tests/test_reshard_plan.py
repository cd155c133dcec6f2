"""The pure half of lesson 10: Megatron's layout and its conversions to and from HF's (round
trips both ways), the planner's invariants over the layout matrix of issue 16, the layouts it
refuses (naming the rule), and the checksummed buckets. No process starts here."""

import collections

import pytest
import torch

from course.check import lesson_module
from weight_sync import reshard as rs
from weight_sync.megatron import (
    hf_to_megatron,
    megatron_spans,
    megatron_to_hf,
    stage_layers,
    tensor_shapes,
    trainer_rank,
)
from weight_sync.model import LlamaShape, make_weights
from weight_sync.vllm_layout import hf_to_vllm, vllm_to_hf

SHAPE = LlamaShape(vocab=256, hidden=64, intermediate=128, layers=4, heads=8, kv_heads=4)
GQA = SHAPE._replace(kv_heads=2)  # engine TP 4 and 8 replicate its KV heads
HF = make_weights(SHAPE, 1, "cpu")
TRAINERS = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (2, 1, 2), (4, 1, 1), (1, 3, 1), (4, 2, 2)]
ENGINES = [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2)]  # (TP, replicas); TP 8 > 4 KV heads


def held_by_trainer(shape, hf, world):
    out = {}
    for r in range(world.trainers):
        t = trainer_rank(r, world.tp, world.pp, world.dp)
        out[r] = hf_to_megatron(hf, shape, t.tp_rank, world.tp, t.pp_rank, world.pp)
    return out


def carried_out(shape, hf, world, plan):
    """The engine's tensors after the plan, carried out in one process (NaN where unwritten)."""
    engine = {}
    for replica in range(world.replicas):
        for i, d in enumerate(world.engine_ranks(replica)):
            want = hf_to_vllm(hf, shape, i, world.engine_tp)
            engine[d] = {n: torch.full_like(w, float("nan")) for n, w in want.items()}
    rs.apply_plan(plan, held_by_trainer(shape, hf, world), engine)
    return engine


# --- Megatron's layout -----------------------------------------------------------------------
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 3), (4, 4)])
def test_megatron_round_trips_both_ways(tp, pp):
    per_rank = {
        (t, p): hf_to_megatron(HF, SHAPE, t, tp, p, pp) for t in range(tp) for p in range(pp)
    }
    back = megatron_to_hf(per_rank, SHAPE, tp, pp)
    assert all(torch.equal(back[n], HF[n]) for n in HF)  # HF -> Megatron -> HF
    again = {k: hf_to_megatron(back, SHAPE, *k[:1], tp, k[1], pp) for k in per_rank}
    for k, weights in per_rank.items():  # Megatron -> HF -> Megatron
        assert weights.keys() == again[k].keys()
        assert all(torch.equal(weights[n], again[k][n]) for n in weights)


def test_megatron_to_hf_to_vllm_and_back():
    per_rank = {(t, 0): hf_to_megatron(HF, SHAPE, t, 2) for t in range(2)}
    hf = megatron_to_hf(per_rank, SHAPE, 2, 1)
    engine = [hf_to_vllm(hf, SHAPE, r, 4) for r in range(4)]
    assert all(torch.equal(vllm_to_hf(engine, SHAPE)[n], HF[n]) for n in HF)


def test_fused_qkv_is_laid_out_per_query_group():
    """Megatron's linear_qkv of TP rank 1 of 2 (groups 2 and 3): [q4 q5 k2 v2 q6 q7 k3 v3]."""
    hd = SHAPE.hidden // SHAPE.heads
    qkv = hf_to_megatron(HF, SHAPE, 1, 2)["decoder.layers.0.self_attention.linear_qkv.weight"]
    p = "model.layers.0.self_attn."
    q, k, v = (HF[p + f"{x}_proj.weight"].view(-1, hd, SHAPE.hidden) for x in "qkv")
    expected = torch.cat([q[4], q[5], k[2], v[2], q[6], q[7], k[3], v[3]])
    assert torch.equal(qkv, expected)
    fc1 = hf_to_megatron(HF, SHAPE, 1, 2)["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = HF["model.layers.0.mlp.gate_proj.weight"], HF["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate[64:], up[64:]]))  # [gate_r; up_r]


def test_stages_number_their_layers_locally():
    assert [list(stage_layers(4, s, 3)) for s in range(3)] == [[0, 1], [2], [3]]
    names = {s.name: s.hf_name for s in megatron_spans(SHAPE, 0, 1, 1, 2)}
    assert (
        names["decoder.layers.0.input_layernorm.weight"] == "model.layers.2.input_layernorm.weight"
    )
    assert "embedding.word_embeddings.weight" not in names and "output_layer.weight" in names


def test_megatron_spans_cover_every_element_of_each_tensor_once():
    for tp, pp in [(1, 1), (2, 2), (4, 1)]:
        for t in range(tp):
            for p in range(pp):
                spans = megatron_spans(SHAPE, t, tp, p, pp)
                for name, size in tensor_shapes(spans, SHAPE).items():
                    dim = next(s.dim for s in spans if s.name == name)
                    count = torch.zeros(size[dim], dtype=torch.int32)
                    for s in (s for s in spans if s.name == name):
                        count[s.start : s.stop] += 1
                    assert bool((count == 1).all()), name


def test_trainer_ranks_go_tp_then_dp_then_pp():
    assert [tuple(trainer_rank(r, 2, 2, 2)) for r in range(8)] == [
        (0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1)
    ]  # fmt: skip


# --- the planner over the layout matrix -------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: f"engine{e[0]}x{e[1]}")
@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda t: "trainer{}x{}x{}".format(*t))
def test_plan_fills_every_engine_rank_exactly_as_hf_to_vllm(trainer, engine):
    world = rs.World(*trainer, *engine)
    sources, destinations = rs.trainer_spans(SHAPE, world), rs.engine_spans(SHAPE, world)
    plan = rs.plan_transfers(sources, destinations)
    rs.check_plan(plan, destinations, SHAPE)  # every destination element written exactly once
    got = carried_out(SHAPE, HF, world, plan)
    for replica in range(world.replicas):
        for i, d in enumerate(world.engine_ranks(replica)):
            want = hf_to_vllm(HF, SHAPE, i, world.engine_tp)
            assert all(torch.equal(got[d][n], want[n]) for n in want), (d, i)
    sent = rs.sent_by(plan, SHAPE, 2)
    by_replica = collections.Counter()
    for r in range(world.trainers):
        by_replica[trainer_rank(r, world.tp, world.pp, world.dp).dp_rank] += sent[r]
    shares = [by_replica[k] for k in range(world.dp)]
    assert min(shares) >= 0.9 * max(shares), shares  # each DP replica sends its own share
    assert all(sent[r] > 0 for r in range(world.trainers)), sent  # every trainer rank sends


@pytest.mark.parametrize("engine_tp", [2, 4, 8])
def test_gqa_engine_tp_above_kv_heads_replicates_them(engine_tp):
    hf = make_weights(GQA, 3, "cpu")
    world = rs.World(2, 2, 1, engine_tp)
    plan = rs.plan_transfers(rs.trainer_spans(GQA, world), rs.engine_spans(GQA, world))
    got = carried_out(GQA, hf, world, plan)
    for i, d in enumerate(world.engine_ranks(0)):
        want = hf_to_vllm(hf, GQA, i, engine_tp)
        assert all(torch.equal(got[d][n], want[n]) for n in want)


def test_plan_needs_no_constraint_between_the_two_tp_sizes():
    """ChatLearn requires engine TP to be a multiple of trainer TP and engine PP to divide
    trainer PP; spans need neither: TP 4 -> 2 (shrinking) and PP 3 -> 1 plan like any other."""
    for world in (rs.World(4, 1, 1, 2), rs.World(4, 3, 1, 1), rs.World(2, 3, 1, 8)):
        destinations = rs.engine_spans(SHAPE, world)
        plan = rs.plan_transfers(rs.trainer_spans(SHAPE, world), destinations)
        rs.check_plan(plan, destinations, SHAPE)


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda: rs.trainer_spans(SHAPE, rs.World(3, 1, 1, 1)), "TP 3 must divide the 4 KV heads"),
        (lambda: rs.trainer_spans(SHAPE, rs.World(1, 5, 1, 1)), "PP 5 must be at most the 4"),
        (
            lambda: rs.engine_spans(SHAPE, rs.World(1, 1, 1, 3)),
            "Engine TP sizes that work: 1, 2, 4, 8",
        ),
        (
            lambda: rs.engine_spans(GQA, rs.World(1, 1, 1, 16)),
            "Engine TP sizes that work: 1, 2, 4, 8",
        ),
    ],
)
def test_layouts_that_cannot_map_are_refused_naming_the_rule(make, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        make()


def test_a_name_on_one_side_only_is_refused():
    world = rs.World(1, 1, 1, 2)
    sources, destinations = rs.trainer_spans(SHAPE, world), rs.engine_spans(SHAPE, world)
    renamed = {d: [s._replace(hf_name="lm_head.bias") if s.hf_name == "lm_head.weight" else s
                   for s in spans] for d, spans in destinations.items()}  # fmt: skip
    with pytest.raises(
        rs.PlanError, match="name on one side only: the trainer has .'lm_head.weight'"
    ):
        rs.plan_transfers(sources, renamed)


def test_a_hole_in_the_sources_is_refused_naming_it():
    world = rs.World(2, 1, 1, 1)
    sources = rs.trainer_spans(SHAPE, world)
    sources[1] = [s for s in sources[1] if s.hf_name != "lm_head.weight"]
    with pytest.raises(
        rs.PlanError, match=r"coverage: no trainer rank holds lm_head.weight \[128:256\)"
    ):
        rs.plan_transfers(sources, rs.engine_spans(SHAPE, world))


def test_check_plan_catches_an_element_written_twice():
    world = rs.World(1, 1, 1, 2)
    destinations = rs.engine_spans(SHAPE, world)
    plan = rs.plan_transfers(rs.trainer_spans(SHAPE, world), destinations)
    plan[1].append(plan[1][3])
    with pytest.raises(rs.PlanError, match="written 2 times, not once"):
        rs.check_plan(plan, destinations, SHAPE)


def test_a_wrong_interleave_passes_shapes_and_coverage_yet_moves_the_wrong_rows():
    """The lesson's bug: read linear_qkv as [all q | all k | all v]. The plan is as valid as the
    right one (same shapes, every element written once), and the engine's qkv_proj is wrong."""
    lesson = lesson_module("10")
    world = rs.World(2, 1, 1, 2)
    destinations = rs.engine_spans(SHAPE, world)
    wrong = {r: lesson.wrong_interleave(s) for r, s in rs.trainer_spans(SHAPE, world).items()}
    plan = rs.plan_transfers(wrong, destinations)
    rs.check_plan(plan, destinations, SHAPE)
    got = carried_out(SHAPE, HF, world, plan)
    want = hf_to_vllm(HF, SHAPE, 0, 2)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert got[2][qkv].shape == want[qkv].shape and not torch.equal(got[2][qkv], want[qkv])
    assert torch.equal(got[2]["model.layers.0.mlp.gate_up_proj.weight"],
                       want["model.layers.0.mlp.gate_up_proj.weight"])  # fmt: skip


# --- buckets, checksums and the routes ---------------------------------------------------------
def test_buckets_pack_and_unpack_in_one_process_and_a_flipped_byte_is_caught():
    world, dtype = rs.World(2, 1, 1, 2), torch.bfloat16
    sources, destinations = rs.trainer_spans(SHAPE, world), rs.engine_spans(SHAPE, world)
    plan = rs.plan_transfers(sources, destinations)
    buckets, held = rs.make_buckets(plan, SHAPE, dtype), held_by_trainer(SHAPE, HF, world)
    for d in (2, 3):
        want = {n: w.to(dtype) for n, w in hf_to_vllm(HF, SHAPE, d - 2, 2).items()}
        staging = {n: torch.zeros_like(w) for n, w in want.items()}
        counts = {n: torch.zeros(w.shape[s.dim], dtype=torch.int32) for s in destinations[d]
                  for n, w in [(s.name, want[s.name])]}  # fmt: skip
        for src in (0, 1):
            data = torch.empty(buckets[src, d].nbytes, dtype=torch.uint8)
            rs.pack(buckets[src, d], held[src], data, dtype)
            assert rs.unpack(buckets[src, d], data, staging, counts) is None
        assert all(torch.equal(staging[n], want[n]) for n in want)
        assert all(bool((c == 1).all()) for c in counts.values())
    data[3] ^= 1  # one bit of the last bucket, after its checksum was computed
    assert "checksum mismatch in 1 piece(s) from rank 1" in rs.unpack(
        buckets[1, 3], data, staging, counts
    )


@pytest.mark.parametrize("path", rs.PATHS)
def test_every_route_delivers_each_bucket_to_its_engine_rank_once(path):
    world = rs.World(2, 1, 2, 2, replicas=2)
    delivered = collections.Counter()
    for src in range(world.trainers):
        dsts = [d for r in range(2) for d in world.engine_ranks(r)]
        for via, finals in rs.route(path, src, dsts, world):
            for d in finals:
                delivered[src, d] += 1
                assert via in (d, 0) or not world.is_trainer(via)
    assert set(delivered.values()) == {1} and len(delivered) == 4 * 4
