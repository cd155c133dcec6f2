"""The training logic of distill_demo: what a student and a teacher do each step. What a teacher
sends and the loss a student takes come from knowledge.py; how a student reaches its teachers is
a Teachers (comms.P2PTeachers here, over lesson 06's messages; rpc_demo's RpcTeachers over RPC),
the one thing that differs between the two demos.

A student, each step: asks its teachers (each gets a block of its batch's rows), runs its own
forward pass while they work, collects their answers, takes the loss, backpropagates, averages
gradients (and the loss) over the students in one all_reduce, and steps AdamW. With overlap on,
it also sends the next step's ids before its backward pass, so the teachers compute the next
answer while it trains on this one. A teacher answers until every student of its unit says STOP.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course.ranks import print_rank
from distill_demo.comms import Channel, Groups, Layout, PeerLost, average_, broadcast_, unit_of
from distill_demo.data import MarkovData
from distill_demo.knowledge import MODES, student_loss, teacher_message
from distill_demo.models import SIZES, TinyTransformer, make_student, make_teacher
from distill_demo.report import Timeline
from distill_demo.startup import Preparation

PRETRAIN_SHARD = 1_000_000  # the teacher's own data: never a student's shard


# --8<-- [start:recipes]
class Recipe(NamedTuple):
    """How a size trains. Larger models need smaller steps, and a 32768-token vocabulary needs
    more pretraining: tools/gpu/recipe_probe.py measured these (docs/distill_demo.md)."""

    teacher_lr: float  # the teacher's AdamW step size while it pretrains
    warmup: int  # its steps of linear warm-up to teacher_lr (large models diverge without)
    teacher_steps: int  # the default --teacher-steps
    student_lr: float  # the default --lr


RECIPES = {
    "tiny": Recipe(1e-2, 0, 60, 1e-2),
    "small": Recipe(1e-3, 0, 60, 3e-3),
    "large": Recipe(3e-4, 10, 200, 3e-4),
}
# --8<-- [end:recipes]


def add_training_flags(p: argparse.ArgumentParser, pretrains: str) -> None:
    """The flags distill_demo and rpc_demo share: what the teachers send, the models, the data.
    pretrains: which teacher trains first ("the teacher", "the first teacher")."""
    p.add_argument(
        "--transfer",
        choices=MODES,
        default="full",
        help="what the teachers send: full probabilities, top-k logits, or hidden states (full)",
    )
    p.add_argument("--topk", type=int, default=8, help="k for --transfer topk (8)")
    p.add_argument("--steps", type=int, default=60, help="training steps (60)")
    p.add_argument(
        "--teacher-steps",
        type=int,
        default=None,
        help=f"steps {pretrains} trains on the data first (60, 200 with --size large; 0 with "
        "--bench)",
    )
    p.add_argument("--size", choices=list(SIZES), default="tiny", help="model sizes (tiny)")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary size (256)")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence (32)")
    p.add_argument("--batch", type=int, default=8, help="sequences per student per step (8)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="the students' AdamW step size (0.01; small 0.003, large 0.0003)",
    )


def training_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The defaults that depend on other flags: the size's recipe, and no pretraining to time."""
    if args.teacher_steps is None:
        args.teacher_steps = 0 if args.bench else RECIPES[args.size].teacher_steps
    if args.lr is None:
        args.lr = RECIPES[args.size].student_lr
    return args


def training_flag_errors(args: argparse.Namespace, per_student: int) -> list[tuple[bool, str]]:
    """(wrong?, what to say) for the shared flags; per_student: teachers each student has.
    Found before any rank trains: a bad --out or --save would otherwise fail after the whole
    run, and a bad --lr as AdamW's traceback on one rank, which its peers then blame."""
    save = Path(args.save or ".")  # looked at only with --save
    return [
        (args.vocab < 2, f"--vocab {args.vocab}: a vocabulary needs at least 2 tokens"),
        (args.seq < 2, f"--seq {args.seq}: sequences need at least 2 tokens"),
        (
            not 1 <= args.topk <= args.vocab,
            f"--topk {args.topk} must be between 1 and --vocab {args.vocab}: top-k keeps the k "
            f"largest of the {args.vocab} logits. Try --topk {min(8, args.vocab)}",
        ),
        (
            args.batch < per_student,
            f"--batch {args.batch}: each student splits its batch's rows over its {per_student} "
            f"teachers, so it needs at least {per_student} rows",
        ),
        (
            not (args.lr > 0 and math.isfinite(args.lr)),
            f"--lr {args.lr:g}: the students' step size must be a number above 0, e.g. --lr "
            f"{RECIPES[args.size].student_lr:g} (--size {args.size}'s)",
        ),
        (
            Path(args.out).exists() and not Path(args.out).is_dir(),
            f"--out {args.out} is a file: --out names the folder the figures go to",
        ),
        (
            bool(args.save) and args.bench,
            "--save is for training runs: --bench trains a fresh student for every setting and "
            "keeps none of them. Leave out --save or --bench",
        ),
        (
            bool(args.save) and not save.parent.is_dir(),
            f"--save {args.save}: there is no folder {save.parent}. Create it, or "
            "save somewhere else",
        ),
        (
            bool(args.save) and save.is_dir(),
            f"--save {args.save} is a folder: give the file to write, e.g. {save / 'student.pt'}",
        ),
    ]


