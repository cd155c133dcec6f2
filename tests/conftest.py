"""Shared test helpers. Every multi-process run goes through course.launcher, so it is bounded
in time, its output comes back in rank order, and it reports any process it left behind."""
import ast
import re
import socket
import sys

import pytest
import torch

from course.launcher import ROOT, launch, run_command

LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))
PROGRAMS = ROOT / "tests" / "programs"


def lesson_ids():
    return [path.stem for path in LESSONS]


def run_ranks(target, nproc=4, args=(), timeout=180, env=None):
    """torchrun `target` on `nproc` gloo ranks; the run must leave no process behind."""
    result = launch(target, nproc, args, timeout, {"COURSE_BACKEND": "gloo", **(env or {})})
    assert result.leftovers == 0, f"{result.leftovers} processes outlived the run"
    return result


def run_python(path, args=(), timeout=180, env=None):
    """`python path args` (a lesson re-launching itself under torchrun), bounded, no leftovers."""
    result = run_command([sys.executable, str(path), *map(str, args)], timeout,
                         {"COURSE_BACKEND": "gloo", **(env or {})})
    assert result.leftovers == 0, f"{result.leftovers} processes outlived the run"
    return result


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
    lines = ast.get_docstring(ast.parse(path.read_text())).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("What you should see"))
    shown = []
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith("    "):
            break  # the block ends at the next unindented line
        line = re.sub(r"\s+<-.*$", "", line[4:].rstrip())
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
    head, rest = (prefix[0], line[prefix.end():]) if prefix else ("", line)
    parts = re.split(rf"(\.\.\.|\s+|(?<![\w.]){NUMBER}(?!\w))", rest)
    body = "".join(".*" if part == "..." else r"\s+" if part.isspace() else
                   NUMBER if re.fullmatch(NUMBER, part) else re.escape(part) for part in parts)
    return re.compile(re.escape(head) + body + r"\s*")


def assert_shows(out, path, checked_only=False):
    """`out` holds every line of the lesson's expected output, in order (other lines may come
    between). checked_only: just its `checked:` lines (another world size changes tables)."""
    shown = expected_output(path)
    if checked_only:
        shown = [(line, pattern) for line, pattern in shown if "checked:" in line]
    lines, at = out.splitlines(), 0
    for line, pattern in shown:
        found = next((i for i in range(at, len(lines)) if pattern.fullmatch(lines[i])), None)
        assert found is not None, (f"{path.name}: its docstring shows\n  {line}\nbut no line "
                                   f"after line {at} of the run's output looks like it (numbers "
                                   f"and `...` may differ):\n{out}")
        at = found + 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lesson(request):
    return ROOT / "lessons" / f"{request.param}.py"


def reference_student(n_students, steps=4, teacher_steps=3, batch=8, vocab=256, seq=32,
                      lr=1e-2):
    """distill_demo's and rpc_demo's single-process reference: the same teacher (trained the
    same way), one student on every student's batches at once, learning from the teacher's full
    probabilities. Returns the student."""
    from distill_demo.data import MarkovData
    from distill_demo.knowledge import kl_full
    from distill_demo.models import make_student, make_teacher
    from distill_demo.train import PRETRAIN_SHARD, RECIPES

    data = MarkovData(vocab, seq)
    teacher = make_teacher("tiny", vocab, seq)
    lr, warmup = RECIPES["tiny"].teacher_lr, RECIPES["tiny"].warmup
    assert warmup == 0, "this reference pretrains without a warm-up, as tiny did"
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr)
    for step in range(teacher_steps):
        ids = data.batch(step, PRETRAIN_SHARD, batch)
        loss = torch.nn.functional.cross_entropy(teacher(ids[:, :-1]).flatten(0, 1),
                                                 ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    student = make_student("tiny", vocab, seq)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    for step in range(steps):
        batches = [data.batch(step, shard, batch) for shard in range(n_students)]
        with torch.no_grad():
            targets = [teacher(ids).softmax(-1) for ids in batches]
        loss = sum(kl_full(student(ids), p) for ids, p in zip(batches, targets)) / n_students
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student
