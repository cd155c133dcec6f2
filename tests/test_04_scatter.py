"""What the generic lesson tests don't cover in lesson 04: a world size that does not divide
the 1000 rows (scatter needs equal pieces, so the lesson pads)."""

from conftest import ROOT, run_ranks, text

LESSON = ROOT / "lessons" / "04_scatter.py"


def test_scatter_pads_when_the_ranks_do_not_divide_the_rows():
    result = run_ranks(LESSON, 3)
    out = text(result)
    assert result.returncode == 0 and "Traceback" not in out, out
    assert "padded to 1002 rows for scatter" in out
    assert (
        "[rank 0] checked: broadcast gives every rank the whole tensor, scatter only its 334 rows"
    ) in out
    assert "[rank 0]    1    4000000  1336000" in out  # 334 rows * 1000 * 4 bytes
