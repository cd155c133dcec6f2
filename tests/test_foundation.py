"""The foundation every lesson stands on: the helper module, the launcher and bad input.
Each bad input must give a clear message on every rank, a non-zero exit, no hang (every run is
bounded by the launcher's timeout) and no process left behind."""

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch

from course import launcher, ranks

from conftest import PROGRAMS, ROOT, free_port, line_of, run_python, run_ranks, text

HELLO = ROOT / "lessons" / "00_hello.py"


def test_print_rank_writes_each_message_in_one_call(monkeypatch):
    writes = []
    fake = io.StringIO()
    fake.write = lambda s: writes.append(s) or len(s)
    monkeypatch.setattr(sys, "stdout", fake)
    monkeypatch.setenv("RANK", "3")
    ranks.print_rank("two", "lines\nhere")
    assert writes == ["[rank 3] two lines\n[rank 3] here\n"]
    ranks.print0("only rank 0 prints this")
    assert len(writes) == 1


@pytest.mark.parametrize(
    "gpus, local_ranks, expected",
    [
        (0, 4, ("gloo", "no GPU: using gloo on CPU")),
        (2, 4, ("gloo", "4 local ranks but 2 GPUs: using gloo on CPU")),
        (2, 2, ("nccl", None)),
    ],
)
def test_backend_follows_the_hardware(monkeypatch, capsys, gpus, local_ranks, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("RANK", "0")
    backend, device = ranks._choose_backend("auto", 1, local_ranks)
    out = capsys.readouterr().out
    assert backend == expected[0]
    assert device == (torch.device("cuda", 1) if backend == "nccl" else torch.device("cpu"))
    assert out == (f"[rank 0] {expected[1]}\n" if expected[1] else "")


def test_forcing_nccl_without_gpus_is_a_clear_error_on_every_rank():
    result = run_ranks(HELLO, 2, env={"COURSE_BACKEND": "nccl"}, timeout=60)
    out = text(result)
    assert result.returncode != 0
    for rank in range(2):
        assert (
            f"[rank {rank}] error: --backend nccl needs one GPU per local rank: 2 local ranks but"
            in out
        )
    assert "Duplicate GPU" not in out and "Traceback" not in out


def test_a_world_size_the_lesson_cannot_use_fails_on_every_rank():
    result = run_ranks(PROGRAMS / "needs_even.py", 3, timeout=60)
    out = text(result)
    assert result.returncode != 0 and "Traceback" not in out
    for rank in range(3):
        assert (
            f"[rank {rank}] error: {PROGRAMS / 'needs_even.py'} needs an even number of ranks, "
            "at least 2, but was started with --nproc-per-node 3. Try: torchrun "
            "--nproc-per-node 4"
        ) in out


def test_plain_python_refuses_a_bad_world_size_before_starting_ranks():
    result = run_python(PROGRAMS / "needs_even.py", ["--nproc", 3], timeout=60)
    assert result.returncode == 2
    assert "needs an even number of ranks, at least 2, but was started with --nproc 3" in text(
        result
    )
    assert "torchrun" not in " ".join(result.lines[1:])  # nothing was launched


def test_plain_python_starts_four_ranks_by_default():
    result = run_python(HELLO, timeout=120)
    assert result.returncode == 0, text(result)
    assert sorted(line.split()[4] for line in result.lines if "torchrun set" in line) == [
        f"RANK={r}" for r in range(4)
    ]


def test_a_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_ranks(HELLO, 2, ["--init-method", f"tcp://127.0.0.1:{port}"], timeout=60)
    assert result.returncode != 0
    assert f"tcp://127.0.0.1:{port}: that port is already in use on this machine" in text(result)


def cmdline(process):
    with contextlib.suppress(psutil.Error):
        return process.cmdline()
    return []  # it has ended since it was listed


def new_tag():
    """A variable to put in one run's environment, so that a test can find its processes."""
    return f"COURSE_TEST_{os.getpid()}_{time.monotonic_ns()}"


def in_background(run):
    """run() in a thread of its own: the thread, and a list that will hold what run() returns."""
    results = []
    thread = threading.Thread(target=lambda: results.append(run()))
    thread.start()
    return thread, results


def hang_with_pids(tmp_path, via, timeout, nproc=4):
    """hang.py in the background, each rank's pid a file in tmp_path: (thread, results, pids())."""
    env = {"COURSE_BACKEND": "gloo", "PIDS": str(tmp_path)}
    runner, results = in_background(
        lambda: launcher.launch(PROGRAMS / "hang.py", nproc, timeout=timeout, env=env, via=via)
    )
    while runner.is_alive() and len(list(tmp_path.iterdir())) < nproc:
        time.sleep(0.05)
    return runner, results, [int(p.name) for p in tmp_path.iterdir()]


def test_the_launcher_asks_about_gpus_without_poisoning_its_forks(monkeypatch, tmp_path):
    """torch's LaunchConfig asks torch.cuda.is_available(). Answered by the CUDA runtime, that
    poisons every later fork of the asking process: on a GPU machine, each rank of plain
    `python lesson.py` failed at its first CUDA call. The launcher makes torch ask NVML."""
    seen = []  # PYTORCH_NVML_BASED_CUDA_CHECK at each is_available() call

    def is_available():
        seen.append(os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"))
        return False

    class NotStarted:  # the agent's thread, never started: only the config is wanted
        def __init__(self, config, args):
            self.config = config

        def start(self):
            pass

    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(launcher, "_Agent", NotStarted)
    launcher.start_agent(HELLO, 2, [], {}, str(tmp_path), "fork", stream=False)
    assert seen == ["1"], seen


@pytest.mark.parametrize("via", ["forkserver", "torchrun"])
def test_a_rank_that_dies_stops_the_others(tmp_path, via):
    """Kill one rank of a hanging run: the launcher (or torchrun) must stop the rest at once,
    long before the run's 60 s bound, and name the rank that died."""
    runner, results, pids = hang_with_pids(tmp_path, via, timeout=60)
    psutil.Process(pids[-1]).kill()
    runner.join()
    result = results[0]
    assert result.returncode not in (0, -1), text(result)  # failed, and was not stuck
    who = "launcher" if via == "forkserver" else "torchrun"
    assert f"{who}: rank" in text(result) and "failed first (exit code -9)" in text(result)
    assert result.seconds < 30, text(result)
    assert result.leftovers == 0 and not launcher.still_running(pids)


def test_a_run_that_hangs_is_stopped_and_says_where_each_rank_was(capsys):
    with pytest.raises(launcher.LessonFailed, match="ran too long and was stopped"):
        launcher.run_lesson(PROGRAMS / "hang.py", 4, timeout=10)
    out = capsys.readouterr().out
    assert "stopped after 10 s; where each rank was:" in out
    sleep, all_reduce = (line_of(PROGRAMS / "hang.py", code) for code in ("time.sleep", "dist.all"))
    assert f"[rank 2] at tests/programs/hang.py:{sleep}: time.sleep(600)" in out
    for rank in (0, 1, 3):
        assert (
            f"[rank {rank}] in all_reduce() called at tests/programs/hang.py:{all_reduce}: "
            "dist.all_reduce(torch.ones(3))"
        ) in out


def test_a_stopped_run_leaves_no_rank_and_the_next_launch_works(tmp_path):
    runner, results, pids = hang_with_pids(tmp_path, "forkserver", timeout=10)
    runner.join()
    assert results[0].timed_out and results[0].leftovers == 0 and not launcher.still_running(pids)
    again = run_ranks(HELLO, 2)
    assert again.returncode == 0, text(again)


def test_a_forkserver_killed_from_outside_ends_the_run_and_the_next_launch_works(tmp_path):
    """The ranks are forked from a forkserver this process keeps: killing it mid-run must end
    the run (its ranks report as lost) with nothing left, and the next launch starts a new one."""
    runner, results, pids = hang_with_pids(tmp_path, "forkserver", timeout=60)
    forkserver = psutil.Process(pids[0]).parent()
    assert forkserver.pid != os.getpid() and all(
        p.ppid() == forkserver.pid for p in map(psutil.Process, pids)
    )
    forkserver.kill()
    runner.join()
    result = results[0]
    assert result.returncode == 1 and result.seconds < 30, text(result)
    lost = "launcher: the forkserver the ranks were forked from is gone (killed from outside?)"
    assert lost in text(result), text(result)
    assert result.leftovers == 0 and not launcher.still_running(pids)
    again = run_ranks(HELLO, 2)
    assert again.returncode == 0, text(again)


def test_ranks_orphaned_by_a_dead_torchrun_are_still_stopped(tmp_path):
    """SIGKILL on torchrun leaves its ranks running (each in a session of its own), outside its
    process tree: the launcher still finds them when the run times out, and stops them."""
    program = tmp_path / "sleeps.py"
    program.write_text(
        "import os, pathlib, time\n"
        "from course.ranks import parser, setup\n"
        "with setup(parser('').parse_args()) as ctx:\n"
        "    pathlib.Path(os.environ['READY'], str(ctx.rank)).touch()\n"
        "    time.sleep(600)\n"
    )
    tag = new_tag()
    env = {"COURSE_BACKEND": "gloo", "READY": str(tmp_path), tag: "1"}
    runner, results = in_background(
        lambda: launcher.launch(program, 2, timeout=20, env=env, via="torchrun")
    )
    while runner.is_alive() and not ((tmp_path / "0").exists() and (tmp_path / "1").exists()):
        time.sleep(0.05)  # until both ranks have joined: then only they hold the run's pipe
    for process in launcher.processes_with(tag, "1"):
        if "torch.distributed.run" in cmdline(process):
            process.kill()
    runner.join()
    result = results[0]
    assert result.timed_out and result.stuck == ["stopped after 20 s; where each rank was:"] + [
        f"[rank {rank}] at {program}:5: time.sleep(600)" for rank in (0, 1)
    ]
    assert not launcher.processes_with(tag, "1")


def test_a_process_a_rank_leaves_behind_is_reported_and_killed():
    """A child a rank starts in a session of its own and never ends outlives the run: counted
    as a leftover, and killed."""
    tag = new_tag()
    result = launcher.launch(
        PROGRAMS / "leaves_a_child.py", 2, timeout=60, env={"COURSE_BACKEND": "gloo", tag: "1"}
    )
    assert result.returncode == 0, text(result)
    assert "[rank 1] started a child that sleeps for 10 minutes" in result.lines
    assert result.leftovers == 1 and not launcher.processes_with(tag, "1")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_on_plain_python_stops_every_rank_and_says_where(tmp_path, signum):
    """`python hang.py` starts its ranks itself: Ctrl-C (or SIGTERM) stops them all at once,
    each rank's stack shown."""
    env = {**os.environ, "COURSE_BACKEND": "gloo", "PIDS": str(tmp_path)}
    cmd = [sys.executable, str(PROGRAMS / "hang.py"), "--nproc", "4"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.iterdir())) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [int(p.name) for p in tmp_path.iterdir()]
        time.sleep(1)  # the three ranks into their all_reduce, most likely
        proc.send_signal(signum)
        out = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
    assert proc.returncode == 1, out
    assert "stopped; where each rank was:" in out and "[rank 2] at " in out, out
    line = line_of(PROGRAMS / "hang.py", "dist.all")
    for rank in (0, 1, 3):  # in it, or (on a loaded machine) on its line, not yet in it
        assert re.search(
            rf"\[rank {rank}\] (in all_reduce\(\) called )?at tests/programs/hang.py:{line}: ", out
        ), out
    assert len(pids) == 4 and not launcher.still_running(pids)


def test_run_lesson_prints_in_rank_order_and_returns_none(capsys):
    assert launcher.run_lesson("00", 2, env={"COURSE_BACKEND": "gloo"}) is None
    lines = capsys.readouterr().out.splitlines()
    ranks = [int(m[1]) for line in lines if (m := launcher.RANK_LINE.match(line))]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1}


