"""Lesson 13 on real gloo ranks, beyond test_lessons.py's runs: the lesson with the engine's
experts by EP, with PP 2 (each stage regroups its own layers) and with expert TP 2 folded onto
TP 2 x DP 2 (all three regroups every time, the engine's logits held against one process's MoE
forward after each update); layouts it cannot use refused on every rank before any byte moves;
the exercise's wrong answers caught; the benchmark's table. The pure planner:
tests/test_moe_plan.py."""

import pytest

from course.check import run_check

from conftest import ROOT, assert_refused_on_every_rank, assert_shows, run_ranks, text

LESSON = ROOT / "lessons" / "13_experts.py"


@pytest.mark.parametrize(
    "nproc, args, layout",
    [
        (4, ["--experts-by", "ep"], "experts by ep (ranks 2..3)"),
        (6, ["--trainer", "1,2,2,2", "--engine", "2"], "trainer TP 1 x PP 2 x DP 2, EP 2"),
        (6, ["--trainer", "2,1,2,2,2", "--engine", "2", "--experts-by", "ep"],
         "no all_to_all: all_to_all regroup needs the trainer's expert TP x EP (2 x 2 = 4)"),
    ],
)  # fmt: skip
def test_lesson_in_other_layouts(nproc, args, layout):
    result = run_ranks(LESSON, nproc, args, timeout=240)
    out = text(result)
    assert result.returncode == 0, out
    assert layout in out, out
    assert_shows(out, LESSON, checked_only=True)
    assert "wrong expert order: committed" in out, out


@pytest.mark.parametrize(
    "nproc, args, says",
    [
        (4, ["--trainer", "1,1,3,3", "--engine", "1"], "EP 3 must divide the 8 experts"),
        (5, ["--trainer", "1,1,2,2", "--engine", "3", "--experts-by", "ep"],
         "EP 3 must divide the 8 experts (whole experts per rank)"),
    ],
)  # fmt: skip
def test_layouts_that_cannot_map_are_refused_on_every_rank(nproc, args, says):
    out = assert_refused_on_every_rank(LESSON, nproc, args, says)
    assert "regroup      ms" not in out, out  # before any byte moved


def test_checks_say_why_the_wrong_answers_fail():
    """tests/wrong/13_experts.py keeps the wrong expert order (every shape right), and
    13_experts_everywhere.py skips the regroup (everything to every engine rank)."""
    wrong = ROOT / "tests" / "wrong"
    status, lines = run_check(["13.1"], wrong / "13_experts.py")
    out = "\n".join(lines)
    assert status == {"13.1": "mismatch"}, out
    assert "holds another expert's weights: the expert order?" in out, out
    assert "the engine's MoE output is" in out, out
    status, lines = run_check(["13.1"], wrong / "13_experts_everywhere.py")
    out = "\n".join(lines)
    assert status == {"13.1": "mismatch"}, out
    assert "is outside its 32 rows" in out, out


def test_benchmark_prints_the_table(tmp_path):
    args = ["--preset", "tiny-moe", "--repeats", "1", "--out", tmp_path]
    result = run_ranks(ROOT / "benchmarks" / "experts.py", 4, args, timeout=120)
    out = text(result)
    assert result.returncode == 0, out
    for line in ("| none |", "| all_to_all |", "| all_gather |"):
        assert line in out, out
    assert "checked: every update committed; after each, every engine tensor equals" in out, out
    assert (tmp_path / "13_experts_gloo.md").stat().st_size > 0
    assert (tmp_path / "13_experts_flows.png").stat().st_size > 0
