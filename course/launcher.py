"""Start ranks from outside them: from a notebook cell, a test, an exercise check, or a lesson
started with plain python.

launch() starts the ranks through torch's elastic launcher, the agent torchrun runs, called as a
function in this process: the ranks are forked from a process that has already imported torch
(a forkserver kept warm for the life of this process, or this process itself), so a launch
takes well under a second instead of torchrun's 5-8 s. The ranks get torchrun's environment
variables and rendezvous; the lesson runs as under torchrun, with `__name__ == "__main__"`.
run_lesson() prints what the ranks said, in rank order, and raises if the run failed.

Every run is bounded in time: a run that takes too long is stopped with SIGTERM, each rank's
Python stack says where it was stuck, and no process of the run is left behind. Each rank
leads a process group of its own (its children join it) and carries the run's
COURSE_STACK_DIR in its environment (its exec'd children inherit it, even those that leave the
group): that is how the launcher finds them all afterwards, to report and kill them.
run_command() runs a command that starts ranks itself (real torchrun, two nodes), bounded alike.
"""

from __future__ import annotations

import ast
import contextlib
import linecache
import logging
import multiprocessing
import os
import re
import runpy
import signal
import sys
import tempfile
import threading
import time
import uuid
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
# Starting the ranks (the forkserver, torch's agent, each rank's imports) takes a second when the
# machine is idle and 20 s on a loaded 2-core one: bounded apart, so that a run's own bound
# (`timeout`) counts from when every rank has started, and means the same on both.
STARTUP_S = 120.0
RANK_LINE = re.compile(r"\[rank ?(\d+)\]:? ")  # ours, "[rank 3] ", and torch's "[rank3]: "
TORCHRUN_LOG = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d")  # torchrun's own log lines
# What torch's elastic agent sets for each rank; a caller's own values must not hide them.
AGENT_VARS = {
    *"RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE ROLE_RANK".split(),
    *"ROLE_NAME ROLE_WORLD_SIZE MASTER_ADDR MASTER_PORT TORCH_NCCL_ASYNC_ERROR_HANDLING".split(),
}
# What the forkserver imports once, so that every rank forked from it starts with them loaded.
PRELOAD = [  # torch.testing and torch.distributed.tensor: lessons' ranks import them lazily
    *["torch", "torch.distributed", "torch.testing", "torch.distributed.tensor"],
    *["course.ranks", "course.check"],
]


class Launched(NamedTuple):
    returncode: int  # -1: the launcher stopped the run (see timed_out)
    lines: list[str]  # "[rank N]" lines in rank order (stable), then every other line as it came
    seconds: float
    stuck: list[str]  # where each rank was, if the run (or a failed rank) made the launcher stop it
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
    *,
    via: str = "forkserver",
) -> Launched:
    """Run `target` (a .py file, or a module as for -m) on `nproc` ranks, for at most `timeout`
    seconds once every rank has started (STARTUP_S to start them). via: "forkserver" (the
    warm default), "fork" (from this process: fastest when it has torch imported and no other
    threads), or "torchrun" (the real command, in a subprocess)."""
    if via == "torchrun":
        what = [str(target)] if str(target).endswith(".py") else ["-m", str(target)]
        cmd = [*TORCHRUN, f"--nproc-per-node={nproc}", *what, *map(str, args)]
        return run_command(cmd, timeout, env, nproc=nproc)
    with tempfile.TemporaryDirectory(prefix="course-run-") as run:
        start, failed, timed_out = time.monotonic(), None, False
        thread = start_agent(target, nproc, [str(a) for a in args], env or {}, run, via, False)
        try:
            while not (thread.finished.is_set() or _all_started(run, nproc, start)):
                time.sleep(0.05)
            timed_out = not _wait(thread, time.monotonic() + timeout)
        except BaseException:  # an interrupted notebook cell, a test timeout: stop the ranks too
            stop(thread, run)
            raise
        finally:
            if timed_out:
                stop(thread, run)
            lost = _stop_lost_ranks(run)  # alive when the agent had given them up
            leftovers = kill_all(run)  # e.g. a child a rank started and never ended
        failed = thread.failure
        stuck = where_stuck(run)
        said = [failure_line(failed, run, lost)] if failed and not timed_out else []
        lines = _rank_order(run, nproc) + said
    if stuck and timed_out:
        stuck.insert(0, f"stopped after {timeout:.0f} s; where each rank was:")
    elif stuck and (failed or leftovers):  # else: a rank's own child stopped by the rank (a pool)
        stuck.insert(0, "the launcher stopped the other ranks; where they were:")
    else:
        stuck = []
    code = -1 if timed_out else (1 if failed else 0)
    return Launched(code, lines, time.monotonic() - start, stuck, leftovers)


