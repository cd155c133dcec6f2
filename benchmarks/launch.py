"""How long does a learner wait for ranks? torchrun against the course's warm launcher.

    python benchmarks/launch.py [--repeats 5] [--nproc 4] [--notebooks]

In one run, alternating so that drift in machine load hits every row alike:
- `torchrun --nproc-per-node 4 lessons/00_hello.py` (gloo), the baseline;
- the same lesson through course.launcher.launch(): the first launch of a fresh process (which
  starts the forkserver and imports torch in it) and later launches from a warm one (this one);
- `python -m lessons.check 00 --solution` from the shell, end to end;
- with --notebooks: the same check from a warm notebook kernel (its second run), and notebook
  06 executed with `jupyter nbconvert --execute`.
Prints every run, then the medians and the ratios against the same-run torchrun baseline.
The course's targets: a later launch >= 10x faster than torchrun; a check from the shell
<= 0.5x the torchrun hello; a check from a warm kernel <= 1 s; notebook 06 in <= 10 s.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from course import launcher

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "lessons" / "00_hello.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COURSE_BACKEND": "gloo"}
# A fresh process: its first launch (forkserver start included), then one more.
FIRST = (
    "import sys, time\n"
    "from course import launcher\n"
    "if __name__ == '__main__':\n"
    "    for _ in range(2):\n"
    "        start = time.perf_counter()\n"
    "        assert launcher.launch(sys.argv[1], int(sys.argv[2])).returncode == 0\n"
    "        print(time.perf_counter() - start)\n"
)
# The check of exercise 00.1 against its solution, as `--solution` runs it, from a kernel.
CHECK = "assert run_check(['00.1'], solution_file('00'))[0] == {'00.1': 'pass'}"


def timed(cmd: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=ENV, timeout=300, **kwargs)
    return time.perf_counter() - start


def torchrun(nproc: int) -> float:
    return timed([*launcher.TORCHRUN, f"--nproc-per-node={nproc}", str(HELLO)])


def warm(nproc: int) -> float:
    result = launcher.launch(HELLO, nproc, env={"COURSE_BACKEND": "gloo"})
    assert result.returncode == 0, "\n".join(result.lines)
    return result.seconds


def first_in_fresh_process(nproc: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", FIRST, str(HELLO), str(nproc)],
        check=True,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    return float(out.stdout.split()[0])


def check_from_shell() -> float:
    return timed([sys.executable, "-m", "lessons.check", "00", "--solution"])


class Kernel:
    """A notebook kernel kept for the whole benchmark, as a classroom keeps one."""

    def __init__(self):
        from jupyter_client.manager import start_new_kernel

        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
        self.run("from course.check import run_check, solution_file")
        self.run(CHECK)  # the kernel's first launch starts its forkserver: not counted

    def run(self, code: str) -> float:
        start = time.perf_counter()
        reply = self.client.execute_interactive(code, timeout=120, output_hook=lambda msg: None)
        assert reply["content"]["status"] == "ok", reply["content"]
        return time.perf_counter() - start

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def notebook_06() -> float:
    with tempfile.TemporaryDirectory() as out:
        return timed(
            [
                sys.executable,
                "-m",
                "jupyter",
                "nbconvert",
                "--to",
                "notebook",
                "--execute",
                "--output-dir",
                out,
                str(ROOT / "notebooks" / "06_distill.ipynb"),
            ],
            cwd=ROOT / "notebooks",
        )


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
    p.add_argument("--notebooks", action="store_true", help="also a kernel's check, notebook 06")
    args = p.parse_args()
    n = args.nproc
    rows = {
        "torchrun, lesson 00": lambda: torchrun(n),
        "warm launcher, first launch": lambda: first_in_fresh_process(n),
        "warm launcher, later launch": lambda: warm(n),
        "check 00 --solution, from a shell": check_from_shell,
    }
    kernel = None
    if args.notebooks:
        kernel = Kernel()
        rows["check 00 --solution, warm kernel"] = lambda: kernel.run(CHECK)
        rows["notebook 06, nbconvert --execute"] = notebook_06
    warm(n)  # this process's own first launch (forkserver start): not a "later" one
    times = {name: [] for name in rows}
    try:
        for repeat in range(args.repeats):
            for name, run in rows.items():  # interleaved
                times[name].append(run())
                print(f"run {repeat + 1}: {name:36s} {times[name][-1]:6.2f} s", flush=True)
    finally:
        if kernel:
            kernel.close()
    base = statistics.median(times["torchrun, lesson 00"])
    print(f"\nmedian of {args.repeats}, {n} ranks, gloo        median   vs torchrun")
    for name, t in times.items():
        median = statistics.median(t)
        print(
            f"  {name:36s} {median:6.2f} s   {median / base:5.2f}x  ({base / median:.1f}x faster)"
        )


if __name__ == "__main__":
    main()
