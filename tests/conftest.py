"""Shared test helpers. Every multi-process run goes through lessons.launcher, so it is bounded
in time, its output comes back in rank order, and it reports any process it left behind."""
import socket
import sys

import pytest

from lessons.launcher import ROOT, launch, run_command

LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))
PROGRAMS = ROOT / "tests" / "programs"


def lesson_ids():
    return [path.stem for path in LESSONS]


def run_ranks(target, nproc=4, args=(), timeout=180, env=None):
    """torchrun `target` on `nproc` gloo ranks; the run must leave no process behind."""
    result = launch(target, nproc, args, timeout, {"COURSE_BACKEND": "gloo", **(env or {})})
    assert result.leftovers == 0, f"{result.leftovers} processes outlived the run"
    return result


def run_python(path, args=(), timeout=180, env=None):
    """`python path args` (a lesson re-launching itself under torchrun), bounded, no leftovers."""
    result = run_command([sys.executable, str(path), *map(str, args)], timeout,
                         {"COURSE_BACKEND": "gloo", **(env or {})})
    assert result.leftovers == 0, f"{result.leftovers} processes outlived the run"
    return result


def text(result):
    return "\n".join(result.lines + result.stuck)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lesson(request):
    return ROOT / "lessons" / f"{request.param}.py"
