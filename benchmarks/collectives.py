"""all_reduce bandwidth under NCCL_ALGO=Ring, NCCL_ALGO=Tree and NCCL's own choice, side by side.

NCCL reads NCCL_ALGO when it sets up a communicator and keeps it for the life of the process,
so every setting needs a run of its own: this script runs lesson 03's --bench once per setting
(torchrun, --nproc ranks) and puts the busbw columns side by side in one table and one plot.

    python benchmarks/collectives.py --nproc 2 --out out     # a machine with 2 GPUs or more

Writes to --out: 03_bandwidth.png (the NCCL's-choice run: all_reduce and broadcast),
03_ring_vs_tree.png and .json (the backend, the device, every run's rows), and 03_algorithms.png,
a picture of a ring, a binary tree and a double binary tree over 8 ranks. The comparison runs
only if the ranks ran NCCL (the backend the first run's 03_bandwidth.json names: without a GPU
per rank, or with COURSE_BACKEND=gloo, they run gloo, where NCCL_ALGO means nothing): else the
script says so and runs once. The table's header and the plot's title name the backend and the
device.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from course.launcher import ROOT, launch  # bounded runs, output in rank order

LESSON = ROOT / "lessons" / "03_collectives.py"
# (column, NCCL_ALGO or None for NCCL's choice, collectives to time). Broadcast has no tree in
# NCCL, so the forced settings time all_reduce only.
SETTINGS = [
    ("NCCL's choice", None, "all_reduce,broadcast"),
    ("Ring", "Ring", "all_reduce"),
    ("Tree", "Tree", "all_reduce"),
]
RUN_TIMEOUT_S = 300  # one setting, start-up included


def run(name, algo, ops, nproc, folder):
    """Lesson 03 --bench under one NCCL_ALGO; returns what it saved (its backend, its rows), or
    None if the run failed."""
    env = {"NCCL_ALGO": algo} if algo else {}
    result = launch(
        LESSON, nproc, ["--bench", "--bench-ops", ops, "--out", folder], RUN_TIMEOUT_S, env
    )
    print(f"--- {name}: NCCL_ALGO={algo or '(unset)'}, {result.seconds:.0f} s")
    print("\n".join(result.lines + result.stuck))
    if result.returncode != 0:
        print(f"--- {name}: failed (exit code {result.returncode}); its column stays empty")
        return None
    return json.loads((Path(folder) / "03_bandwidth.json").read_text())


def size_text(nbytes):
    units = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
    return next(f"{nbytes / scale:g} {unit}" for unit, scale in units if nbytes >= scale)


def device_of(backend):
    """The lesson's ranks' device on `backend`: NCCL, a GPU per rank; gloo, the CPU."""
    if backend == "nccl":
        return torch.cuda.get_device_name(0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU, {cores} cores"


def plot(columns, nproc, where, path):
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in columns.items():
        mine = [r for r in rows if r["op"] == "all_reduce"]
        ax.plot([r["bytes"] for r in mine], [r["busbw"] for r in mine], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel="message size (bytes)",
        ylabel="all_reduce busbw (GB/s)",
        title=f"NCCL_ALGO, {nproc} ranks, {where}",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def tree_parents(n):
    """NCCL-style binary tree over ranks 0..n-1: rank r hangs below r with its lowest set bit
    moved up one place (or cleared, past the end). Odd ranks have no children: leaves."""
    parents = {}
    for r in range(1, n):
        low = r & -r
        up = (r ^ low) | (low << 1)
        parents[r] = up if up < n else r ^ low
    return parents


def draw_algorithms(path, n=8):
    """Ring, one binary tree, and NCCL's double binary tree, drawn for n ranks. The second tree
    is the first mirrored (rank r -> n-1-r), so its leaves are the even ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def depth(parents, r):
        return 0 if r not in parents else 1 + depth(parents, parents[r])

    def tree(parents, color, dy=0.0):  # (position of each rank, edges child -> parent, color)
        return {r: (r, -depth(parents, r) - dy) for r in range(n)}, parents.items(), color

    one = tree_parents(n)
    mirrored = {n - 1 - r: n - 1 - p for r, p in one.items()}
    circle = {r: (math.sin(2 * math.pi * r / n), math.cos(2 * math.pi * r / n)) for r in range(n)}
    panels = {
        f"ring: {n} links, 2({n}-1) steps": [(circle, [(r, (r + 1) % n) for r in range(n)], "C0")],
        "binary tree: leaves (odd ranks) only send up": [tree(one, "C0")],
        "double binary tree: each rank inside one tree at most": [
            tree(one, "C0"),
            tree(mirrored, "C3", 0.2),
        ],
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, layers) in zip(axes, panels.items()):
        for xy, edges, color in layers:
            ax.plot(*zip(*xy.values()), linestyle="none")  # text and arrows don't set the limits
            for a, b in edges:
                ax.annotate(
                    "",
                    xy[b],
                    xy[a],
                    arrowprops={"arrowstyle": "->", "color": color, "shrinkA": 9, "shrinkB": 9},
                )
            for r, (x, y) in xy.items():
                ax.text(
                    x,
                    y,
                    str(r),
                    ha="center",
                    va="center",
                    color=color,
                    bbox={"boxstyle": "circle", "fc": "white", "ec": color},
                )
        ax.set_title(title, fontsize=10)
        ax.margins(0.15)
        ax.axis("off")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nproc", type=int, default=2, help="ranks, one per GPU (2)")
    p.add_argument("--out", default="out", help="folder for the table's data and the plots")
    args = p.parse_args()
    os.environ.pop("NCCL_ALGO", None)  # the NCCL's-choice run must not inherit a setting
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns, backend = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for name, algo, ops in SETTINGS:
            folder = Path(tmp) / name.replace(" ", "_").replace("'", "")
            saved = run(name, algo, ops, args.nproc, folder)
            if saved is None:
                continue
            if backend is None:  # the first run's: what the ranks used, not what this process sees
                backend = saved["backend"]
            if saved["backend"] != backend:
                print(f"--- {name}: ran {saved['backend']}, not {backend}; its column stays empty")
                continue
            columns[name] = saved["rows"]
            if algo is None:
                shutil.copy(folder / "03_bandwidth.png", out / "03_bandwidth.png")
            if backend != "nccl":
                print(
                    f"the ranks ran {backend} (no GPU per rank, or COURSE_BACKEND={backend}), "
                    "where NCCL_ALGO changes nothing. One run only."
                )
                break
    settings = SETTINGS
    if backend != "nccl" and columns:  # one run, and not NCCL's choice: its column says what ran
        settings, columns = [(backend, None, None)], {backend: next(iter(columns.values()))}
    if not columns:
        sys.exit("every run failed (output above)")
    where = f"{backend} on {device_of(backend)}"
    sizes = sorted({r["bytes"] for rows in columns.values() for r in rows})
    print(f"all_reduce busbw (GB/s), {args.nproc} ranks, {where}")
    print(f"{'size':>10}" + "".join(f"{name:>15}" for name, *_ in settings))
    for size in sizes:
        cells = []
        for name, *_ in settings:
            found = [
                r["busbw"]
                for r in columns.get(name, [])
                if r["bytes"] == size and r["op"] == "all_reduce"
            ]
            cells.append(f"{found[0]:15.3g}" if found else f"{'-':>15}")
        print(f"{size_text(size):>10}" + "".join(cells))
    draw_algorithms(out / "03_algorithms.png")
    files = ["03_bandwidth.png", "03_algorithms.png"]
    if backend == "nccl":  # the comparison means something only under NCCL
        meta = dict(backend=backend, device=device_of(backend), nproc=args.nproc)
        (out / "03_ring_vs_tree.json").write_text(
            json.dumps({**meta, "columns": columns}, indent=1)
        )
        plot(columns, args.nproc, where, out / "03_ring_vs_tree.png")
        files += ["03_ring_vs_tree.png", "03_ring_vs_tree.json"]
    print(f"saved in {out}: {', '.join(files)}")


if __name__ == "__main__":
    main()
