"""Lesson 10 on real gloo ranks, beyond test_lessons.py's 4-rank run: the lesson at 6 and 8
ranks (TP x PP and TP x DP trainers into engines of TP 2 and 4, KV heads replicated), world
sizes and layouts it cannot use refused on every rank, and the faults of issue 16 in one run of
this file under torchrun (python tests/test_10_reshard.py faults): a shape and a dtype
mismatch found before any byte moves, then a trainer rank that dies mid-update. The pure
planner and the conversions are tests/test_reshard_plan.py."""

import sys
from pathlib import Path

import pytest

from course.check import run_check

from conftest import ROOT, assert_refused_on_every_rank, assert_shows, run_ranks, text

THIS = Path(__file__).resolve()
LESSON = ROOT / "lessons" / "10_reshard.py"


@pytest.mark.parametrize(
    "nproc, args, layout",
    [
        (6, [], "trainer TP 2 x PP 2 x DP 1 (ranks 0..3), engine TP 2"),
        (8, [], "trainer TP 2 x PP 1 x DP 2 (ranks 0..3), engine TP 4"),
        (6, ["--trainer", "1,1,2", "--engine", "4", "--kv-heads", "2"], "engine TP 4"),
    ],
)
def test_lesson_at_6_and_8_ranks(nproc, args, layout):
    result = run_ranks(LESSON, nproc, args, timeout=240)
    out = text(result)
    assert result.returncode == 0, out
    assert layout in out, out
    assert_shows(out, LESSON, checked_only=True)


@pytest.mark.parametrize(
    "nproc, args, says",
    [
        (3, [], "no default split of 3 ranks: pass --trainer tp,pp,dp --engine tp"),
        (4, ["--trainer", "3,1,1", "--engine", "1"], "TP 3 must divide the 4 KV heads"),
        (4, ["--trainer", "1,1,1", "--engine", "3"], "Engine TP sizes that work: 1, 2, 4, 8"),
        (4, ["--trainer", "1,1,1", "--engine", "2"], "= 3 ranks, not 4: torchrun"),
    ],
)
def test_layouts_that_cannot_map_are_refused_on_every_rank(nproc, args, says):
    assert_refused_on_every_rank(LESSON, nproc, args, says)


def test_benchmark_prints_the_table_against_its_baseline(tmp_path):
    args = ["--preset", "tiny", "--trainer", "1,2,1", "--repeats", "1", "--out", tmp_path]
    result = run_ranks(ROOT / "benchmarks" / "reshard.py", 4, args, timeout=120)
    out = text(result)
    assert result.returncode == 0, out
    for line in ("same-run baseline: one p2p send", "| gather |", "| direct |", "| two-stage |"):
        assert line in out, out
    assert "checked: every update committed on every engine rank" in out, out
    assert (tmp_path / "10_reshard_gloo.md").stat().st_size > 0


def test_checks_say_why_the_wrong_answers_fail():
    """tests/wrong/10_reshard.py: the fused QKV read as [all q | all k | all v], and a planner
    that takes every piece from DP replica 0. Both mismatch, and the verdict says why."""
    status, lines = run_check(["10.1", "10.2"], ROOT / "tests" / "wrong" / "10_reshard.py")
    out = "\n".join(lines)
    assert status == {"10.1": "mismatch", "10.2": "mismatch"}, out
    assert "hold another head's weights: the q/k/v interleave?" in out, out
    assert "not all from replica 0" in out, out


