"""Every exercise check fails on the unsolved stub, catches a plausible wrong answer, and passes
on the reference solution; solution and stub share one skeleton."""

import ast
import re

import pytest

from course import check
from course.check import exercises_of, run_check, solution_file

from conftest import LESSONS, ROOT, run_python, text

WITH_EXERCISES = [path for path in LESSONS if exercises_of(path.stem[:2])]
IDS = [path.stem for path in WITH_EXERCISES]
WRONG = ROOT / "tests" / "wrong"


def regions(path):
    """{exercise id: source of its `# --8<-- [start:ex-NN-K]` ... `[end:ex-NN-K]` region}
    (region names can't hold the id's dot: docs snippets allow only [-_0-9a-z])."""
    return {
        f"{number}.{k}": stub
        for number, k, stub in re.findall(
            r"# --8<-- \[start:ex-(\d\d)-(\d+)\]\n(.*?)# --8<-- \[end:ex-\1-\2\]",
            path.read_text(),
            re.S,
        )
    }


def skeleton(source):
    """What stub and solution must share: each function's name, arguments and docstring."""
    return [
        (f.name, ast.dump(f.args), ast.get_docstring(f))
        for f in ast.parse(source).body
        if isinstance(f, ast.FunctionDef)
    ]


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=IDS)
def test_stub_and_solution_share_a_skeleton(path):
    stubs, solved = regions(path), regions(solution_file(path.stem[:2]))
    assert set(stubs) == set(exercises_of(path.stem[:2])), "every exercise needs a marked region"
    assert set(solved) == set(stubs), "solutions/ must solve every exercise, in marked regions"
    for exercise, stub in stubs.items():
        assert skeleton(stub) == skeleton(solved[exercise]), exercise
        assert re.search(rf'NotImplementedError\(\s*"Exercise {exercise}:', stub), exercise
        assert "(about " in stub, f"{exercise}: say how long an answer is, (about N lines)"


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=IDS)
def test_check_says_not_attempted_on_the_stub(path):
    ids = exercises_of(path.stem[:2])
    status, lines = run_check(ids, None, 4)
    assert status == {i: "not attempted" for i in ids}, "\n".join(lines)


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=IDS)
def test_check_catches_a_wrong_answer(path, monkeypatch):
    # A wrong answer may deadlock: let its collectives give up after 8 s, not the check's 20 s.
    monkeypatch.setattr(check, "COLLECTIVE_TIMEOUT_S", "8")
    ids = exercises_of(path.stem[:2])
    status, lines = run_check(ids, WRONG / path.name, 4)
    assert status == {i: "mismatch" for i in ids}, "\n".join(lines)
    assert "yours" in "\n".join(lines) and "expected" in "\n".join(lines)
    # A verdict fits on a screen: 25 lines per exercise for 4 ranks, each a few terminal lines.
    assert len(lines) <= 25 * len(ids) and max(map(len, lines)) <= 400, "\n".join(lines)


@pytest.mark.parametrize("path", WITH_EXERCISES, ids=IDS)
def test_check_passes_the_solution(path):
    ids = exercises_of(path.stem[:2])
    status, lines = run_check(ids, solution_file(ids[0]))  # on each of the lesson's world sizes
    assert status == {i: "pass" for i in ids}, "\n".join(lines)


@pytest.mark.parametrize(
    "args, says",
    [  # lesson 06 pairs students with teachers: not on 3 ranks
        (
            ["06", "--nproc", "3"],
            "06's checks need an even number of ranks, at least 2, not --nproc 3",
        ),
        (["06", "--nproc", "0"], "--nproc 0: a world needs at least 1 rank"),
        (["00.9"], "lesson 00 has no exercise 00.9; it has 00.1"),
        (["99"], "no lesson matches '99_'"),
        (["00", "--file", "missing.py"], "--file missing.py: no such file"),
    ],
)
def test_the_check_refuses_what_it_cannot_run_at_once(args, says):
    """A bad lesson, exercise, file or world size: one line saying so, before any rank starts."""
    result = run_python("-m", ["lessons.check", *args], timeout=60)
    out = text(result)
    assert result.returncode == 2 and "Traceback" not in out and says in out, out
