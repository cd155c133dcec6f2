"""rpc_demo --bench: one distillation config, trained twice by the same processes in one run.

    p2p  distill_demo's trainer as it is: every process in one world, students first, the
         teachers answering over isend/irecv (lesson 06), overlap on
    RPC  rpc_demo: students' world and teachers' world, rpc_async between them, pipelined the
         same way (the next step's request in flight during the student's backward)

Per path: --warmup untimed steps, --repeats timed ones (the median is reported; on a GPU each
step ends with a synchronize), then PROFILE_STEPS steps with every phase timed, which say where
the time goes. The same batches, the same fresh student, the same teacher: the losses must match.
Rank 0 prints the table and saves 08_demo_bench.png and 08_demo_bench_timeline.png in --out.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from course.ranks import print0
from distill_demo.comms import P2PTeachers, count, make_groups
from distill_demo.report import Timeline, plot_timelines
from distill_demo.train import (
    Batches,
    Result,
    Session,
    new_student,
    prepare_teacher,
    teacher_session,
    train_student,
)
from rpc_demo.roles import RollPreparation, student_role, teacher_role
from rpc_demo.worlds import Roll, Worker, role_world, worker_name

PROFILE_STEPS = 3  # after the timed steps: each phase timed (on a GPU, synchronized)
BATCHES = 4  # distinct batches, made before timing and reused: data costs nothing in the table
GOAL = 1.2  # RPC's step time may be at most this many times p2p's
PHASES = ("forward", "wait teacher", "send ids", "loss+backward", "all_reduce", "optimizer")


# --8<-- [start:bench]
def run_bench(
    args: argparse.Namespace, me: Worker, backend: str, ports: list[dict[str, int]], roll: Roll
) -> None:
    """Every process: --rounds times, the p2p path then the RPC path, each in worlds made for
    it (ports[round]) and torn down after it. Both train with distill_demo's step."""
    layout = me.layout
    steps = args.warmup + args.repeats + PROFILE_STEPS
    session = Session(
        args.transfer, True, steps, record=range(steps - PROFILE_STEPS, steps), timed=True
    )
    batches = None  # the same batches on both paths, made once
    if me.rank in layout.students:
        batches = Batches(me.cfg, layout.students.index(me.rank), BATCHES)
    rounds = []
    for ports_now in ports:
        p2p = p2p_path(me, ports_now["p2p"], roll, session, batches)
        over_rpc = None
        if me.rank in layout.students:
            over_rpc = student_role(me, ports_now, roll, session, batches)
        else:
            teacher_role(me, ports_now, roll, "none")
        if me.rank == 0:
            rounds.append(
                {
                    "p2p": p2p,
                    "RPC": (over_rpc.result, over_rpc.timelines, over_rpc.cpu_s),
                    "idle": over_rpc.idle,
                    "round_trips": over_rpc.round_trips,
                }
            )
    if me.rank == 0:
        table(args, me, backend, rounds)


# --8<-- [end:bench]


# --8<-- [start:p2p]
def p2p_path(
    me: Worker, port: int, roll: Roll, session: Session, batches: Batches | None
) -> tuple[Result, dict, dict] | None:
    """distill_demo's trainer, unchanged, in a world of every process. Returns, on rank 0, the
    student's result, every rank's timeline and CPU seconds; None elsewhere."""
    layout, cfg, rank, timeline = me.layout, me.cfg, me.rank, Timeline(me.device)
    everybody = layout.students + layout.teachers
    with role_world("the p2p world", everybody, port, me, roll):
        groups = make_groups(layout, datetime.timedelta(seconds=me.timeout))
        prepared = RollPreparation(me, roll, say=rank == 0)  # for teacher0's model
        result = None
        if rank in layout.students:
            prepared.wait()
            student, optimizer = new_student(cfg)  # the RPC path starts from the same student
            cpu = time.process_time()
            teachers = P2PTeachers(cfg.device, rank, layout, groups)
            result = train_student(
                cfg, session, student, optimizer, teachers, batches, timeline, groups.students
            )
        else:
            teacher = prepare_teacher(cfg, rank, layout.teachers[0], groups.teachers, prepared)
            cpu = time.process_time()
            teacher_session(cfg, session, teacher, rank, layout, groups, timeline)
        cpu = time.process_time() - cpu  # this process, all its threads
        everyone = [None] * len(everybody) if rank == 0 else None
        dist.gather_object((timeline.take(), cpu), everyone, dst=0)
    if rank != 0:
        return None
    return (
        result,
        {r: e for r, (e, _) in enumerate(everyone)},
        {r: c for r, (_, c) in enumerate(everyone)},
    )


