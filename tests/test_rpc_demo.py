"""rpc_demo: distillation over RPC, students and teachers in worlds of their own. Its students'
weights against a single process, its benchmark (both paths, the same losses), and its bad
inputs: a teacher that never joins, dies or hangs; a port in use; CUDA initialised before fork;
torchrun. Every run goes through course.launcher (bounded; no process may outlive it)."""

import multiprocessing
import re
import socket
import sys
import textwrap

import pytest
import torch

from course import launcher
from distill_demo.comms import Layout
from distill_demo.reference import check_against_reference
from distill_demo.report import CheckFailed
from distill_demo.train import Config
from rpc_demo.__main__ import main, parse_args, validate
from rpc_demo.worlds import Failed, Worker, gpu_index, role_world

from conftest import ROOT, reference_student, run_ranks, text

ENV = {"PYTHONPATH": str(ROOT), "COURSE_BACKEND": "gloo"}
SMALL = ["--steps", 4, "--teacher-steps", 3]  # a few steps: enough to tell a wrong answer


def demo(args, timeout=180):
    """`python -m rpc_demo args`, bounded; no process of the run may be left behind."""
    result = launcher.run_command(
        [sys.executable, "-m", "rpc_demo", *map(str, args)], timeout, ENV, cwd=ROOT
    )
    assert result.leftovers == 0, f"{result.leftovers} processes outlived the run"
    return result


def assert_same_weights(yours, expected, lr=1e-2, steps=4):
    """As in test_distill_demo: nearly every weight agrees to rounding (AdamW can flip a weight
    whose gradient cancels to ~0), none further apart than AdamW moves one in `steps` steps."""
    yours, expected = (torch.cat([t.reshape(-1) for t in d.values()]) for d in (yours, expected))
    apart = ~torch.isclose(yours, expected, rtol=1e-4, atol=1e-5)
    assert apart.float().mean() <= 1e-2, f"{int(apart.sum())} of {apart.numel()} weights differ"
    assert (yours - expected).abs().max() <= 2 * lr * steps


