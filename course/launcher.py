"""Start ranks from outside them: from a notebook cell, a test or an exercise check.

launch() runs torchrun in a subprocess and returns what the ranks printed, in rank order;
run_lesson() prints that and raises if the run failed. Both are bounded in time: a run that
takes too long is stopped with SIGTERM (torchrun passes it on to every rank), each rank's
Python stack says where it was stuck, and no process of the run is left behind. Every process
of a run carries the run's own COURSE_STACK_DIR in its environment, inherited by the children
a rank starts and kept by orphans that have left torchrun's process tree: that is how the
launcher finds them all afterwards, to report and kill them.
"""

from __future__ import annotations

import ast
import contextlib
import linecache
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from subprocess import PIPE, STDOUT, Popen, TimeoutExpired
from typing import NamedTuple

import psutil

ROOT = Path(__file__).resolve().parent.parent  # the course checkout
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# Every run: one thread per rank (ranks share a few cores), NVLink multicast off, no buffering.
RUN_ENV = {"OMP_NUM_THREADS": "1", "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"}
MARK = "COURSE_STACK_DIR"  # a folder per run: where each rank stopped by SIGTERM leaves its stack
RANK_LINE = re.compile(r"\[rank ?(\d+)\]:? ")  # ours, "[rank 3] ", and torch's "[rank3]: "
TORCHRUN_LOG = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d")  # torchrun's own log lines


class Launched(NamedTuple):
    returncode: int  # -1: the launcher stopped the run (see timed_out)
    lines: list[str]  # "[rank N]" lines in rank order (stable), then every other line as it came
    seconds: float
    stuck: list[str]  # where each rank was, if the run (or torchrun, after a failure) stopped it
    leftovers: int  # processes of this run still alive afterwards (killed, but counted)

    @property
    def timed_out(self) -> bool:  # the launcher had to stop the run: it did not end by itself
        return self.returncode == -1


class LessonFailed(RuntimeError):
    pass