# --8<-- [end:p2p]


def per_step(events: list, phases: list[str]) -> dict[str, float]:
    """{phase: mean milliseconds per profiled step}"""
    return {
        p: sum(e - s for name, s, e in events if name == p) * 1e3 / PROFILE_STEPS for p in phases
    }


def table(args: argparse.Namespace, me: Worker, backend: str, rounds: list[dict]) -> None:
    """Rank 0: step time and throughput of both paths, their losses, where the time goes.
    rounds: [{"p2p": (result, timelines, cpu), "RPC": (result, timelines, cpu), ...}, ...]"""
    layout = me.layout
    timed = slice(args.warmup, args.warmup + args.repeats)
    tokens = len(layout.students) * args.batch * args.seq  # per step, all students together
    print0(f"bench: {describe(args, me, backend)}")
    print0(
        f"bench: {args.rounds} round{'s' * (args.rounds > 1)} of p2p then RPC; per round "
        f"and path {args.warmup} warm-up + {args.repeats} timed steps + {PROFILE_STEPS} "
        "profiled"
    )
    steps = args.warmup + args.repeats + PROFILE_STEPS
    print0(
        f"{'round':>5}{'p2p ms':>10}{'RPC ms':>10}{'RPC/p2p':>9}   CPU ms a step, all "
        f"processes: {'p2p':>7}{'RPC':>8}"
    )
    for i, paths in enumerate(rounds):
        ms = [statistics.median(paths[p][0].seconds[timed]) * 1e3 for p in ("p2p", "RPC")]
        cpu = [sum(paths[p][2].values()) * 1e3 / steps for p in ("p2p", "RPC")]
        print0(
            f"{i + 1:>5}{ms[0]:>10.2f}{ms[1]:>10.2f}{ms[1] / ms[0]:>8.2f}x"
            f"{'':>30}{cpu[0]:>7.2f}{cpu[1]:>8.2f}"
        )
    step_ms = {
        p: statistics.median(s for paths in rounds for s in paths[p][0].seconds[timed]) * 1e3
        for p in ("p2p", "RPC")
    }
    print0(
        f"{'path':6}{'step ms':>10}{'tokens/s':>12}{'vs p2p':>9}   (median of all "
        f"{args.rounds * args.repeats} timed steps)"
    )
    for path, ms in step_ms.items():
        print0(f"{path:6}{ms:>10.2f}{tokens / ms * 1e3:>12,.0f}{ms / step_ms['p2p']:>8.2f}x")
    ratio = step_ms["RPC"] / step_ms["p2p"]
    print0(
        f"RPC / p2p step time: {ratio:.2f}x; goal <= {GOAL}x: "
        f"{'met' if ratio <= GOAL else 'NOT met'}"
    )

    (_, p2p_lines, _), (_, rpc_lines, _) = rounds[-1]["p2p"], rounds[-1]["RPC"]
    unit = layout.units[0]  # student 0's
    teacher = unit.teachers[0]
    print0(
        f"where the time goes, ms per step (last round, mean of its {PROFILE_STEPS} profiled "
        f"steps; student 0, and its teacher {worker_name(layout, teacher)}):"
    )
    print0(f"{'path':6}" + "".join(f"{p:>14}" for p in PHASES) + f"{'teacher fwd':>14}")
    breakdown = {}
    for path, lines in (("p2p", p2p_lines), ("RPC", rpc_lines)):
        breakdown[path] = per_step(lines[0], PHASES)
        teacher_ms = per_step(lines[teacher], ["forward"])["forward"]
        print0(
            f"{path:6}"
            + "".join(f"{breakdown[path][p]:>14.2f}" for p in PHASES)
            + f"{teacher_ms:>14.2f}"
        )
    forward = teacher_ms / len(unit.students)  # over RPC it answers each student on its own
    round_trip = statistics.mean(b - a for a, b in rounds[-1]["round_trips"]) * 1e3
    print0(
        f"RPC: from rpc_async to the answer's arrival {round_trip:.2f} ms a request, of which "
        f"the teacher's forward {forward:.2f} ms; the rest, {round_trip - forward:.2f} ms, "
        "is RPC (pickling, TensorPipe, threads) and waiting for a core"
    )
    idle = rounds[-1]["idle"]
    print0(
        "RPC idle: with no call in flight for a second, CPU busy "
        + ", ".join(f"{worker_name(layout, r)} {busy:.2f}" for r, busy in sorted(idle.items()))
        + f" of a core (TensorPipe transport: {args.rpc_transport})"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = {r: worker_name(layout, r) for r in layout.students + layout.teachers}
    plot_bench(breakdown, step_ms, out / "08_demo_bench.png", describe(args, me, backend))
    plot_timelines(
        {
            "p2p: one world, isend/irecv (distill_demo)": p2p_lines,
            "RPC: two worlds, rpc_async (rpc_demo)": rpc_lines,
        },
        names,
        out / "08_demo_bench_timeline.png",
        describe(args, me, backend),
    )
    print0(f"figures: {out / '08_demo_bench.png'}, {out / '08_demo_bench_timeline.png'}")
    # Last, so the table and the breakdown above are printed whatever this finds.
    rtol = 1e-3 if me.cfg.dtype == torch.float32 else 2e-2  # bf16 rounds far more
    reference = rounds[0]["p2p"][0].losses

    def drift(runs):  # largest relative difference from round 1's p2p losses, step by step
        return max(
            (abs(a - b) / abs(b) for losses in runs for a, b in zip(losses, reference)), default=0.0
        )

    if len(rounds) > 1:  # how far the same path drifts by itself: the floor for RPC vs p2p
        print0(
            f"losses, largest relative difference from round 1's p2p: p2p in later rounds "
            f"{drift(paths['p2p'][0].losses for paths in rounds[1:]):.1e}, RPC "
            f"{drift(paths['RPC'][0].losses for paths in rounds):.1e}"
        )
    worst = drift(paths[p][0].losses for paths in rounds for p in ("p2p", "RPC"))
    assert worst <= rtol and all(
        len(paths[p][0].losses) == len(reference) for paths in rounds for p in ("p2p", "RPC")
    ), f"rank 0: p2p and RPC losses differ by {worst:.1e} (relative), more than {rtol:g}"
    print0(
        f"checked: p2p and RPC give the same mean loss at each of the {len(reference)} steps, "
        f"in every round (largest relative difference {worst:.1e})"
    )


def describe(args: argparse.Namespace, me: Worker, backend: str) -> str:
    layout = me.layout
    device = torch.cuda.get_device_name(me.device) if me.device.type == "cuda" else "CPU"
    return (
        f"{count(len(layout.teachers), 'teacher')} : {count(len(layout.students), 'student')}"
        f" on {device} ({backend}), {args.size} models, vocab {args.vocab}, seq {args.seq}, "
        f"batch {args.batch}, {str(me.cfg.dtype).removeprefix('torch.')}, {args.transfer}"
    )


def plot_bench(
    breakdown: dict[str, dict[str, float]], step_ms: dict[str, float], path: Path, title: str
) -> None:
    """One bar per path: student 0's profiled step, phase by phase; a tick at the median step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 2.8))
    colours = plt.get_cmap("tab10").colors
    for row, (name, phases) in enumerate(breakdown.items()):
        left = 0.0
        for i, phase in enumerate(PHASES):
            ax.barh(
                row,
                phases[phase],
                left=left,
                color=colours[i],
                edgecolor="white",
                label=phase if row == 0 else None,
            )
            left += phases[phase]
        ax.plot(
            [step_ms[name]] * 2,
            [row - 0.45, row + 0.45],
            color="black",
            linewidth=2,
            label="median step (timed)" if row == 0 else None,
        )
    ax.set_yticks(range(len(breakdown)), list(breakdown))
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per step (student 0)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
