"""Pictures the lessons and projects draw, in one place: matplotlib is imported inside each
function, so a program that draws nothing never pays for importing it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from course.ranks import Rank


Box = dict  # one span on a timeline: start, end, color, ... (timeline()'s docstring)


def timeline(
    panels: dict[str, dict[str, list[Box]]],
    path: str | Path,
    title: str = "",
    xlabel: str = "ms",
    arrows: Sequence[tuple[Box, Box, bool]] = (),
    window: tuple[float, float] | None = None,
    legend: Sequence[str] | None = None,
    width: float = 9.0,
    lane: float = 0.55,
) -> None:
    """The one timeline picture: per panel, a lane per rank, a box per span of time in it.
    Lesson 05's all_reduce launches, distill_demo's phases and course/trace.py's merged
    trace are all drawn by it.

    panels: {panel title: {lane label: [box, ...]}}, lanes top to bottom. A box is a dict:
    start and end in ms (no end: a tick at start), color; optionally kind (its legend entry),
    text (written inside when it fits; above=True: over its left end instead), y and h (its
    band of the lane, from -0.5 at the top: -0.4 and 0.8 unless given), alpha, edge (outline).
    arrows: (box, box, solid): from the first's start to the second's end, as from a send to
    the recv that took it; dashed red where not solid. window: (lo, hi), the ms to show.
    legend: the kinds to list, in order (all of them, as first met, unless given)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    sizes = [len(rows) for rows in panels.values()]
    height = 0.9 + sum(0.45 + lane * n for n in sizes)  # inches: lanes, titles, axes, legend
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=sizes)[:, 0]
    kinds, place, texts = {}, {}, []  # kind -> legend handle; id(box) -> (axes, y, h)
    for ax, (name, rows) in zip(axes, panels.items()):
        for row, boxes in enumerate(rows.values()):
            for box in boxes:
                y, h = row + box.get("y", -0.4), box.get("h", 0.8)
                color, alpha, edge = box["color"], box.get("alpha", 1.0), box.get("edge")
                if box.get("end") is None:  # a moment, not a span: a tick across the band
                    ax.vlines(box["start"], y, y + h, color=color, alpha=alpha, lw=1.5)
                    handle = Line2D([], [], color=color, marker="|", ls="", ms=10, mew=1.5)
                else:
                    ax.broken_barh(
                        [(box["start"], box["end"] - box["start"])],
                        (y, h),
                        color=color,
                        alpha=alpha,
                        edgecolor=edge or color,
                        linewidth=0.3 if edge else 0,
                    )
                    handle = Patch(color=color, alpha=alpha)
                    texts += [(ax, box, y, h)] if box.get("text") else []
                if box.get("kind"):
                    kinds.setdefault(box["kind"], handle)
                place[id(box)] = (ax, y, h)
        ax.set_yticks(range(len(rows)), list(rows))
        ax.set_ylim(len(rows) - 0.5, -0.55)  # the first lane on top
        ax.grid(axis="x", alpha=0.3)
        if window:
            ax.set_xlim(*window)
        else:
            ax.margins(x=0.02)
        if name:
            ax.set_title(name, fontsize=9, loc="left")
    axes[-1].set_xlabel(xlabel, fontsize=9)
    for a, b, solid in arrows:
        (ax, ya, ha), (_, yb, hb) = place[id(a)], place[id(b)]
        down = yb > ya  # leave by the edge that faces the other box, enter by the one facing back
        ax.annotate(
            "",
            xy=(b["end"], yb if down else yb + hb),
            xytext=(a["start"], ya + ha if down else ya),
            arrowprops=dict(
                arrowstyle="->",
                lw=0.8,
                color="black" if solid else "red",
                linestyle="-" if solid else "--",
            ),
        )
    if title:
        fig.suptitle(title, fontsize=10)
    shown = [k for k in legend or kinds if k in kinds]
    if shown:
        fig.legend(
            [kinds[k] for k in shown],
            shown,
            loc="outside lower center",
            fontsize=8,
            ncol=min(len(shown), 6),
            frameon=False,
        )
    fig.draw_without_rendering()  # lay the figure out first: then a text goes where it fits
    for ax, box, y, h in texts:
        lo, hi = ax.get_xlim()
        start, end = max(box["start"], lo), min(box["end"], hi)
        char = 0.55 * 7 * fig.dpi / 72  # pixels per character at 7 pt
        if (end - start) * ax.bbox.width / (hi - lo) <= char * len(box["text"]):
            continue  # too narrow to write in: the legend says what the box is
        if box.get("above"):  # over its left end: for a band too thin to write in
            x, y, ha, va = start, y - 0.02, "left", "bottom"
        else:
            x, y, ha, va = (start + end) / 2, y + h / 2, "center", "center"
        ax.text(x, y, box["text"], ha=ha, va=va, fontsize=7, clip_on=True, in_layout=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def ddp_timeline(events: list[tuple], path: str | Path) -> None:
    """Lesson 05, a collective: every rank passes its log of one step, as (step, what, which,
    time); rank 0 draws a lane per rank, saves it to `path` and says so. A lane: backward, with
    a tick where each all_reduce started, then the wait in finish(), in ms since that rank's
    backward started. The axis shows backward; the wait runs off its end, its length written."""
    import torch.distributed as dist

    from course.ranks import print0

    timelines = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(events, timelines, dst=0)
    if timelines is None:
        return
    lanes, right = {}, 0.0  # the axis ends at 1.6 x the longest backward
    for rank, log in enumerate(timelines):
        start = next(t for _, _, which, t in log if which == "starts")
        ms = {}  # "returns", "waited", "launch" -> [ms since backward started]
        for _, what, which, t in log:
            ms.setdefault(which if what == "backward" else what, []).append((t - start) * 1e3)
        (returned,), (waited,) = ms["returns"], ms["waited"]
        right = max(right, 1.6 * returned)
        backward = dict(start=0.0, end=returned, color="C0", alpha=0.4, kind="backward")
        wait = dict(
            start=returned,
            end=waited,
            color="C7",
            alpha=0.3,
            kind="finish(): waiting for the all_reduces",
            text=f"finish() returned at {waited:.1f} ms",
        )
        ticks = [
            dict(start=t, color="C3", kind="an all_reduce starts (one per parameter)")
            for t in ms["launch"]
        ]
        lanes[f"rank {rank}"] = [{**box, "y": -0.25, "h": 0.5} for box in (backward, wait, *ticks)]
    timeline(
        {"": lanes},
        path,
        xlabel="ms since this rank's backward started (last step)",
        window=(0.0, right),
        lane=0.6,
    )
    print0(f"saved {path}")


def plot_losses(curves: dict[str, list[float]], path: str | Path, title: str) -> None:
    """distill_demo, rpc_demo: curves {label: [loss per step]} -> one line each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label)
    ax.set(xlabel="step", ylabel="distillation loss (KL, nats/token)", title=title, yscale="log")
    ax.legend()
    fig.savefig(path)


def plot_bench(rows: list[dict], path: str | Path, title: str) -> None:
    """distill_demo --bench: rows, dicts with mode, overlap, step_ms, bytes -> step time per
    mode, overlap off and on, and bytes per step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for i, overlap in enumerate(("off", "on")):
        times = [
            next(r["step_ms"] for r in rows if r["mode"] == m and r["overlap"] == overlap)
            for m in modes
        ]
        left.bar([x + 0.4 * i for x in range(len(modes))], times, 0.4, label=f"overlap {overlap}")
    left.set(
        xticks=[x + 0.2 for x in range(len(modes))],
        xticklabels=modes,
        ylabel="step time, ms (median)",
    )
    left.legend(fontsize=8)
    sizes = [next(r["bytes"] for r in rows if r["mode"] == m) for m in modes]
    bars = right.bar(modes, sizes, color="tab:orange")
    right.bar_label(
        bars, [f"{b / 1e6:.3g} MB" if b >= 1e5 else f"{b / 1e3:.3g} kB" for b in sizes], fontsize=8
    )
    right.set(yscale="log", ylabel="bytes per step per student (from teachers)")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)