@dataclass(frozen=True)
class Config:
    """What training needs to know, fixed for a whole run: the flags that shape it, and the
    device. Both demos make one from their flags; the single-process reference takes one too."""

    size: str  # the models' size (models.SIZES)
    vocab: int
    seq: int  # tokens per sequence
    batch: int  # sequences per student per step
    lr: float  # the students' AdamW step size
    topk: int  # k for --transfer topk
    teacher_steps: int  # the first teacher pretrains this many steps
    device: torch.device

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> Config:
        """Each field from the flag of its name (--teacher-steps: args.teacher_steps)."""
        flags = [f.name for f in fields(cls) if f.name != "device"]
        return cls(**{name: getattr(args, name) for name in flags}, device=device)

    @property
    def dtype(self) -> torch.dtype:  # what the teacher computes in, and the student's autocast
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)


@dataclass(frozen=True)
class Session:
    """A stretch of training with one setting; the benchmark runs several, one after another."""

    mode: str  # "full", "topk" or "hidden": see knowledge.py
    overlap: bool
    steps: int
    record: range = range(0)  # steps whose phases go on the timeline
    timed: bool = False  # synchronize at each step's end, so step times are the GPU's


@dataclass
class Result:
    losses: list[float] = field(default_factory=list)  # mean over the students, per step
    seconds: list[float] = field(default_factory=list)  # per step
    bytes_in: float = 0.0  # per step: the teachers' answers (over p2p, headers included)
    bytes_out: float = 0.0  # per step: the ids sent to the teachers


class Batches:
    """One student's batches (its shard of the data), on its device. cycle > 0: only that many
    distinct steps, made once and reused, so that a benchmark's data costs nothing."""

    def __init__(self, cfg: Config, shard: int, cycle: int = 0):
        self.data, self.size, self.device = MarkovData(cfg.vocab, cfg.seq), cfg.batch, cfg.device
        self.shard, self.cycle, self.made = shard, cycle, {}

    def __call__(self, step: int) -> torch.Tensor:
        if not self.cycle:
            return self.data.batch(step, self.shard, self.size).to(self.device)
        step %= self.cycle
        if step not in self.made:
            self.made[step] = self.data.batch(step, self.shard, self.size).to(self.device)
        return self.made[step]


class Teachers(Protocol):
    """How a student reaches its teachers: the one thing that differs between distill_demo
    (comms.P2PTeachers, isend/irecv) and rpc_demo (rpc_demo.student.RpcTeachers, RPC)."""

    ranks: list[int]  # the student's teachers: each gets a block of the batch's rows
    sent: int  # bytes sent to them so far
    received: int  # bytes received from them so far

    def lm_head(self) -> torch.Tensor:
        """The first teacher's lm_head weight (--transfer hidden), once a session."""

    def ask(self, blocks: list[torch.Tensor], record: bool) -> object:
        """Start sending teacher i blocks[i]; returns at once, with what collect() needs.
        `record`: that step is on the timeline."""

    def collect(self, asked: object, step: int) -> list[list[torch.Tensor]]:
        """Wait for what `asked` asked for: each teacher's answer (knowledge.teacher_message)."""

    def done(self) -> None:
        """The session is over."""

    def at_step(self, err: PeerLost, step: int) -> str:
        """What to say of `err` (a peer that left), which happened at `step`."""


def pretrain(
    teacher: torch.nn.Module,
    data: MarkovData,
    size: str,
    steps: int,
    batch: int,
    device: torch.device | str,
    lr: float | None = None,
    warmup: int | None = None,
) -> list[float]:
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


def prepare_teacher(
    cfg: Config, rank: int, first: int, group: dist.ProcessGroup | None, prepared: Preparation
) -> TinyTransformer:
    """Rank `first` trains the teacher on the data for --teacher-steps (a real run would load a
    checkpoint), then hands its weights to every other rank of `group` (None: the default
    world). `rank` and `first` count in the default world. The others wait for it on
    `prepared` (startup.py), not in the broadcast: preparing may take longer than --timeout."""
    teacher = make_teacher(cfg.size, cfg.vocab, cfg.seq).to(cfg.device)
    if rank == first:
        with prepared.preparing():
            if cfg.teacher_steps:
                data = MarkovData(cfg.vocab, cfg.seq)
                losses = pretrain(teacher, data, cfg.size, cfg.teacher_steps, cfg.batch, cfg.device)
                print_rank(
                    f"teacher pretrained for {cfg.teacher_steps} steps: next-token loss "
                    f"{losses[0]:.2f} -> {losses[-1]:.2f} (the data's entropy: "
                    f"{data.entropy():.2f})"
                )
    else:
        prepared.wait()
    broadcast_(teacher, first, group)  # every teacher answers alike
    return teacher.to(cfg.dtype).eval()


