"""One process of rpc_demo, started by the launcher: a student or a teacher, from start to end.

    students' world (process group)     RPC world (all)      teachers' world (process group)
    student0 ... student{S-1}  <-- rpc_async(answer) -->     teacher0 ... teacher{T-1}
    all_reduce of gradients                                  broadcast of the teacher's weights

A process's rank in the RPC world is its global number (students first, as in distill_demo);
its rank in its role's world counts from 0 there. "[rank N]" in the output is the global one.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
from pathlib import Path

import torch

from course.plots import plot_losses
from course.ranks import print0, print_rank
from distill_demo.comms import Layout, PeerLost, count
from distill_demo.knowledge import bytes_per_token
from distill_demo.models import SIZES
from distill_demo.reference import check_against_reference, train_reference
from distill_demo.report import CheckFailed, Progress, check_loss_fell, plot_timelines
from distill_demo.train import Batches, Config, Session
from rpc_demo import bench
from rpc_demo.roles import Outcome, student_role, teacher_role
from rpc_demo.worlds import DONE, STARTING, Failed, Roll, Worker, gpu_index, worker_name

TIMELINE_STEPS = 3  # the last steps of a training run go on the timeline


def run_worker(
    rank: int, args: argparse.Namespace, backend: str, ports: list[dict[str, int]], roll: Roll
) -> None:
    """The launcher's child number `rank`: the whole life of one student or teacher."""
    os.environ["RANK"] = str(rank)  # print_rank writes "[rank N]" from it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the launcher, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the launcher's handler, inherited by fork
    if "COURSE_STACK_DIR" in os.environ:  # under course.launcher: say where we were if stopped
        stacks = open(
            Path(os.environ["COURSE_STACK_DIR"]) / f"rank{rank}.{os.getpid()}.txt", "w"
        )  # open for the process's lifetime
        faulthandler.register(signal.SIGTERM, file=stacks, all_threads=True, chain=True)
    roll[rank] = STARTING
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # one machine: every gloo group listens on loopback
    layout = Layout(args.students + args.teachers, args.teachers, args.students)
    device = (
        torch.device("cuda", gpu_index(layout, rank)) if backend == "nccl" else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)  # one machine: GPU index = rank, or shared (gpu_index)
        # Runs are checked step by step against one process (and the benchmark's p2p and RPC
        # halves against each other): on a GPU that needs deterministic kernels. Strict, not
        # warn_only: cuDNN attention's backward is otherwise non-deterministic, and at
        # --size large its rounding grew into loss differences of tens of percent within 5
        # steps (1xH100; strict: bitwise equal, docs/rpc_demo.md).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first matmul
        torch.use_deterministic_algorithms(True)
    else:  # one thread per process, as torchrun does: the processes share the cores
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    me = Worker(
        rank,
        layout,
        Config.from_args(args, device),
        args.timeout,
        args.rpc_timeout,
        args.rpc_transport,
    )
    try:
        if args.bench:
            bench.run_bench(args, me, backend, ports, roll)
        else:
            train(args, me, backend, ports[0], roll)
    except (Failed, PeerLost, CheckFailed) as err:  # one line naming what went wrong
        print_rank(f"error: {worker_name(layout, rank)}: {err}")
        raise SystemExit(1) from None
    roll[rank] = DONE


def train(
    args: argparse.Namespace, me: Worker, backend: str, ports: dict[str, int], roll: Roll
) -> None:
    """The training run: students learn over RPC; rank 0 reports, checks and draws."""
    layout = me.layout
    session = Session(
        args.transfer,
        True,
        args.steps,
        record=range(max(0, args.steps - TIMELINE_STEPS), args.steps),
    )
    if me.rank not in layout.students:
        fault = args.fault if me.rank == layout.teachers[-1] else "none"
        return teacher_role(me, ports, roll, fault)
    progress = None
    if me.rank == 0:
        describe(args, me, backend, ports)
        progress = Progress(args.steps, "train")
    got = student_role(
        me,
        ports,
        roll,
        session,
        Batches(me.cfg, layout.students.index(me.rank)),
        progress and (lambda step, loss: progress.update(step, loss=loss)),
    )
    if me.rank == 0:
        report(args, me, got)


def describe(args: argparse.Namespace, me: Worker, backend: str, ports: dict[str, int]) -> None:
    layout = me.layout
    for line in layout.describe():
        print0(line)
    print0(
        f"worlds: students' (ranks {', '.join(map(str, layout.students))}) and teachers' "
        f"(ranks {', '.join(map(str, layout.teachers))}), each a process group of its own; "
        f"RPC joins all {len(me.names)}: {', '.join(me.names)}"
    )
    print0(
        f"ports: students' world {ports['students']}, teachers' world {ports['teachers']}, "
        f"RPC {ports['rpc']}"
    )
    teacher, student = SIZES[args.size]["teacher"], SIZES[args.size]["student"]
    print0(
        f"models ({args.size}): teacher {teacher[1]} layers x {teacher[0]}, student "
        f"{student[1]} x {student[0]}; vocab {args.vocab}, seq {args.seq}, batch {args.batch} "
        f"per student; {str(me.cfg.dtype).removeprefix('torch.')}, {backend} on "
        f"{me.device.type}"
    )


def report(args: argparse.Namespace, me: Worker, outcome: Outcome) -> None:
    """Rank 0: what the run did, checked against one process doing all of it."""
    layout, result, timelines = me.layout, outcome.result, outcome.timelines
    tokens = args.batch * args.seq
    per_token = bytes_per_token(
        args.transfer,
        args.vocab,
        args.topk,
        SIZES[args.size]["teacher"][0],
        torch.finfo(me.cfg.dtype).bits // 8,
    )
    print0(
        f"bytes per step per student: {result.bytes_in:,.0f} from its teachers, "
        f"{result.bytes_out:,.0f} to them (tensor payloads; RPC adds its own framing)"
    )
    assert result.bytes_in == tokens * per_token, f"rank 0: {result.bytes_in} bytes a step"
    print0(
        f"checked: that is {tokens} tokens x {per_token:,} bytes ({args.transfer}), as "
        "knowledge.bytes_per_token says"
    )
    losses = result.losses
    check_loss_fell(losses, args)
    print0(
        "checked: every student holds the same weights (spread 0 over the students' world "
        f"of {len(layout.students)})"
    )
    for teacher, per_student in outcome.answered.items():
        assert set(per_student.values()) == {args.steps}, (
            f"rank 0: teacher {teacher} answered {per_student} requests (student rank: requests)"
        )
    print0(
        f"checked: each teacher answered {args.steps} requests from each of its students and "
        "stopped when they said so"
    )
    ref_losses, ref_student = train_reference(
        me.cfg, args.transfer, len(layout.students), args.steps
    )
    check_against_reference(me.cfg, losses, outcome.student, ref_losses, ref_student)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = (
        f"rpc_demo: {args.transfer}, {count(len(layout.teachers), 'teacher')} : "
        f"{count(len(layout.students), 'student')} ({me.device.type})"
    )
    plot_losses({"over RPC": losses, "one process": ref_losses}, out / "08_demo_loss.png", title)
    plot_timelines(
        {f"last {TIMELINE_STEPS} steps": timelines},
        {r: worker_name(layout, r) for r in timelines},
        out / "08_demo_timeline.png",
        title,
    )
    print0(f"figures: {out / '08_demo_loss.png'}, {out / '08_demo_timeline.png'}")
    if args.save:
        torch.save(outcome.student.state_dict(), args.save)
        print0(f"saved the student's weights to {args.save}")
