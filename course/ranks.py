"""What every rank of every lesson needs and none of them teaches. Lesson 00 writes it out in full.

- parser() and setup(): torchrun's variables, backend and device, init, teardown that always runs
- print_rank / print0: each line prefixed "[rank N]" and written in one write(), never torn
- needs: the world sizes a lesson can use, checked on every rank before any collective
- self-launch: `python lessons/NN_topic.py [--nproc N]` runs itself on N ranks (start_ranks)
Starting ranks from outside (notebooks, tests, exercise checks) is course/launcher.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, NoReturn

import torch
import torch.distributed as dist

from course import watch

Needs = tuple[str, Callable[[int], bool]]  # world sizes a lesson can use: (what to say, the test)
EVEN: Needs = ("an even number of ranks, at least 2", lambda n: n >= 2 and n % 2 == 0)
AT_LEAST_2: Needs = ("at least 2 ranks", lambda n: n >= 2)


def dump_stack_on_sigterm(child: bool = False) -> None:
    """Started by course.launcher? Then, if the run is stopped (SIGTERM), leave this rank's
    Python stack in a file, so the launcher can say where each rank was stuck."""
    global _stack_fd
    if _stack_fd is None and "COURSE_STACK_DIR" in os.environ and "RANK" in os.environ:
        name = f"rank{os.environ['RANK']}.{os.getpid()}{'.child' if child else ''}.txt"
        path = Path(os.environ["COURSE_STACK_DIR"]) / name
        _stack_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # for the process's life
        faulthandler.register(signal.SIGTERM, file=_stack_fd, all_threads=True, chain=True)


def _own_stack_file() -> None:
    """In a process a rank forks (a data loader, a helper): its stack goes to a file of its own,
    named by its pid, not into the rank's, where it would be read as the rank's."""
    global _stack_fd
    if _stack_fd is not None:
        os.close(_stack_fd)  # this process's copy of the rank's file
        _stack_fd = None
        dump_stack_on_sigterm(child=True)


_stack_fd = None
dump_stack_on_sigterm()  # under torchrun (run by the launcher): a rank imports this module fresh
os.register_at_fork(after_in_child=_own_stack_file)


def print_rank(*args: object, sep: str = " ") -> None:
    """print() for ranks: every line prefixed `[rank N]`, all of them in one write() call."""
    prefix = f"[rank {os.environ.get('RANK', '0')}] "
    text = sep.join(str(a) for a in args)
    sys.stdout.write("".join(prefix + line + "\n" for line in text.split("\n")))
    sys.stdout.flush()


def print0(*args: object, sep: str = " ") -> None:
    if os.environ.get("RANK", "0") == "0":
        print_rank(*args, sep=sep)


def print_table0(row: dict[str, object]) -> None:
    """Every rank passes its row (a dict, same keys on every rank); rank 0 prints them all,
    aligned, in rank order. A collective: every rank must call it."""
    rows = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(row, rows, dst=0)  # pickled, sent to rank 0; None elsewhere
    if rows:
        width = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in row}
        table = [dict(zip(row, row)), *rows]  # a header row first: each key as its own title
        print_rank("\n".join("  ".join(str(r[k]).rjust(width[k]) for k in row) for r in table))


# --8<-- [start:spread]
def spread(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> float:
    """Largest minus smallest of `tensor` across the ranks of `group`, over all elements: zero
    iff every rank holds the same values. A collective: every rank of `group` must call it."""
    high, low = tensor.detach().clone(), -tensor.detach()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MAX, group=group)  # max of -x is -(min of x)
    return (high + low).max().item()
    # --8<-- [end:spread]


@contextlib.contextmanager
def on_lost_peer(what: str) -> Iterator[None]:
    """A rank that dies closes its connections: gloo fails the next send or recv with it at once
    (any backend: after --timeout). Say in one line what was lost, instead of a traceback."""
    try:
        yield
    except RuntimeError as err:  # gloo's says "[...pair.cc:553] Connection closed by peer ..."
        print_rank(f"error: {what} ({str(err).split('] ')[-1].split('. ')[0]})")
        raise SystemExit(1) from None


def usage_error(message: str, every_rank: bool = True) -> NoReturn:
    """A mistake in how the program was started: exit code 2, no traceback. every_rank: each rank
    finds it too, so wait (bounded) until all have said it, or torchrun stops the slower ones."""
    print_rank(f"error: {message}")
    if every_rank and "MASTER_PORT" in os.environ:
        _all_ranks_reach("usage_error")
    raise SystemExit(2)


def _all_ranks_reach(key, timeout_s=20.0):
    """A barrier on torchrun's own store, for use before (or instead of) init_process_group."""
    store = watch.run_store(timeout_s)
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < int(os.environ["WORLD_SIZE"]) and time.monotonic() < deadline:
        time.sleep(0.005)  # well inside the agent's 0.05 s look: all go before it stops any


