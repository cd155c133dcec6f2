"""What a student and a teacher do in rpc_demo, from joining their worlds to leaving them; the
same in a training run and in the benchmark's RPC half.

Order matters, and is the same for every process: its role's world first (a process group
with its own store), then the RPC world (its own rendezvous), left in the reverse order. The
teachers' world carries the first teacher's weights to the others; the students' world
averages gradients; RPC carries ids one way and the teachers' answers the other.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distill_demo.train import new_student
from course.ranks import print_rank
from rpc_demo.student import cpu_now, idle_cpu, stop_teachers, student_session, teacher_events
from rpc_demo.teacher import Serving, install, prepare, serve
from rpc_demo.worlds import IN_WORLD, PREPARING, cuda_maps, role_world, rpc_world, worker_name


@dataclass
class Outcome:
    """What a run over RPC ends with, on rank 0 (student0)."""
    result: object  # student0's RpcResult: mean losses, step times, bytes, round trips
    student: torch.nn.Module  # student0's trained model
    answered: dict  # {teacher rank: requests it answered each of its students}
    timelines: dict  # {rank: [(phase, start, end), ...]} of the recorded steps
    cpu_s: dict  # --bench: {rank: CPU seconds used during the session, all its threads}
    idle: dict  # --bench: {rank: cores student0 and its teachers kept busy while nobody called}


# --8<-- [start:roles]
def student_role(run, ports, roll, session, on_step=None):
    """A student: its world, then RPC, then back in its world to compare and gather. Returns an
    Outcome on rank 0, None on the other students."""
    layout, rank = run.layout, run.rank
    names = [worker_name(layout, r) for r in range(len(layout.students + layout.teachers))]
    unit = layout.units[layout.unit_of(rank)]
    with role_world("the students' world", layout.students, ports["students"], run, roll):
        student, optimizer = new_student(run)
        maps = cuda_maps(layout, unit.teachers, names, run.device)
        with rpc_world(rank, names, ports["rpc"], run.args.rpc_timeout, roll,
                       run.args.rpc_transport, maps):
            cpu = cpu_now(run) if session.timed else {}  # its teachers' too
            result = student_session(run, student, optimizer, session, on_step)
            cpu = {r: s - cpu[r] for r, s in cpu_now(run).items()} if session.timed else {}
            events = teacher_events(run) if rank == 0 else {}
            idle = idle_cpu(run) if rank == 0 and session.timed else {}
            stopped = stop_teachers(run)  # they leave when all their students have said so
        weights = torch.cat([p.detach().reshape(-1) for p in student.parameters()])
        high, low = weights.clone(), -weights  # max - min over the students: 0 if all agree
        dist.all_reduce(high, dist.ReduceOp.MAX)  # in the students' world: the default group
        dist.all_reduce(low, dist.ReduceOp.MAX)
        assert (high + low).max().item() == 0.0, f"rank {rank}: students' weights differ"
        everyone = [None] * len(layout.students) if rank == 0 else None
        dist.gather_object((stopped, run.timeline.take(), cpu), everyone, dst=0)
    if rank != 0:
        return None
    answered, cpu_s = {}, {}
    for student_rank, (stops, timeline, cpu) in enumerate(everyone):
        events[student_rank] = timeline
        cpu_s |= cpu  # a teacher of several students: measured by each, over the same steps
        for teacher, requests in stops.items():
            answered.setdefault(teacher, {})[student_rank] = requests
    return Outcome(result, student, answered, events, cpu_s, idle)


def teacher_role(run, ports, roll, fault):
    """A teacher: its world (the first teacher's weights go to all), then RPC until its
    students say stop. `fault`: misbehave, to show how students fail (--fault)."""
    layout, rank = run.layout, run.rank
    names = [worker_name(layout, r) for r in range(len(layout.students + layout.teachers))]
    index = layout.teachers.index(rank)
    with role_world("the teachers' world", layout.teachers, ports["teachers"], run, roll):
        roll[rank] = PREPARING  # students joining RPC wait for this without counting
        model = prepare(run, index)
        roll[rank] = IN_WORLD
        unit = layout.units[layout.unit_of(rank)]
        install(Serving(model, run.device, unit.students,
                        run.args.timeout + run.args.rpc_timeout, fault))
        if fault == "absent":  # alive, but never joins RPC: the others must not wait forever
            print_rank(f"{names[rank]}: --fault absent: not joining the RPC world")
            time.sleep(3 * run.args.rpc_timeout)  # the launcher stops us before this ends
            return
        with rpc_world(rank, names, ports["rpc"], run.args.rpc_timeout, roll,
                       run.args.rpc_transport):
            serve()
# --8<-- [end:roles]
