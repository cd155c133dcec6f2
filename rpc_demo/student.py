"""A student's side of rpc_demo: distill_demo's training step (train.train_student, overlap on),
with its teachers called over RPC instead of isend/irecv. RpcTeachers is that step's Teachers:
the one thing rpc_demo changes. Each step a student

  1. runs its forward pass while its teachers compute this step's answer (asked a step ago),
  2. waits for the answer (a Future per teacher),
  3. asks for the NEXT step's answer (rpc_async returns at once): the teachers work on it
     during this step's backward pass, all_reduce and optimizer step,
  4. takes the loss, backpropagates, averages gradients (and the loss) over the students'
     own world in one all_reduce, and steps AdamW.

A teacher that does not answer fails the future: within --rpc-timeout if it hangs or never
joined, at once if its process died. The student then names it and the step, and stops.
"""

from __future__ import annotations

import time

import torch
import torch.distributed.rpc as rpc

from distill_demo.comms import PeerLost
from rpc_demo import teacher as teacher_rpc
from rpc_demo.worlds import Failed, Worker, worker_name


def wait_for(future: torch.futures.Future, teacher_rank: int, me: Worker, what: str) -> object:
    """What teacher `teacher_rank` answered to `what` (e.g. "step 3"), or Failed naming it."""
    try:
        return future.wait()
    except RuntimeError as err:  # how RPC reports a timeout, a broken connection, a callee error
        first = str(err).strip().splitlines()[0]
        why = (
            f"no answer within --rpc-timeout {me.rpc_timeout:g} s"
            if "timeout" in first.lower()
            else "its connection broke: the process died or is unreachable"
        )
        raise Failed(
            f"{worker_name(me.layout, teacher_rank)} (rank {teacher_rank}) did not "
            f"answer {what}: {why} ({first})"
        ) from None


# --8<-- [start:student]
class RpcTeachers:
    """A student's teachers over RPC, as distill_demo's train_student asks for them
    (train.Teachers): each block of ids goes out with rpc_async, which returns a Future at once;
    collect() waits for the Futures. Counts the tensor payloads (RPC adds its own framing)."""

    def __init__(self, me: Worker, mode: str):
        self.me, self.mode = me, mode
        self.ranks = me.layout.units[me.layout.unit_of(me.rank)].teachers
        self.names = [worker_name(me.layout, t) for t in self.ranks]
        self.sent = self.received = 0
        self.round_trips = []  # (asked, answered) of the recorded requests: the benchmark's

    def lm_head(self) -> torch.Tensor:
        return wait_for(
            rpc.rpc_async(self.names[0], teacher_rpc.lm_head),
            self.ranks[0],
            self.me,
            "the call for its lm_head",
        )

    def ask(self, blocks: list[torch.Tensor], record: bool) -> list[torch.futures.Future]:
        asked = time.perf_counter()
        futures = [
            rpc.rpc_async(
                name,
                teacher_rpc.answer,
                args=(self.me.rank, self.mode, block, self.me.cfg.topk, record),
            )
            for name, block in zip(self.names, blocks)
        ]
        self.sent += sum(b.numel() * b.element_size() for b in blocks)
        if record:  # when did the last answer arrive? (for the benchmark's breakdown)
            done = torch.futures.collect_all(futures)
            done.add_done_callback(lambda _: self.round_trips.append((asked, time.perf_counter())))
        return futures

    def collect(self, futures: list[torch.futures.Future], step: int) -> list[list[torch.Tensor]]:
        answers = [
            wait_for(future, teacher, self.me, f"step {step + 1}")
            for future, teacher in zip(futures, self.ranks)
        ]
        self.received += sum(t.numel() * t.element_size() for answer in answers for t in answer)
        return answers

    def done(self) -> None:
        """Nothing yet: stop() tells the teachers, after the benchmark has measured them."""

    def at_step(self, err: PeerLost, step: int) -> str:
        return f"at step {step}, {err}"  # (a teacher that fails is named by wait_for)

    # --8<-- [end:student]

    def stop(self) -> dict[int, int]:
        """Tell each teacher this student is done; {teacher rank: requests it answered}."""
        futures = {
            t: rpc.rpc_async(name, teacher_rpc.stop, args=(self.me.rank,))
            for t, name in zip(self.ranks, self.names)
        }
        return {t: wait_for(f, t, self.me, "the stop call") for t, f in futures.items()}

    def cpu_now(self) -> dict[int, float]:
        """{rank: CPU seconds used so far} of this student and its teachers (all their threads)."""
        return {
            t: rpc.rpc_sync(name, teacher_rpc.cpu_seconds)
            for t, name in zip(self.ranks, self.names)
        } | {self.me.rank: time.process_time()}

    def idle_cpu(self, seconds: float = 1.0) -> dict[int, float]:
        """Sleep `seconds` while nobody calls anybody; {rank: cores busy meanwhile} for this
        student and its teachers. What RPC costs when it has nothing to do."""
        before, start = self.cpu_now(), time.perf_counter()
        time.sleep(seconds)
        after, elapsed = self.cpu_now(), time.perf_counter() - start
        return {r: (after[r] - before[r]) / elapsed for r in before}


def teacher_events(me: Worker) -> dict[int, list]:
    """Rank 0: every teacher's recorded forward passes, {rank: [(phase, start, end)]}."""
    futures = {
        t: rpc.rpc_async(worker_name(me.layout, t), teacher_rpc.take_events)
        for t in me.layout.teachers
    }
    return {t: wait_for(f, t, me, "the call for its timeline") for t, f in futures.items()}