def relaunch(nproc: int, argv: list[str]) -> int:
    """`python lesson.py`: run this same program on `nproc` ranks forked from this process,
    their output straight to this terminal; Ctrl-C stops them all and shows where each was."""
    import torch.distributed  # noqa: F401  (imported once here, not once per rank)

    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    target = spec.name.removesuffix(".__main__") if spec else os.path.abspath(main.__file__)
    signal.signal(signal.SIGTERM, _interrupt)  # stopped from outside: stop the ranks as Ctrl-C
    with tempfile.TemporaryDirectory(prefix="course-run-") as run:
        thread = start_agent(target, nproc, argv, {}, run, "fork", True)
        try:
            done = _wait(thread, float("inf"))  # a terminal run: Ctrl-C is its bound
        except KeyboardInterrupt:
            done = False
        finally:
            if not thread.finished.is_set():
                stop(thread, run)
            leftovers = kill_all(run)
        stuck = where_stuck(run) if not done or thread.failure or leftovers else []
        if not done:
            stuck.insert(0, "stopped; where each rank was:")
        elif stuck:
            stuck.insert(0, "the launcher stopped the other ranks; where they were:")
        if thread.failure and done:
            stuck.insert(0, failure_line(thread.failure, run))
        if stuck:
            print("\n".join(stuck), file=sys.stderr, flush=True)
    return 0 if done and not thread.failure else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class _Agent(threading.Thread):
    """torch's elastic agent (torchrun's) in a thread: the caller's main thread stays free to
    time the run and to take Ctrl-C, and the agent installs no signal handlers of its own."""

    def __init__(self, config, args):
        super().__init__(daemon=True, name="course-launcher-agent")
        self.config, self.args, self.failure = config, args, None
        # Waited on instead of join(): a join() that Ctrl-C interrupts marks the thread as
        # stopped while it still runs (CPython's bpo-45274 fix), and we would stop nothing.
        self.finished = threading.Event()

    def run(self):
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import elastic_launch

        _quiet_agent()
        try:
            elastic_launch(self.config, _rank_main)(*self.args)
        except ChildFailedError as err:
            self.failure = err.failures  # {rank: ProcessFailure}, exit codes and times
        except Exception as err:  # the agent itself failed (e.g. rendezvous): report it as is
            self.failure = {-1: err}
        finally:
            self.finished.set()


def _quiet_agent() -> None:
    """The agent logs what it sees (a rank failed, it stopped the others): we say it ourselves."""
    for name in list(logging.Logger.manager.loggerDict):  # the agent's logs are not the lesson's:
        if name.startswith(
            ("torch.distributed.elastic", "torch.distributed.la", "torch.mu", "torchel")
        ):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # what failed, we report ourselves


_forkserver_ready = False


def warm_up() -> None:
    """Start the forkserver now, in the background: its imports (a few seconds) then overlap
    with whatever this process does before its first launch (a notebook's first cells)."""
    global _forkserver_ready
    if not _forkserver_ready:  # preloaded once, before its first start
        multiprocessing.set_forkserver_preload(PRELOAD)
        _forkserver_ready = True
    from multiprocessing import forkserver

    forkserver.ensure_running()