def launch(
    target: str | Path,
    nproc: int = 4,
    args: Iterable = (),
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> Launched:
    """Run `target` (a .py file, or a module for -m) on `nproc` ranks under torchrun."""
    what = [str(target)] if str(target).endswith(".py") else ["-m", str(target)]
    return run_command(
        [*TORCHRUN, f"--nproc-per-node={nproc}", *what, *map(str, args)], timeout, env
    )


def run_command(
    cmd: list[str],
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> Launched:
    """Run a command that starts ranks (torchrun, or a lesson under plain python), bounded."""
    with tempfile.TemporaryDirectory(prefix="course-run-") as run:
        env = {**os.environ, **RUN_ENV, **(env or {}), MARK: run}
        start = time.monotonic()
        proc = Popen(cmd, stdout=PIPE, stderr=STDOUT, text=True, errors="replace", env=env, cwd=cwd)
        try:
            out, timed_out = proc.communicate(timeout=timeout)[0], False
        except TimeoutExpired:
            out, timed_out = _stop(proc, run), True
        except BaseException:  # an interrupted notebook cell, a test timeout: stop the ranks too
            _stop(proc, run)
            raise
        finally:  # e.g. a child a rank started and never ended: it outlives torchrun
            leftovers = _kill_all(run)
        stuck = _where_stuck(run)  # ranks stopped by SIGTERM (ours, or torchrun's) left stacks
    if stuck and timed_out:
        stuck.insert(0, f"stopped after {timeout:.0f} s; where each rank was:")
    elif stuck:
        stuck.insert(0, "torchrun stopped the other ranks; where they were:")
    lines = out.splitlines()
    ranked = sorted((int(m[1]), i) for i, line in enumerate(lines) if (m := RANK_LINE.match(line)))
    rest = _tidy([line for line in lines if not RANK_LINE.match(line)])
    lines = [lines[i] for _, i in ranked] + rest
    code = -1 if timed_out else proc.returncode
    return Launched(code, lines, time.monotonic() - start, stuck, leftovers)


def processes_with(name: str, value: str) -> list[psutil.Process]:
    """Every process (that this user may read) whose environment holds name=value."""
    return [
        p for p in psutil.process_iter(["environ"]) if (p.info["environ"] or {}).get(name) == value
    ]


def _stop(proc: Popen, run: str) -> str:
    """SIGTERM to torchrun, which passes it to every rank (each then writes its stack), or to
    the ranks themselves if torchrun is gone. SIGKILL only as a last resort: torchrun starts
    ranks in their own sessions, so killing it alone would orphan them."""
    for p in [proc] if proc.poll() is None else processes_with(MARK, run):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=15)[0]
    except TimeoutExpired:
        for p in processes_with(MARK, run):  # torchrun too: its environment holds the mark
            with contextlib.suppress(psutil.Error):
                p.kill()
        return proc.communicate()[0]  # the output pipe closes once every holder of it is gone


def _kill_all(run: str) -> int:
    """SIGKILL every process of the run still alive, until none is (one may start another as
    it goes); how many there were."""
    seen: set[psutil.Process] = set()
    while fresh := [p for p in processes_with(MARK, run) if p not in seen]:
        for p in fresh:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(fresh, timeout=5)
        seen.update(fresh)
    return len(seen)


def _tidy(lines: list[str]) -> list[str]:
    """Drop torchrun's own log lines and tracebacks; its failure report becomes one line."""
    kept, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("Traceback"):
            if not TORCHRUN_LOG.match(lines[i]):
                kept.append(lines[i])
            i += 1
            continue
        end = next(
            (j for j in range(i + 1, len(lines)) if not lines[j][:1].isspace()), len(lines) - 1
        )
        if "ChildFailedError" in lines[end]:  # its report runs on to the last ==== line
            end = max(j for j in range(end, len(lines)) if j == end or lines[j].startswith("===="))
        block = "\n".join(lines[i : end + 1])
        if "torch/distributed/run.py" not in block:  # a traceback of the program's own: keep
            kept += lines[i : end + 1]
        elif first := re.search(r"Root Cause.*?rank\s*: (\d+).*?exitcode\s*: (-?\d+)", block, re.S):
            kept.append(
                f"torchrun: rank {first[1]} failed first (exit code {first[2]}) and "
                "torchrun stopped the others"
            )
        i = end + 1
    return kept


def _where_stuck(folder: str) -> list[str]:
    """One line per process of each rank (a rank's own children too) from its faulthandler dump:
    the call it was in, and the line of the program that made it."""
    lines = []
    dumps = sorted(
        Path(folder).glob("rank*.txt"), key=lambda p: [int(n) for n in p.stem[4:].split(".")]
    )
    for path in dumps:
        rank, pid = path.stem[4:].split(".")
        threads = path.read_text().split("\n\n")
        main = next((t for t in threads if "in <module>" in t), threads[0])
        frames = re.findall(r'File "(.+)", line (\d+) in (\S+)', main)  # innermost first
        ours = [f for f in frames if "/torch/" not in f[0] and not f[0].endswith("ranks.py")]
        if not ours:
            continue
        file, line, _ = ours[0]
        shown = os.path.relpath(file) if file.startswith(str(ROOT)) else file
        where = f"{shown}:{line}: {linecache.getline(file, int(line)).strip()}"
        inside = f"in {frames[0][2]}() called " if frames[0] != ours[0] else ""
        alone = sum(p.stem.startswith(f"rank{rank}.") for p in dumps) == 1
        lines.append(f"[rank {rank}]{'' if alone else f' (pid {pid})'} {inside}at {where}")
    return lines


def lesson_path(lesson: str | Path) -> Path:
    """A lesson's number ("06"), name ("06_distill") or path -> its file."""
    if Path(lesson).is_file():
        return Path(lesson)
    found = sorted((ROOT / "lessons").glob(f"{lesson}*.py"))
    if not found:
        raise FileNotFoundError(f"no lesson matches {lesson!r} in {ROOT / 'lessons'}")
    return found[0]


def what_you_should_see(lesson: str | Path) -> list[str]:
    """The "What you should see" block of a lesson's docstring, as it reads: the one copy of its
    expected output, which the docs show and the tests hold against a real run."""
    doc = ast.get_docstring(ast.parse(lesson_path(lesson).read_text())).splitlines()
    start = next(i for i, line in enumerate(doc) if line.startswith("What you should see"))
    block = []
    for line in doc[start + 1 :]:
        if line.strip() and not line.startswith("    "):
            break  # the block ends at the next unindented line
        block.append(line[4:].rstrip())
    while block and not block[-1]:
        block.pop()
    return block


def run_lesson(
    lesson: str | Path,
    nproc: int = 4,
    args: Iterable = (),
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> None:
    """For notebooks: run a lesson on `nproc` ranks and print its output in rank order.
    Returns None; raises LessonFailed on a non-zero exit or a timeout (ranks stopped first)."""
    path = lesson_path(lesson)
    done = launch(path, nproc, args, timeout, env)
    print("\n".join(done.lines + done.stuck))
    if done.returncode != 0:
        why = "ran too long and was stopped" if done.timed_out else f"exited with {done.returncode}"
        raise LessonFailed(f"{path.name} on {nproc} ranks {why} (its output is above)")