def new_student(cfg: Config) -> tuple[TinyTransformer, torch.optim.Optimizer]:
    student = make_student(cfg.size, cfg.vocab, cfg.seq).to(cfg.device)
    return student, torch.optim.AdamW(student.parameters(), lr=cfg.lr)


# --8<-- [start:student]
def train_student(
    cfg: Config,
    session: Session,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    teachers: Teachers,
    batches: Batches,
    timeline: Timeline,
    group: dist.ProcessGroup | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Result:
    """`session.steps` steps of one student, its gradients averaged over `group` (the
    students). Returns the mean loss over the students per step, step times, bytes moved."""
    phase, result, params = timeline.phase, Result(), list(student.parameters())
    lm_head = None
    if session.mode == "hidden":  # once per session: the teacher's lm_head, to form its logits
        lm_head = teachers.lm_head()

    def ask(step):
        """Send this step's ids, a block of rows to each teacher; returns (ids, requests)."""
        ids = batches(step)
        return ids, teachers.ask(ids.tensor_split(len(teachers.ranks)), step in session.record)

    def collect(asked, step):
        """The teachers' answers, their row blocks put back together."""
        answers = teachers.collect(asked, step)
        return [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*answers)]

    def train_step(step, pending):
        """One step. `pending`: this step's request, if sent early. Returns the next one's."""
        with cfg.autocast():
            if session.overlap:
                ids, asked = pending
                with phase("forward"):
                    logits = student(ids)  # the teachers compute this step's answer meanwhile
                with phase("wait teacher"):
                    message = collect(asked, step)
                if step + 1 < session.steps:
                    with phase("send ids"):  # they start on the next step during my backward
                        pending = ask(step + 1)
            else:
                with phase("send ids"):
                    ids, asked = ask(step)
                with phase("wait teacher"):
                    message = collect(asked, step)
                with phase("forward"):
                    logits = student(ids)
        with phase("loss+backward"):
            loss = student_loss(session.mode, logits, message, lm_head)
            loss.backward()
        mean_loss = loss.detach().reshape(1)
        with phase("all_reduce"):  # the loss rides along with the gradients: one collective
            average_([p.grad for p in params] + [mean_loss], group)
        with phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
        result.losses.append(mean_loss.item())  # waits for the GPU: the step is done
        return pending

    sent, received, step = teachers.sent, teachers.received, 0
    try:
        pending = ask(0) if session.overlap else None
        for step in range(session.steps):
            timeline.recording = step in session.record
            start = time.perf_counter()
            pending = train_step(step, pending)
            if session.timed and cfg.device.type == "cuda":
                torch.cuda.synchronize()
            result.seconds.append(time.perf_counter() - start)
            if on_step:
                on_step(step + 1, result.losses[-1])
        result.bytes_out = (teachers.sent - sent) / session.steps
        result.bytes_in = (teachers.received - received) / session.steps
        teachers.done()
    except PeerLost as err:  # say when, too
        raise PeerLost(teachers.at_step(err, step + 1)) from None
    timeline.recording = False
    return result


# --8<-- [end:student]


# --8<-- [start:teacher]
def teacher_session(
    cfg: Config,
    session: Session,
    teacher: torch.nn.Module,
    rank: int,
    layout: Layout,
    groups: Groups,
    timeline: Timeline,
) -> int:
    """Answer the unit's students until they all send STOP; returns the steps answered."""
    unit, group = unit_of(rank, layout, groups)
    channel, phase = Channel(cfg.device, layout.name), timeline.phase
    if session.mode == "hidden" and rank == unit.teachers[0]:
        for student in unit.students:  # the lm_head goes once; then only hidden states travel
            channel.wait(channel.send([teacher.lm_head.weight.detach()], student, group), student)

    def receive():
        requests = [channel.recv(s, group, "left without sending STOP") for s in unit.students]
        if all(r is None for r in requests):
            return None
        if any(r is None for r in requests):
            raise RuntimeError(f"rank {rank}: some students sent STOP and others did not")
        return [r[0] for r in requests]

    answered = 0
    timeline.recording = 0 in session.record
    with phase("wait students"):
        requests = receive()
    while requests is not None:
        with phase("forward"):  # all of the unit's rows in one forward pass
            message = teacher_message(session.mode, teacher, torch.cat(requests), cfg.topk)
        with phase("answer"):
            rows = [len(r) for r in requests]
            parts = [m.split(rows) for m in message]
            sending = [
                (s, channel.send([p[i] for p in parts], s, group))
                for i, s in enumerate(unit.students)
            ]
            for student, works in sending:
                channel.wait(works, student)
        answered += 1
        timeline.recording = answered in session.record
        with phase("wait students"):
            requests = receive()
    timeline.recording = False
    return answered


# --8<-- [end:teacher]
