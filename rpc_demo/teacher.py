"""A teacher's side of rpc_demo. Its main thread prepares the model in the teachers' world, then
waits; the work is done by its RPC threads, which run `answer` whenever a student calls it.

RPC sends a function by module and name, and the callee imports it: the functions students
call are top-level functions of this module (rpc_demo.teacher), and they reach the model
through the one teacher this process serves (`_serving`, set before RPC starts). No RRef:
PyTorch does not send CUDA tensors through RRef calls, and on GPUs the answers are CUDA tensors.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from types import SimpleNamespace

import torch

from distill_demo.knowledge import teacher_message
from distill_demo.train import prepare_teacher
from rpc_demo.worlds import Failed

FAULT_STEP = 3  # --fault dies|hangs: the last teacher misbehaves at this request


@dataclasses.dataclass
class Serving:
    """The teacher this process serves, and what its RPC threads have counted."""
    model: torch.nn.Module
    device: torch.device
    students: list  # the ranks of the students it serves: it stops when all have said stop
    timeout_s: float  # how long it waits for a word from them (--timeout + --rpc-timeout)
    fault: str = "none"  # "dies" or "hangs" at request FAULT_STEP
    answered: dict = dataclasses.field(default_factory=dict)  # student rank -> requests
    stopped: set = dataclasses.field(default_factory=set)
    events: list = dataclasses.field(default_factory=list)  # ("forward", start, end), recorded
    last_heard: float = dataclasses.field(default_factory=time.monotonic)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    all_stopped: threading.Event = dataclasses.field(default_factory=threading.Event)


_serving: Serving | None = None  # this process's teacher; RPC threads find it here


def prepare(run, index):
    """distill_demo's teacher: the first teacher pretrains it, then broadcasts it to the others,
    here over the teachers' own world. prepare_teacher asks `run` who the first teacher is and
    which group to broadcast in: rank 0 of this world, and the world itself (group None)."""
    in_teachers_world = dataclasses.replace(run, rank=index, layout=SimpleNamespace(teachers=[0]),
                                            groups=SimpleNamespace(teachers=None))
    return prepare_teacher(in_teachers_world)


# --8<-- [start:answer]
def answer(student: int, mode: str, ids: torch.Tensor, k: int, record: bool):
    """Runs on the teacher, on one of its RPC threads: what the teacher sends back for `ids`
    (knowledge.py), as a list of tensors. `record`: time the forward for the timeline."""
    serving = _serving
    with serving.lock:
        serving.last_heard = time.monotonic()
        count = serving.answered[student] = serving.answered.get(student, 0) + 1
    if serving.fault == "dies" and count == FAULT_STEP:
        os.kill(os.getpid(), signal.SIGKILL)  # as if the machine went away
    if serving.fault == "hangs" and count >= FAULT_STEP:
        time.sleep(3 * serving.timeout_s)  # slower than the student waits; the launcher ends us
    on_gpu = serving.device.type == "cuda"
    # An RPC thread starts on GPU 0: make the teacher's GPU current (for synchronize, too).
    with torch.cuda.device(serving.device) if on_gpu else contextlib.nullcontext():
        if record and on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        message = teacher_message(mode, serving.model, ids, k)
        if record:
            if on_gpu:
                torch.cuda.synchronize()
            serving.events.append(("forward", start, time.perf_counter()))
    return message
# --8<-- [end:answer]


def lm_head():
    """For --transfer hidden: the teacher's lm_head weight, asked for once per run."""
    _serving.last_heard = time.monotonic()
    return _serving.model.lm_head.weight.detach()


def take_events():
    """The recorded forward passes (for the timeline), emptied."""
    events, _serving.events = _serving.events, []
    return events


def cpu_seconds() -> float:
    """CPU seconds this process (all its threads) has used so far."""
    return time.process_time()


def stop(student: int) -> int:
    """A student is done with this teacher; returns how many requests it answered it."""
    serving = _serving
    with serving.lock:
        serving.last_heard = time.monotonic()
        serving.stopped.add(student)
        if serving.stopped >= set(serving.students):
            serving.all_stopped.set()
        return serving.answered.get(student, 0)


def install(serving: Serving):
    """Before RPC starts: a student may call as soon as init_rpc returns."""
    global _serving
    _serving = serving


# --8<-- [start:serve]
def serve() -> dict:
    """The teacher's main thread, in the RPC world: wait until every student it serves has said
    stop. Bounded: a student waits at most --timeout in its all_reduce and --rpc-timeout for
    an answer, so one that has not called for longer than both is stuck or gone.
    Returns {student rank: requests answered}."""
    serving = _serving
    serving.last_heard = time.monotonic()  # joining RPC took a while: count from here
    while not serving.all_stopped.wait(0.2):
        quiet = time.monotonic() - serving.last_heard
        if quiet > serving.timeout_s:
            waiting = [f"student{s}" for s in serving.students if s not in serving.stopped]
            raise Failed(f"no call from {', '.join(waiting)} for {quiet:.0f} s (--timeout + "
                         f"--rpc-timeout): they are stuck or gone")
    return dict(serving.answered)
# --8<-- [end:serve]
