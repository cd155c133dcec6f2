"""Lesson 07's bad inputs and failure paths, which the generic lesson and exercise tests don't
reach: forking where it cannot work, CUDA initialised before a fork, a child that dies, and a
child whose port is taken."""
import datetime
import importlib
import multiprocessing
import os
import socket

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, free_port, run_ranks, text

LESSON = ROOT / "lessons" / "07_processes.py"
processes = importlib.import_module("lessons.07_processes")


@pytest.fixture
def one_rank_world():
    """This test process as rank 0 of a world of 1, like a lesson rank that starts children."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_children_fork_is_refused_on_every_rank_with_the_fix():
    result = run_ranks(LESSON, 2, ["--children", "fork"], timeout=120)
    out = text(result)
    assert result.returncode != 0 and "Traceback" not in out, out
    for rank in range(2):
        assert (f"[rank {rank}] error: --children fork: this rank has joined a process group, "
                "and a forked child inherits its bookkeeping") in out, out
    assert "Start children with spawn (--children spawn, the default)" in out
    assert "started by" not in out  # refused before any child was started


def test_cuda_initialised_before_fork_names_the_error_and_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    why = processes.why_not_fork()
    assert why.startswith("CUDA is initialised in this rank, and a forked child cannot use it: "
                          "'Cannot re-initialize CUDA in forked subprocess'")
    assert "or fork them before init_process_group and before the first CUDA call" in why
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert processes.why_not_fork() is None  # nothing initialised: forking is fine


def test_a_child_that_dies_without_reporting_is_named_at_once(one_rank_world):
    fork = multiprocessing.get_context("fork")
    reports = fork.Queue()
    child = fork.Process(target=os._exit, args=(3,))  # dies before it says anything
    child.start()
    try:
        with pytest.raises(RuntimeError, match=rf"child process\(es\) \[{child.pid}\] did not report"):
            processes.collect(reports, [child], 1)
    finally:
        child.join()
    assert child.exitcode == 3


def test_a_child_whose_port_is_taken_reports_it_and_is_joined(one_rank_world):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=r"rank 0: child 0: DistNetworkError: .*EADDRINUSE"):
            processes.start_children("spawn", port, 1, {0: 1.0})
    assert not multiprocessing.active_children()  # start_children joined it