def test_helpers_import_from_any_working_directory():
    code = "import course.ranks, course.launcher, course.check; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert out.stdout == "ok\n", out.stderr


def test_two_nodes_on_one_machine():
    """Two torchrun "nodes" meet through c10d rendezvous on a free port: 4 ranks in all."""
    port = free_port()

    def node(rank):
        return launcher.run_command(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "2",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                str(HELLO),
            ],
            timeout=120,
            env={"COURSE_BACKEND": "gloo"},
        )

    with ThreadPoolExecutor(2) as pool:
        nodes = list(pool.map(node, [0, 1]))
    seen = []
    for result in nodes:
        assert result.returncode == 0, text(result)
        mine = [
            dict(kv.split("=") for kv in line.split("torchrun set ")[1].split())
            for line in result.lines
            if "torchrun set" in line
        ]
        assert sorted(int(v["LOCAL_RANK"]) for v in mine) == [0, 1]
        assert len({v["GROUP_RANK"] for v in mine}) == 1 and mine[0]["WORLD_SIZE"] == "4"
        seen += [int(v["RANK"]) for v in mine]
    assert sorted(seen) == [0, 1, 2, 3]


def test_a_rank_that_leaves_by_os_exit_0_does_not_hang_the_run(tmp_path):
    """torch's agent counts a function's rank as done when it returns: os._exit(0) never does."""
    program = tmp_path / "leaves.py"
    program.write_text(
        "import os\n"
        "from course.ranks import parser, print_rank, setup\n"
        "with setup(parser('').parse_args()) as ctx:\n"
        "    if ctx.rank == 1:\n"
        "        os._exit(0)\n"
        "print_rank('done')\n"
    )
    result = run_ranks(program, 2, timeout=60)
    assert result.returncode == 0 and not result.timed_out, text(result)
    assert "[rank 0] done" in result.lines and result.seconds < 30


