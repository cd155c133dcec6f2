"""What distill_demo shows: a progress bar (rank 0), a per-rank record of compute and
communication (Timeline), and its figures, which course/plots.py draws: the loss curve, the
benchmark bars and the timelines (plot_timelines turns the recorded phases into its boxes)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch

from course.plots import timeline
from course.ranks import print0

# Phase names -> what kind of time it is, for the timeline's colours.
KINDS = {
    "forward": "compute",
    "loss+backward": "compute",
    "optimizer": "compute",
    "send ids": "communication",
    "wait teacher": "waiting",
    "all_reduce": "communication",
    "wait students": "waiting",
    "answer": "communication",
}
COLOURS = {"compute": "tab:blue", "communication": "tab:orange", "waiting": "0.75"}


class Progress:
    """A bar that redraws itself on a terminal; on a pipe or in a notebook, a plain line every
    tenth of the run, so logs stay readable. Only rank 0 draws."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None):
        self.total, self.label, self.stream = total, label, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = max(1, total // 10)
        self.start = time.perf_counter()

    def update(self, done: int, **info: float | int | str) -> None:
        text = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
        )
        seconds = time.perf_counter() - self.start
        if self.tty:  # one write per redraw; \r returns to the line's start
            filled = round(20 * done / self.total)
            self.stream.write(
                f"\r[rank 0] {self.label} [{'#' * filled}{'.' * (20 - filled)}] "
                f"{done}/{self.total} {text} {seconds:.1f}s"
            )
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
    def phase(self, name: str) -> Iterator[None]:
        if not self.recording:
            yield
            return
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.events.append((name, start, time.perf_counter()))

    def take(self) -> list[tuple[str, float, float]]:
        events, self.events = self.events, []
        return events


class CheckFailed(RuntimeError):
    """A run's own check of its result failed: printed as one line, exit code 1."""


def check_loss_fell(losses: list[float], args: argparse.Namespace) -> None:
    """Rank 0: the students' mean loss fell over the run (the first loss is taken before any
    step, so one step proves nothing)."""
    if len(losses) < 2:
        return
    if not losses[-1] < losses[0]:
        raise CheckFailed(
            f"the students' mean loss did not fall in {args.steps} steps: "
            f"{losses[0]:.4f} -> {losses[-1]:.4f}. Their step size may be too "
            f"large for --size {args.size}: try a smaller --lr than {args.lr:g}, "
            "or more --steps"
        )
    print0(
        f"checked: mean student loss fell from {losses[0]:.4f} to {losses[-1]:.4f} in "
        f"{args.steps} steps"
    )


def plot_timelines(panels: dict, names: dict, path: Path, title: str) -> None:
    """panels: {panel title: {rank: [(phase, start, end), ...]}} -> a timeline per panel, its
    time in ms from its first phase, coloured by KINDS (course/plots.py draws it)."""
    lanes = {}
    for panel, ranks in panels.items():
        origin = min((e[1] for events in ranks.values() for e in events), default=0.0)
        lanes[panel] = {
            names[rank]: [
                {
                    "start": (start - origin) * 1e3,
                    "end": (end - origin) * 1e3,
                    "edge": "white",
                    "color": COLOURS[KINDS[phase]],
                    "kind": KINDS[phase],
                }
                for phase, start, end in ranks[rank]
            ]
            for rank in sorted(ranks)
        }
    timeline(lanes, path, title, xlabel="milliseconds", legend=list(COLOURS))
