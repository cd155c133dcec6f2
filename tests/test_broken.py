"""Every program in lessons/broken/ fails the way its docstring says: by itself, within the bound,
with a non-zero exit, a message that names the rank(s) and the wrong call, and no process left
behind. Each runs its first documented command ("Run it"), on gloo."""

import re

import pytest

from lessons.broken import documented_runs

from conftest import ROOT, line_of, run_ranks, text

BROKEN = ROOT / "lessons" / "broken"
PROGRAMS = sorted(BROKEN.glob("[a-z]*.py"))
# A broken run must end by itself within this, start-up included (a bound, not a timing). On an
# idle 2-core machine they end in 3-15 s (--debug's collective timeout is 10 s); under the load
# of a full test run, starting 4 ranks alone has taken 15-20 s.
BOUND_S = 60
NEW_GROUP = line_of(BROKEN / "new_group_members_only.py", "pair = dist.new_group(")
ORDER = line_of(BROKEN / "group_order.py", "groups[tuple(ranks)] = dist.new_group(ranks)")
# A hang fails at COURSE_TIMEOUT; the report of where every rank is comes at COURSE_STUCK_AFTER
# (10 s by default: shorter here, to keep the suite short; the mechanism is the same).
HANG_ENV = {"COURSE_TIMEOUT": "15", "COURSE_STUCK_AFTER": "5"}


def call(rank, code):
    """A torch traceback line that shows `code` as the call rank `rank` failed in."""
    return re.compile(rf"^\[rank{rank}\]: +{re.escape(code)}$", re.M)


# What each program's output must contain: the rank(s) and the call, as plain text or a regex.
EXPECTED = {
    # --debug: whichever rank compares first names the mismatch (the other may just see it go)
    "collective_mismatch": [
        re.compile(
            r"\[rank[01]\]: RuntimeError: Detected mismatch between collectives on ranks\. Rank "
            r"[01] is running collective: CollectiveFingerPrint\(SequenceNumber=0, OpType="
            r"(ALLREDUCE|BROADCAST).*but Rank [01] is running collective: CollectiveFingerPrint"
            r"\(SequenceNumber=0, OpType=(BROADCAST|ALLREDUCE).*Op type: "
            r"(ALLREDUCEvs BROADCAST|BROADCASTvs ALLREDUCE)"
        ),
        call(0, "dist.all_reduce(x)  # the mistake: rank 0 sums..."),
        call(1, "dist.broadcast(x, src=0)  # ...while the others wait for rank 0's broadcast"),
    ],
    "shape_mismatch": [
        re.compile(
            r"\[rank\d\]: RuntimeError: Detected mismatch between collectives on ranks\. "
            r"Rank \d is running collective: .*TensorShape=\[[34]\].* but Rank \d is running "
            r"collective: .*TensorShape=\[[34]\].*Tensor shapes: (4vs 3|3vs 4)"
        ),
        call(1, "dist.all_reduce(grad)"),
    ],
    "skipped_collective": [
        "[rank0]: RuntimeError: [Rank 0]: Ranks 3 failed to pass monitoredBarrier in 10000 ms",
        call(0, "dist.all_reduce(grad)"),
        "[rank 0] why: rank 3 had 2 batches, the others 3: it skipped the all_reduce of step 2",
        "[rank 3] trained on 2 batches; evaluating",
    ],
    "send_send_deadlock": [
        *[f"[rank{r}]: RuntimeError: " for r in (0, 1)],
        *[
            call(r, "dist.send(mine, right)  # the mistake: everybody sends first...")
            for r in (0, 1)
        ],
        re.compile(r"Timed out waiting 10000ms for send operation to complete"),
        *[f"[rank {r}] why: every rank is in send() to its right-hand neighbour" for r in (0, 1)],
    ],
    "recv_wrong_shape": [
        "op.preamble.length <= op.nbytes. 40 vs 32. Received data size doesn't match expected size",
        "launcher: rank 1 failed first (exit code -6)",  # SIGABRT, on the receiving rank
        "[rank1]: Fatal Python error: Aborted, in recv() called at lessons/broken/recv_wrong_shape"
        f".py:{line_of(BROKEN / 'recv_wrong_shape.py', 'dist.recv(batch')}: "
        "dist.recv(batch, src=0)",
    ],
    "missing_wait": [
        "[rank1]: AssertionError: rank 1: received [0.0, 0.0, 0.0, 0.0] from rank 0, which sent "
        "[7.0, 7.0, 7.0, 7.0]",
        "[rank 1] why: rank 0 zeroed its tensor after isend() without waiting on the request",
    ],
    "new_group_members_only": [
        f"[rank{r}]: RuntimeError: the ranks disagree on new_group call 1: [0, 1] on ranks 0, 1 "
        f"(at lessons/broken/new_group_members_only.py:{NEW_GROUP}) but [2, 3] on ranks 2, 3"
        for r in range(4)
    ],
    "group_order": [
        f"[rank{r}]: RuntimeError: the ranks disagree on new_group call 1: [0, 1] on ranks 0, 1 "
        f"(at lessons/broken/group_order.py:{ORDER}) but [2, 3] on ranks 2, 3"
        for r in range(4)
    ],
    # Hangs under default flags: after --stuck-after (5 s here) one rank says where every rank is.
    "recv_wrong_source": [
        re.compile(r"^\[rank \d\] stuck\? rank \d has waited \d+ s in one call", re.M),
        re.compile(r"rank 1: \d+ s in send\(dst=2, tensor \[1\] float32\) at "),
        re.compile(r"rank 2: \d+ s in recv\(src=0, tensor \[1\] float32\) at .*src=rank - 2\)"),
        re.compile(r"rank 3: \d+ s in recv\(src=2, tensor \[1\] float32\) at "),
    ],
    "broadcast_src_differs": [
        re.compile(r"^\[rank \d\] stuck\? rank \d has waited", re.M),
        re.compile(r"rank \d: \d+ s in broadcast\(src=0, tensor \[4\] float32\) at "),
        re.compile(r"rank \d: \d+ s in broadcast\(src=1, tensor \[4\] float32\) at "),
    ],
    "asleep": [
        re.compile(r"^\[rank \d\] stuck\? rank \d has waited", re.M),
        *[
            re.compile(rf"rank {r}: \d+ s in all_reduce\(tensor \[4\] float32\) at ")
            for r in (0, 1)
        ],
        re.compile(r"rank 3: \d+ s at lessons/broken/asleep\.py:\d+: time\.sleep\(0\.1\)"),
    ],
    "dtype_mismatch": [  # --debug: rank 3 named
        re.compile(r"but Rank 3 is running collective: .*TensorDtypes=Double"),
    ],
}


