"""Lesson 01 beyond the generic runs: `--broken order|members` breaks the new_group rule on
purpose; it must fail by itself within its short group timeout (not be stopped by the
launcher), say on every rank what went wrong, and leave no process behind."""

import pytest

from conftest import ROOT, run_ranks, text

LESSON = ROOT / "lessons" / "01_groups.py"


@pytest.mark.parametrize("how", ["order", "members"])
def test_broken_rule_fails_by_itself_and_explains(how):
    result = run_ranks(LESSON, 4, ["--broken", how], timeout=120)
    out = text(result)
    assert result.returncode not in (0, -1), out  # failed, and was not stopped for hanging
    assert not result.timed_out and "Traceback" not in out, out
    # Which call made which group is fixed by the flag; what gloo then did varies run to run.
    for rank in range(4):
        assert (
            f"[rank {rank}] error: --broken {how}: the ranks made different new_group calls; "
            "group '1' was [0, 1] on ranks [0, 1] but [2, 3] on ranks [2, 3]"
        ) in out, out
    assert "[rank 0] What went wrong: torch names a group by counting new_group calls" in out
    assert "[rank 0] rank  new_group calls, in order  what happened" in out


def test_broken_needs_four_ranks_and_says_so_on_every_rank():
    result = run_ranks(LESSON, 2, ["--broken", "order"], timeout=60)
    out = text(result)
    assert result.returncode != 0 and "Traceback" not in out, out
    for rank in range(2):
        assert f"[rank {rank}] error: --broken runs on gloo with at least 4 ranks" in out, out
