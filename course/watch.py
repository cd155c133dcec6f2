"""What every rank watches for, so that a mistake explains itself, at almost no cost to a good run.

course.ranks.setup() turns these on for the length of its `with` block:

- **new_group's order.** Each rank's k-th `dist.new_group` call is compared with every other
  rank's k-th call through torchrun's store, before torch creates the group. Ranks that create
  groups in a different order, or only the groups they are in, fail at once, on every rank,
  naming the groups, the ranks and the line (torch itself would give wrong sums or a hang).
- **Hangs.** A thread notes every second where the main thread is (the torch.distributed call
  and the program's line). When a rank has waited `--stuck-after` seconds (8) in one call, the
  first rank to notice prints where every rank is; the run keeps waiting, and fails at
  `--timeout` as before.
- **Fatal signals.** faulthandler prints the Python stack of a rank that a C++ abort kills
  (gloo aborts a rank that receives more bytes than its tensor holds).
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import functools
import itertools
import json
import linecache
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

TORCH = str(Path(dist.__file__).parent.parent)  # .../site-packages/torch
COURSE = str(Path(__file__).parent)
LIBRARY = (TORCH, COURSE, sys.prefix, sys.base_prefix)  # not the program's own lines
EVERY_S = 1.0  # how often each rank notes where it is
CONNECT_S = 60.0  # the least time a store client is given to connect


@contextlib.contextmanager
def watching(timeout_s: float, stuck_after_s: float) -> Iterator[None]:
    """Check new_group calls and report hangs for the length of a `with` block (after init)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    original = dist.new_group
    # Each connects when first needed, not here: on a loaded CI machine a store client's connect
    # once took more than 10 s, and setup need not wait for it.
    store = functools.cache(lambda: run_store(timeout_s))
    dist.new_group = _checked(original, store, rank, world_size, timeout_s)
    watch = _Watch(functools.partial(run_store, timeout_s), rank, world_size, stuck_after_s)
    watch.start()
    try:
        yield
    finally:
        dist.new_group = original
        watch.stop()


@contextlib.contextmanager
def unchecked_new_group() -> Iterator[None]:
    """torch's own new_group for the length of a `with` block, unchecked: lesson 01 breaks the
    rule on purpose, to show what torch alone does."""
    checked = dist.new_group
    dist.new_group = getattr(checked, "__wrapped__", checked)
    try:
        yield
    finally:
        dist.new_group = checked


def run_store(timeout_s: float) -> dist.Store:
    """A client of the store torchrun (or rank 0) hosts, under this run's own prefix: every rank
    can reach it, and using it touches no process group (whatever the program did to them).
    timeout_s bounds its waits; connecting gets at least CONNECT_S, as it is no part of the
    program (on a loaded CI machine a connect once outlasted --debug's 10 s)."""
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    connect = datetime.timedelta(seconds=max(timeout_s, CONNECT_S))
    store = dist.TCPStore(address, port, is_master=False, timeout=connect)
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"course/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def _checked(new_group, connect, rank, world_size, timeout_s):
    """dist.new_group, after every rank's k-th call has been compared with the others'."""
    calls = itertools.count(1)

    @functools.wraps(new_group)
    def checked_new_group(ranks=None, *args, **kwargs):
        if kwargs.get("use_local_synchronization"):  # only members call it: nothing to compare
            return new_group(ranks, *args, **kwargs)
        k, caller = next(calls), sys._getframe(1)
        mine = sorted(ranks) if ranks is not None else list(range(world_size))
        store = connect()
        store.set(f"new_group/{k}/{rank}", json.dumps([mine, _place(caller)]))
        keys = [f"new_group/{k}/{r}" for r in range(world_size)]
        rule = (
            "every rank must call new_group for every group, even the groups it is not in, in "
            "the same order: build the list of groups the same way on every rank (lesson 01)"
        )
        deadline = time.monotonic() + timeout_s
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.01)  # polled, not store.wait(): its timeout prints C++ socket warnings
        if not store.check(keys):
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            raise RuntimeError(
                f"new_group call {k} ({mine} at {_place(caller)}): rank(s) "
                f"{', '.join(map(str, missing))} made no call {k} within {timeout_s:g} s: {rule}"
            ) from None
        seen = {}  # (groups, place) -> the ranks that called new_group so
        for r, key in enumerate(keys):
            seen.setdefault(tuple(map(str, json.loads(store.get(key)))), []).append(r)
        if len({groups for groups, _ in seen}) > 1:
            said = " but ".join(
                f"{groups} on rank{'s' * (len(who) > 1)} {', '.join(map(str, who))} (at {place})"
                for (groups, place), who in seen.items()
            )
            raise RuntimeError(f"the ranks disagree on new_group call {k}: {said}. Fix: {rule}")
        return new_group(ranks, *args, **kwargs)

    return checked_new_group


