"""Every lesson, run the ways a learner runs it: with 2 ranks (or a clear world-size error) and
plain python, both through the course's launcher; each must exit 0 and print the `checked:`
lines of its docstring's "What you should see" block. The README's torchrun command with 4
ranks, against the whole block: tests/test_lessons_torchrun.py."""

import ast

import pytest

from conftest import (
    LESSONS,
    assert_shows,
    expected_output,
    lesson_ids,
    run_python,
    run_ranks,
    text,
)


def needs(path):
    """The lesson's NEEDS (text, test), read from its source: None means any world size."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "NEEDS":
            from course import ranks

            return getattr(ranks, node.value.id)
    return None


def assert_ran(result, path, n):
    out = text(result)
    assert result.returncode == 0, out
    assert "Traceback" not in out, out
    assert_shows(out, path, checked_only=n != 4)  # the docstring shows a run on 4 ranks


@pytest.mark.parametrize("path", LESSONS, ids=lesson_ids())
def test_docstring_shows_what_the_lesson_checks(path):
    shown = [line for line, _ in expected_output(path)]
    assert any("checked:" in line for line in shown), f"{path.name} shows no `checked:` line"


@pytest.mark.parametrize("path", LESSONS, ids=lesson_ids())
def test_two_ranks(path):
    need = needs(path)
    result = run_ranks(path, 2)
    if need is None or need[1](2):
        assert_ran(result, path, 2)
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
    assert_ran(run_python(path, ["--nproc", nproc]), path, nproc)