@pytest.mark.parametrize(
    "students, teachers, transfer",
    [
        (2, 2, ["--transfer", "full"]),
        (3, 1, ["--transfer", "topk", "--topk", 256]),  # k = vocab: the full distribution
        (1, 3, ["--transfer", "hidden"]),  # 3 teachers split one student's batch
    ],
    ids=["2-students-2-teachers-full", "3-students-1-teacher-topk-all", "1-student-3-hidden"],
)
def test_students_match_one_process(tmp_path, students, teachers, transfer):
    saved = tmp_path / "student.pt"
    result = demo(
        [
            "--students",
            students,
            "--teachers",
            teachers,
            *transfer,
            *SMALL,
            "--out",
            tmp_path,
            "--save",
            saved,
        ]
    )
    out = text(result)
    assert result.returncode == 0 and "Traceback" not in out, out
    assert (
        f"[rank 0] worlds: students' (ranks {', '.join(map(str, range(students)))}) and teachers'"
    ) in out
    assert (
        f"[rank 0] checked: every student holds the same weights (spread 0 over the "
        f"students' world of {students})"
    ) in out
    assert (
        "[rank 0] checked: each teacher answered 4 requests from each of its students and "
        "stopped when they said so"
    ) in out
    assert "[rank 0] checked: losses and weights match one process" in out
    assert_same_weights(torch.load(saved), reference_student(students).state_dict())
    for name in ("08_demo_loss.png", "08_demo_timeline.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_the_reference_tells_a_wrong_answer_apart():
    """The run's own check fails for a student that learned from one student's data of two."""
    cfg = tiny_on_cpu()
    right, wrong = reference_student(2), reference_student(1)
    check_against_reference(cfg, [1.0] * 4, right, [1.0] * 4, right)  # passes: the same
    with pytest.raises(CheckFailed, match="weights differ from one process's"):
        check_against_reference(cfg, [1.0] * 4, wrong, [1.0] * 4, right)
    with pytest.raises(CheckFailed, match=r"mean loss at step 1 is 1, one process's 1\.1"):
        check_against_reference(cfg, [1.0] * 4, right, [1.1] * 4, right)


def test_bench_prints_both_paths_and_their_losses_match(tmp_path):
    result = demo(
        [
            "--students",
            1,
            "--teachers",
            1,
            "--bench",
            "--warmup",
            1,
            "--repeats",
            3,
            "--rounds",
            2,
            "--out",
            tmp_path,
        ]
    )
    out = text(result)
    assert result.returncode == 0 and "Traceback" not in out, out
    rounds = re.findall(r"\[rank 0\] +(\d) +([\d.]+) +([\d.]+) +([\d.]+)x +([\d.]+) +([\d.]+)", out)
    assert [r[0] for r in rounds] == ["1", "2"], out
    paths = dict(re.findall(r"\[rank 0\] (p2p|RPC) +([\d.]+) +[\d,]+ +[\d.]+x", out))
    assert set(paths) == {"p2p", "RPC"} and all(float(ms) > 0 for ms in paths.values()), out
    assert re.search(r"\[rank 0\] RPC / p2p step time: [\d.]+x; goal <= 1.2x: (met|NOT met)", out)
    assert (
        "[rank 0] checked: p2p and RPC give the same mean loss at each of the 7 steps, in "
        "every round"
    ) in out
    drift = re.search(
        r"\[rank 0\] losses, largest relative difference from round 1's p2p: p2p "
        r"in later rounds ([\d.e+-]+), RPC ([\d.e+-]+)",
        out,
    )
    assert drift and max(map(float, drift.groups())) <= 1e-3, out  # float32 on CPU
    assert "[rank 0] RPC: from rpc_async to the answer's arrival" in out
    for name in ("08_demo_bench.png", "08_demo_bench_timeline.png"):
        assert (tmp_path / name).stat().st_size > 10_000


# --- a teacher that misbehaves: the students fail within --rpc-timeout, naming it ----------


def test_a_teacher_that_dies_is_named_by_its_student_at_once(tmp_path):
    result = demo(
        [
            "--fault",
            "dies",
            "--steps",
            30,
            "--teacher-steps",
            0,
            "--rpc-timeout",
            20,
            "--out",
            tmp_path,
        ],
        timeout=120,
    )
    out = text(result)
    assert result.returncode == 1, out  # 1: the launcher reported; -1: the test stopped it
    # student1 asks teacher1, which dies at its 3rd request: the connection breaks at once
    assert (
        "[rank 1] error: student1: teacher1 (rank 3) did not answer step 3: its connection "
        "broke: the process died or is unreachable"
    ) in out, out
    assert "[rank 0] error: student0: at step 3, a rank left the all_reduce" in out  # its peer
    assert "teacher1 (rank 3) was killed by SIGKILL, in RPC" in out
    assert "RPC ran for more than set timeout" not in out  # not waited for: 20 s
    assert "checked:" not in out


def test_a_teacher_that_hangs_fails_its_student_within_the_rpc_timeout(tmp_path):
    result = demo(
        [
            "--fault",
            "hangs",
            "--steps",
            30,
            "--teacher-steps",
            0,
            "--rpc-timeout",
            4,
            "--out",
            tmp_path,
        ],
        timeout=120,
    )
    out = text(result)
    assert result.returncode == 1, out  # 1: the launcher reported; -1: the test stopped it
    assert (
        "[rank 1] error: student1: teacher1 (rank 3) did not answer step 3: no answer within "
        "--rpc-timeout 4 s (RPCErr:1:RPC ran for more than set timeout (4000 ms)"
    ) in out, out
    assert "[launcher] failed: " in out and "stopped teacher1 (rank 3), in RPC" in out


def test_a_teacher_that_never_joins_is_named_within_the_rpc_timeout(tmp_path):
    result = demo(
        ["--fault", "absent", "--teacher-steps", 0, "--rpc-timeout", 6, "--out", tmp_path],
        timeout=120,
    )
    out = text(result)
    assert result.returncode == 1, out  # 1: the launcher reported; -1: the test stopped it
    named = [  # (on a busy machine a slow peer may be named too: ".*")
        rank
        for rank in (0, 1)
        if re.search(
            rf"\[rank {rank}\] error: student{rank}: (.*, )?teacher1 \(rank 3, its model "
            r"ready\) never joined the RPC world within 6 s \(--rpc-timeout\)"
            ": is it running",
            out,
        )
    ]
    assert named, out
    for rank in {0, 1} - set(named):  # the other gave up first and exited: named at once
        other = 1 - rank
        assert (
            f"[rank {rank}] error: student{rank}: student{other} (rank {other}) ended without "
            "joining the RPC world (the launcher saw its process exit)"
        ) in out, out
    assert "stopped teacher1 (rank 3), its model ready" in out


def test_a_teacher_still_pretraining_is_waited_for_not_called_absent(tmp_path):
    """Startup is not liveness: a teacher that pretrains for longer than --rpc-timeout (as the
    large config's teacher did on a GPU) is waited for, and the run succeeds. 600 tiny steps
    take about 5 s on a 2-core machine: well past the 1 s, also on a faster one."""
    result = demo(
        [
            "--students",
            1,
            "--teachers",
            1,
            "--teacher-steps",
            600,
            "--steps",
            4,
            "--rpc-timeout",
            1,
            "--out",
            tmp_path,
        ],
        timeout=180,
    )
    out = text(result)
    assert result.returncode == 0, out
    assert (
        "[rank 0] student0: teacher0 (rank 1) still preparing after 1 s (--rpc-timeout); "
        "waiting, as that is not a fault"
    ) in out, out
    assert "[rank 1] teacher pretrained for 600 steps" in out and "checked: losses" in out


def preparing_teacher(tmp_path, then):
    """`python -m rpc_demo`, except that teacher0's pretraining first runs `then` (sleeps, as
    if it loaded a big checkpoint, or dies). Forked children inherit the change."""
    wrapper = tmp_path / "preparing_teacher.py"
    wrapper.write_text(
        textwrap.dedent(f"""
        import os, signal, sys, time
        import distill_demo.train
        from rpc_demo.__main__ import main
        real = distill_demo.train.pretrain

        def pretrain(*args, **kwargs):
            {then}
            return real(*args, **kwargs)

        distill_demo.train.pretrain = pretrain
        main(sys.argv[1:])
    """)
    )
    return wrapper


def run_wrapper(wrapper, args, timeout=120):
    result = launcher.run_command(
        [sys.executable, str(wrapper), *map(str, args)], timeout, ENV, cwd=ROOT
    )
    assert result.leftovers == 0, f"{result.leftovers} processes outlived the run"
    return result


def test_the_other_teachers_wait_for_teacher0_without_the_timeout(tmp_path):
    """teacher1 takes teacher0's weights in the teachers' world: it waits for them on that
    world's store, not in the broadcast, where --timeout (3 s) would end it while teacher0 is
    still preparing (6 s)."""
    result = run_wrapper(
        preparing_teacher(tmp_path, "time.sleep(6)"),
        [
            *["--students", 1, "--teachers", 2, "--steps", 3, "--teacher-steps", 3],
            *["--timeout", 3, "--rpc-timeout", 1, "--out", tmp_path],
        ],
    )
    out = text(result)
    assert result.returncode == 0 and "Traceback" not in out, out
    assert re.search(
        r"\[rank 2\] teacher0 \(rank 1\) still preparing its model after \d+ s \(--timeout "
        r"3\); waiting, as that is not a fault",
        out,
    ), out
    assert "[rank 0] checked: losses and weights match one process" in out


def test_teachers_still_forming_their_world_are_waited_for_not_called_absent(tmp_path):
    """A teacher late to the teachers' world (a busy machine started it 4 s after the others)
    keeps both teachers there, a stage --timeout bounds: the student waits past --rpc-timeout
    1 s instead of calling them absent (a CI run failed so)."""
    wrapper = tmp_path / "late_teacher.py"
    wrapper.write_text(
        textwrap.dedent("""
        import sys, time
        import torch.distributed as dist
        from rpc_demo.__main__ import main
        real = dist.init_process_group

        def init_process_group(*args, **kwargs):
            if kwargs.get("world_size") == 2 and kwargs.get("rank") == 1:  # teacher1, late
                time.sleep(4)
            return real(*args, **kwargs)

        dist.init_process_group = init_process_group
        main(sys.argv[1:])
    """)
    )
    result = run_wrapper(
        wrapper,
        [
            *["--students", 1, "--teachers", 2, "--steps", 3, "--teacher-steps", 3],
            *["--timeout", 30, "--rpc-timeout", 1, "--out", tmp_path],
        ],
    )
    out = text(result)
    assert result.returncode == 0 and "Traceback" not in out, out
    assert re.search(
        r"\[rank 0\] student0: (teacher0 \(rank 1, joining a process group\), )?teacher1 "
        r"\(rank 2, joining a process group\) still preparing after 1 s \(--rpc-timeout\); "
        "waiting, as that is not a fault",
        out,
    ), out
    assert "[rank 0] checked: losses and weights match one process" in out


def test_a_teacher_that_dies_while_preparing_is_named_at_once(tmp_path):
    """The launcher marks it DEAD in the roll: its student stops waiting for it at once (not
    after --rpc-timeout 30 s plus the launcher's grace), and so does the other teacher, unless
    the launcher stops it first."""
    result = run_wrapper(
        preparing_teacher(tmp_path, "time.sleep(1); os.kill(os.getpid(), signal.SIGKILL)"),
        ["--students", 1, "--teachers", 2, "--teacher-steps", 3, "--out", tmp_path],
    )
    out = text(result)
    assert result.returncode == 1, out  # 1: the launcher reported; -1: the test stopped it
    # teacher1, which waits for teacher0's weights, names it and ends too: student0 may see both
    assert re.search(
        r"\[rank 0\] error: student0: teacher0 \(rank 1\)(, teacher1 \(rank 2\))? ended "
        r"without joining the RPC world \(the launcher saw (its process|them) exit\)",
        out,
    ), out
    # teacher1 names it too, unless the launcher, stopping everyone once student0 failed, got to
    # it first (on a loaded machine, within its 0.1 s between looks)
    assert (
        "[rank 2] error: teacher1: teacher0 (rank 1) died while preparing its model (its process "
        "ended)"
    ) in out or "stopped teacher1 (rank 2), preparing its model" in out, out
    assert "teacher0 (rank 1) was killed by SIGKILL, preparing its model" in out
    assert "still preparing" not in out and result.seconds < 30, out  # not --rpc-timeout's wait


def test_stopping_the_launcher_stops_every_process_and_says_where_they_were(tmp_path):
    """SIGTERM to the launcher (what course.launcher sends at its timeout): no process left,
    and each one's stack says where it was."""
    result = launcher.run_command(
        [
            sys.executable,
            "-m",
            "rpc_demo",
            "--steps",
            "100000",
            "--teacher-steps",
            "0",
            "--out",
            str(tmp_path),
        ],
        25,
        ENV,
        cwd=ROOT,
    )
    out = text(result)
    assert result.leftovers == 0 and result.stuck, out
    assert "[launcher] interrupted: stopping every student and teacher" in out
    assert all(f"[rank {r}]" in "\n".join(result.stuck) for r in range(4)), out


# --- bad input, refused before any process starts ------------------------------------------


def test_a_port_in_use_is_refused_before_anything_starts(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            main(["--rpc-port", str(port)])
    assert exit_.value.code == 2 and multiprocessing.active_children() == []
    assert capsys.readouterr().out == (
        f"[launcher] error: --rpc-port {port}: that port is in use on this machine (Address "
        f"already in use). Pick another, or leave --rpc-port out to get a free one\n"
    )


def tiny_on_cpu():
    """The tests' runs' training settings (SMALL, the other flags' defaults), on this CPU."""
    return Config(
        "tiny",
        vocab=256,
        seq=32,
        batch=8,
        lr=1e-2,
        topk=8,
        teacher_steps=3,
        device=torch.device("cpu"),
    )


def one_process(students, timeout=2):
    """This test process as rank 0 of a world of `students` students (and no teacher)."""
    return Worker(0, Layout(students, 0, students), tiny_on_cpu(), timeout, rpc_timeout=30)


def test_a_port_taken_after_the_launcher_checked_it_is_named():
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            Failed,
            match=rf"the students' world: port {port} is in use: another "
            "program took it after the launcher found it free",
        ):
            with role_world("the students' world", [0], port, one_process(1), [0]):
                pass


def test_a_member_that_never_joins_its_world_is_named_within_the_timeout():
    roll = [0, 0]  # student1 never starts
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        Failed,
        match=r"did not form within --timeout 2 s; missing: student1 "
        r"\(rank 1, not started\)",
    ):
        with role_world("the students' world", [0, 1], port, one_process(2), roll):
            pass
    assert not torch.distributed.is_initialized()


