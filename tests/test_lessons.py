"""Every lesson, run the three ways a learner runs it: torchrun with 4 ranks, with 2 ranks (or a
clear world-size error), and plain python. Each must exit 0 and print the checks it made."""
import ast

import pytest

from conftest import LESSONS, ROOT, lesson_ids, run_python, run_ranks, text

# What each lesson must print on rank 0 ({n}: the world size), one line per entry:
# tests/must_print/NN_topic.txt. A lesson without that file fails.
MUST_PRINT = ROOT / "tests" / "must_print"


def needs(path):
    """The lesson's NEEDS (text, test), read from its source: None means any world size."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "NEEDS":
            from course import ranks
            return getattr(ranks, node.value.id)
    return None


def assert_ran(result, stem, n):
    out = text(result)
    assert result.returncode == 0, out
    assert "Traceback" not in out, out
    for line in (MUST_PRINT / f"{stem}.txt").read_text().splitlines():
        assert f"[rank 0] {line.format(n=n)}" in out, f"missing {line!r} in:\n{out}"


@pytest.mark.parametrize("path", LESSONS, ids=lesson_ids())
def test_lesson_has_what_it_must_print(path):
    must = MUST_PRINT / f"{path.stem}.txt"
    assert must.is_file() and must.read_text().strip(), f"write what {path.name} must print in {must}"


@pytest.mark.parametrize("path", LESSONS, ids=lesson_ids())
def test_four_ranks(path):
    assert_ran(run_ranks(path, 4), path.stem, 4)


@pytest.mark.parametrize("path", LESSONS, ids=lesson_ids())
def test_two_ranks(path):
    need = needs(path)
    result = run_ranks(path, 2)
    if need is None or need[1](2):
        assert_ran(result, path.stem, 2)
    else:  # the lesson cannot use 2 ranks: every rank says so, naming the requirement
        out = text(result)
        assert result.returncode != 0
        for rank in range(2):
            assert f"[rank {rank}] error: " in out and need[0] in out, out


@pytest.mark.parametrize("path", LESSONS, ids=lesson_ids())
def test_plain_python(path):
    """`python lessons/NN.py --nproc 2` re-runs itself under torchrun."""
    need = needs(path)
    nproc = 2 if need is None or need[1](2) else 4
    assert_ran(run_python(path, ["--nproc", nproc]), path.stem, nproc)
