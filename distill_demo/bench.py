"""distill_demo --bench: the same config with each transfer mode, overlap off and on, in one run.
Per setting: --warmup steps untimed, --repeats steps timed (the median is reported; on a GPU each
step ends with a synchronize, so it is the GPU's time), then a few steps on the timeline.
Rank 0 prints the table and the targets, and saves 06_demo_bench.png and
06_demo_bench_timeline.png in --out."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from course.plots import plot_bench
from course.ranks import print0
from distill_demo.comms import Groups, Layout, P2PTeachers, count
from distill_demo.knowledge import MODES
from distill_demo.report import Timeline, plot_timelines
from distill_demo.startup import Preparation
from distill_demo.train import (
    Batches,
    Config,
    Session,
    new_student,
    prepare_teacher,
    teacher_session,
    train_student,
)

TIMELINE_STEPS = 2  # recorded after the timed ones (recording synchronizes, so is not timed)
BATCHES = 4  # distinct batches, made before timing and reused: data costs nothing in the table


def run_bench(
    args: argparse.Namespace,
    cfg: Config,
    rank: int,
    layout: Layout,
    groups: Groups,
    prepared: Preparation,
) -> None:
    is_student = rank in layout.students
    teacher = None
    if is_student:
        prepared.wait()  # for the teacher's model (startup.py), then to the timed steps
    else:
        teacher = prepare_teacher(cfg, rank, layout.teachers[0], groups.teachers, prepared)
    batches = Batches(cfg, layout.students.index(rank), BATCHES) if is_student else None
    timeline = Timeline(cfg.device)
    steps = args.warmup + args.repeats + TIMELINE_STEPS
    rows, panels = [], {}
    print0(
        f"bench: {args.warmup} warm-up + {args.repeats} timed + {TIMELINE_STEPS} timeline "
        f"steps per setting; k = {args.topk}"
    )
    for mode in MODES:
        for overlap in (False, True):
            session = Session(
                mode, overlap, steps, record=range(steps - TIMELINE_STEPS, steps), timed=True
            )
            if is_student:
                student, optimizer = new_student(cfg)  # every setting starts from the same one
                teachers = P2PTeachers(cfg.device, rank, layout, groups)
                result = train_student(
                    cfg, session, student, optimizer, teachers, batches, timeline, groups.students
                )
                timed = result.seconds[args.warmup : args.warmup + args.repeats]
                row = {
                    "mode": mode,
                    "overlap": "on" if overlap else "off",
                    "step_ms": statistics.median(timed) * 1e3,
                    "bytes": result.bytes_in,
                    "ids_bytes": result.bytes_out,
                }
            else:
                teacher_session(cfg, session, teacher, rank, layout, groups, timeline)
                row = None
            everyone = [None] * dist.get_world_size() if rank == 0 else None
            dist.gather_object(timeline.take(), everyone, dst=0)
            if rank == 0:
                rows.append(row)
                panels[f"{mode}, overlap {row['overlap']}"] = dict(enumerate(everyone))
                print0(f"  {mode:6} overlap {row['overlap']:3}: {row['step_ms']:9.2f} ms/step")
    if rank == 0:
        table(args, cfg, layout, rows)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        title = describe(args, cfg, layout)
        plot_bench(rows, out / "06_demo_bench.png", title)
        plot_timelines(
            panels,
            {r: layout.name(r) for r in range(dist.get_world_size())},
            out / "06_demo_bench_timeline.png",
            title,
        )
        print0(f"figures: {out / '06_demo_bench.png'}, {out / '06_demo_bench_timeline.png'}")


def describe(args: argparse.Namespace, cfg: Config, layout: Layout) -> str:
    device = torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else "CPU"
    return (
        f"{count(len(layout.teachers), 'teacher')} : "
        f"{count(len(layout.students), 'student')} on {device}, "
        f"{args.size} models, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, "
        f"{str(cfg.dtype).removeprefix('torch.')}"
    )


def table(args: argparse.Namespace, cfg: Config, layout: Layout, rows: list[dict]) -> None:
    """The benchmark's table and its targets, printed by rank 0."""
    print0(f"bench: {describe(args, cfg, layout)}")
    print0(
        f"{'mode':8}{'overlap':>8}{'step ms':>11}{'bytes/step in':>17}{'bytes/step out':>16}"
        f"{'time vs full':>14}{'bytes vs full':>15}"
    )
    full = {r["overlap"]: r for r in rows if r["mode"] == "full"}
    for r in rows:
        base = full[r["overlap"]]
        print0(
            f"{r['mode']:8}{r['overlap']:>8}{r['step_ms']:>11.2f}{r['bytes']:>17,.0f}"
            f"{r['ids_bytes']:>16,.0f}{r['step_ms'] / base['step_ms']:>13.2f}x"
            f"{(base['bytes'] + base['ids_bytes']) / (r['bytes'] + r['ids_bytes']):>14.1f}x"
        )
    get = {(r["mode"], r["overlap"]): r for r in rows}
    total = {k: r["bytes"] + r["ids_bytes"] for k, r in get.items()}
    cut, target = total["full", "on"] / total["topk", "on"], args.vocab / (2 * args.topk)
    print0(
        f"top-k cuts bytes per step (in + out) by {cut:.1f}x; target >= vocab/(2k) = "
        f"{target:.1f}: {'met' if cut >= target else 'NOT met'}"
    )
    if cfg.dtype == torch.float32:  # on a GPU the top-k logits travel in bf16, 2 bytes
        print0(
            "  (float32 here: a top-k entry costs 4 + 4 bytes against full's 4 per vocabulary "
            "entry, so the cut cannot reach vocab/(2k); on a GPU top-k logits travel in bf16)"
        )
    for overlap in ("off", "on"):
        ratio = get["topk", overlap]["step_ms"] / get["full", overlap]["step_ms"]
        print0(
            f"top-k step time / full, overlap {overlap}: {ratio:.2f} "
            f"({'faster' if ratio < 1 else 'NOT faster'})"
        )
    print0(
        "overlap on / off, step time: "
        + ", ".join(f"{m} {get[m, 'on']['step_ms'] / get[m, 'off']['step_ms']:.2f}" for m in MODES)
    )