def test_cuda_initialised_before_fork_is_refused_with_the_fix(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and multiprocessing.active_children() == []
    out = capsys.readouterr().out
    assert out.startswith(
        "[launcher] error: --start fork: CUDA is initialised in this process, "
        "and a forked child cannot use it ('Cannot re-initialize CUDA in "
        "forked subprocess')"
    ), out
    assert "Fix: start the processes with spawn (--start spawn" in out


def test_spawn_is_the_fix_and_works(tmp_path):
    result = demo(
        [
            "--start",
            "spawn",
            "--students",
            1,
            "--teachers",
            1,
            "--steps",
            2,
            "--teacher-steps",
            0,
            "--out",
            tmp_path,
        ],
        timeout=240,
    )
    out = text(result)
    assert result.returncode == 0 and "Traceback" not in out, out
    assert "[rank 0] checked: losses and weights match one process" in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--students", 0], "--students 0 --teachers 2: at least 1 of each"),
        (["--topk", 300], "--topk 300 must be between 1 and --vocab 256"),
        (
            ["--students", 1, "--teachers", 3, "--batch", 2],
            "--batch 2: each student splits its batch's rows over its 3 teachers",
        ),
        (["--rounds", 0], "--steps, --repeats and --rounds must be at least 1"),
        (["--fault", "dies", "--bench"], "--fault dies is for training runs: leave out --bench"),
        (["--fault", "hangs", "--steps", 2], "--fault hangs strikes at step 3"),
        (
            ["--rpc-port", 5000, "--student-port", 5000],
            "--student-port and --rpc-port are both 5000: each world needs a port of its own",
        ),
        (["--rpc-timeout", 0], "--timeout and --rpc-timeout must be > 0"),
        # found only after training before (FILE: a file that exists)
        (["--lr", -1], "--lr -1: the students' step size must be a number above 0, e.g. --lr"),
        (["--out", "FILE"], "--out FILE is a file: --out names the folder the figures go to"),
        (["--save", "/nonexistent/dir/s.pt"], "--save /nonexistent/dir/s.pt: there is no folder"),
        (["--bench", "--save", "s.pt"], "--save is for training runs: --bench trains a fresh"),
    ],
)
def test_bad_flags_are_named(capsys, tmp_path, flags, message):
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        main([str(taken) if f == "FILE" else str(f) for f in flags])
    out = capsys.readouterr().out
    assert exit_.value.code == 2 and multiprocessing.active_children() == [], out
    assert "Traceback" not in out, out
    assert out.startswith(f"[launcher] error: {message.replace('FILE', str(taken))}"), out


