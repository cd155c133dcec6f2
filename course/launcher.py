"""Start ranks from outside them: from a notebook cell, a test or an exercise check.

launch() runs torchrun in a subprocess and returns what the ranks printed, in rank order;
run_lesson() prints that and raises if the run failed. Both are bounded in time: a run that
takes too long is stopped with SIGTERM (torchrun passes it on to every rank), each rank's
Python stack says where it was stuck, and no process of the run is left behind.
"""
from __future__ import annotations

import contextlib
import linecache
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent  # the course checkout


class Launched(NamedTuple):
    returncode: int
    lines: list  # "[rank N]" lines in rank order (stable), then every other line as it came
    seconds: float
    stuck: list  # where each rank was, if the run (or torchrun, after a failure) stopped them
    leftovers: int  # processes of this run still alive afterwards (killed, but counted)

    @property
    def timed_out(self):  # the launcher had to stop the run: it did not end by itself
        return self.returncode == -1


class LessonFailed(RuntimeError):
    pass


RANK_LINE = re.compile(r"\[rank ?(\d+)\]:? ")  # ours, "[rank 3] ", and torch's "[rank3]: "
TORCHRUN_LOG = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d")  # torchrun's own log lines


def launch(target, nproc=4, args=(), timeout=120.0, env=None, cwd=None) -> Launched:
    """Run `target` (a .py file, or a module for -m) on `nproc` ranks under torchrun."""
    what = [str(target)] if str(target).endswith(".py") else ["-m", str(target)]
    return run_command([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={nproc}", *what, *map(str, args)], timeout, env, cwd)


def run_command(cmd, timeout=120.0, env=None, cwd=None) -> Launched:
    """Run a command that starts ranks (torchrun, or a lesson under plain python), bounded."""
    with tempfile.TemporaryDirectory(prefix="course-stacks-") as stacks:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NCCL_NVLS_ENABLE": "0",
               "PYTHONUNBUFFERED": "1", **(env or {}), "COURSE_STACK_DIR": stacks}
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", env=env, cwd=cwd)
        try:
            out, timed_out = proc.communicate(timeout=timeout)[0], False
        except subprocess.TimeoutExpired:
            out, timed_out = _stop(proc, stacks), True
        except BaseException:  # an interrupted notebook cell, a test timeout: stop the ranks too
            _stop(proc, stacks)
            raise
        stuck = _where_stuck(stacks)  # ranks stopped by SIGTERM (ours, or torchrun's) left stacks
        if stuck:
            stuck.insert(0, f"stopped after {timeout:.0f} s; where each rank was:" if timed_out
                         else "torchrun stopped the other ranks; where they were:")
        leftovers = _pids_with(stacks)  # e.g. a child process a rank started and never ended
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    lines = out.splitlines()
    ranked = sorted((int(m[1]), i) for i, line in enumerate(lines) if (m := RANK_LINE.match(line)))
    ordered = [lines[i] for _, i in ranked] + _tidy([l for l in lines if not RANK_LINE.match(l)])
    code = -1 if timed_out else proc.returncode
    return Launched(code, ordered, time.monotonic() - start, stuck, len(leftovers))


def _tidy(lines):
    """Drop torchrun's own log lines and tracebacks; its failure report becomes one line."""
    kept, i = [], 0
    while i < len(lines):
        if TORCHRUN_LOG.match(lines[i]):
            i += 1
            continue
        if not lines[i].startswith("Traceback"):
            kept.append(lines[i])
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if not lines[j][:1].isspace()),
                   len(lines) - 1)
        if "ChildFailedError" in lines[end]:  # its report runs on to the last ==== line
            end = max(j for j in range(end, len(lines)) if j == end or lines[j].startswith("===="))
        block = "\n".join(lines[i:end + 1])
        if "torch/distributed/run.py" not in block:  # a traceback of the program's own: keep
            kept.extend(lines[i:end + 1])
        elif first := re.search(r"Root Cause.*?rank\s*: (\d+).*?exitcode\s*: (-?\d+)", block, re.S):
            kept.append(f"torchrun: rank {first[1]} failed first (exit code {first[2]}) and "
                        "torchrun stopped the others")
        i = end + 1
    return kept


def _stop(proc, marker):
    """SIGTERM to torchrun, which passes it to every rank (each then writes its stack); SIGKILL
    only as a last resort: torchrun starts ranks in their own sessions, so killing it alone
    would orphan them."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=15)[0]
    except subprocess.TimeoutExpired:
        for pid in [*_pids_with(marker), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return proc.communicate()[0]


def _pids_with(marker):
    """Every process whose environment holds `marker`: all ranks of one launch (Linux /proc)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker.encode() in environ.read_bytes():
                pids.append(int(environ.parent.name))
    return pids


def _where_stuck(folder):
    """One line per process of each rank (a rank's own children too) from its faulthandler dump:
    the call it was in, and the line of the program that made it."""
    lines = []
    dumps = sorted(Path(folder).glob("rank*.txt"),
                   key=lambda p: [int(n) for n in p.stem[4:].split(".")])
    for path in dumps:
        rank, pid = path.stem[4:].split(".")
        threads = path.read_text().split("\n\n")
        main = next((t for t in threads if "in <module>" in t), threads[0])
        frames = re.findall(r'File "(.+)", line (\d+) in (\S+)', main)  # innermost first
        ours = [f for f in frames if "/torch/" not in f[0] and not f[0].endswith("ranks.py")]
        if frames and ours:
            file, line, _ = ours[0]
            code = linecache.getline(file, int(line)).strip()
            shown = os.path.relpath(file) if file.startswith(str(ROOT)) else file
            where = f"{shown}:{line}: {code}"
            inside = f"in {frames[0][2]}() called " if frames[0] != ours[0] else ""
            who = f"[rank {rank}]" if sum(p.stem.startswith(f"rank{rank}.") for p in dumps) == 1 \
                else f"[rank {rank}] (pid {pid})"
            lines.append(f"{who} {inside}at {where}")
    return lines


def lesson_path(lesson):
    """"06", "06_distill" or a path -> the lesson file."""
    if Path(lesson).is_file():
        return Path(lesson)
    found = sorted((ROOT / "lessons").glob(f"{lesson}*.py"))
    if not found:
        raise FileNotFoundError(f"no lesson matches {lesson!r} in {ROOT / 'lessons'}")
    return found[0]


def run_lesson(lesson, nproc=4, args=(), timeout=300.0, env=None):
    """For notebooks: run a lesson on `nproc` ranks and print its output in rank order.
    Returns None; raises LessonFailed on a non-zero exit or a timeout (ranks stopped first)."""
    path = lesson_path(lesson)
    result = launch(path, nproc, args, timeout, env)
    print("\n".join(result.lines + result.stuck))
    if result.returncode != 0:
        why = ("ran too long and was stopped" if result.timed_out
               else f"exited with {result.returncode}")
        raise LessonFailed(f"{path.name} on {nproc} ranks {why} (its output is above)")
