"""The training logic of distill_demo: what a student and a teacher do each step. Messages go
through comms.Channel; what a teacher sends and the loss a student takes come from knowledge.py.

A student, each step: asks its teachers (each gets a block of its batch's rows), runs its own
forward pass while they work, collects their answers, takes the loss, backpropagates, averages
gradients (and the loss) over the students in one all_reduce, and steps AdamW. With overlap on,
it also sends the next step's ids before its backward pass, so the teachers compute the next
answer while it trains on this one. A teacher answers until every student of its unit says STOP.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from distill_demo.comms import Channel, Groups, Layout, PeerLost, average_, broadcast_
from distill_demo.data import MarkovData
from distill_demo.knowledge import student_loss, teacher_message
from distill_demo.models import make_student, make_teacher
from distill_demo.report import Timeline
from course.ranks import print_rank

PRETRAIN_SHARD = 1_000_000  # the teacher's own data: never a student's shard


# --8<-- [start:recipes]
class Recipe(NamedTuple):
    """How a size trains. Larger models need smaller steps, and a 32768-token vocabulary needs
    more pretraining: tools/gpu/recipe_probe.py measured these (docs/distill_demo.md)."""
    teacher_lr: float  # the teacher's AdamW step size while it pretrains
    warmup: int  # its steps of linear warm-up to teacher_lr (large models diverge without)
    teacher_steps: int  # the default --teacher-steps
    student_lr: float  # the default --lr


RECIPES = {"tiny": Recipe(1e-2, 0, 60, 1e-2), "small": Recipe(1e-3, 0, 60, 3e-3),
           "large": Recipe(3e-4, 10, 200, 3e-4)}
# --8<-- [end:recipes]


@dataclass
class Run:
    """Everything a rank's role needs, made once by __main__."""
    args: argparse.Namespace
    rank: int
    device: torch.device
    layout: Layout
    groups: Groups
    channel: Channel
    data: MarkovData
    timeline: Timeline
    cycle: int = 0  # >0: reuse this many pre-made batches (the benchmark's data costs nothing)
    _batches: dict = field(default_factory=dict)

    @property
    def dtype(self):  # what the teacher computes in, and the student's autocast
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def autocast(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def batch(self, step: int, shard: int) -> torch.Tensor:
        if not self.cycle:
            return self.data.batch(step, shard, self.args.batch).to(self.device)
        key = (step % self.cycle, shard)
        if key not in self._batches:
            self._batches[key] = self.data.batch(*key, self.args.batch).to(self.device)
        return self._batches[key]

    def unit(self):
        """(this rank's unit, the group of that unit)"""
        index = self.layout.unit_of(self.rank)
        return self.layout.units[index], self.groups.units[index]


@dataclass
class Session:
    """A stretch of training with one setting; the benchmark runs several, one after another."""
    mode: str  # "full", "topk" or "hidden": see knowledge.py
    overlap: bool
    steps: int
    record: range = range(0)  # steps whose phases go on the timeline
    timed: bool = False  # synchronize at each step's end, so step times are the GPU's


@dataclass
class Result:
    losses: list = field(default_factory=list)  # mean over the students, per step
    seconds: list = field(default_factory=list)  # per step
    bytes_in: float = 0.0  # per step: the teachers' answers, headers included
    bytes_out: float = 0.0  # per step: the ids sent to the teachers


def pretrain(teacher, data: MarkovData, size: str, steps: int, batch: int, device,
             lr: float | None = None, warmup: int | None = None) -> list[float]:
    """Train `teacher` to predict the next token for `steps` steps with its size's recipe (or
    with `lr` and `warmup` instead). Returns its loss at every step."""
    lr = RECIPES[size].teacher_lr if lr is None else lr
    warmup = RECIPES[size].warmup if warmup is None else warmup
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:  # a linear warm-up keeps large models from diverging
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        ids = data.batch(step, PRETRAIN_SHARD, batch).to(device)
        loss = F.cross_entropy(teacher(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def prepare_teacher(run: Run) -> torch.nn.Module:
    """The first teacher trains on the data for --teacher-steps (a real run would load a
    checkpoint), then hands its weights to every other teacher."""
    args = run.args
    teacher = make_teacher(args.size, args.vocab, args.seq).to(run.device)
    first = run.layout.teachers[0]
    if run.rank == first and args.teacher_steps:
        losses = pretrain(teacher, run.data, args.size, args.teacher_steps, args.batch,
                          run.device)
        print_rank(f"teacher pretrained for {args.teacher_steps} steps: next-token loss "
                   f"{losses[0]:.2f} -> {losses[-1]:.2f} (the data's entropy: "
                   f"{run.data.entropy():.2f})")
    broadcast_(teacher, first, run.groups.teachers)  # every teacher answers alike
    return teacher.to(run.dtype).eval()


# --8<-- [start:student]
def student_session(run: Run, student, optimizer, session: Session, on_step=None) -> Result:
    unit, group = run.unit()
    shard = run.layout.students.index(run.rank)
    channel, phase, result = run.channel, run.timeline.phase, Result()
    params = list(student.parameters())
    lm_head = None
    if session.mode == "hidden":  # once per session: the teacher's lm_head, to form its logits
        lm_head = channel.recv(unit.teachers[0], group)[0]

    def ask(step):
        """Send this step's ids, a block of rows to each teacher; returns (ids, requests)."""
        ids = run.batch(step, shard)
        blocks = ids.tensor_split(len(unit.teachers))
        return ids, [(t, channel.send([b], t, group)) for t, b in zip(unit.teachers, blocks)]

    def collect(sending):
        """The teachers' answers, their row blocks put back together."""
        for teacher, requests in sending:
            channel.wait(requests, teacher)
        answers = [channel.recv(t, group) for t in unit.teachers]
        if any(a is None for a in answers):
            raise RuntimeError(f"rank {run.rank}: a teacher sent STOP; only students send it")
        return [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*answers)]

    def train_step(step, pending):
        """One step. `pending`: this step's request, if sent early. Returns the next one's."""
        with run.autocast():
            if session.overlap:
                ids, sending = pending
                with phase("forward"):
                    logits = student(ids)  # the teachers compute this step's answer meanwhile
                with phase("wait teacher"):
                    message = collect(sending)
                if step + 1 < session.steps:
                    with phase("send ids"):  # they start on the next step during my backward
                        pending = ask(step + 1)
            else:
                with phase("send ids"):
                    ids, sending = ask(step)
                with phase("wait teacher"):
                    message = collect(sending)
                with phase("forward"):
                    logits = student(ids)
        with phase("loss+backward"):
            loss = student_loss(session.mode, logits, message, lm_head)
            loss.backward()
        mean_loss = loss.detach().reshape(1)
        with phase("all_reduce"):  # the loss rides along with the gradients: one collective
            average_([p.grad for p in params] + [mean_loss], run.groups.students)
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
        result.losses.append(mean_loss.item())  # waits for the GPU: the step is done
        return pending

    sent, received, step = channel.sent, channel.received, 0
    try:
        pending = ask(0) if session.overlap else None
        for step in range(session.steps):
            run.timeline.recording = step in session.record
            start = time.perf_counter()
            pending = train_step(step, pending)
            if session.timed and run.device.type == "cuda":
                torch.cuda.synchronize()
            result.seconds.append(time.perf_counter() - start)
            if on_step:
                on_step(step + 1, result.losses[-1])
        result.bytes_out = (channel.sent - sent) / session.steps
        result.bytes_in = (channel.received - received) / session.steps
        for teacher in unit.teachers:
            channel.send_stop(teacher, group)
    except PeerLost as err:  # say when, too
        raise PeerLost(f"{err} at step {step + 1}") from None
    run.timeline.recording = False
    return result
# --8<-- [end:student]


# --8<-- [start:teacher]
def teacher_session(run: Run, teacher, session: Session) -> int:
    """Answer the unit's students until they all send STOP; returns the steps answered."""
    unit, group = run.unit()
    channel, phase = run.channel, run.timeline.phase
    if session.mode == "hidden" and run.rank == unit.teachers[0]:
        for student in unit.students:  # the lm_head goes once; then only hidden states travel
            channel.wait(channel.send([teacher.lm_head.weight.detach()], student, group), student)

    def receive():
        requests = [channel.recv(s, group, "left without sending STOP") for s in unit.students]
        if all(r is None for r in requests):
            return None
        if any(r is None for r in requests):
            raise RuntimeError(f"rank {run.rank}: some students sent STOP and others did not")
        return [r[0] for r in requests]

    answered = 0
    run.timeline.recording = 0 in session.record
    with phase("wait students"):
        requests = receive()
    while requests is not None:
        with phase("forward"):  # all of the unit's rows in one forward pass
            message = teacher_message(session.mode, teacher, torch.cat(requests), run.args.topk)
        with phase("answer"):
            rows = [len(r) for r in requests]
            parts = [m.split(rows) for m in message]
            sending = [(s, channel.send([p[i] for p in parts], s, group))
                       for i, s in enumerate(unit.students)]
            for student, works in sending:
                channel.wait(works, student)
        answered += 1
        run.timeline.recording = answered in session.record
        with phase("wait students"):
            requests = receive()
    run.timeline.recording = False
    return answered
# --8<-- [end:teacher]


def new_student(run: Run):
    student = make_student(run.args.size, run.args.vocab, run.args.seq).to(run.device)
    return student, torch.optim.AdamW(student.parameters(), lr=run.args.lr)