def test_every_broken_program_is_tested_and_documented():
    assert sorted(path.stem for path in PROGRAMS) == sorted(EXPECTED)
    for path in PROGRAMS:
        doc = path.read_text()
        for section in ("What is wrong", "Run it", "What you should see", "The fix"):
            assert f"\n{section}\n" in doc, f"{path.name}: no '{section}' section"
        assert documented_runs(path), f"{path.name}: no torchrun command under 'Run it'"


@pytest.mark.parametrize("path", PROGRAMS, ids=[p.stem for p in PROGRAMS])
def test_broken_program_fails_fast_and_names_the_ranks_and_the_call(path):
    nproc, args = documented_runs(path)[0]
    env = {} if "--debug" in args else HANG_ENV  # --debug: its own 10 s timeout
    result = run_ranks(path, nproc, args, timeout=BOUND_S, env=env)  # and none outlived it
    out = text(result)
    assert result.returncode != 0, out
    assert not result.timed_out, f"did not fail by itself within {BOUND_S} s:\n{out}"
    for expected in EXPECTED[path.stem]:
        found = expected.search(out) if isinstance(expected, re.Pattern) else expected in out
        assert found, f"missing {expected!r} in:\n{out}"


def test_a_true_hang_is_stopped_and_each_rank_says_where():
    """send/send with a 600 s timeout really hangs: the launcher stops it and names the call."""
    path = BROKEN / "send_send_deadlock.py"
    result = run_ranks(path, 2, ["--timeout", 600], timeout=12)
    line = line_of(path, "dist.send(mine, right)")
    assert result.returncode == -1 and result.stuck[0] == "stopped after 12 s; where each rank was:"
    for rank in (0, 1):
        assert (
            f"[rank {rank}] in send() called at lessons/broken/send_send_deadlock.py:{line}: "
            "dist.send(mine, right)  # the mistake: everybody sends first..."
        ) in result.stuck


def test_odd_world_size_for_the_distill_lesson_is_refused_on_every_rank():
    distill = ROOT / "lessons" / "06_distill.py"
    result = run_ranks(distill, 3, timeout=BOUND_S)
    out = text(result)
    assert result.returncode != 0 and not result.timed_out and "Traceback" not in out
    for rank in range(3):
        assert (
            f"[rank {rank}] error: {distill} needs an even number of ranks, at least 2, but "
            "was started with --nproc-per-node 3. Try: torchrun --nproc-per-node 4"
        ) in out


