"""Live ranks for a notebook: N ranks the kernel starts once and keeps, and a %%ranks cell magic
that runs a cell on them (or on some) and prints what each said, in rank order.

    ranks = live.start("00_hello", nproc=4)   # then, in a cell of its own:
    %%ranks                                   # runs on every rank; `%%ranks 0 2`: on ranks 0, 2
    ranks.restart()                           # fresh ranks; the cells that ran are run again

The ranks start as run_lesson starts a lesson (course/launcher.py: torch's elastic launcher,
forked from the warm forkserver): each has torchrun's environment, and joins the process group
when a cell calls the lesson's setup. A rank runs every cell in one namespace, the lesson's
(`__main__`, with its file and docstring): a cell sees what the last one left. A cell not done
by its bound (`%%ranks --timeout 30`; 300 s) or stopped by the kernel's interrupt stops every
rank, each one's stack saying where it was. A rank whose kernel is gone ends itself and its
children: restarting the kernel leaves nothing running.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import linecache
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import types
from multiprocessing.connection import Client, Listener, wait

from course import launcher

TIMEOUT_S = 300.0  # a cell's bound, as run_lesson's
_current: Ranks | None = None  # the ranks %%ranks runs cells on


class RanksFailed(RuntimeError):
    def _render_traceback_(self):  # IPython shows this: the ranks' own tracebacks are above it
        return [f"RanksFailed: {self}"]


def start(lesson: str, nproc: int = 4, timeout: float = TIMEOUT_S) -> Ranks:
    """`nproc` live ranks in the namespace of `lesson` ("00_hello", or a path), %%ranks's from
    now on; the ranks of an earlier start() are stopped."""
    global _current
    if _current:
        _current.stop()
    _current = Ranks(lesson, nproc, timeout)
    with contextlib.suppress(ImportError, AttributeError):  # not in IPython: no magic
        from IPython import get_ipython

        get_ipython().register_magic_function(_ranks_magic, "cell", "ranks")
    return _current


class Ranks:
    def __init__(self, lesson: str, nproc: int, timeout: float):
        self.lesson, self.nproc, self.timeout = launcher.lesson_path(lesson), nproc, timeout
        self.ran: list[tuple[str, list[int]]] = []  # cells that ran: what restart() runs again
        self.count, self.folder, self.conns = 0, None, {}
        atexit.register(self.stop)  # the kernel exits (a restart): no rank outlives it
        self._start()

    def _start(self) -> None:
        key = os.urandom(16)  # a rank proves it knows it (HMAC) before it is listened to
        listener = Listener(("127.0.0.1", 0), authkey=key)
        self.folder, self.read = tempfile.mkdtemp(prefix="course-live-"), [0] * self.nproc
        self.failed = None  # how the run ended, if a rank left: the launcher's one line
        host, port = listener.address
        env = {"COURSE_LIVE": f"{host}:{port}:{key.hex()}:{os.getpid()}"}
        self.agent = launcher.start_agent(
            "course.live", self.nproc, [str(self.lesson)], env, self.folder, "forkserver", False
        )
        self.conns = {}  # rank -> its connection: each rank says its rank first
        threading.Thread(
            target=_accept, args=(listener, self.nproc, self.conns), daemon=True
        ).start()
        deadline = time.monotonic() + 120
        try:
            while len(self.conns) < self.nproc and time.monotonic() < deadline:
                if self.agent.finished.wait(0.05):  # the ranks ended before they all came
                    break
        except BaseException:
            self.stop()
            raise
        finally:
            with contextlib.suppress(OSError):  # wake a waiting accept(): a connection, no word
                socket.create_connection((host, port), timeout=1).close()
            listener.close()
        if len(self.conns) < self.nproc:
            said = self._output(range(self.nproc))
            self.stop()
            raise RanksFailed(f"the ranks did not start in 120 s, or failed:\n{said}")

    def run(self, source: str, on=(), timeout=None, quiet=False) -> None:
        """Run `source` on the ranks `on` (all by default); print what each said."""
        if not self.folder:
            raise RanksFailed("the ranks were stopped: ranks.restart() starts them again")
        on = sorted(set(on)) or list(range(self.nproc))
        if bad := [r for r in on if not 0 <= r < self.nproc]:
            raise ValueError(f"no rank {bad[0]}: the ranks are 0..{self.nproc - 1}")
        self.count += 1
        name = f"<cell {self.count}>"  # the cell's name in tracebacks and stacks
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        timeout, replies = timeout or self.timeout, {}
        deadline = time.monotonic() + timeout
        try:
            for rank in on:
                self.conns[rank].send((source, name))
            while len(replies) < len(on):
                waiting = {self.conns[r]: r for r in on if r not in replies}
                for conn in wait(list(waiting), timeout=0.1):
                    replies[waiting[conn]] = conn.recv()  # EOFError: the rank is gone
                if time.monotonic() > deadline and len(replies) < len(on):
                    raise TimeoutError(f"not done after {timeout:g} s")
        except (KeyboardInterrupt, TimeoutError, EOFError, OSError) as err:
            said = [self._output(on), *self._stop_showing_stacks(replies)]
            print("\n".join(filter(None, said)))
            why = str(err) if isinstance(err, TimeoutError) else "interrupted"
            if isinstance(err, (EOFError, BrokenPipeError)):  # which rank, and how: the agent knows
                why = f"a rank left ({self.failed})" if self.failed else "a rank left"
            raise RanksFailed(
                f"{why}: every rank was stopped; ranks.restart() starts fresh ones and runs "
                f"again the {_cells(len(self.ran))} that had run"
            ) from None
        if (said := self._output(on)) and not quiet:
            sys.stdout.write(said + "\n")
        if failed := {r: why for r, why in replies.items() if why}:
            plural = "s" * (len(failed) > 1)
            raise RanksFailed(f"rank{plural} {str(sorted(failed))[1:-1]}: {failed[min(failed)]}")
        self.ran.append((source, on))

    def _output(self, on) -> str:
        """What the ranks `on` wrote since the last look, rank by rank, each line "[rank N]"."""
        lines = []
        for rank in on:
            with open(os.path.join(self.folder, f"out.{rank:05d}.txt"), "a+") as out:
                out.seek(self.read[rank])
                text = out.read()
                self.read[rank] += len(text.encode())
            for line in text.splitlines():
                lines.append(line if launcher.RANK_LINE.match(line) else f"[rank {rank}] {line}")
        return "\n".join(lines)

    def _stop_showing_stacks(self, replies) -> list[str]:
        launcher.stop(self.agent, self.folder)  # SIGTERM: each rank writes its stack, then ends
        stuck = launcher.where_stuck(self.folder)
        failure = self.agent.failure
        self.failed = launcher.failure_line(failure, self.folder) if failure else None
        shown = [line for line in stuck if int(line.split("]")[0][6:]) not in replies]
        done = [f"[rank {r}] had finished the cell" for r in sorted(replies)]
        self.stop()
        return ["where each rank was:", *shown, *done] if shown else done

    def stop(self) -> None:
        """End every rank (each leaves the process group), bounded; then kill what is left."""
        if not self.folder:
            return
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                conn.send(None)  # leave: what keep_open holds closes (the process group)
        if not self.agent.finished.wait(10):
            launcher.stop(self.agent, self.folder)
        launcher.kill_all(self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder, self.conns = None, {}

    def restart(self) -> None:
        """Fresh ranks, and every cell that had run run again on them, quietly."""
        self.stop()
        self._start()
        cells, self.ran = self.ran, []
        for source, on in cells:
            self.run(source, on, quiet=True)
        print(f"{self.nproc} fresh ranks; ran again the {_cells(len(cells))} that had run")


def _accept(listener, nproc, conns) -> None:
    with contextlib.suppress(Exception):  # a connection that failed the handshake: given up
        while len(conns) < nproc:
            conn = listener.accept()
            conns[conn.recv()] = conn


def _ranks_magic(line: str, cell: str) -> None:
    """%%ranks [RANK ...] [--timeout SECONDS]: run the cell on those ranks (default: all)."""
    words = line.replace("--timeout ", "--timeout=").split()
    timeout = next((float(w[10:]) for w in words if w.startswith("--timeout=")), None)
    _current.run(cell, [int(w) for w in words if not w.startswith("--")], timeout)


# A rank: started by the launcher as `python -m course.live LESSON`.


def _serve(lesson: str) -> None:
    host, port, key, kernel = os.environ["COURSE_LIVE"].split(":")
    conn = Client((host, int(port)), authkey=bytes.fromhex(key))
    threading.Thread(target=_end_with, args=(int(kernel),), daemon=True).start()
    kept = contextlib.ExitStack()  # what keep_open entered: closed as the rank leaves
    doc = ast.get_docstring(ast.parse(open(lesson).read()), clean=False)
    ns = types.ModuleType("__main__", doc)  # __main__: what a cell defines pickles by name
    ns.__file__, ns.keep_open = lesson, kept.enter_context
    sys.modules["__main__"], sys.argv = ns, [lesson]  # the lesson's parser sees no flags
    conn.send(int(os.environ["RANK"]))
    with kept:
        try:
            while message := conn.recv():
                cell, name = message
                linecache.cache[name] = (len(cell), None, cell.splitlines(True), name)
                conn.send(_run(cell, name, ns.__dict__))
        except (EOFError, OSError, KeyboardInterrupt):  # the kernel is gone, or going: tidy up
            shutil.rmtree(os.environ[launcher.MARK], ignore_errors=True)


def _run(cell: str, name: str, ns: dict) -> str | None:
    """Run one cell in `ns`: None, or what went wrong (its traceback goes to stderr)."""
    try:
        exec(_compile(cell, name), ns)
    except SystemExit as err:
        return f"exit code {err.code}"
    except BaseException as err:
        tb = err.__traceback__
        while tb and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        traceback.print_exception(type(err), err, tb)
        return f"{type(err).__name__}: {(str(err).strip() or ' ').splitlines()[0]}"
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _compile(cell: str, name: str):
    """A cell as code. A step of main() may `return` (this rank's part ends): such a cell runs
    as a function whose names are all global, so what it assigns stays for the next cell."""
    tree = ast.parse(cell, name)
    if not any(isinstance(n, ast.Return) for n in _same_scope(tree)):
        return compile(tree, name, "exec")
    names = sorted({n.id for n in _same_scope(tree) if isinstance(n, ast.Name)})
    module = ast.parse("def __cell__():\n    pass\n__cell__()")
    module.body[0].body = ([ast.Global(names)] if names else []) + tree.body
    return compile(ast.fix_missing_locations(module), name, "exec")


def _same_scope(node):
    """The names `node` stores, and its returns, outside nested functions and comprehensions."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Return) or (
            isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store)
        ):
            yield child
        if not isinstance(child, (ast.FunctionDef, ast.Lambda, ast.ClassDef, ast.comprehension)):
            yield from _same_scope(child)


def _end_with(kernel: int) -> None:
    """The kernel is gone (killed, restarted): end this rank and its children now."""
    while launcher.still_running([kernel]):
        time.sleep(0.5)
    shutil.rmtree(os.environ[launcher.MARK], ignore_errors=True)  # the run's folder
    os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":
    _serve(sys.argv[1])


def _cells(n: int) -> str:
    return f"{n} cell{'s' * (n != 1)}"
