"""A teacher's side of rpc_demo. Its main thread prepares the model in the teachers' world, then
serves: it runs the forward pass of every request, one after another, on its own stream. An RPC
thread only takes a request in and queues it (`answer`, an async_execution function: it returns
a Future, which the main thread completes, and RPC sends the answer then).

Why not answer in the RPC thread? RPC runs each message on a stream it takes from torch's pool
(32 per GPU, round robin) and on any of its 16 threads; on a GPU every new stream and thread
costs cudaMalloc calls and a cuBLAS workspace, and the forward pass was 5-9x slower there
(tools/gpu/rpc_probe.py measures it, docs/rpc_demo.md quotes it). One thread on one stream is
what a serving engine does too: a request queue in front of one loop that owns the GPU.

RPC sends a function by module and name, and the callee imports it: the functions students
call are top-level functions of this module (rpc_demo.teacher), and they reach the model
through the one teacher this process serves (`_serving`, set before RPC starts). No RRef:
PyTorch does not send CUDA tensors through RRef calls, and on GPUs the answers are CUDA tensors.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import threading
import time

import torch
import torch.distributed.rpc as rpc

from distill_demo.knowledge import teacher_message
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
    requests: queue.Queue = dataclasses.field(default_factory=queue.Queue)  # for the main thread


_serving: Serving | None = None  # this process's teacher; RPC threads find it here


# --8<-- [start:answer]
@rpc.functions.async_execution
def answer(
    student: int, mode: str, ids: torch.Tensor, k: int, record: bool
) -> torch.futures.Future:
    """Runs on the teacher, in one of its RPC threads: count the request, queue it for the main
    thread (`serve`), and return a Future of what the teacher sends back for `ids`
    (knowledge.py, a list of tensors). `record`: time the forward for the timeline."""
    serving = _serving
    with serving.lock:
        serving.last_heard = time.monotonic()
        count = serving.answered[student] = serving.answered.get(student, 0) + 1
    if serving.fault == "dies" and count == FAULT_STEP:
        os.kill(os.getpid(), signal.SIGKILL)  # as if the machine went away
    if serving.fault == "hangs" and count >= FAULT_STEP:
        time.sleep(3 * serving.timeout_s)  # slower than the student waits; the launcher ends us
    on_gpu = serving.device.type == "cuda"
    # A Future with devices: when the main thread completes it, it records an event on its
    # stream, and RPC sends the answer once that event is reached (no synchronize needed).
    answered = torch.futures.Future(devices=[serving.device] if on_gpu else None)
    arrived = None
    if on_gpu:  # ids arrived on the stream RPC picked for this message: the forward waits for it
        arrived = torch.cuda.Event()
        arrived.record(torch.cuda.current_stream(serving.device))
    serving.requests.put((mode, ids, k, record, arrived, answered))
    return answered


def forward(serving: Serving, request: tuple) -> None:
    """The teacher's main thread: one queued request, answered on the main thread's stream."""
    mode, ids, k, record, arrived, answered = request
    on_gpu = serving.device.type == "cuda"
    if on_gpu:
        stream = torch.cuda.current_stream(serving.device)
        stream.wait_event(arrived)
        ids.record_stream(stream)  # allocated on RPC's stream: not reused before we are done
    try:
        if record and on_gpu:
            torch.cuda.synchronize(serving.device)  # time this forward, not the queue before it
        start = time.perf_counter()
        message = teacher_message(mode, serving.model, ids, k)
        if record:
            if on_gpu:
                torch.cuda.synchronize(serving.device)
            serving.events.append(("forward", start, time.perf_counter()))
    except Exception as err:  # noqa: BLE001 (the student's future fails with it, naming us)
        answered.set_exception(err)
        return
    answered.set_result(message)


# --8<-- [end:answer]


def lm_head() -> torch.Tensor:
    """For --transfer hidden: the teacher's lm_head weight, asked for once per run."""
    _serving.last_heard = time.monotonic()
    return _serving.model.lm_head.weight.detach()


def take_events() -> list[tuple[str, float, float]]:
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


def install(serving: Serving) -> None:
    """Before RPC starts: a student may call as soon as init_rpc returns."""
    global _serving
    _serving = serving


# --8<-- [start:serve]
def serve() -> dict[int, int]:
    """The teacher's main thread, in the RPC world: answer queued requests, one at a time, until
    every student it serves has said stop. Bounded: a student waits at most --timeout in its
    all_reduce and --rpc-timeout for an answer, so one that has not called for longer than
    both is stuck or gone. Returns {student rank: requests answered}."""
    serving = _serving
    serving.last_heard = time.monotonic()  # joining RPC took a while: count from here
    if serving.device.type == "cuda":
        torch.cuda.set_device(serving.device)
    while not (serving.all_stopped.is_set() and serving.requests.empty()):
        try:
            forward(serving, serving.requests.get(timeout=0.2))
            continue
        except queue.Empty:
            pass
        quiet = time.monotonic() - serving.last_heard
        if quiet > serving.timeout_s:
            waiting = [f"student{s}" for s in serving.students if s not in serving.stopped]
            raise Failed(
                f"no call from {', '.join(waiting)} for {quiet:.0f} s (--timeout + "
                f"--rpc-timeout): they are stuck or gone"
            )
    return dict(serving.answered)


# --8<-- [end:serve]
