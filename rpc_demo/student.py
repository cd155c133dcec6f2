"""A student's side of rpc_demo: distill_demo's training step (train.py, overlap on), with the
teachers called over RPC instead of isend/irecv. Each step a student

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
from dataclasses import dataclass, field

import torch
import torch.distributed.rpc as rpc

from distill_demo.comms import PeerLost, average_
from distill_demo.data import MarkovData
from distill_demo.knowledge import student_loss, teacher_message
from distill_demo.models import make_student, make_teacher
from distill_demo.train import Result, pretrain
from rpc_demo import teacher as teacher_rpc
from rpc_demo.worlds import Failed, worker_name


@dataclass
class RpcResult(Result):
    round_trips: list = field(default_factory=list)  # (asked, answered) of the recorded requests


def wait_for(future, teacher_rank, run, what):
    """What teacher `teacher_rank` answered to `what` (e.g. "step 3"), or Failed naming it."""
    try:
        return future.wait()
    except RuntimeError as err:  # how RPC reports a timeout, a broken connection, a callee error
        first = str(err).strip().splitlines()[0]
        timeout = run.args.rpc_timeout
        why = (f"no answer within --rpc-timeout {timeout:g} s" if "timeout" in first.lower() else
               "its connection broke: the process died or is unreachable")
        raise Failed(f"{worker_name(run.layout, teacher_rank)} (rank {teacher_rank}) did not "
                     f"answer {what}: {why} ({first})") from None


# --8<-- [start:student]
def student_session(run, student, optimizer, session, on_step=None) -> RpcResult:
    """`session.steps` steps against the unit's teachers (each gets a block of the batch's rows);
    returns the mean loss over the students per step, the step times and the bytes moved."""
    unit = run.layout.units[run.layout.unit_of(run.rank)]
    shard = run.layout.students.index(run.rank)
    names = [worker_name(run.layout, t) for t in unit.teachers]
    phase, result, params = run.timeline.phase, RpcResult(), list(student.parameters())
    lm_head = None
    if session.mode == "hidden":  # once: the teacher's lm_head, to form its logits here
        lm_head = wait_for(rpc.rpc_async(names[0], teacher_rpc.lm_head), unit.teachers[0], run,
                           "the call for its lm_head")

    def ask(step):
        """Ask each teacher for its block of this step's rows; returns at once."""
        ids, record = run.batch(step, shard), step in session.record
        asked = time.perf_counter()
        futures = [rpc.rpc_async(name, teacher_rpc.answer,
                                 args=(run.rank, session.mode, block, run.args.topk, record))
                   for name, block in zip(names, ids.tensor_split(len(names)))]
        if record:  # when did the last answer arrive? (for the benchmark's breakdown)
            done = torch.futures.collect_all(futures)
            done.add_done_callback(lambda _: result.round_trips.append(
                (asked, time.perf_counter())))
        return ids, futures

    def collect(futures, step):
        """The teachers' answers, their row blocks put back together."""
        answers = [wait_for(future, teacher, run, f"step {step + 1}")
                   for future, teacher in zip(futures, unit.teachers)]
        return [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*answers)]

    pending = ask(0)
    for step in range(session.steps):
        run.timeline.recording = step in session.record
        start = time.perf_counter()
        with run.autocast():
            ids, futures = pending
            with phase("forward"):
                logits = student(ids)  # the teachers compute this step's answer meanwhile
            with phase("wait teacher"):
                message = collect(futures, step)
            if step + 1 < session.steps:
                with phase("send ids"):  # in flight during this step's backward and all_reduce
                    pending = ask(step + 1)
        with phase("loss+backward"):
            loss = student_loss(session.mode, logits, message, lm_head)
            loss.backward()
        mean_loss = loss.detach().reshape(1)
        with phase("all_reduce"):  # the students' own world; the loss rides along, one collective
            try:
                average_([p.grad for p in params] + [mean_loss], None)
            except PeerLost as err:  # another student is gone: say when
                raise Failed(f"at step {step + 1}, {err}") from None
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
        result.losses.append(mean_loss.item())  # waits for the GPU: the step is done
        if session.timed and run.device.type == "cuda":
            torch.cuda.synchronize()
        result.seconds.append(time.perf_counter() - start)
        result.bytes_in = sum(t.numel() * t.element_size() for t in message)
        result.bytes_out = ids.numel() * ids.element_size()
        if on_step:
            on_step(step + 1, result.losses[-1])
    run.timeline.recording = False
    return result
# --8<-- [end:student]


def stop_teachers(run) -> dict:
    """Tell each of this student's teachers it is done; {teacher rank: requests it answered}."""
    unit = run.layout.units[run.layout.unit_of(run.rank)]
    futures = {t: rpc.rpc_async(worker_name(run.layout, t), teacher_rpc.stop, args=(run.rank,))
               for t in unit.teachers}
    return {t: wait_for(f, t, run, "the stop call") for t, f in futures.items()}


def teacher_events(run) -> dict:
    """Rank 0: every teacher's recorded forward passes, {rank: [(phase, start, end)]}."""
    futures = {t: rpc.rpc_async(worker_name(run.layout, t), teacher_rpc.take_events)
               for t in run.layout.teachers}
    return {t: wait_for(f, t, run, "the call for its timeline") for t, f in futures.items()}


def cpu_now(run) -> dict:
    """{rank: CPU seconds used so far} of this student and its teachers (all their threads)."""
    unit = run.layout.units[run.layout.unit_of(run.rank)]
    return {t: rpc.rpc_sync(worker_name(run.layout, t), teacher_rpc.cpu_seconds)
            for t in unit.teachers} | {run.rank: time.process_time()}


def idle_cpu(run, seconds=1.0) -> dict:
    """Sleep `seconds` while nobody calls anybody; {rank: cores busy meanwhile} for this
    student and its teachers. What RPC costs when it has nothing to do."""
    before, start = cpu_now(run), time.perf_counter()
    time.sleep(seconds)
    after, elapsed = cpu_now(run), time.perf_counter() - start
    return {r: (after[r] - before[r]) / elapsed for r in before}


def reference_training(args, n_students, device, autocast):
    """One process, no communication: the same teacher (pretrained as distill_demo pretrains it)
    and one student that trains on every student's batch at once. Returns (losses, student)."""
    data = MarkovData(args.vocab, args.seq)
    teacher = make_teacher(args.size, args.vocab, args.seq).to(device)
    if args.teacher_steps:
        pretrain(teacher, data, args.size, args.teacher_steps, args.batch, device)
    teacher = teacher.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    student = make_student(args.size, args.vocab, args.seq).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        batches = [data.batch(step, shard, args.batch).to(device) for shard in range(n_students)]
        lm_head = teacher.lm_head.weight.detach()  # for --transfer hidden
        with autocast():  # equal batches: the mean of the students' losses is the mean loss
            loss = sum(student_loss(args.transfer, student(ids),
                                    teacher_message(args.transfer, teacher, ids, args.topk),
                                    lm_head) for ids in batches) / n_students
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, student
