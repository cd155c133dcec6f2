"""The foundation every lesson stands on: the helper module, the launcher and bad input.
Each bad input must give a clear message on every rank, a non-zero exit, no hang (every run is
bounded by the launcher's timeout) and no process left behind."""
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import PROGRAMS, ROOT, free_port, run_python, run_ranks, text
from course import launcher, ranks

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


@pytest.mark.parametrize("gpus, local_ranks, expected", [
    (0, 4, ("gloo", "no GPU: using gloo on CPU")),
    (2, 4, ("gloo", "4 local ranks but 2 GPUs: using gloo on CPU")),
    (2, 2, ("nccl", None)),
])
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
        assert f"[rank {rank}] error: --backend nccl needs one GPU per local rank: 2 local ranks but" in out
    assert "Duplicate GPU" not in out and "Traceback" not in out


def test_a_world_size_the_lesson_cannot_use_fails_on_every_rank():
    result = run_ranks(PROGRAMS / "needs_even.py", 3, timeout=60)
    out = text(result)
    assert result.returncode != 0 and "Traceback" not in out
    for rank in range(3):
        assert (f"[rank {rank}] error: {PROGRAMS / 'needs_even.py'} needs an even number of ranks, "
                "at least 2, but was started with --nproc-per-node 3. Try: torchrun "
                "--nproc-per-node 4") in out


def test_plain_python_refuses_a_bad_world_size_before_starting_ranks():
    result = run_python(PROGRAMS / "needs_even.py", ["--nproc", 3], timeout=60)
    assert result.returncode == 2
    assert "needs an even number of ranks, at least 2, but was started with --nproc 3" in text(result)
    assert "torchrun" not in " ".join(result.lines[1:])  # nothing was launched


def test_plain_python_starts_four_ranks_by_default():
    result = run_python(HELLO, timeout=120)
    assert result.returncode == 0, text(result)
    assert sorted(l.split()[4] for l in result.lines if "torchrun set" in l) == [
        f"RANK={r}" for r in range(4)]


def test_a_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_ranks(HELLO, 2, ["--init-method", f"tcp://127.0.0.1:{port}"], timeout=60)
    assert result.returncode != 0
    assert f"tcp://127.0.0.1:{port}: that port is already in use on this machine" in text(result)


def test_a_rank_that_dies_stops_the_others():
    """Kill one rank of a running lesson: torchrun must stop the rest (bounded: 60 s)."""
    tag = f"COURSE_TEST_{os.getpid()}_{time.monotonic_ns()}"
    results = []
    runner = threading.Thread(target=lambda: results.append(
        run_ranks(HELLO, 4, timeout=60, env={tag: "1"})))
    runner.start()
    workers = []
    while runner.is_alive() and len(workers) < 4:
        workers = [pid for pid in launcher._pids_with(f"{tag}=1")
                   if b"00_hello.py" in open(f"/proc/{pid}/cmdline", "rb").read()
                   and b"torch.distributed.run" not in open(f"/proc/{pid}/cmdline", "rb").read()]
        time.sleep(0.05)
    os.kill(workers[-1], signal.SIGKILL)
    runner.join()
    assert results[0].returncode not in (0, -1), text(results[0])  # failed, and was not stuck
    assert "torchrun: rank" in text(results[0]) and "(exit code -9)" in text(results[0])


def test_a_run_that_hangs_is_stopped_and_says_where_each_rank_was(capsys):
    with pytest.raises(launcher.LessonFailed, match="ran too long and was stopped"):
        launcher.run_lesson(PROGRAMS / "hang.py", 4, timeout=15)
    out = capsys.readouterr().out
    assert "stopped after 15 s; where each rank was:" in out
    assert "[rank 2] at tests/programs/hang.py:12: time.sleep(600)" in out
    for rank in (0, 1, 3):
        assert (f"[rank {rank}] in all_reduce() called at tests/programs/hang.py:14: "
                "dist.all_reduce(torch.ones(3))") in out
    assert not launcher._pids_with("hang.py")


def test_run_lesson_prints_in_rank_order_and_returns_none(capsys):
    assert launcher.run_lesson("00", 2, env={"COURSE_BACKEND": "gloo"}) is None
    lines = capsys.readouterr().out.splitlines()
    ranks = [int(launcher.RANK_LINE.match(l)[1]) for l in lines if launcher.RANK_LINE.match(l)]
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
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
             str(rank), "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", str(HELLO)], timeout=120, env={"COURSE_BACKEND": "gloo"})

    with ThreadPoolExecutor(2) as pool:
        nodes = list(pool.map(node, [0, 1]))
    seen = []
    for result in nodes:
        assert result.returncode == 0, text(result)
        mine = [dict(kv.split("=") for kv in l.split("torchrun set ")[1].split())
                for l in result.lines if "torchrun set" in l]
        assert sorted(int(v["LOCAL_RANK"]) for v in mine) == [0, 1]
        assert len({v["GROUP_RANK"] for v in mine}) == 1 and mine[0]["WORLD_SIZE"] == "4"
        seen += [int(v["RANK"]) for v in mine]
    assert sorted(seen) == [0, 1, 2, 3]