@pytest.mark.parametrize(
    "gpus, flags, message",
    [
        (
            0,
            [],
            "--backend nccl needs a GPU per student and per teacher at least (with fewer than "
            "4 GPUs they share them): 2 students, 2 teachers, 0 GPUs",
        ),
        (
            1,
            ["--bench"],
            "--backend nccl --bench needs a GPU per process (its p2p half is one NCCL "
            "world of all 4), and there are 1",
        ),
    ],
)
def test_too_few_gpus_for_nccl_is_refused(capsys, monkeypatch, gpus, flags, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(SystemExit) as exit_:
        main(["--backend", "nccl", *flags])
    assert exit_.value.code == 2 and multiprocessing.active_children() == []
    assert capsys.readouterr().out.startswith(f"[launcher] error: {message}")


@pytest.mark.parametrize("gpus, expected", [(4, [0, 1, 2, 3]), (2, [0, 1, 0, 1])])
def test_students_and_teachers_share_gpus_only_when_there_are_too_few(monkeypatch, gpus, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    layout = Layout(4, 2, 2)  # students 0, 1; teachers 2, 3
    assert [gpu_index(layout, rank) for rank in range(4)] == expected


def test_good_flags_pass_validation():
    validate(parse_args([]))  # the defaults
    validate(parse_args(["--students", "1", "--teachers", "3", "--batch", "3"]))


def test_torchrun_is_refused_on_every_rank():
    result = run_ranks("rpc_demo", 2, [], timeout=120, env=ENV)
    out = text(result)
    assert result.returncode != 0 and "Traceback" not in out, out
    for rank in range(2):
        assert (
            f"[rank {rank}] error: rpc_demo starts its own processes (two worlds, and RPC "
            "between them): run python -m rpc_demo"
        ) in out, out
