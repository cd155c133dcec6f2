"""What do --trace and --debug cost? Two measurements, each interleaved in one run so that every
mode sees the same machine load:

1. Lesson wall time: `torchrun --nproc-per-node N lessons/NN.py` plain, with --trace DIR and
   with --debug, start-up and (for --trace) the export and merge on rank 0 included.
2. Per collective, timed inside the ranks: a loop of all_reduces of 1 KiB and of 4 MiB, plain,
   under --trace (the profiler recording) and under --debug (DETAIL's checks before each one).

    python benchmarks/trace_overhead.py [--lessons 03 06] [--nproc 4] [--repeats 3]

Prints every run; then, for each mode, the fastest run and the median, with their ratios to
those of the plain runs, and the machine's load. The fastest run is the better estimate of the cost
itself on a shared machine; the median says what to expect there.
"""

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from course import launcher  # bounded runs, no process left behind

MODES = {"plain": [], "--trace": ["--trace"], "--debug": ["--debug"]}  # --trace gets a folder
SIZES = {"1 KiB": 256, "4 MiB": 1 << 20}  # float32 elements per all_reduce
REPEATS_INSIDE = {"1 KiB": 200, "4 MiB": 20}  # all_reduces timed per size, after 5 warm-ups


def run(target, nproc, args, folder):
    """Wall time of one bounded run; for --trace, check that the lesson did write a trace."""
    args = [*args, folder] if args[-1:] == ["--trace"] else args
    result = launcher.launch(target, nproc, args, timeout=600, env={"COURSE_BACKEND": "gloo"})
    if result.returncode != 0:
        sys.exit(
            f"{target} {' '.join(map(str, args))} failed:\n"
            + "\n".join(result.lines + result.stuck)
        )
    if "--trace" in args and not (Path(folder) / "trace.json").is_file():
        sys.exit(
            f"{target} ignored --trace: no {folder}/trace.json (does it use course.ranks.setup?)"
        )
    return result


def worker():
    """One rank of measurement 2: time all_reduces of each size, print the mean per call."""
    import torch
    import torch.distributed as dist

    from course.ranks import parser, print0, setup

    p = parser(__doc__)
    p.add_argument("--worker", action="store_true")
    args = p.parse_args()
    with setup(args, trace=args.trace) as ctx:
        for name, numel in SIZES.items():
            x = torch.ones(numel, device=ctx.device)
            for _ in range(5):  # warm-up: connections, allocations
                dist.all_reduce(x)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(REPEATS_INSIDE[name]):
                dist.all_reduce(x)
            seconds = (time.perf_counter() - start) / REPEATS_INSIDE[name]
            print0(f"all_reduce {name}: {seconds * 1e6:.1f} us")


def positive(text):
    """--repeats: a whole number of 1 or more (a median needs at least one run)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of 1 or more")
    return int(text)


def main():
    if "--worker" in sys.argv[1:]:  # a rank of measurement 2, started by this script: its flags
        return worker()  # are the lesson parser's (--trace DIR, --debug), so it parses its own
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--lessons", nargs="+", default=["03", "06"], help="lesson numbers (03 06)")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--repeats", type=positive, default=5)
    args = p.parse_args()  # an unknown flag is an error, not silently ignored
    lessons = [launcher.lesson_path(n) for n in args.lessons]
    load_before = os.getloadavg()[0]
    wall = {(lesson.stem, mode): [] for lesson in lessons for mode in MODES}
    inside = {(size, mode): [] for size in SIZES for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(1, args.repeats + 1):
            for lesson in lessons:
                for mode, flags in MODES.items():  # interleaved: load drift hits all modes alike
                    seconds = run(lesson, args.nproc, flags, f"{tmp}/{lesson.stem}{repeat}").seconds
                    wall[lesson.stem, mode].append(seconds)
                    print(f"run {repeat}: {lesson.stem:20s} {mode:8s} {seconds:6.2f} s", flush=True)
            for mode, flags in MODES.items():
                out = run(Path(__file__), args.nproc, ["--worker", *flags], f"{tmp}/worker{repeat}")
                for line in out.lines:
                    if found := re.search(r"all_reduce (.+): ([\d.]+) us", line):
                        inside[found[1], mode].append(float(found[2]))
                        print(f"run {repeat}: inside, {mode:8s} {line}", flush=True)
    print(
        f"\n{args.nproc} gloo ranks, {args.repeats} runs of each; machine load (1-minute "
        f"average) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on "
        f"{os.cpu_count()} cores. Fastest run, then the median, and their ratio to plain:"
    )
    print(f"  {'lesson wall time':20s}" + "".join(f"{mode:>24s}" for mode in MODES))
    for lesson in lessons:
        print(
            f"  {lesson.stem:20s}"
            + "".join(
                _cell(wall[lesson.stem, mode], wall[lesson.stem, "plain"], "s", 1) for mode in MODES
            )
        )
    for size in SIZES:
        print(
            f"  {'all_reduce ' + size:20s}"
            + "".join(
                _cell(inside[size, mode], inside[size, "plain"], "ms", 1e-3) for mode in MODES
            )
        )


def _cell(times, plain, unit, scale):
    """'fastest / median (ratio to plain's fastest / to plain's median)' for one mode."""
    best, middle = min(times) * scale, statistics.median(times) * scale
    median = statistics.median
    ratios = f"{min(times) / min(plain):.2f}/{median(times) / median(plain):.2f}"
    return f"{best:7.2f}/{middle:.2f} {unit} ({ratios})".rjust(24)


if __name__ == "__main__":
    main()