def start_agent(target, nproc, argv, env, run, via, stream) -> _Agent:
    """Start torch's elastic agent in a thread, running `target` on `nproc` ranks forked `via`
    "fork" or "forkserver"; `run` is the run's folder (its mark), `stream`: the ranks write to
    this terminal rather than to a file each. Returns at once; course/live.py keeps it running."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    if via == "forkserver":
        warm_up()
    target = str(target)
    if target.endswith(".py"):
        target = os.path.abspath(target)
    # LaunchConfig asks torch.cuda.is_available() (to bind ranks to NUMA nodes). The CUDA
    # runtime's answer poisons every later fork of this process: each rank forked from it then
    # fails at its first CUDA call ("Cannot re-initialize CUDA in forked subprocess"). NVML's
    # answer, which torch documents for this case, does not.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port, as torchrun --standalone
        start_method=via,
        max_restarts=0,
        monitor_interval=0.05,  # how often the agent looks at its ranks (torchrun: 0.1 s)
        logs_specs=DefaultLogsSpecs(log_dir=os.path.join(run, "logs")),
    )
    # The ranks see this process's environment as it is now, as torchrun's would (the forkserver
    # holds the one it started with), less what the agent sets for each rank.
    mine = {k: v for k, v in os.environ.items() if k not in AGENT_VARS and "TORCHELASTIC" not in k}
    env = {**mine, **RUN_ENV, **env, MARK: run}
    thread = _Agent(config, (target, argv, env, os.getcwd(), stream))
    thread.start()
    return thread


def _rank_main(target: str, argv: list[str], env: dict, cwd: str, stream: bool) -> None:
    """One rank, in its forked process: what torchrun's child would be, then the program."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # forked from relaunch(), which catches it
    os.environ.update(env)
    os.setpgid(0, 0)  # a process group of its own, which its children join: found and stopped
    run, rank = Path(env[MARK]), os.environ["RANK"]
    (run / f"pid.{rank}.{os.getpid()}").touch()
    if not stream:  # this rank's output, in the order it wrote it, in a file of its own
        out = os.open(run / f"out.{int(rank):05d}.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(out, 1)
        os.dup2(out, 2)
    import torch

    from course import ranks

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch was imported before it
    _answer_the_agent_on_exit()
    ranks.dump_stack_on_sigterm()
    os.chdir(cwd)
    sys.argv = [target, *argv]
    try:
        if target.endswith(".py"):
            sys.path.insert(0, os.path.dirname(target))  # as `python file.py` would
            runpy.run_path(target, run_name="__main__")
        else:
            sys.path.insert(0, cwd)  # as `python -m module` would
            sys.modules.pop(target, None)  # imported before the fork: run it afresh, as -m does
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) or err.code is None else 1
        if code:  # as Python would: a message is printed, a number is the exit code
            if not isinstance(err.code, int):
                print(err.code, file=sys.stderr)
            _exit(code)
    except BaseException as err:  # as Python would at the top level: the traceback, then exit 1
        tb = err.__traceback__  # from the program's first frame on, not the launcher's or runpy's
        while tb and tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>"):
            tb = tb.tb_next
        # torch's hook, once a group exists, prefixes each line with "[rankN]: "
        sys.excepthook(type(err), err.with_traceback(tb), tb)
        _exit(1)
    sys.stdout.flush()
    Path(env[MARK], f"done.{rank}").touch()  # it returned: neither failed nor was killed


def _answer_the_agent_on_exit() -> None:
    """The agent counts a rank as done once it has its return value, which _wrap sends after we
    return. A program that leaves by os._exit(0) (a test's sudden death) never returns: send
    the value first, or the agent waits for it until the run's timeout."""
    frame = sys._getframe(1)
    while frame and "ret_val_" not in frame.f_locals:  # torch's _wrap, which called us
        frame = frame.f_back
    answer = frame.f_locals["ret_val_"] if frame else None
    real_exit, rank_pid = os._exit, os.getpid()

    def _exit_now(code):
        if os.getpid() == rank_pid:  # not in a child the rank forked: it inherits this
            Path(os.environ[MARK], f"exit.{os.environ['RANK']}").write_text(repr(time.time()))
            if code == 0 and answer is not None:
                answer.put(None)
        real_exit(code)

    os._exit = _exit_now


def _exit(code: int) -> None:
    """Leave now with `code`: the agent reads it as the rank's exit code, as torchrun would.
    (os._exit, as _answer_the_agent_on_exit set it: it notes the time in the run's folder.)"""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait(thread: _Agent, deadline: float) -> bool:
    """Until the agent has returned (True) or the deadline passed (False); Ctrl-C raises."""
    while not thread.finished.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            return False
    return True


