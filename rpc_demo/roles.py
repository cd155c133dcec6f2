"""What a student and a teacher do in rpc_demo, from joining their worlds to leaving them; the
same in a training run and in the benchmark's RPC half.

Order matters, and is the same for every process: its role's world first (a process group
with its own store), then the RPC world (its own rendezvous), left in the reverse order. The
teachers' world carries the first teacher's weights to the others; the students' world
averages gradients; RPC carries ids one way and the teachers' answers the other.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from course.ranks import print_rank, spread
from distill_demo.comms import PeerLost
from distill_demo.report import Timeline
from distill_demo.startup import Preparation
from distill_demo.train import Batches, Result, Session, new_student, prepare_teacher, train_student
from rpc_demo.student import RpcTeachers, teacher_events
from rpc_demo.teacher import Serving, install, serve
from rpc_demo.worlds import (
    DEAD,
    PREPARING,
    READY,
    Roll,
    Worker,
    cuda_maps,
    role_world,
    rpc_world,
    worker_name,
)


@dataclass
class Outcome:
    """What a run over RPC ends with, on rank 0 (student0)."""

    result: Result  # student0's: mean losses, step times, bytes
    student: torch.nn.Module  # student0's trained model
    answered: dict  # {teacher rank: requests it answered each of its students}
    timelines: dict  # {rank: [(phase, start, end), ...]} of the recorded steps
    cpu_s: dict  # --bench: {rank: CPU seconds used during the session, all its threads}
    idle: dict  # --bench: {rank: cores student0 and its teachers kept busy while nobody called}
    round_trips: list  # --bench: (asked, answered) of student0's recorded requests


class RollPreparation(Preparation):
    """The wait for teacher0's model (distill_demo/startup.py) on the launcher's roll: its
    stage says when the model is READY, and the launcher writes DEAD as soon as it dies. (Not
    a store: in the teachers' world teacher0 hosts the store, and a store whose host has died
    fails each call with a page of C++ warnings.)"""

    def __init__(self, me: Worker, roll: Roll, say: bool):
        self.first, self.roll = me.layout.teachers[0], roll
        super().__init__(
            f"{worker_name(me.layout, self.first)} (rank {self.first})", me.timeout, say
        )

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        self.roll[self.first] = PREPARING
        yield
        self.roll[self.first] = READY

    def look(self) -> tuple[bool, None]:
        if self.roll[self.first] == DEAD:
            raise PeerLost(f"{self.who} died while preparing its model (its process ended)")
        # READY or later (joining RPC, in it): each world starts below READY (role_world), and
        # teacher0 leaves one only after everyone waiting in it has gone past this wait.
        return self.roll[self.first] >= READY, None  # None: no beat to watch, DEAD says it


# --8<-- [start:roles]
def student_role(
    me: Worker,
    ports: dict[str, int],
    roll: Roll,
    session: Session,
    batches: Batches,
    on_step: Callable[[int, float], None] | None = None,
) -> Outcome | None:
    """A student: its world, then RPC, then back in its world to compare and gather. Trains
    with distill_demo's step, its teachers over RPC. Returns an Outcome on rank 0, None on the
    other students."""
    layout, rank, timeline = me.layout, me.rank, Timeline(me.device)
    with role_world("the students' world", layout.students, ports["students"], me, roll):
        student, optimizer = new_student(me.cfg)
        teachers = RpcTeachers(me, session.mode)
        maps = cuda_maps(layout, teachers.ranks, me.names, me.device)
        with rpc_world(rank, me.names, ports["rpc"], me.rpc_timeout, roll, me.rpc_transport, maps):
            cpu = teachers.cpu_now() if session.timed else {}  # its teachers' too
            # distill_demo's step; with no group, it averages over this world: the students'
            result = train_student(
                me.cfg, session, student, optimizer, teachers, batches, timeline, on_step=on_step
            )
            cpu = {r: s - cpu[r] for r, s in teachers.cpu_now().items()} if session.timed else {}
            events = teacher_events(me) if rank == 0 else {}
            idle = teachers.idle_cpu() if rank == 0 and session.timed else {}
            stopped = teachers.stop()  # they leave when all their students have said so
        weights = torch.cat([p.detach().reshape(-1) for p in student.parameters()])
        gap = spread(weights)  # max - min over the students' world: 0 if all agree
        assert gap == 0.0, f"rank {rank}: students' weights differ by {gap}"
        everyone = [None] * len(layout.students) if rank == 0 else None
        dist.gather_object((stopped, timeline.take(), cpu), everyone, dst=0)
    if rank != 0:
        return None
    answered, cpu_s = {}, {}
    for student_rank, (stops, recorded, cpu) in enumerate(everyone):
        events[student_rank] = recorded
        cpu_s |= cpu  # a teacher of several students: measured by each, over the same steps
        for teacher, requests in stops.items():
            answered.setdefault(teacher, {})[student_rank] = requests
    return Outcome(result, student, answered, events, cpu_s, idle, teachers.round_trips)


def teacher_role(me: Worker, ports: dict[str, int], roll: Roll, fault: str) -> None:
    """A teacher: its world (the first teacher's weights go to all), then RPC until its
    students say stop. `fault`: misbehave, to show how students fail (--fault)."""
    layout, rank = me.layout, me.rank
    index = layout.teachers.index(rank)  # its rank in the teachers' world
    with role_world("the teachers' world", layout.teachers, ports["teachers"], me, roll):
        roll[rank] = PREPARING  # students joining RPC wait for this without counting
        # teacher0 pretrains; the others wait for it, then take its weights (in this world)
        model = prepare_teacher(me.cfg, index, 0, None, RollPreparation(me, roll, index == 1))
        roll[rank] = READY
        unit = layout.units[layout.unit_of(rank)]
        install(Serving(model, me.device, unit.students, me.timeout + me.rpc_timeout, fault))
        if fault == "absent":  # alive, but never joins RPC: the others must not wait forever
            print_rank(f"{me.names[rank]}: --fault absent: not joining the RPC world")
            time.sleep(3 * me.rpc_timeout)  # the launcher stops us before this ends
            return
        with rpc_world(rank, me.names, ports["rpc"], me.rpc_timeout, roll, me.rpc_transport):
            serve()


# --8<-- [end:roles]