def test_faults_leave_the_engine_as_it_was(tmp_path):
    """Trainer TP2 + engine TP2. A name on one side only, a wrong shape, a wrong dtype: each
    refused on every rank before any byte moves, naming the tensor. Then trainer rank 1 dies
    after its first message: every engine rank keeps version 0 and model A's weights, and
    names rank 1."""
    result = run_ranks(THIS, 4, ["faults"], timeout=180)
    out = text(result)
    assert result.returncode == 0, out
    for rank in range(4):
        said = f"[rank {rank}] RESULT name: refused: name on one side only: the trainer has "
        assert said in out, out
        assert f"[rank {rank}] RESULT shape: refused: " in out, out
        assert f"[rank {rank}] RESULT dtype: refused: " in out, out
    assert (
        "trainer rank 1: decoder.layers.0.mlp.linear_fc1.weight is (64, 64), "
        "the layout says (128, 64)" in out
    ), out
    assert (
        "trainer rank 0: output_layer.weight is torch.int32, the update moves torch.bfloat16" in out
    ), out
    for rank in (2, 3):
        assert f"[rank {rank}] RESULT after shape and dtype: version 0, model A" in out, out
        assert (
            f"[rank {rank}] RESULT after the death: version 0, model A, rejected: engine rank "
        ) in out, out
    said = [line for line in out.splitlines() if "RESULT after the death" in line]
    assert all("trainer rank 1 failed mid-update" in line for line in said), out


# ---------------------------------------------------------------------------------------------
# Run under torchrun: python tests/test_10_reshard.py faults
def faults():
    import torch
    import torch.distributed as dist

    from course.ranks import parser, print_rank, setup
    from weight_sync import reshard as rs
    from weight_sync.megatron import hf_to_megatron
    from weight_sync.model import LlamaShape, make_weights
    from weight_sync.vllm_layout import hf_to_vllm

    shape = LlamaShape(vocab=256, hidden=64, intermediate=128, layers=4, heads=8, kv_heads=4)
    world, dtype = rs.World(2, 1, 1, 2), torch.bfloat16
    args = parser("").parse_args(["--timeout", "20"])
    with setup(args) as ctx:
        plan = rs.plan_transfers(rs.trainer_spans(shape, world), rs.engine_spans(shape, world))
        group, tp_rank = rs.engine_world(world, ctx.device)
        hf_a, hf_b = make_weights(shape, 1, "cpu"), make_weights(shape, 2, "cpu")
        engine = weights = None
        if world.is_trainer(ctx.rank):
            weights = hf_to_megatron(hf_b, shape, ctx.rank, world.tp)
        else:
            model_a = {n: w.to(dtype) for n, w in hf_to_vllm(hf_a, shape, tp_rank, 2).items()}
            engine = rs.Engine(shape, tp_rank, 2, {n: w.clone() for n, w in model_a.items()}, group)

        def as_before():
            same = all(torch.equal(engine.live[n], w) for n, w in model_a.items())
            return f"version {engine.version}, " + ("model A" if same else "CHANGED")

        def attempt(name, held):
            try:
                rs.update("direct", plan, world, ctx.rank, shape, held, dtype, ctx.device, engine)
                print_rank(f"RESULT {name}: NOT REFUSED")
            except rs.PlanError as err:
                print_rank(f"RESULT {name}: refused: {err}")

        renamed = {  # the engine names an HF tensor the trainer does not have
            d: [x._replace(hf_name="lm_head.bias") if x.hf_name == "lm_head.weight" else x
                for x in spans] for d, spans in rs.engine_spans(shape, world).items()
        }  # fmt: skip
        try:
            rs.plan_transfers(rs.trainer_spans(shape, world), renamed)
        except rs.PlanError as err:
            print_rank(f"RESULT name: refused: {err}")
        broken = weights and dict(weights)
        if ctx.rank == 1:  # a tensor of the wrong shape on one trainer rank
            name = "decoder.layers.0.mlp.linear_fc1.weight"
            broken[name] = broken[name][:64]
        attempt("shape", broken)
        if ctx.rank == 0:  # a tensor of a dtype that is no float
            broken["output_layer.weight"] = broken["output_layer.weight"].int()
        attempt("dtype", broken)
        if engine:
            print_rank(f"RESULT after shape and dtype: {as_before()}")
        try:
            result = rs.update(
                "direct", plan, world, ctx.rank, shape, weights, dtype, ctx.device, engine, 1
            )
        except rs.RankDied:  # the peers see its connections close, as if the process had died
            dist.destroy_process_group()
            return
        if engine:
            print_rank(f"RESULT after the death: {as_before()}, rejected: {result.why}")
        # a world with a dead rank: no collective may follow, so no barrier at the end


if __name__ == "__main__":
    {"faults": faults}[sys.argv[1]]()
