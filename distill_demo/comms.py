"""Communication for distill_demo, kept apart from the training logic in train.py.

- Layout: which ranks teach and which learn for a teachers:students ratio, and who serves whom
- make_groups: the groups every rank creates, all of them, in one order
- Channel: messages of one or two tensors between two ranks - lesson 02's shape handshake
  (header, then payload) grown to several tensors, with lesson 06's STOP message. It counts
  the bytes it moves and turns a peer's broken connection into PeerLost, naming that peer.
- P2PTeachers: a student's teachers over the Channel, as train.train_student asks for them
- average_: one bucketed all_reduce for a list of tensors (lesson 06's exercise 06.1)
"""

from __future__ import annotations

import contextlib
import datetime
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

from course.header import DTYPES, STOP, TENSOR  # lesson 02's message kinds and dtype codes

# Lesson 02's header describes one tensor; this one extends it to MAX_TENSORS (top-k sends
# values and indices together): [kind, number of tensors, then per tensor: dtype code, ndim,
# MAX_DIMS sizes]. The kinds and the dtype codes are lesson 02's (course/header.py).
MAX_TENSORS, MAX_DIMS = 2, 4
HEADER_LEN = 2 + MAX_TENSORS * (2 + MAX_DIMS)
HEADER_BYTES = HEADER_LEN * 8  # int64s


class PeerLost(RuntimeError):
    """A rank this one was talking to is gone (its process died or left without STOP)."""


def parse_ratio(text: str) -> tuple[int, int]:
    """ "1:3" -> (1, 3): teachers to students. ValueError with the reason if it is not one."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"--ratio {text}: write it as TEACHERS:STUDENTS with two positive "
            "whole numbers, e.g. 1:1, 1:3 or 3:1"
        )
    return int(parts[0]), int(parts[1])


class Unit(NamedTuple):
    """Teachers and students that work together: each student splits its batch's rows over
    the unit's teachers; each teacher answers every student of its unit."""

    teachers: list[int]
    students: list[int]


# --8<-- [start:layout]
class Layout:
    """Students first (rank 0, which prints, is a student), then teachers, in units of the
    ratio reduced to lowest terms: 2:2 on 8 ranks is four 1:1 pairs."""

    def __init__(self, world_size: int, teachers: int, students: int):
        common = math.gcd(teachers, students)
        self.ratio = (teachers, students)
        per_t, per_s = teachers // common, students // common
        if world_size % (per_t + per_s):
            raise ValueError(
                f"--ratio {teachers}:{students} needs a multiple of {per_t + per_s} ranks "
                f"({count(per_t, 'teacher')} and {count(per_s, 'student')} at a time), but was "
                f"started with {world_size}. Try: torchrun --nproc-per-node {per_t + per_s} "
                f"-m distill_demo --ratio {teachers}:{students}"
            )
        n_units = world_size // (per_t + per_s)
        self.students = list(range(n_units * per_s))
        self.teachers = list(range(n_units * per_s, world_size))
        self.units = [
            Unit(
                self.teachers[u * per_t : (u + 1) * per_t],
                self.students[u * per_s : (u + 1) * per_s],
            )
            for u in range(n_units)
        ]

    def unit_of(self, rank: int) -> int:
        return next(i for i, u in enumerate(self.units) if rank in u.teachers + u.students)

    def name(self, rank: int) -> str:
        return f"{'student' if rank in self.students else 'teacher'} rank {rank}"

    def describe(self) -> list[str]:
        t, s = self.ratio
        lines = [
            f"teachers:students {t}:{s} on {len(self.teachers) + len(self.students)} ranks: "
            f"{count(len(self.teachers), 'teacher')}, {count(len(self.students), 'student')}"
        ]
        for unit in self.units:
            how = "its batch's rows split over them" if len(unit.teachers) > 1 else "whole batches"
            lines.append(
                f"  {'teachers' if len(unit.teachers) > 1 else 'teacher'} "
                f"{', '.join(map(str, unit.teachers))} -> "
                f"{'students' if len(unit.students) > 1 else 'student'} "
                f"{', '.join(map(str, unit.students))} ({how})"
            )
        return lines


# --8<-- [end:layout]


def count(n: int, thing: str) -> str:
    return f"{n} {thing}{'s' * (n != 1)}"


class Groups(NamedTuple):
    students: dist.ProcessGroup  # the students' data-parallel group: gradients are averaged here
    teachers: dist.ProcessGroup  # the teachers: the first one's weights are broadcast to the others
    units: list[dist.ProcessGroup]  # one per unit: its teachers and students, for their messages


def make_groups(layout: Layout, timeout: datetime.timedelta) -> Groups:
    """Every rank creates every group, in the same order, including those it is not in. Each
    gets `timeout` (the world's): a group made without one waits torch's default (10 min NCCL)."""
    students = dist.new_group(layout.students, timeout=timeout)
    teachers = dist.new_group(layout.teachers, timeout=timeout)
    units = [dist.new_group(sorted(u.teachers + u.students), timeout=timeout) for u in layout.units]
    return Groups(students, teachers, units)


def unit_of(rank: int, layout: Layout, groups: Groups) -> tuple[Unit, dist.ProcessGroup]:
    """`rank`'s unit, and the group its point-to-point messages go in."""
    index = layout.unit_of(rank)
    return layout.units[index], groups.units[index]