def _all_started(run: str, nproc: int | None, start: float) -> bool:
    """Has every one of `nproc` ranks started (or STARTUP_S passed since `start`)? A rank that
    runs has made its stack file (course.ranks.dump_stack_on_sigterm), empty until stopped."""
    ranks = {p.name.split(".")[0] for p in Path(run).glob("rank*.txt") if ".child" not in p.name}
    return nproc is None or len(ranks) >= nproc or time.monotonic() > start + STARTUP_S


def _rank_pids(run: str) -> list[int]:
    return [int(p.name.split(".")[2]) for p in Path(run).glob("pid.*")]


def _rank_order(run: str, nproc: int) -> list[str]:
    """Every rank's output: "[rank N]" lines in rank order (stable), then the rest, rank by rank."""
    lines = []
    for path in sorted(Path(run).glob("out.*.txt")):
        lines += _fatal_said(int(path.stem[4:]), path.read_text(errors="replace").splitlines())
    ranked = sorted((int(m[1]), i) for i, line in enumerate(lines) if (m := RANK_LINE.match(line)))
    return [lines[i] for _, i in ranked] + [line for line in lines if not RANK_LINE.match(line)]


def _fatal_said(rank: int, lines: list[str]) -> list[str]:
    """A rank killed by a fatal signal (a C++ abort): C++'s message and faulthandler's report,
    prefixed with the rank as torch prefixes a traceback; the stack as the one line it was in."""
    if not (fatal := [i for i, line in enumerate(lines) if line.startswith("Fatal Python")]):
        return lines
    said = [
        f"[rank{rank}]: {line}" if line.startswith(("terminate called", "  what():")) else line
        for line in lines[: fatal[0]]
    ]
    where = _stack_line("\n".join(lines[fatal[0] :])) or "(no Python stack)"
    return [*said, f"[rank{rank}]: {lines[fatal[0]]}, {where}"]


def failure_line(failures: dict, run: str, lost: list[int] = ()) -> str:
    """Which rank failed first, how, and what happened to the others, in one line."""
    if -1 in failures:
        err = failures[-1]
        return f"launcher: the elastic agent failed: {type(err).__name__}: {err}"
    if lost or all(f.exitcode == 255 for f in failures.values()):  # what a lost forkserver says
        return (
            "launcher: the forkserver the ranks were forked from is gone (killed from outside?): "
            f"the run is lost{f'; stopped the {len(lost)} ranks still running' if lost else ''}"
        )
    # The agent stamps a failure with the second it saw it, so ranks that end together tie. A
    # rank that ended through _exit() wrote the time it did; one killed by a signal (an abort,
    # a crash, SIGKILL) wrote nothing, and it goes first: the others can only have noticed it.
    # A rank can also die of a fatal signal as the agent stops the others for another's exit,
    # unreported: faulthandler's "Fatal Python error" in its output says so.
    codes = _killed(run) | _fatal(run) | {r: f.exitcode for r, f in failures.items()}
    exits = {r: float(p.read_text()) for r in codes if (p := Path(run, f"exit.{r}")).exists()}
    signalled = {r for r, code in codes.items() if code < 0 and code != -signal.SIGTERM}
    when = {r: exits.get(r, failures[r].timestamp if r in failures else 0) for r in codes}
    first = min(codes, key=lambda r: (r not in signalled, when[r], r))
    # Stopped: the agent reports one failed rank at a time, so count the ranks that wrote a
    # stack (only SIGTERM makes one) too.
    stacks = [(int(p.name[4:].split(".")[0]), p.stat().st_size) for p in Path(run).glob("rank*")]
    dumped = {r for r, size in stacks if size}
    stopped = sorted((dumped | {r for r, c in codes.items() if c == -signal.SIGTERM}) - {first})
    line = f"launcher: rank {first} failed first (exit code {codes[first]})"
    if codes[first] == -signal.SIGABRT and "match expected size" in _output(run, first):
        line += " (gloo aborts the rank that RECEIVED more bytes than its tensor holds: the rank "
        line += "whose tensor differs may be another; --debug compares them and names it)"
    if stopped:
        line += f"; the launcher stopped rank{'s' * (len(stopped) > 1)} "
        line += ", ".join(map(str, stopped))
    return line


def _output(run: str, rank: int) -> str:
    path = Path(run, f"out.{rank:05d}.txt")
    return path.read_text(errors="replace") if path.exists() else ""


