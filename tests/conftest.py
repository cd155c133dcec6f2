"""Shared test helpers. Every multi-process run goes through course.launcher, so it is bounded
in time, its output comes back in rank order, and it reports any process it left behind."""

import contextlib
import os
import random
import re
import socket
import sys

import pytest
import torch

from course.launcher import ROOT, launch, run_command, warm_up, what_you_should_see

# A rank waiting this long in one call says where every rank is (course/watch.py). On a loaded
# test machine a rank can wait 10 s (the default) for one that draws a figure: the tests of the
# report set it themselves.
os.environ.setdefault("COURSE_STUCK_AFTER", "30")
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))
PROGRAMS = ROOT / "tests" / "programs"


def pytest_sessionstart(session):
    warm_up()  # the ranks' forkserver imports torch while pytest collects the tests
    # (a hook, not at import: a rank that runs a test file as its program imports this module)


def lesson_ids():
    return [path.stem for path in LESSONS]


def run_ranks(target, nproc=4, args=(), timeout=180, env=None, via="forkserver"):
    """`target` on `nproc` gloo ranks, started by the warm launcher (or via="torchrun", the real
    command); the run must leave no process behind."""
    env = {"COURSE_BACKEND": "gloo", **(env or {})}
    result = launch(target, nproc, args, timeout, env, via=via)
    assert result.leftovers == 0, f"{result.leftovers} processes outlived the run"
    return result


def run_python(path, args=(), timeout=180, env=None):
    """`python path args` (a lesson starting its own ranks), bounded, no leftovers."""
    cmd = [sys.executable, str(path), *map(str, args)]
    result = run_command(cmd, timeout, {"COURSE_BACKEND": "gloo", **(env or {})})
    assert result.leftovers == 0, f"{result.leftovers} processes outlived the run"
    return result


def line_of(path, code):
    """The number of the first line of `path` holding `code` (as a traceback or stack shows it)."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if code in line)


def text(result):
    return "\n".join(result.lines + result.stuck)


# A number in a lesson's output: a count, a timing, a port, a loss. Numbers vary with the
# machine and the world size; the words around them are what must not drift.
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def expected_output(path):
    """The lesson's "What you should see" block, the one copy of its expected output, as
    patterns, one per output line, in order: `...` matches anything, a number any number,
    `  <- note` is a remark for the reader, a line `...` alone stands for lines left out, and
    a line indented further continues the one above."""
    shown = []
    for line in what_you_should_see(path):
        line = re.sub(r"\s+<-.*$", "", line)
        if line.startswith(" ") and shown and not line.lstrip().startswith("..."):
            shown[-1] += " " + line.strip()  # a continuation line
        elif line.strip() and line.strip() != "...":
            shown.append(line)
    assert shown, f"{path.name}: its 'What you should see' block is empty"
    return [(line, _pattern(line)) for line in shown]


def _pattern(line):
    """One shown line as a regex: its `[rank N]` prefix kept, `...` anything, any number for a
    number, any run of spaces for a run of spaces (column widths follow the numbers)."""
    prefix = re.match(r"\[rank \d+\]", line)
    head, rest = (prefix[0], line[prefix.end() :]) if prefix else ("", line)
    parts = re.split(rf"(\.\.\.|\s+|(?<![\w.]){NUMBER}(?!\w))", rest)
    return re.compile(re.escape(head) + "".join(map(_piece, parts)) + r"\s*")


def _piece(part):
    if part == "...":
        return ".*"
    if part.isspace():
        return r"\s+"
    return NUMBER if re.fullmatch(NUMBER, part) else re.escape(part)


def assert_shows(out, path, checked_only=False):
    """`out` holds every line of the lesson's expected output, in order (other lines may come
    between). checked_only: just its `checked:` lines (another world size changes tables)."""
    shown = expected_output(path)
    if checked_only:
        shown = [(line, pattern) for line, pattern in shown if "checked:" in line]
    lines, at = out.splitlines(), 0
    for line, pattern in shown:
        found = next((i for i in range(at, len(lines)) if pattern.fullmatch(lines[i])), None)
        assert found is not None, (
            f"{path.name}: its docstring shows\n  {line}\nbut no line "
            f"after line {at} of the run's output looks like it (numbers "
            f"and `...` may differ):\n{out}"
        )
        at = found + 1


def free_port():
    """A free port outside Linux's range for outgoing connections' ports (32768-60999), so that
    no connection of a test running beside this one takes it before its user binds it."""
    for _ in range(50):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", random.randrange(20000, 32000)))
            return s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lesson(request):
    return ROOT / "lessons" / f"{request.param}.py"


def reference_student(n_students, steps=4, teacher_steps=3, batch=8, vocab=256, seq=32, lr=1e-2):
    """distill_demo's and rpc_demo's single-process reference (distill_demo/reference.py) for
    the tests' runs: tiny models on the CPU, one student on every student's batches at once,
    learning from the teacher's full probabilities, whatever the run sent. Returns the student."""
    from distill_demo.reference import train_reference
    from distill_demo.train import Config

    cfg = Config(
        "tiny",
        vocab,
        seq,
        batch,
        lr,
        topk=vocab,
        teacher_steps=teacher_steps,
        device=torch.device("cpu"),
    )
    return train_reference(cfg, "full", n_students, steps)[1]


