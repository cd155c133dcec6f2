"""Lesson 07's bad inputs and failure paths, which the generic lesson and exercise tests don't
reach: forking where it cannot work, CUDA initialised before a fork, a child that dies, and a
child whose port is taken."""

import datetime
import importlib
import multiprocessing
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from conftest import ROOT, free_port, run_ranks, text

LESSON = ROOT / "lessons" / "07_processes.py"
processes = importlib.import_module("lessons.07_processes")


@pytest.fixture
def one_rank_world():
    """This test process as rank 0 of a world of 1, like a lesson rank that starts children."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_children_fork_is_refused_on_every_rank_with_the_fix():
    result = run_ranks(LESSON, 2, ["--children", "fork"], timeout=120)
    out = text(result)
    assert result.returncode != 0 and "Traceback" not in out, out
    for rank in range(2):
        assert (
            f"[rank {rank}] error: --children fork: this rank joined a process group: a forked "
            "child inherits its bookkeeping"
        ) in out, out
    assert "Start children with spawn (--children spawn, the default)" in out
    assert "checked: children" not in out  # refused before any child was started


def test_cuda_initialised_before_fork_names_the_error_and_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    why = processes.why_not_fork()
    assert why.startswith("CUDA is initialised in this rank: a forked child cannot use it. ")
    assert "or fork them before init_process_group and before the first CUDA call" in why
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert processes.why_not_fork() is None  # nothing initialised: forking is fine


def test_a_child_that_dies_without_reporting_is_named_at_once(one_rank_world, monkeypatch):
    """start_processes' join names the child (index and pid) and its exit code, at once."""

    def child_world(i, *args):  # in place of the lesson's: dies before it says anything
        os._exit(3)

    monkeypatch.setattr(processes, "child_world", child_world)
    start = time.monotonic()
    with pytest.raises(
        ProcessExitedException, match="process 0 terminated with exit code 3"
    ) as err:
        processes.start_children("fork", free_port(), 1, {0: 1.0})  # fork: runs the patched one
    assert err.value.error_pid > 0 and time.monotonic() - start < 20
    assert not multiprocessing.active_children()


def test_a_child_whose_port_is_taken_raises_its_error_and_is_joined(one_rank_world):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ProcessRaisedException,
            match=r"(?s)Process 0 terminated with the "
            r"following error:.*DistNetworkError.*EADDRINUSE",
        ):
            processes.start_children("spawn", port, 1, {0: 1.0})
    assert not multiprocessing.active_children()  # start_children joined it