def _place(frame):
    return f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}"


def _short(path):
    return os.path.relpath(path) if path.startswith(os.getcwd() + os.sep) else path


def where(frame) -> tuple[str | None, str]:
    """(the torch.distributed call the frame is in, e.g. "recv(src=2, tensor [4] float32)", or
    None; the program's line that made it, "lessons/x.py:40: dist.recv(t, src=2)")."""
    stack = []  # innermost first
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    inner = 0  # the frames of the torch.distributed call the rank is in now, if any
    while inner < len(stack) - 1 and _in(stack[inner], TORCH + "/distributed"):
        inner += 1
    mine = [f for f in stack[inner:] if not _in(f, *LIBRARY)] or stack[inner:]
    if not inner:
        return None, _line(mine[0])
    c10d = [f for f in stack[:inner] if f.f_code.co_filename.endswith("distributed_c10d.py")]
    call = (c10d or stack[:inner])[-1]  # the outermost: all_gather_object, not all_gather
    return f"{call.f_code.co_name}({_args(call)})", _line(mine[0])


def _in(frame, *folders):
    return frame.f_code.co_filename.startswith(folders)


def _line(frame):
    code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{_place(frame)}: {code}"


def _args(frame):
    """The arguments that tell two ranks' calls apart: peers, roots and the tensor's shape."""
    values = dict(frame.f_locals)
    peers = ("src", "dst", "group_src", "group_dst")
    said = [f"{k}={values[k]}" for k in peers if isinstance(values.get(k), int)]
    said = [s for s in said if not (s.startswith("group_") and s[6:] in said)]  # dst=1 is enough
    tensor = values.get("tensor")
    if hasattr(tensor, "shape"):
        said.append(f"tensor {list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}")
    return ", ".join(said)


class _Watch(threading.Thread):
    """Every second: note where this rank's main thread is; once it has waited stuck_after_s in
    one torch.distributed call, the first rank to notice prints where every rank is."""

    def __init__(self, connect, rank, world_size, stuck_after_s):
        super().__init__(name="course-watch", daemon=True)
        self.connect, self.store, self.rank, self.world_size = connect, None, rank, world_size
        self.stuck_after_s, self.main = stuck_after_s, threading.main_thread().ident
        self.stopping = threading.Event()

    def run(self):
        with contextlib.suppress(Exception):  # the store can go first at the end of a run
            self.store = self.connect()  # its own client: none is shared between threads
            last, since = None, time.monotonic()
            keys = [f"where/{r}" for r in range(self.world_size)]
            while not self.stopping.wait(EVERY_S):  # a first note a second in: past setup
                frame = sys._current_frames().get(self.main)
                here = where(frame) if frame is not None else (None, "?")
                now = time.monotonic()
                if here != last:
                    last, since = here, now
                note = [*here, now - since, time.time()]
                self.store.set(f"where/{self.rank}", json.dumps(note))
                waited = now - since
                # Say it once every rank has noted where it is (one that started late is no
                # longer in setup), or, if some never do, at twice the wait.
                if here[0] and waited >= self.stuck_after_s:
                    if self.store.check(keys) or waited >= 2 * self.stuck_after_s:
                        if self.store.add("where/reported", 1) == 1:  # one report per run
                            self.report(waited)

    def report(self, waited):
        """Where every rank is, as each last noted it (at most a second ago)."""
        keys = [f"where/{r}" for r in range(self.world_size)]
        lines = [
            f"stuck? rank {self.rank} has waited {waited:.0f} s in one call; where every rank is "
            "(the run fails at --timeout; --debug names a mismatched collective at once):"
        ]
        for r, key in enumerate(keys):
            if not self.store.check([key]):
                lines.append(f"  rank {r}: not started yet")
                continue
            call, line, for_s, at = json.loads(self.store.get(key))
            if call == "done":
                lines.append(f"  rank {r}: left the process group (its program ended)")
            elif time.time() - at > 3 * EVERY_S:
                silent = time.time() - at
                lines.append(f"  rank {r}: no news for {silent:.0f} s (died?); last at {line}")
            else:
                lines.append(f"  rank {r}: {for_s:.0f} s {f'in {call} ' if call else ''}at {line}")
        from course.ranks import print_rank

        print_rank("\n".join(lines))

    def stop(self):
        self.stopping.set()
        self.join(timeout=5)
        with contextlib.suppress(Exception):
            self.store.set(f"where/{self.rank}", json.dumps(["done", "", 0, time.time()]))


def show_stack_on_fatal_signal() -> None:
    """A rank killed by SIGSEGV, SIGABRT, SIGBUS, SIGFPE or SIGILL prints its Python stack
    (every thread) on stderr first: the line of the program it was in."""
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)