def parser(doc: str) -> argparse.ArgumentParser:
    """The lesson's own flags go on this; these are the ones every lesson shares. A bad value, on
    the command line or in a COURSE_ variable, is one clear line on every rank, exit code 2."""
    env = os.environ.get
    if env("COURSE_BACKEND", "auto") not in BACKENDS:
        usage_error(f"COURSE_BACKEND={env('COURSE_BACKEND')}: use one of {', '.join(BACKENDS)}")
    if env("COURSE_DEBUG", "0") not in ("0", "1"):
        usage_error(f"COURSE_DEBUG={env('COURSE_DEBUG')}: set it to 1 (on) or 0 (off)")
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--nproc", type=_nproc, default=4, help="ranks to start under plain python (%(default)s)"
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=env("COURSE_BACKEND", "auto"),
        help="auto: NCCL if every local rank has its own GPU, else gloo on CPU",
    )
    p.add_argument(
        "--timeout",
        type=seconds_above_0("--timeout"),
        default=seconds_above_0("COURSE_TIMEOUT")(env("COURSE_TIMEOUT", "60")),
        help="seconds a collective may wait before it fails (60)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=env("COURSE_DEBUG") == "1",
        help="TORCH_DISTRIBUTED_DEBUG=DETAIL and a 10 s timeout unless --timeout is given "
        "(collectives ~2-3x slower)",
    )
    p.add_argument(
        "--stuck-after",
        type=seconds_above_0("--stuck-after"),
        default=seconds_above_0("COURSE_STUCK_AFTER")(env("COURSE_STUCK_AFTER", "8")),
        help="seconds a rank may wait in one call before the ranks say where each one is (8)",
    )
    p.add_argument("--out", default="out", help="folder for the figures a lesson saves (out/)")
    p.add_argument(
        "--trace",
        metavar="DIR",
        default=env("COURSE_TRACE"),
        help="record every rank with torch.profiler; rank 0 writes DIR/trace.json "
        "and DIR/timeline.png (docs: tracing)",
    )
    return p


BACKENDS = ["auto", "gloo", "nccl"]


def _nproc(text: str) -> int:
    """--nproc's value, checked: a whole number of ranks, 1 or more."""
    if not text.isdigit() or int(text) < 1:
        usage_error(f"--nproc {text}: give a number of ranks, 1 or more, e.g. --nproc 4")
    return int(text)


def whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of `least` or more (repeats, rounds, updates); anything
    else is one line from argparse, before any rank starts."""

    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of {least} or more")
        return int(text)

    return parse


def seconds_above_0(what: str) -> Callable[[str], float]:
    """A timeout's value, checked: a number of seconds above 0 (0 or less would make every
    collective fail at once, with a wall of C++ frames)."""

    def convert(text: str) -> float:
        try:
            seconds = float(text)
        except ValueError:
            seconds = float("nan")
        if not seconds > 0:
            sep = "=" if what.isupper() else " "
            usage_error(f"{what}{sep}{text}: give a number of seconds above 0, e.g. {what}{sep}60")
        return seconds

    return convert


class Rank(NamedTuple):
    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device
    timeout: datetime.timedelta  # pass it to new_group: groups don't inherit the world's


@contextlib.contextmanager
def setup(
    args: argparse.Namespace,
    needs: Needs | None = None,
    *,
    relaunch: bool = False,
    trace: str | None = None,
) -> Iterator[Rank]:
    """Join the process group for the length of a `with` block, and leave it however it ends.
    `needs` = (text, test): the world sizes the program accepts. Opt-ins, each visible at the
    call: relaunch=True lets plain `python lesson.py` start its ranks itself; trace=DIR
    records the block with torch.profiler on every rank and merges the ranks (course/trace.py)."""
    if "RANK" not in os.environ:  # not started by torchrun
        if not relaunch:
            command = f"torchrun --nproc-per-node 4 {' '.join(_main_target())}"
            usage_error(f"start this program with torchrun, e.g. {command}", every_rank=False)
        start_ranks(args.nproc, needs)
    rank, local_rank, world_size, local_world_size = (
        int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    )
    _require(world_size, needs, f"--nproc-per-node {world_size}")  # before any collective
    backend, device = _choose_backend(args.backend, local_rank, local_world_size)
    if args.debug:  # read at `import torch.distributed`, so set it here and for child processes
        os.environ["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
        dist.set_debug_level(dist.DebugLevel.DETAIL)
    given = "COURSE_TIMEOUT" in os.environ or any(a.startswith("--timeout") for a in sys.argv)
    timeout = datetime.timedelta(seconds=10 if args.debug and not given else args.timeout)
    watch.show_stack_on_fatal_signal()  # a C++ abort (gloo's, NCCL's) still shows the Python line
    dist.init_process_group(
        backend, timeout=timeout, device_id=device if backend == "nccl" else None
    )
    try:
        if backend == "nccl":  # create the communicator now, not inside the first timed collective
            dist.barrier(device_ids=[local_rank])
        from course import trace as tracing  # imported only by the ranks that join

        stuck_after = getattr(args, "stuck_after", 8.0)
        with watch.watching(timeout.total_seconds(), stuck_after), tracing.recording(trace):
            yield Rank(rank, local_rank, world_size, backend, device, timeout)
    except Exception as err:  # say it now, before teardown: a peer that notices this rank go
        sys.excepthook(type(err), err, err.__traceback__)  # may end the run before it is said
        sys.stderr.flush()
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _choose_backend(requested, local_rank, local_world_size):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "nccl" and gpus < local_world_size:
        fix = "Use --backend gloo, or auto."
        if gpus:
            fix = f"Start at most {gpus} ranks per node, or use --backend gloo."
        usage_error(
            f"--backend nccl needs one GPU per local rank: {local_world_size} local ranks "
            f"but {gpus} GPUs (NCCL refuses two ranks on one GPU). {fix}"
        )
    if requested == "nccl" or (requested == "auto" and 0 < local_world_size <= gpus):
        device = torch.device("cuda", local_rank)  # LOCAL_RANK picks the GPU, RANK does not
        torch.cuda.set_device(device)
        return "nccl", device
    if requested == "auto":
        why = f"{local_world_size} local ranks but {gpus} GPUs" if gpus else "no GPU"
        print0(f"{why}: using gloo on CPU")
    return "gloo", torch.device("cpu")


def _main_target():
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return ["-m", spec.name.removesuffix(".__main__")] if spec else [sys.argv[0]]


def _require(world_size, needs, started_with):
    if needs and not needs[1](world_size):
        good = next(n for n in (4, 2, 8, 6, 3, 1) if needs[1](n))
        target = " ".join(_main_target())
        usage_error(
            f"{target} needs {needs[0]}, but was started with {started_with}. "
            f"Try: torchrun --nproc-per-node {good} {target}"
        )


def start_ranks(nproc: int, needs: Needs | None = None) -> NoReturn:
    """Plain `python lesson.py`: run this same file on `nproc` ranks, started by torch's elastic
    launcher (torchrun's agent) from this process, and exit as they did."""
    _require(nproc, needs, f"--nproc {nproc}")
    argv = sys.argv[1:]  # the ranks' own flags, without --nproc (and its value, if apart)
    drop = {i for i, a in enumerate(argv) if a.startswith("--nproc")}
    drop |= {i + 1 for i in drop if argv[i] == "--nproc"}
    from course import launcher

    sys.stdout.flush()
    raise SystemExit(launcher.relaunch(nproc, [a for i, a in enumerate(argv) if i not in drop]))
