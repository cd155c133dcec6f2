"""The pure half of lesson 13: the mixture-of-experts model (routing, the reference forward), its
Megatron (EP, expert TP) and vLLM (experts by TP or EP) layouts and their round trips, the one
planner with the expert axis over trainer/engine layout pairs and both regroups, and the
layouts it refuses, naming the rule. No process starts here."""

import collections

import pytest
import torch

from course.check import lesson_module
from weight_sync import regroup as rg
from weight_sync import reshard as rs
from weight_sync.megatron import from_hf, to_hf
from weight_sync.moe import (
    PRESETS,
    engine_moe,
    experts_missed,
    hf_moe,
    make_moe_weights,
    moe_specs,
    route,
)
from weight_sync.vllm_layout import hf_to_vllm, vllm_to_hf

SHAPE = PRESETS["tiny-moe"]
NO_SHARED = SHAPE._replace(intermediate=0)
HF = make_moe_weights(SHAPE, 1)
PAIRS = [  # (trainer tp, pp, dp, ep, etp) -> (engine ranks, experts by)
    ((1, 1, 2, 2, 1), (2, "tp")),
    ((2, 1, 2, 2, 0), (4, "tp")),  # expert TP = TP 2, folded with EP 2 onto TP x DP
    ((1, 2, 2, 2, 1), (2, "ep")),  # PP 2: each stage's ranks regroup their own layers
    ((2, 1, 2, 2, 1), (2, "ep")),  # expert TP 1 under TP 2: EP spans the TP ranks
    ((1, 1, 4, 4, 1), (2, "tp")),  # expert TP x EP 4 != engine's 2: no all_to_all
    ((1, 1, 4, 2, 1), (2, "tp")),  # two expert-DP groups, each sends its share
    ((2, 1, 1, 1, 0), (8, "ep")),  # no EP in the trainer, engine EP 8: one expert per rank
]


def world_of(trainer, engine, shape=SHAPE):
    return rs.World(*trainer[:3], engine[0], 1, trainer[3], trainer[4], engine[1])


def test_routing_breaks_ties_towards_the_lower_expert_and_renormalizes():
    h, router = torch.ones(3, 4), torch.zeros(6, 4)  # every expert equally likely
    combine = route(h, router, 2)
    assert combine[:, :2].eq(0.5).all() and combine[:, 2:].eq(0).all()
    combine = route(torch.randn(50, 4), torch.randn(6, 4), 2)
    assert torch.allclose(combine.sum(1), torch.ones(50)) and (combine.gt(0).sum(1) == 2).all()


def test_specs_name_the_experts_as_hf_does():
    names = [n for n, _, _ in moe_specs(SHAPE)]
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert (
        "model.layers.0.mlp.gate.weight" in names
        and "model.layers.0.mlp.gate_proj.weight" not in names
    )
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in names
    assert not any("shared" in n for n, _, _ in moe_specs(NO_SHARED))


