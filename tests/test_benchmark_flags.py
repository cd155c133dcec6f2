"""The benchmarks' own checks: a bad flag is one line and exit code 2, before anything runs (not a
traceback from deep in a rank, nor a flag silently ignored); the live-engine benchmark runs end
to end on CPU. (Lesson 03's Ring-vs-Tree script: tests/test_03_collectives.py.)"""

import re
import sys

import pytest

from conftest import ROOT, run_command, run_ranks, text

BENCHMARKS = ROOT / "benchmarks"

BAD_FLAGS = [
    ("startup.py", ["--repeats", "0"], "--repeats"),
    ("launch.py", ["--repeats", "-1"], "--repeats"),
    ("reshard.py", ["--repeats", "0"], "--repeats"),
    ("experts.py", ["--repeats", "-2"], "--repeats"),
    ("weight_update.py", ["--repeats", "0"], "--repeats"),
    ("colocate.py", ["--repeats", "0"], "--repeats"),
    ("trace_overhead.py", ["--repeats", "0"], "--repeats"),
    ("reshard.py", ["--trainer", "1,1"], "--trainer"),
    ("experts.py", ["--trainer", "1,1"], "--trainer"),
    ("live_engine.py", ["--dtype", "float33"], "--dtype"),
    ("weight_update.py", ["--models", "llama-3.2-1B"], "--models"),
    ("trace_overhead.py", ["--lesons", "03"], "--lesons"),  # a typo, once silently ignored
]


@pytest.mark.parametrize(
    "script, args, flag", BAD_FLAGS, ids=[f"{s}-{' '.join(a)}" for s, a, _ in BAD_FLAGS]
)
def test_a_bad_flag_is_one_line_and_exit_code_2(script, args, flag):
    # Plain python: the flags are parsed before any rank starts (under torchrun each rank parses
    # them the same way, and each leaves with the same line).
    result = run_command([sys.executable, str(BENCHMARKS / script), *args], timeout=60)
    out = text(result)
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    error = [line for line in out.splitlines() if f"{script}: error: " in line]
    assert len(error) == 1 and flag in error[0], out


def test_live_engine_benchmark_on_cpu(tmp_path):
    """The smallest run: the tiny model, one update per policy x waiting style, short gaps."""
    args = ["--preset", "tiny", "--updates", "1", "--gap-s", "0.2", "--every-ms", "50"]
    args += ["--max-new", "2", "--timeout", "20", "--out", tmp_path]  # a stuck update fails fast
    result = run_ranks(BENCHMARKS / "live_engine.py", 3, args, timeout=90)
    out = text(result)
    assert result.returncode == 0, out
    for policy in ("drain", "abort", "keep"):
        for waiting in ("polling", "event"):
            row = re.search(rf"\| {policy} \| {waiting} \| (.*) \|$", out, re.MULTILINE)
            assert row, f"no table row for {policy}, {waiting}:\n{out}"
            replies = int(row[1].split(" | ")[-3])  # then retried, mixed
            assert replies >= 1, row[0]
    assert "Checked: no reply mixes versions under drain and abort" in out, out
    assert (tmp_path / "12_live_engine_gloo.md").stat().st_size > 0