def test_nproc_under_plain_python_is_a_number_of_ranks():
    for bad in ("0", "-2", "two"):
        result = run_python(HELLO, ["--nproc", bad], timeout=60)
        out = text(result)
        assert result.returncode == 2 and "Traceback" not in out, out
        assert f"error: --nproc {bad}: give a number of ranks, 1 or more" in out, out


def test_a_run_stopped_while_its_ranks_start_stops_every_one(monkeypatch, tmp_path):
    """Stopped at once (an interrupt as the cell starts): ranks that register after the stop
    began get SIGTERM too, and the agent ends without the last resort, SIGKILL (kill_all)."""
    killed = []
    monkeypatch.setattr(launcher, "kill_all", lambda run: killed.append(run) or 0)
    env = {"COURSE_BACKEND": "gloo", "PIDS": str(tmp_path)}
    thread = launcher.start_agent(
        PROGRAMS / "hang.py", 4, [], env, str(tmp_path), "forkserver", False
    )
    launcher.stop(thread, str(tmp_path))
    assert thread.finished.is_set() and not killed, "stop() had to SIGKILL ranks it never signalled"
    monkeypatch.undo()
    assert launcher.kill_all(str(tmp_path)) == 0


@pytest.mark.parametrize(
    "args, env, said",
    [
        (["--timeout", "0"], {}, "--timeout 0: give a number of seconds above 0"),
        (["--timeout", "-5"], {}, "--timeout -5: give a number of seconds above 0"),
        ([], {"COURSE_TIMEOUT": "abc"}, "COURSE_TIMEOUT=abc: give a number of seconds above 0"),
        ([], {"COURSE_BACKEND": "cuda"}, "COURSE_BACKEND=cuda: use one of auto, gloo, nccl"),
        ([], {"COURSE_DEBUG": "yes"}, "COURSE_DEBUG=yes: set it to 1 (on) or 0 (off)"),
    ],
)
def test_a_bad_flag_or_variable_is_one_clear_line_on_every_rank(args, env, said):
    result = run_ranks(HELLO, 2, args, timeout=60, env={"COURSE_BACKEND": "gloo", **env})
    out = text(result)
    assert result.returncode != 0 and not result.timed_out and "Traceback" not in out, out
    for rank in range(2):
        assert f"[rank {rank}] error: {said}" in out, out


@pytest.mark.parametrize("via", ["forkserver", "torchrun"])
def test_a_process_a_rank_forks_is_not_shown_as_the_rank(via):
    """A forked helper's stack goes to a file of its own: the rank is shown where it is
    (waitpid), its child as its child (torchrun stops whole process groups: both write)."""
    program = PROGRAMS / "forks_a_helper.py"
    result = launcher.launch(program, 2, timeout=15, env={"COURSE_BACKEND": "gloo"}, via=via)
    wait, sleep = (line_of(program, code) for code in ("os.waitpid", "time.sleep(600)"))
    where = "\n".join(result.stuck)
    assert result.timed_out, text(result)
    assert f"[rank 1] at tests/programs/forks_a_helper.py:{wait}: " in where, where
    children = [line for line in result.stuck if f"forks_a_helper.py:{sleep}:" in line]
    assert len(children) == 1 and children[0].startswith("[rank 1] (its child, pid "), where
    assert result.leftovers == 0, where  # the launcher stopped the child with its rank