def test_the_agreement_check_passes_when_the_ranks_agree(tmp_path):
    """same_on_every_rank stays quiet when the ranks agree (or the group programs prove nothing)."""
    program = tmp_path / "agree.py"
    program.write_text(
        "from lessons.broken import same_on_every_rank\n"
        "from course.ranks import parser, print_rank, setup\n"
        "with setup(parser('').parse_args()) as ctx:\n"
        "    same_on_every_rank('the groups', [[0, 1], [2, 3]])\n"
        "    print_rank('agreed')\n"
    )
    result = run_ranks(program, 4, timeout=BOUND_S)
    assert result.returncode == 0, text(result)
    assert [line for line in result.lines if "agreed" in line] == [
        f"[rank {r}] agreed" for r in range(4)
    ]


def test_explain_keeps_the_original_error_and_adds_one_line(capsys, monkeypatch):
    from lessons.broken import explain

    monkeypatch.setenv("RANK", "2")
    with pytest.raises(RuntimeError, match="the original message"):
        with explain("one plain sentence"):
            raise RuntimeError("the original message")
    assert capsys.readouterr().out == "[rank 2] why: one plain sentence\n"
    with explain("never printed"):
        pass
    assert capsys.readouterr().out == ""


def test_a_send_send_deadlock_says_where_every_rank_is_before_the_timeout():
    """Under default flags (no --debug) the hang explains itself after --stuck-after seconds."""
    path = BROKEN / "send_send_deadlock.py"
    result = run_ranks(path, 2, [], timeout=BOUND_S, env=HANG_ENV)
    out, line = text(result), line_of(path, "dist.send(mine, right)")
    assert result.returncode != 0 and not result.timed_out, out
    for rank, peer in ((0, 1), (1, 0)):
        assert re.search(
            rf"rank {rank}: \d+ s in send\(dst={peer}, tensor \[4\] float32\) at "
            rf"lessons/broken/send_send_deadlock\.py:{line}: dist\.send\(mine, right\)",
            out,
        ), out


def test_a_gloo_abort_shows_the_ranks_python_line_and_who_may_be_the_cause():
    """Without --debug: the rank gloo aborts is the receiver; the launcher says so."""
    path = BROKEN / "dtype_mismatch.py"
    result = run_ranks(path, 4, [], timeout=BOUND_S, env=HANG_ENV)
    out, line = text(result), line_of(path, "dist.all_reduce(grad)")
    assert result.returncode != 0 and not result.timed_out, out
    assert re.search(
        rf"^\[rank\d\]: Fatal Python error: Aborted, in all_reduce\(\) called at "
        rf"lessons/broken/dtype_mismatch\.py:{line}: dist\.all_reduce\(grad\)$",
        out,
        re.M,
    ), out
    assert "the rank whose tensor differs may be another; --debug compares them and names it" in out


def test_a_rank_that_never_makes_the_new_group_call_is_named(tmp_path):
    program = tmp_path / "late.py"
    program.write_text(
        "import torch.distributed as dist\n"
        "from course.ranks import parser, setup\n"
        "with setup(parser('').parse_args()) as ctx:\n"
        "    if ctx.rank < 2:\n"
        "        dist.new_group([0, 1])\n"
    )
    result = run_ranks(program, 4, ["--timeout", "10"], timeout=BOUND_S)  # all started by then
    out = text(result)
    assert result.returncode != 0 and not result.timed_out, out
    said = f"RuntimeError: new_group call 1 ([0, 1] at {program}:5): rank(s) 2, 3 made no call 1"
    # The first of ranks 0 and 1 to give up ends the run: the launcher may stop the other first.
    assert any(f"[rank{rank}]: {said} within 10 s" in out for rank in (0, 1)), out


def test_torchruns_report_becomes_one_true_line():
    """torchrun's "Root Cause" can be a rank it stopped itself (SIGTERM) when ranks end in the same
    second; the line names the rank that failed, and only the ranks torchrun did stop."""
    from course.launcher import _torchrun_summary

    def entry(rank, code):
        return (
            f"[{rank}]:\n  time      : 2026-12-05_00:00:01\n  rank      : {rank} (local_rank: "
            f"{rank})\n  exitcode  : {code} (pid: 1)\n"
        )

    root = "Root Cause (first observed failure):\n"
    report = f"Failures:\n{entry(1, 1)}{entry(3, -15)}{root}{entry(2, -15)}"
    assert (
        _torchrun_summary(report)
        == "torchrun: rank 1 failed first (exit code 1); torchrun stopped ranks 2, 3"
    )
    report = (
        f"Failures:\n  <NO_OTHER_FAILURES>\nRoot Cause (first observed failure):\n{entry(2, 1)}"
    )
    assert _torchrun_summary(report) == "torchrun: rank 2 failed first (exit code 1)"
