"""Lesson 06's own cases, beyond what test_lessons runs for every lesson (4 ranks, 2 ranks, plain
python): 8 ranks, an odd world size, a teacher that dies mid-run, and reproducibility."""

import re
import textwrap

from conftest import ROOT, assert_shows, run_python, run_ranks, text

LESSON = ROOT / "lessons" / "06_distill.py"


def table(result):
    """The per-step loss rows rank 0 printed."""
    return [
        line
        for line in result.lines
        if line.startswith("[rank 0] ") and line[9:13].strip().isdigit()
    ]


def test_eight_ranks_four_pairs():
    result = run_ranks(LESSON, 8)
    out = text(result)
    assert result.returncode == 0 and "Traceback" not in out, out
    assert (
        "[rank 0] students: ranks 0, 1, 2, 3; teachers: ranks 4, 5, 6, 7 (pairs 0-4, 1-5, 2-6, 3-7)"
    ) in out
    assert (
        "[rank 0] step   loss rank 0   loss rank 1   loss rank 2   loss rank 3          mean"
    ) in out
    assert_shows(out, LESSON, checked_only=True)
    assert "student group of 4)" in out
    rows = table(result)
    assert [int(row.split()[2]) for row in rows] == list(range(1, 31))
    assert all(len(row.split()) == 2 + 1 + 4 + 1 for row in rows)  # step, 4 losses, mean


def test_an_odd_world_size_is_refused_on_every_rank():
    result = run_ranks(LESSON, 3, timeout=60)
    out = text(result)
    assert result.returncode != 0 and "Traceback" not in out, out
    for rank in range(3):
        assert (
            f"[rank {rank}] error: {LESSON} needs an even number of ranks, at least 2, but "
            "was started with --nproc-per-node 3. Try: torchrun --nproc-per-node 4"
        ) in out
    assert "students:" not in out  # refused before any group was made


def test_plain_python_refuses_an_odd_nproc_before_starting_ranks():
    result = run_python(LESSON, ["--nproc", 3], timeout=60)
    assert result.returncode == 2
    assert "needs an even number of ranks, at least 2, but was started with --nproc 3" in text(
        result
    )


def test_steps_must_be_positive():
    result = run_ranks(LESSON, 2, ["--steps", 0], timeout=60)
    out = text(result)
    assert result.returncode != 0 and "Traceback" not in out
    for rank in range(2):
        assert f"[rank {rank}] error: --steps 0: train for at least 1 step" in out, out


def dying_teacher(tmp_path, rank, at_reply, how):
    """A copy of the lesson in which teacher `rank` dies instead of sending reply `at_reply`.
    Test-only: the lesson itself has no such switch; this wrapper replaces its send_tensor."""
    wrapper = tmp_path / "dying_teacher.py"
    wrapper.write_text(
        textwrap.dedent(f"""
        import importlib.util, os, signal, sys
        spec = importlib.util.spec_from_file_location("lesson06", {str(LESSON)!r})
        lesson = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(lesson)
        real_send, sent = lesson.send_tensor, []

        def send_tensor(tensor, dst, group):
            sent.append(dst)
            if os.environ["RANK"] == "{rank}" and len(sent) == {at_reply}:
                {how}
            return real_send(tensor, dst, group)

        lesson.send_tensor = send_tensor
        lesson.main()
    """)
    )
    return wrapper


def test_a_teacher_that_exits_mid_run_is_named_by_its_student(tmp_path):
    """Teacher rank 3 leaves abruptly with exit code 0, so torchrun does not stop the others:
    student 1 must notice by itself, name its teacher and fail; the run ends on its own."""
    wrapper = dying_teacher(tmp_path, 3, 5, "os._exit(0)")
    result = run_ranks(wrapper, 4, timeout=90, env={"COURSE_TIMEOUT": "30"})
    out = text(result)
    assert not result.timed_out, out  # it ended by itself, well before the launcher's 90 s
    assert result.returncode != 0, out
    # The kernel closes a dead process's sockets: gloo reads "Connection closed by peer", or
    # "Connection reset by peer" if the dead process had unread data.
    assert re.search(
        r"\[rank 1\] error: teacher rank 3 stopped answering at step 5 \([^)]*"
        r"Connection (closed|reset) by peer",
        out,
    ), out
    assert "Timed out" not in out  # noticed at once, not when a collective's timeout ran out


def test_a_teacher_killed_mid_run_stops_the_run(tmp_path):
    """Teacher rank 2 is killed (SIGKILL, as by the OOM killer): the run fails, nothing hangs."""
    wrapper = dying_teacher(tmp_path, 2, 5, "os.kill(os.getpid(), signal.SIGKILL)")
    result = run_ranks(wrapper, 4, timeout=90, env={"COURSE_TIMEOUT": "30"})
    out = text(result)
    assert not result.timed_out and result.returncode != 0, out
    assert "launcher: rank 2 failed first (exit code -9)" in out, out
    assert "checked:" not in out


def test_two_runs_print_the_same_losses():
    first, second = run_ranks(LESSON, 2), run_ranks(LESSON, 2)
    assert first.returncode == second.returncode == 0, text(first) + text(second)
    assert len(table(first)) == 30 and table(first) == table(second)
