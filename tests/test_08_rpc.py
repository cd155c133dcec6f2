"""Lesson 08's failure paths, which the generic lesson and exercise tests don't reach: a teacher
that hangs, dies or never joins makes its student fail fast, naming it; a port in use is an
error on every rank; and RPC listens on 127.0.0.1 only, by default."""

import contextlib
import importlib
import os
import socket
import sys

from course import launcher

from conftest import ROOT, free_port, run_ranks, text

LESSON = ROOT / "lessons" / "08_rpc.py"
rpc_lesson = importlib.import_module("lessons.08_rpc")


def test_a_teacher_that_hangs_fails_its_student_within_the_rpc_timeout():
    result = run_ranks(LESSON, 2, ["--teacher", "hangs", "--rpc-timeout", "3"], timeout=120)
    out = text(result)
    assert result.returncode != 0, out
    assert (
        "[rank 0] error: student0: its teacher teacher0 (rank 1) did not answer (--rpc-timeout 3 s)"
    ) in out, out
    assert "RPC ran for more than set timeout (3000 ms)" in out


def test_a_teacher_that_dies_fails_its_student_at_once():
    """torchrun stops every rank 0.1 s after one dies; give the student time to say why."""
    result = launcher.run_command(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "--monitor-interval=5",
            str(LESSON),
            "--teacher",
            "dies",
        ],
        timeout=120,
        env={"COURSE_BACKEND": "gloo"},
    )
    out = text(result)
    assert result.leftovers == 0 and result.returncode not in (0, -1), out
    assert "[rank 0] error: student0: its teacher teacher0 (rank 1) did not answer" in out, out
    assert "tensorpipe" in out  # the connection broke: no waiting for the timeout (10 s)
    assert "RPC ran for more than set timeout" not in out


def test_a_teacher_that_never_joins_fails_the_students_at_init():
    result = run_ranks(LESSON, 2, ["--teacher", "absent", "--rpc-timeout", "4"], timeout=120)
    out = text(result)
    assert result.returncode != 0, out
    assert ("[rank 0] error: student0: not all 2 RPC workers joined tcp://127.0.0.1:") in out, out
    assert "within 4 s (--rpc-timeout)" in out


def test_an_rpc_port_in_use_is_an_error_on_every_rank():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_ranks(LESSON, 2, ["--rpc-port", port], timeout=120)
    out = text(result)
    assert result.returncode != 0 and "Traceback" not in out, out
    for rank in range(2):
        assert (
            f"[rank {rank}] error: --rpc-port {port}: that port is in use on this machine" in out
        ), out


def listening(pid):
    """(address, port) of every TCP socket process `pid` listens on (Linux /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # e.g. the fd listdir itself used, closed by now
            if (target := os.readlink(f"/proc/{pid}/fd/{fd}")).startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append(
                    (
                        socket.inet_ntop(
                            socket.AF_INET if width == 8 else socket.AF_INET6,
                            bytes.fromhex(address)[::-1] if width == 8 else bytes.fromhex(address),
                        ),
                        int(port, 16),
                    )
                )
    return found


def test_rpc_listens_on_loopback_only_by_default(monkeypatch):
    for name in ("TP_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.setenv(name, "")  # start_rpc sets them: restored after the test
    port = free_port()
    before = set(listening(os.getpid()))
    rpc_lesson.start_rpc("solo", 0, 1, f"127.0.0.1:{port}", "lo", 20)
    try:
        opened = set(listening(os.getpid())) - before
    finally:
        rpc_lesson.rpc.shutdown(graceful=True, timeout=20)
    assert len(opened) > 1, opened  # the rendezvous store and TensorPipe's listeners
    # The store listens on every interface (documented in the lesson); everything else on lo.
    assert {address for address, p in opened if p != port} == {"127.0.0.1"}, opened