# --8<-- [start:channel]
class Channel:
    """Point-to-point messages for one rank: a header, then up to MAX_TENSORS payloads."""

    def __init__(self, device: torch.device, name: Callable[[int], str] = str):
        self.device, self.name = device, name  # name(rank): how to call a peer in an error
        self.sent = self.received = 0  # bytes, headers included

    @contextlib.contextmanager
    def talking_to(self, peer: int, doing: str) -> Iterator[None]:
        """A dead peer's connection closes: gloo fails the next send or recv at once (NCCL
        when --timeout runs out, if torchrun has not stopped the run first)."""
        try:
            yield
        except RuntimeError as err:
            why = str(err).split("] ")[-1].split(". ")[0]  # gloo: "[...pair.cc:553] Connection..."
            raise PeerLost(f"{self.name(peer)} {doing} ({why})") from None

    def send(self, tensors: list[torch.Tensor], dst: int, group: dist.ProcessGroup) -> list:
        """Start sending; returns the requests to finish with wait() before touching `tensors`."""
        header = [TENSOR, len(tensors)]
        for t in tensors:
            header += [DTYPES.index(t.dtype), t.dim(), *t.shape, *[0] * (MAX_DIMS - t.dim())]
        header += [0] * (HEADER_LEN - len(header))
        header = torch.tensor(header, dtype=torch.int64, device=self.device)
        tensors = [t.contiguous() for t in tensors]
        self.sent += HEADER_BYTES + sum(t.numel() * t.element_size() for t in tensors)
        with self.talking_to(dst, "could not be sent to"):
            return [dist.isend(t, dst, group) for t in [header, *tensors]]

    def wait(self, requests: list, peer: int) -> None:
        with self.talking_to(peer, "stopped receiving"):
            for request in requests:
                request.wait()

    def send_stop(self, dst: int, group: dist.ProcessGroup) -> None:
        self.sent += HEADER_BYTES
        with self.talking_to(dst, "stopped receiving"):
            dist.send(
                torch.full((HEADER_LEN,), STOP, dtype=torch.int64, device=self.device), dst, group
            )

    def recv(
        self, src: int, group: dist.ProcessGroup, lost: str = "stopped answering"
    ) -> list[torch.Tensor] | None:
        """The next message from `src`: a list of tensors, or None if it was STOP. `lost`: what
        to say of `src` if it is gone."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        with self.talking_to(src, lost):
            dist.recv(header, src, group)
            header = header.tolist()
            if header[0] not in (TENSOR, STOP):
                raise RuntimeError(f"{self.name(src)} sent {header[0]} where a header goes")
            if header[0] == STOP:
                self.received += HEADER_BYTES
                return None
            tensors = []
            for i in range(header[1]):
                dtype, ndim, *sizes = header[2 + i * (2 + MAX_DIMS) : 2 + (i + 1) * (2 + MAX_DIMS)]
                tensors.append(torch.empty(sizes[:ndim], dtype=DTYPES[dtype], device=self.device))
                dist.recv(tensors[-1], src, group)
        self.received += HEADER_BYTES + sum(t.numel() * t.element_size() for t in tensors)
        return tensors


# --8<-- [end:channel]


# --8<-- [start:p2p-teachers]
class P2PTeachers:
    """A student's teachers over point-to-point messages (lesson 06), as train.train_student
    asks for them (train.Teachers): ids go out with isend, answers come back with recv, and
    STOP tells the teachers that the session is over."""

    def __init__(self, device: torch.device, rank: int, layout: Layout, groups: Groups):
        unit, self.group = unit_of(rank, layout, groups)
        self.rank, self.ranks = rank, unit.teachers
        self.channel = Channel(device, layout.name)

    @property
    def sent(self) -> int:
        return self.channel.sent

    @property
    def received(self) -> int:
        return self.channel.received

    def lm_head(self) -> torch.Tensor:
        return self.channel.recv(self.ranks[0], self.group)[0]

    def ask(self, blocks: list[torch.Tensor], record: bool) -> list:
        """Start sending each teacher its block; returns the requests, for collect()."""
        return [(t, self.channel.send([b], t, self.group)) for t, b in zip(self.ranks, blocks)]

    def collect(self, sending: list, step: int) -> list[list[torch.Tensor]]:
        for teacher, requests in sending:
            self.channel.wait(requests, teacher)
        answers = [self.channel.recv(t, self.group) for t in self.ranks]
        if any(a is None for a in answers):
            raise RuntimeError(f"rank {self.rank}: a teacher sent STOP; only students send it")
        return answers

    def done(self) -> None:
        for teacher in self.ranks:
            self.channel.send_stop(teacher, self.group)

    def at_step(self, err: PeerLost, step: int) -> str:
        return f"{err} at step {step}"


# --8<-- [end:p2p-teachers]


def average_(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Replace each tensor by its mean over `group`, with one all_reduce for all of them."""
    bucket = torch.cat([t.reshape(-1).float() for t in tensors])
    try:
        dist.all_reduce(bucket, group=group)  # SUM over the group's ranks only
    except RuntimeError as err:
        raise PeerLost(
            f"a rank left the all_reduce ({str(err).split('] ')[-1].split('. ')[0]})"
        ) from None
    bucket /= dist.get_world_size(group)
    for t, mean in zip(tensors, bucket.split([t.numel() for t in tensors])):
        t.copy_(mean.view_as(t))


def broadcast_(module: torch.nn.Module, src: int, group: dist.ProcessGroup | None) -> None:
    """Every rank of `group` ends with `src`'s weights of `module`."""
    try:
        for param in module.parameters():
            dist.broadcast(param.data, src, group=group)
    except RuntimeError as err:
        raise PeerLost(
            f"a rank left the broadcast of the teacher's weights "
            f"({str(err).split('] ')[-1].split('. ')[0]})"
        ) from None
