"""What distill_demo shows: a progress bar (rank 0), a per-rank timeline of compute and
communication, and the figures (loss curve, timelines, benchmark bars). matplotlib is imported
inside the plotting functions, so a run that draws nothing does not pay for it."""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

from course.ranks import print0

# Phase names -> what kind of time it is, for the timeline's colours.
KINDS = {"forward": "compute", "loss+backward": "compute", "optimizer": "compute",
         "send ids": "communication", "wait teacher": "waiting", "all_reduce": "communication",
         "wait students": "waiting", "answer": "communication"}
COLOURS = {"compute": "tab:blue", "communication": "tab:orange", "waiting": "0.75"}


class Progress:
    """A bar that redraws itself on a terminal; on a pipe or in a notebook, a plain line every
    tenth of the run, so logs stay readable. Only rank 0 draws."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.stream = total, label, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = max(1, total // 10)
        self.start = time.perf_counter()

    def update(self, done: int, **info):
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in info.items())
        seconds = time.perf_counter() - self.start
        if self.tty:  # one write per redraw; \r returns to the line's start
            filled = round(20 * done / self.total)
            self.stream.write(f"\r[rank 0] {self.label} [{'#' * filled}{'.' * (20 - filled)}] "
                              f"{done}/{self.total} {text} {seconds:.1f}s")
            if done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif done % self.every == 0 or done == self.total:
            print0(f"{self.label} {done}/{self.total} {text}")


class Timeline:
    """(phase, start, end) of the steps chosen for recording; nothing for the others. On a GPU
    each recorded phase is bracketed by a synchronize, so its times are the GPU's, not just
    the time it took to queue the work (recorded steps run a little slower for it)."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.events, self.recording = [], False

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.recording:
            yield
            return
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.events.append((name, start, time.perf_counter()))

    def take(self) -> list:
        events, self.events = self.events, []
        return events


class CheckFailed(RuntimeError):
    """A run's own check of its result failed: printed as one line, exit code 1."""


def check_loss_fell(losses: list, args):
    """Rank 0: the students' mean loss fell over the run (the first loss is taken before any
    step, so one step proves nothing)."""
    if len(losses) < 2:
        return
    if not losses[-1] < losses[0]:
        raise CheckFailed(f"the students' mean loss did not fall in {args.steps} steps: "
                          f"{losses[0]:.4f} -> {losses[-1]:.4f}. Their step size may be too "
                          f"large for --size {args.size}: try a smaller --lr than {args.lr:g}, "
                          "or more --steps")
    print0(f"checked: mean student loss fell from {losses[0]:.4f} to {losses[-1]:.4f} in "
           f"{args.steps} steps")


def plot_losses(curves: dict, path: Path, title: str):
    """curves: {label: [loss per step]} -> one line each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label)
    ax.set(xlabel="step", ylabel="distillation loss (KL, nats/token)", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timelines(panels: dict, names: dict, path: Path, title: str):
    """panels: {panel title: {rank: [(phase, start, end), ...]}} -> one timeline per panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 0.9 + 0.55 * len(names) * len(panels)),
                             squeeze=False)
    for ax, (panel, ranks) in zip(axes[:, 0], panels.items()):
        origin = min((e[1] for events in ranks.values() for e in events), default=0.0)
        for row, rank in enumerate(sorted(ranks)):
            for phase, start, end in ranks[rank]:
                ax.broken_barh([((start - origin) * 1e3, (end - start) * 1e3)], (row - 0.4, 0.8),
                               color=COLOURS[KINDS[phase]], edgecolor="white", linewidth=0.3)
        ax.set_yticks(range(len(ranks)), [names[r] for r in sorted(ranks)])
        ax.invert_yaxis()
        ax.set_title(panel, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("milliseconds")
    fig.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items()], ncol=3,
               loc="lower center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bench(rows: list, path: Path, title: str):
    """rows: dicts with mode, overlap, step_ms, bytes -> step time and bytes per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for i, overlap in enumerate(("off", "on")):
        times = [next(r["step_ms"] for r in rows if r["mode"] == m and r["overlap"] == overlap)
                 for m in modes]
        left.bar([x + 0.4 * i for x in range(len(modes))], times, 0.4, label=f"overlap {overlap}")
    left.set(xticks=[x + 0.2 for x in range(len(modes))], xticklabels=modes,
             ylabel="step time, ms (median)")
    left.legend(fontsize=8)
    sizes = [next(r["bytes"] for r in rows if r["mode"] == m) for m in modes]
    bars = right.bar(modes, sizes, color="tab:orange")
    right.bar_label(bars, [f"{b / 1e6:.3g} MB" if b >= 1e5 else f"{b / 1e3:.3g} kB" for b in sizes],
                    fontsize=8)
    right.set(yscale="log", ylabel="bytes per step per student (from teachers)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