def size_text(nbytes: int) -> str:
    """A message size as people say it: 4096 -> "4 KiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def plot_bandwidth(rows: list[dict], path: str | Path, title: str) -> None:
    """Lesson 03 --bench: rows, dicts with op, bytes and busbw -> busbw over message size, a
    line per collective."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        ax.plot([r["bytes"] for r in mine], [r["busbw"] for r in mine], "o-", label=op)
    ax.set_xscale("log", base=2)
    sizes = sorted({r["bytes"] for r in rows})
    ax.set_xticks(sizes, [size_text(b) for b in sizes], rotation=45)
    ax.set(xlabel="message size", ylabel="busbw (GB/s)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)


# Lesson 03 --bench: message sizes in bytes. gloo on loopback moves ~1-2 GB/s, NCCL on NVLink
# ~400 (the timing itself, time_collective, is the lesson's).
BENCH_SIZES = {
    "cpu": [2**k for k in range(12, 23, 2)],  # 4 KiB .. 4 MiB: seconds on 2 CPU cores
    "cuda": [2**k for k in range(20, 33, 2)],  # 1 MiB .. 4 GiB
}


def bandwidth_sweep(
    ctx: Rank,
    ops: Sequence[str],
    bus_factor: dict[str, Callable[[int], float]],
    out: str | Path,
    time_collective: Callable[[Rank, str, int], float],
) -> None:
    """Lesson 03 --bench: time_collective(ctx, op, nbytes) for each of `ops` over BENCH_SIZES;
    print algbw and busbw = algbw * bus_factor[op](n), as nccl-tests reports them; check that
    the largest size moves real data; on rank 0 save the rows as OUT/03_bandwidth.json and draw
    them as OUT/03_bandwidth.png."""
    import json
    import os

    import torch
    import torch.distributed as dist

    from course.ranks import print0

    n, sizes = ctx.world_size, BENCH_SIZES[ctx.device.type]
    algo = os.environ.get("NCCL_ALGO", "NCCL's choice") if ctx.backend == "nccl" else None
    label = f"{ctx.backend}, {n} ranks" + (f", NCCL_ALGO={algo}" if algo else "")
    factors = ", ".join(f"{bus_factor[op](n):.2f} ({op})" for op in ops)
    print0(f"bandwidth: {label}; busbw = algbw * {factors}")
    print0(f"{'op':>10} {'size':>8} {'time us':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}")
    rows = []
    for op in ops:
        for nbytes in sizes:
            seconds = time_collective(ctx, op, nbytes)
            algbw = nbytes / seconds / 1e9  # tensor bytes per second, as nccl-tests reports it
            busbw = algbw * bus_factor[op](n)  # what each rank's link carried per second
            rows.append(dict(op=op, bytes=nbytes, seconds=seconds, algbw=algbw, busbw=busbw))
            size = size_text(nbytes)
            print0(f"{op:>10} {size:>8} {seconds * 1e6:10.1f} {algbw:11.3g} {busbw:11.3g}")
    # The timed tensors held zeros; check the largest size moves real data correctly too.
    t = torch.full((sizes[-1] // 4,), ctx.rank + 1.0, device=ctx.device)
    dist.all_reduce(t)
    assert bool((t == n * (n + 1) / 2).all()), f"rank {ctx.rank}: all_reduce of {sizes[-1]} B"
    print0(f"checked: all_reduce of {size_text(sizes[-1])} gives {n}*{n + 1}/2 in every element")
    if ctx.rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        meta = {"backend": ctx.backend, "world_size": n, "nccl_algo": algo, "label": label}
        (Path(out) / "03_bandwidth.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        plot_bandwidth(rows, Path(out) / "03_bandwidth.png", label)
        print0(f"saved {out}/03_bandwidth.png and .json")


def reshard_layouts(columns: list[tuple[str, list[str]]], path: str | Path, title: str) -> None:
    """Lesson 10: which rank holds which rows of a fused QKV tensor. columns: (rank's label,
    the HF head of each block of head_dim rows, top to bottom: "q3", "k1", ...); one column per
    rank, a box per block, colored by q, k or v."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    colors = {"q": "tab:blue", "k": "tab:orange", "v": "tab:green"}
    fig = Figure(figsize=(1.4 * len(columns) + 1.5, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for x, (_, heads) in enumerate(columns):
        for row, head in enumerate(heads):
            ax.add_patch(Rectangle((x - 0.4, row), 0.8, 1, facecolor=colors.get(head[0], "grey"),
                                   edgecolor="white"))  # fmt: skip
            ax.text(x, row + 0.5, head, ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(len(columns)), [label for label, _ in columns], fontsize=8)
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ax.set_ylim(max(len(heads) for _, heads in columns), 0)  # row 0 at the top
    ax.set(ylabel="head_dim rows of the rank's fused QKV, top to bottom", title=title)
    fig.savefig(path)