@pytest.mark.parametrize("shape", [SHAPE, NO_SHARED], ids=["shared", "no-shared"])
@pytest.mark.parametrize("engine", [(1, "tp"), (2, "tp"), (4, "tp"), (2, "ep"), (8, "ep")])
def test_engine_layouts_round_trip_and_their_partial_sums_are_the_reference(shape, engine):
    hf = make_moe_weights(shape, 2)
    n, by = engine
    per_rank = [hf_to_vllm(hf, shape, r, n, by) for r in range(n)]
    back = vllm_to_hf(per_rank, shape, by)
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    h, p = torch.randn(40, shape.hidden), "model.layers.1.mlp."
    ours = sum(engine_moe(h, per_rank[r].__getitem__, p, shape, r, n, by) for r in range(n))
    torch.testing.assert_close(ours, hf_moe(h, hf.__getitem__, p, shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trainer, engine", PAIRS)
def test_trainer_layouts_round_trip(trainer, engine):
    world = world_of(trainer, engine)
    held = rs.trainer_spans(SHAPE, world)
    back = to_hf([(spans, from_hf(spans, SHAPE, HF)) for spans in held.values()], SHAPE)
    assert all(torch.equal(back[k], HF[k]) for k in HF)


def carried_out(world, sources, plan):
    """The engine's tensors after the plan, the trainer's (regrouped) tensors cut from HF by
    their spans: the single-process regroup."""
    engine = {}
    for i, d in enumerate(world.engine_ranks(0)):
        want = hf_to_vllm(HF, SHAPE, i, world.engine_tp, world.experts_by)
        engine[d] = {n: torch.full_like(w, float("nan")) for n, w in want.items()}
    rs.apply_plan(plan, {r: from_hf(s, SHAPE, HF) for r, s in sources.items()}, engine)
    return engine


@pytest.mark.parametrize("how", ["none", *rg.REGROUPS])
@pytest.mark.parametrize("trainer, engine", PAIRS)
def test_plan_fills_every_engine_rank_exactly_as_hf_to_vllm(trainer, engine, how):
    world = world_of(trainer, engine)
    try:
        sources = rg.sources(SHAPE, world, None if how == "none" else how)
    except rs.PlanError as err:  # the one rule all_to_all has
        assert how == "all_to_all" and world.expert_tp * world.ep != world.engine_tp, err
        assert "to equal the engine's TP" in str(err)
        return
    destinations = rs.engine_spans(SHAPE, world)
    plan = rs.plan_transfers(sources, destinations)
    rs.check_plan(plan, destinations, SHAPE)  # every destination element written exactly once
    got = carried_out(world, sources, plan)
    for i, d in enumerate(world.engine_ranks(0)):
        want = hf_to_vllm(HF, SHAPE, i, world.engine_tp, world.experts_by)
        assert all(torch.equal(got[d][n], want[n]) for n in want), (d, i)
    fed = collections.defaultdict(set)
    for t in (t for ts in plan.values() for t in ts if ".experts." in t.hf_name):
        fed[t.src].add(t.dst)
    if how == "all_to_all":  # the point of it: each trainer rank feeds one engine rank
        assert all(len(d) == 1 for d in fed.values()), fed


A2A = [p for p in PAIRS if p[0][3] > 1 and (p[0][4] or p[0][0]) * p[0][3] == p[1][0]]


@pytest.mark.parametrize("trainer, engine", A2A)
def test_all_to_all_regroup_plan_delivers_what_each_rank_forwards(trainer, engine):
    world = world_of(trainer, engine)
    held = rs.trainer_spans(SHAPE, world)
    for rank in range(world.trainers):
        plan, group = rg.regroup_plan(SHAPE, world, rank), rg.expert_group(world, rank)
        want = {r: from_hf(rg.regrouped_spans(SHAPE, world, "all_to_all", r), SHAPE, HF)
                for r in group}  # fmt: skip
        got = {r: {n: torch.full_like(w, float("nan")) for n, w in want[r].items()} for r in group}
        rs.apply_plan(plan, {r: from_hf(held[r], SHAPE, HF) for r in group}, got)
        assert all(torch.equal(got[r][n], want[r][n]) for r in group for n in want[r])
        if world.experts_by == "tp":  # the exchange stays inside each EP group
            ep_group = rg.expert_group(world, rank, ep_only=True)
            assert all(t.src in ep_group for t in plan[rank])


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda: rs.engine_spans(SHAPE, rs.World(1, 1, 1, 16, experts_by="ep")),
         "engine EP 16 needs more experts per rank than exist: 8 experts"),
        (lambda: rs.engine_spans(SHAPE, rs.World(1, 1, 1, 3, experts_by="ep")),
         "EP 3 must divide the 8 experts"),
        (lambda: rs.trainer_spans(SHAPE, rs.World(1, 1, 3, 1, ep=3, etp=1)),
         "EP 3 must divide the 8 experts"),
        (lambda: rs.trainer_spans(SHAPE, rs.World(2, 1, 1, 1, ep=2)),
         r"expert TP x EP \(2 x 2\) must divide TP x DP \(2 x 1\)"),
        (lambda: rg.sources(SHAPE, rs.World(1, 1, 2, 4, ep=2, etp=1), "all_to_all"),
         r"expert TP x EP \(1 x 2 = 2\) to equal the engine's TP \(4\)"),
    ],
)  # fmt: skip
def test_layouts_that_cannot_map_are_refused_naming_the_rule(make, says):
    with pytest.raises(ValueError, match=says):
        make()


def test_an_expert_missing_on_the_trainer_is_refused_naming_it():
    world = rs.World(1, 1, 2, 2, ep=2, etp=1)
    sources = rs.trainer_spans(SHAPE, world)
    sources[1] = [s for s in sources[1] if ".experts.5." not in s.hf_name]
    with pytest.raises(rs.PlanError, match="an expert missing on the trainer: no trainer rank "
                       "holds .'model.layers.0.mlp.experts.5.down_proj.weight'"):  # fmt: skip
        rs.plan_transfers(sources, rs.engine_spans(SHAPE, world))


def test_a_wrong_expert_order_passes_shapes_and_coverage_yet_changes_the_output():
    """The lesson's bug: EP rank b's local expert k taken for expert k*ep + b. The plan is as
    valid as the right one; the engine's experts are swapped, and its MoE output changes."""
    lesson = lesson_module("13")
    world = rs.World(1, 1, 2, 2, ep=2, etp=1)
    destinations = rs.engine_spans(SHAPE, world)
    wrong = {r: lesson.wrong_order(s, world.ep) for r, s in rs.trainer_spans(SHAPE, world).items()}
    plan = rs.plan_transfers(wrong, destinations)
    rs.check_plan(plan, destinations, SHAPE)
    held = {r: from_hf(s, SHAPE, HF) for r, s in rs.trainer_spans(SHAPE, world).items()}
    engine = {d: hf_to_vllm(HF, SHAPE, i, 2) for i, d in enumerate(world.engine_ranks(0))}
    rs.apply_plan(plan, held, engine)
    h, p = torch.randn(64, SHAPE.hidden), "model.layers.0.mlp."
    assert not experts_missed(HF, SHAPE, lesson.PROMPT)
    ours = sum(
        engine_moe(h, engine[d].__getitem__, p, SHAPE, i, 2, "tp") for i, d in enumerate(engine)
    )
    assert (ours - hf_moe(h, HF.__getitem__, p, SHAPE)).abs().max() > 1e-3