def assert_refused_on_every_rank(target, nproc, args, says, timeout=120):
    """`target` on `nproc` ranks fails, every rank printing `error: ` and one of them `says`,
    with no traceback (a clear refusal, not a crash). Returns the output."""
    result = run_ranks(target, nproc, args, timeout=timeout)
    out = text(result)
    assert result.returncode != 0, out
    for rank in range(nproc):
        assert f"[rank {rank}] error: " in out, out
    assert says in out, out
    assert "Traceback" not in out, out
    return out


# A scenario (a test file run as a program, beside an engine job) prints `RESULT name: text`
# lines, each in one write; the test reads them back by name.
def report(name, value):
    sys.stdout.write(f"RESULT {name}: {value}\n")
    sys.stdout.flush()


def reported(out):
    """{name: text} from the `RESULT name: text` lines of `out`."""
    return {
        line.split(": ", 1)[0][len("RESULT ") :]: line.split(": ", 1)[1]
        for line in out.splitlines()
        if line.startswith("RESULT ") and ": " in line
    }


def engine_address(port_file, within=120):
    """The address an engine job writes to `port_file`, once it has (it may still be starting)."""
    import time

    deadline = time.monotonic() + within
    while not os.path.exists(port_file):
        if time.monotonic() > deadline:
            raise SystemExit(f"no engine wrote {port_file} within {within} s")
        time.sleep(0.1)
    with open(port_file) as f:
        return f.read()


def die_after_sends(group, sends=2):
    """Make this process (a trainer) SIGKILL itself mid-update: once `group` has sent `sends`
    messages and the last has left, it reports `dying` and is killed."""
    import signal

    send, sent = group.send, []

    def send_then_die(data, dst):
        work = send(data, dst)
        sent.append(work)
        if len(sent) == sends:
            work.wait()
            report("dying", f"after {sends} buckets")
            os.kill(os.getpid(), signal.SIGKILL)
        return work

    group.send = send_then_die


@contextlib.contextmanager
def engine_job(target, nproc, args, port_file, scenarios):
    """An engine: `target` on `nproc` ranks in a thread, serving until a scenario stops it.
    Yields the job's box, {"result": run_ranks's} once it has ended. On the way out, an engine
    still running that wrote `port_file` (a scenario failed before stopping it) is stopped by
    `python scenarios shutdown port_file`; then the job is joined and any error raised."""
    import threading

    box = {}

    def serve():
        try:
            box["result"] = run_ranks(target, nproc, args, timeout=240)
        except BaseException as err:  # e.g. processes left behind: report it in the test
            box["error"] = err

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        if thread.is_alive() and os.path.exists(port_file):
            run_python(scenarios, ["shutdown", port_file], timeout=60)
        thread.join(260)
        assert not thread.is_alive(), "the engine job did not end"
        if "error" in box:
            raise box["error"]
