"""How much does a lesson add to torchrun's own start-up? Wall time of
`torchrun --standalone --nproc-per-node N lessons/00_hello.py` against a bare hello world on the
same backend (benchmarks/bare_hello.py: gloo on CPU, NCCL when every rank has a GPU),
interleaved in one run so both see the same machine load.

    python benchmarks/startup.py [--repeats 5] [--nproc 4]

Prints each run, the medians and their ratio (target: lesson / bare <= 1.2).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = {
    "bare hello world": ROOT / "benchmarks" / "bare_hello.py",
    "lessons/00_hello.py": ROOT / "lessons" / "00_hello.py",
}


def wall_time(path, nproc):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
    return time.perf_counter() - start


def positive(text):
    """--repeats: a whole number of 1 or more (a median needs at least one run)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of 1 or more")
    return int(text)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=positive, default=5)
    p.add_argument("--nproc", type=int, default=4)
    args = p.parse_args()
    times = {name: [] for name in PROGRAMS}
    wall_time(PROGRAMS["bare hello world"], args.nproc)  # warm the file cache; not counted
    for repeat in range(args.repeats):
        for name, path in PROGRAMS.items():  # interleaved: drift in load hits both alike
            times[name].append(wall_time(path, args.nproc))
            print(f"run {repeat + 1}: {name:22s} {times[name][-1]:6.2f} s", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nmedian of {args.repeats}, {args.nproc} ranks:")
    for name, median in medians.items():
        print(f"  {name:22s} {median:6.2f} s")
    ratio = medians["lessons/00_hello.py"] / medians["bare hello world"]
    print(f"  ratio lesson / bare    {ratio:6.2f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
