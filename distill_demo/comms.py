"""Communication for distill_demo, kept apart from the training logic in train.py.

- Layout: which ranks teach and which learn for a teachers:students ratio, and who serves whom
- make_groups: the groups every rank creates, all of them, in one order
- Channel: messages of one or two tensors between two ranks - lesson 02's shape handshake
  (header, then payload) grown to several tensors, with lesson 06's STOP message. It counts
  the bytes it moves and turns a peer's broken connection into PeerLost, naming that peer.
- average_: one bucketed all_reduce for a list of tensors (lesson 06's exercise 06.1)
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

TENSOR, STOP = 20_202, 20_204  # message kinds, as in lessons 02 and 06
MAX_TENSORS, MAX_DIMS = 2, 4
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
          torch.int32)  # dtype code = position, as in lesson 02
# [kind, number of tensors, then per tensor: dtype code, ndim, MAX_DIMS sizes]
HEADER_LEN = 2 + MAX_TENSORS * (2 + MAX_DIMS)
HEADER_BYTES = HEADER_LEN * 8  # int64s


class PeerLost(RuntimeError):
    """A rank this one was talking to is gone (its process died or left without STOP)."""


def parse_ratio(text: str) -> tuple[int, int]:
    """"1:3" -> (1, 3): teachers to students. ValueError with the reason if it is not one."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--ratio {text}: write it as TEACHERS:STUDENTS with two positive "
                         "whole numbers, e.g. 1:1, 1:3 or 3:1")
    return int(parts[0]), int(parts[1])


class Unit(NamedTuple):
    """Teachers and students that work together: each student splits its batch's rows over
    the unit's teachers; each teacher answers every student of its unit."""
    teachers: list
    students: list


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
                f"-m distill_demo --ratio {teachers}:{students}")
        n_units = world_size // (per_t + per_s)
        self.students = list(range(n_units * per_s))
        self.teachers = list(range(n_units * per_s, world_size))
        self.units = [Unit(self.teachers[u * per_t:(u + 1) * per_t],
                           self.students[u * per_s:(u + 1) * per_s]) for u in range(n_units)]

    def unit_of(self, rank: int) -> int:
        return next(i for i, u in enumerate(self.units) if rank in u.teachers + u.students)

    def name(self, rank: int) -> str:
        return f"{'student' if rank in self.students else 'teacher'} rank {rank}"

    def describe(self) -> list[str]:
        t, s = self.ratio
        lines = [f"teachers:students {t}:{s} on {len(self.teachers) + len(self.students)} ranks: "
                 f"{count(len(self.teachers), 'teacher')}, {count(len(self.students), 'student')}"]
        for unit in self.units:
            how = "its batch's rows split over them" if len(unit.teachers) > 1 else "whole batches"
            lines.append(f"  {'teachers' if len(unit.teachers) > 1 else 'teacher'} "
                         f"{', '.join(map(str, unit.teachers))} -> "
                         f"{'students' if len(unit.students) > 1 else 'student'} "
                         f"{', '.join(map(str, unit.students))} ({how})")
        return lines
# --8<-- [end:layout]


def count(n: int, thing: str) -> str:
    return f"{n} {thing}{'s' * (n != 1)}"


class Groups(NamedTuple):
    students: object  # the students' data-parallel group: gradients are averaged here
    teachers: object  # the teachers: the first one's weights are broadcast to the others
    units: list  # one per unit: its teachers and students, for their point-to-point messages


def make_groups(layout: Layout, timeout) -> Groups:
    """Every rank creates every group, in the same order, including those it is not in. Each
    gets `timeout` (the world's): a group made without one waits torch's default (10 min NCCL)."""
    students = dist.new_group(layout.students, timeout=timeout)
    teachers = dist.new_group(layout.teachers, timeout=timeout)
    units = [dist.new_group(sorted(u.teachers + u.students), timeout=timeout) for u in layout.units]
    return Groups(students, teachers, units)


# --8<-- [start:channel]
class Channel:
    """Point-to-point messages for one rank: a header, then up to MAX_TENSORS payloads."""

    def __init__(self, device: torch.device, name=str):
        self.device, self.name = device, name  # name(rank): how to call a peer in an error
        self.sent = self.received = 0  # bytes, headers included

    @contextlib.contextmanager
    def talking_to(self, peer: int, doing: str):
        """A dead peer's connection closes: gloo fails the next send or recv at once (NCCL
        when --timeout runs out, if torchrun has not stopped the run first)."""
        try:
            yield
        except RuntimeError as err:
            why = str(err).split("] ")[-1].split(". ")[0]  # gloo: "[...pair.cc:553] Connection..."
            raise PeerLost(f"{self.name(peer)} {doing} ({why})") from None

    def send(self, tensors: list, dst: int, group) -> list:
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

    def wait(self, requests: list, peer: int):
        with self.talking_to(peer, "stopped receiving"):
            for request in requests:
                request.wait()

    def send_stop(self, dst: int, group):
        self.sent += HEADER_BYTES
        with self.talking_to(dst, "stopped receiving"):
            dist.send(torch.full((HEADER_LEN,), STOP, dtype=torch.int64, device=self.device),
                      dst, group)

    def recv(self, src: int, group, lost: str = "stopped answering"):
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
                dtype, ndim, *sizes = header[2 + i * (2 + MAX_DIMS):2 + (i + 1) * (2 + MAX_DIMS)]
                tensors.append(torch.empty(sizes[:ndim], dtype=DTYPES[dtype], device=self.device))
                dist.recv(tensors[-1], src, group)
        self.received += HEADER_BYTES + sum(t.numel() * t.element_size() for t in tensors)
        return tensors
# --8<-- [end:channel]


def average_(tensors: list, group) -> None:
    """Replace each tensor by its mean over `group`, with one all_reduce for all of them."""
    bucket = torch.cat([t.reshape(-1).float() for t in tensors])
    try:
        dist.all_reduce(bucket, group=group)  # SUM over the group's ranks only
    except RuntimeError as err:
        raise PeerLost(f"a rank left the all_reduce ({str(err).split('] ')[-1].split('. ')[0]})"
                       ) from None
    bucket /= dist.get_world_size(group)
    for t, mean in zip(tensors, bucket.split([t.numel() for t in tensors])):
        t.copy_(mean.view_as(t))


def broadcast_(module: torch.nn.Module, src: int, group) -> None:
    """Every rank of `group` ends with `src`'s weights of `module`."""
    for param in module.parameters():
        dist.broadcast(param.data, src, group=group)
