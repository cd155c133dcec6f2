"""distill_demo - lesson 06 grown into a distillation trainer: transformer teacher and student,
any teachers:students ratio, three ways to ship the teacher's knowledge, and a benchmark.

Run it (from the repository root)
    torchrun --nproc-per-node 4 -m distill_demo                     # 2 teachers, 2 students
    torchrun --nproc-per-node 4 -m distill_demo --ratio 1:3 --transfer topk --topk 8
    torchrun --nproc-per-node 2 -m distill_demo --bench             # every mode, overlap on/off
    python -m distill_demo --nproc 4                                # plain python starts torchrun
    On 2 GPUs (1 teacher : 1 student), the benchmark at a realistic size:
    torchrun --nproc-per-node 2 -m distill_demo --bench --size large --vocab 131072 \\
             --seq 2048 --batch 2 --topk 64 --out bench/

What you should see
    The mapping of teachers to students, a progress bar on rank 0 (a line every tenth of the
    run when the output is not a terminal), the bytes each step moved, then "checked: ..."
    lines (the bytes, the loss fell, the students agree, the teachers answered every step; the
    losses and weights match one process doing it all). --bench prints a table: step time and
    bytes per step for each transfer mode, with overlap on and off. Figures go to --out (out/):
    06_demo_loss.png and 06_demo_timeline.png; with --bench, 06_demo_bench.png and
    06_demo_bench_timeline.png.
Modules: models.py, data.py (importable on their own), knowledge.py (what is sent, the losses),
comms.py (who talks to whom, the protocol), startup.py (waiting for the teacher's model),
train.py (the steps), reference.py (one process doing it all, to compare with), bench.py,
report.py.
Setup and printing come from course/ranks.py.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from course import watch
from course.plots import plot_losses
from course.ranks import parser, print0, print_rank, setup, spread, usage_error
from distill_demo.bench import run_bench
from distill_demo.comms import (
    HEADER_BYTES,
    Groups,
    Layout,
    P2PTeachers,
    PeerLost,
    make_groups,
    parse_ratio,
)
from distill_demo.knowledge import bytes_per_token
from distill_demo.models import SIZES
from distill_demo.reference import check_against_reference, train_reference
from distill_demo.report import CheckFailed, Progress, Timeline, check_loss_fell, plot_timelines
from distill_demo.startup import Preparation, StorePreparation
from distill_demo.train import (
    Batches,
    Config,
    Result,
    Session,
    add_training_flags,
    new_student,
    prepare_teacher,
    teacher_session,
    train_student,
    training_defaults,
    training_flag_errors,
)

TIMELINE_STEPS = 3  # the last steps of a run go on the timeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.prog = "python -m distill_demo"  # not __main__.py
    p.add_argument("--ratio", default="1:1", help="teachers:students, e.g. 1:1, 1:3, 3:1 (1:1)")
    add_training_flags(p, "the teacher")
    p.add_argument(
        "--overlap",
        choices=["on", "off"],
        default="on",
        help="student computes while its teachers do, and asks for the next step early (on)",
    )
    p.add_argument("--bench", action="store_true", help="time every mode, overlap on and off")
    p.add_argument("--warmup", type=int, default=3, help="--bench: untimed steps first (3)")
    p.add_argument("--repeats", type=int, default=10, help="--bench: timed steps, median (10)")
    p.add_argument("--save", help="write the trained student's weights to this file (rank 0)")
    return training_defaults(p.parse_args(argv))


def validate(args: argparse.Namespace, world_size: int) -> Layout:
    """Every mistake in the flags, said on every rank before any rank joins the group."""
    try:
        layout = Layout(world_size, *parse_ratio(args.ratio))
    except ValueError as err:
        usage_error(str(err))
    per_student = len(layout.units[0].teachers)
    for bad, message in training_flag_errors(args, per_student) + [
        (
            args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.teacher_steps < 0,
            "--steps and --repeats must be at least 1, --warmup and --teacher-steps at least 0",
        ),
    ]:
        if bad:
            usage_error(message)
    return layout


def preparation(layout: Layout, rank: int, timeout_s: float) -> Preparation:
    """The wait for the first teacher's model (startup.py), on torchrun's store: every rank
    reaches it, and the agent that hosts it outlives any rank."""

    def connect():  # run_store: a client of torchrun's store, under this run's prefix
        return dist.PrefixStore("distill_demo/prepare/", watch.run_store(timeout_s))

    return StorePreparation(connect, layout.name(layout.teachers[0]), timeout_s, say=rank == 0)


def train(
    args: argparse.Namespace,
    cfg: Config,
    rank: int,
    layout: Layout,
    groups: Groups,
    prepared: Preparation,
) -> None:
    """One training run; rank 0 reports what it did, checks it and draws it."""
    session = Session(
        args.transfer,
        args.overlap == "on",
        args.steps,
        record=range(max(0, args.steps - TIMELINE_STEPS), args.steps),
    )
    timeline = Timeline(cfg.device)
    result = answered = student = None
    if rank in layout.students:
        prepared.wait()  # for the teacher's model, however long it takes: not in the first recv
        student, optimizer = new_student(cfg)
        progress = Progress(args.steps, "train") if rank == 0 else None
        teachers = P2PTeachers(cfg.device, rank, layout, groups)  # lesson 06: isend, recv
        batches = Batches(cfg, layout.students.index(rank))
        on_step = progress and (lambda step, loss: progress.update(step, loss=loss))
        result = train_student(
            cfg, session, student, optimizer, teachers, batches, timeline, groups.students, on_step
        )
        weights = torch.cat([p.detach().reshape(-1) for p in student.parameters()])
        gap = spread(weights, groups.students)  # max - min over the students: 0 if all agree
        assert gap == 0.0, f"rank {rank}: student weights differ across students by {gap}"
    else:
        teacher = prepare_teacher(cfg, rank, layout.teachers[0], groups.teachers, prepared)
        answered = teacher_session(cfg, session, teacher, rank, layout, groups, timeline)
    everyone = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((answered, timeline.take()), everyone, dst=0)
    if rank == 0:
        report(args, cfg, layout, result, student, everyone)
        if args.save:
            torch.save(student.state_dict(), args.save)
            print0(f"saved the student's weights to {args.save}")


def report(
    args: argparse.Namespace,
    cfg: Config,
    layout: Layout,
    result: Result,
    student: torch.nn.Module,
    everyone: list,
) -> None:
    """Rank 0: the bytes, the checks and the figures. student: rank 0's, trained;
    everyone: (answered, timeline) per rank."""
    tokens = args.batch * args.seq
    teacher_dim = SIZES[args.size]["teacher"][0]
    per_token = bytes_per_token(
        args.transfer, args.vocab, args.topk, teacher_dim, torch.finfo(cfg.dtype).bits // 8
    )
    n_teachers = len(layout.units[0].teachers)
    print0(
        f"bytes per step per student: {result.bytes_in:,.0f} from its teachers, "
        f"{result.bytes_out:,.0f} to them (ids)"
    )
    expected = tokens * per_token + n_teachers * HEADER_BYTES  # a header per answer
    assert result.bytes_in == expected, f"rank 0: {result.bytes_in} bytes a step, not {expected}"
    print0(
        f"checked: that is {tokens} tokens x {per_token:,} bytes ({args.transfer}) + "
        f"{n_teachers} header{'s' * (n_teachers > 1)}, as knowledge.bytes_per_token says"
    )
    losses = result.losses
    check_loss_fell(losses, args)
    print0(
        "checked: every student holds the same weights (spread 0 over the student group "
        f"of {len(layout.students)})"
    )
    answered = [everyone[t][0] for t in layout.teachers]
    assert answered == [args.steps] * len(layout.teachers), f"rank 0: teachers answered {answered}"
    print0(f"checked: each teacher answered {args.steps} steps and stopped on the stop message")
    # The mean loss it printed and the weights, against one process doing all of it (at the
    # tiny default a second; at --size large it pretrains the teacher again: minutes on a GPU).
    ref_losses, ref_student = train_reference(cfg, args.transfer, len(layout.students), args.steps)
    check_against_reference(cfg, losses, student, ref_losses, ref_student)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = (
        f"{args.transfer}, overlap {args.overlap}, {layout.ratio[0]}:{layout.ratio[1]} "
        f"on {dist.get_world_size()} ranks ({cfg.device.type})"
    )
    plot_losses({args.transfer: losses}, out / "06_demo_loss.png", f"distill_demo: {title}")
    plot_timelines(
        {f"last {TIMELINE_STEPS} steps": {r: e for r, (_, e) in enumerate(everyone)}},
        {r: layout.name(r) for r in range(len(everyone))},
        out / "06_demo_timeline.png",
        f"distill_demo: {title}",
    )
    print0(f"figures: {out / '06_demo_loss.png'}, {out / '06_demo_timeline.png'}")


def main() -> None:
    args = parse_args()
    layout = validate(args, int(os.environ.get("WORLD_SIZE", args.nproc)))
    with setup(args, relaunch=True, trace=args.trace) as ctx:
        if ctx.device.type == "cuda" and not args.bench:
            # A run is checked step by step against one process (report): on a GPU that needs
            # deterministic kernels, as rpc_demo found (cuDNN attention's backward is not, and
            # at --size large its rounding grew into loss gaps of tens of percent in 5 steps).
            # --bench is not checked so: it measures the fast kernels.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any matmul
            torch.use_deterministic_algorithms(True)
        cfg = Config.from_args(args, ctx.device)
        groups = make_groups(layout, ctx.timeout)
        prepared = preparation(layout, ctx.rank, ctx.timeout.total_seconds())
        for line in layout.describe():
            print0(line)
        teacher, student = SIZES[args.size]["teacher"], SIZES[args.size]["student"]
        print0(
            f"models ({args.size}): teacher {teacher[1]} layers x {teacher[0]}, student "
            f"{student[1]} x {student[0]}; vocab {args.vocab}, seq {args.seq}, batch "
            f"{args.batch} per student; {str(cfg.dtype).removeprefix('torch.')}"
        )
        try:
            if args.bench:
                run_bench(args, cfg, ctx.rank, layout, groups, prepared)
            else:
                train(args, cfg, ctx.rank, layout, groups, prepared)
        except (PeerLost, CheckFailed) as err:  # one line naming it, not a traceback per rank
            print_rank(f"error: {err}")
            raise SystemExit(1) from None


if __name__ == "__main__":
    main()