FATAL = {"Aborted": -6, "Segmentation fault": -11, "Bus error": -7, "Floating point exception": -8}


def _fatal(run: str) -> dict[int, int]:
    """{rank: exit code} of the ranks whose output shows faulthandler's report of a fatal signal."""
    found = {}
    for path in Path(run).glob("out.*.txt"):
        if m := re.search(
            r"^Fatal Python error: (\w[\w ]*)", path.read_text(errors="replace"), re.M
        ):
            found[int(path.stem.split(".")[1])] = FATAL.get(m[1], -6)
    return found


def _killed(run: str) -> dict[int, int]:
    """{rank: -9} of the ranks that left no trace of how they ended: neither returned, nor exited
    through _exit(), nor wrote a stack when stopped (SIGTERM), nor reported a fatal signal. Only
    SIGKILL ends a process so silently. (torch's agent reports one failed rank per poll, so a
    rank killed a moment before another exits may be missing from its report.)"""
    found, folder = {}, Path(run)
    for pid_file in folder.glob("pid.*"):
        rank, pid = pid_file.name.split(".")[1:]
        ended = [f"done.{rank}", f"exit.{rank}"]
        stack = folder / f"rank{rank}.{pid}.txt"
        if not any((folder / name).exists() for name in ended) and not (
            stack.exists() and stack.stat().st_size
        ):
            found[int(rank)] = -signal.SIGKILL
    return {r: code for r, code in found.items() if r not in _fatal(run)}


def _stop_lost_ranks(run: str) -> list[int]:
    """Ranks still running once the agent has returned: SIGTERM (their stacks are written),
    then whatever is left is killed with the rest of the run."""
    lost = []
    for pid in still_running(_rank_pids(run)):
        with contextlib.suppress(psutil.Error):
            lost.append(psutil.Process(pid))
    for p in lost:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    psutil.wait_procs(lost, timeout=10)
    return [p.pid for p in lost]


def stop(thread: _Agent, run: str) -> None:
    """SIGTERM to every rank's process group (each rank, and each process it forked, then
    writes its stack, and the agent sees them fail), and to each rank that starts meanwhile
    (stopped while starting); wait for the agent; SIGKILL what is left after 15 s."""
    signalled, deadline = set(), time.monotonic() + 15
    while True:
        for pid in set(_rank_pids(run)) - signalled:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)  # a rank leads its own group (_rank_main)
            signalled.add(pid)
        if thread.finished.wait(0.1) or time.monotonic() > deadline:
            break
    if not thread.finished.is_set():
        kill_all(run)
        thread.finished.wait(15)


def run_command(
    cmd: list[str],
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    nproc: int | None = None,
) -> Launched:
    """Run a command that starts ranks (torchrun, or a lesson under plain python), bounded:
    `timeout` seconds from when its `nproc` ranks have started (None: from its start)."""
    with tempfile.TemporaryDirectory(prefix="course-run-") as run:
        env = {**os.environ, **RUN_ENV, **(env or {}), MARK: run}
        start, ran = time.monotonic(), None
        proc = Popen(cmd, stdout=PIPE, stderr=STDOUT, text=True, errors="replace", env=env, cwd=cwd)
        try:
            while True:
                try:  # read as it goes (a full pipe would stall the ranks), a bound in view
                    out, timed_out = proc.communicate(timeout=0.1)[0], False
                    break
                except TimeoutExpired:
                    if ran is None and _all_started(run, nproc, start):
                        ran = time.monotonic()
                    if ran is not None and time.monotonic() > ran + timeout:
                        out, timed_out = _stop_command(proc, run), True
                        break
        except BaseException:  # an interrupted notebook cell, a test timeout: stop the ranks too
            _stop_command(proc, run)
            raise
        finally:  # e.g. a child a rank started and never ended: it outlives torchrun
            leftovers = kill_all(run)
        stuck = where_stuck(run)  # ranks stopped by SIGTERM (ours, or torchrun's) left stacks
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


def _stop_command(proc: Popen, run: str) -> str:
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


def kill_all(run: str) -> int:
    """SIGKILL every process of the run still alive, until none is (one may start another as
    it goes); how many there were. The run's processes: those whose environment holds its mark
    (exec'd ones), and those in the process group of one of its ranks (forked ones)."""
    groups, seen, torchs = set(_rank_pids(run)), set(), set()
    while fresh := [p for p in _processes_of(run, groups) if p not in seen | torchs]:
        # One that ends within seconds of its rank (e.g. multiprocessing's resource tracker, a
        # child the rank joined late, on a loaded machine) has not been left behind.
        fresh = psutil.wait_procs(fresh, timeout=3)[1]
        for p in fresh:
            with contextlib.suppress(psutil.Error):
                # torch_shm_manager (the name cut to 15 characters): torch's own, ends late itself
                (torchs if p.name().startswith("torch_shm_manag") else seen).add(p)
                p.kill()
        psutil.wait_procs(fresh, timeout=5)
    return len(seen)


def _processes_of(run: str, groups: set[int]) -> list[psutil.Process]:
    found = processes_with(MARK, run)
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if p not in found and os.getpgid(p.pid) in groups:
                found.append(p)
    return [p for p in found if still_running([p.pid])]


def still_running(pids: Iterable[int]) -> list[int]:
    """Those of `pids` still running: not gone, not a zombie (it has ended; only its parent has
    not reaped it)."""
    running = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
    return running


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
        elif line := _torchrun_summary(block):
            kept.append(line)
        i = end + 1
    return kept


def _torchrun_summary(report: str) -> str | None:
    """torchrun's ChildFailedError report as one line: the rank that failed first, and those
    torchrun stopped (SIGTERM). Its "Root Cause" is the failure it saw first, to the second;
    ranks that end together tie, and one it stopped itself is never the cause."""
    entry = r"rank\s*: (\d+).*?exitcode\s*: (-?\d+)"
    codes = {int(r): int(c) for r, c in re.findall(entry, report, re.S)}
    if not (root := re.search(rf"Root Cause.*?{entry}", report, re.S)):
        return None
    stopped = sorted(r for r, code in codes.items() if code == -signal.SIGTERM)
    first = int(root[1])
    if codes[first] == -signal.SIGTERM and len(stopped) < len(codes):
        first = min(r for r, code in codes.items() if code != -signal.SIGTERM)
    stopped = [r for r in stopped if r != first]
    line = f"torchrun: rank {first} failed first (exit code {codes[first]})"
    if stopped:
        line += f"; torchrun stopped rank{'s' * (len(stopped) > 1)} {', '.join(map(str, stopped))}"
    return line


def where_stuck(folder: str) -> list[str]:
    """One line per process of each rank (a rank's own children too) from its faulthandler dump:
    the call it was in, and the line of the program that made it. A process a rank forked has a
    file of its own (course.ranks._own_stack_file), shown as the rank's child."""
    lines = []
    dumps = Path(folder).glob("rank*.txt")  # rank{R}.{pid}.txt, a forked child's .child.txt
    for path in sorted(dumps, key=lambda p: [int(n) for n in p.stem[4:].split(".")[:2]]):
        rank, pid, *child = path.stem[4:].split(".")
        if where := _stack_line(path.read_text()):
            lines.append(f"[rank {rank}]{f' (its child, pid {pid})' if child else ''} {where}")
    return lines


def _stack_line(dump: str) -> str | None:
    """faulthandler's dump of a process's threads -> "in recv() called at x.py:40: <code>": the
    main thread's innermost call, and the line of the program that made it."""
    threads = dump.split("\n\n")
    main = next((t for t in threads if "in <module>" in t), threads[0])
    frames = re.findall(r'File "(.+)", line (\d+) in (\S+)', main)  # innermost first
    library = (sys.prefix, sys.base_prefix, str(ROOT / "course"))  # python's, torch's, ours
    ours = [f for f in frames if not f[0].startswith(library)] or [
        f
        for f in frames
        if "/torch/" not in f[0]  # a process in library code only: its line
    ]
    if not ours:
        return None
    file, line, _ = ours[0]
    shown = os.path.relpath(file) if file.startswith(str(ROOT)) else file
    where = f"{shown}:{line}: {linecache.getline(file, int(line)).strip()}"
    return f"{f'in {frames[0][2]}() called ' if frames[0] != ours[0] else ''}at {where}"


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
