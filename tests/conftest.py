"""Shared test helpers. Every multi-process run goes through course.launcher, so it is bounded
in time, its output comes back in rank order, and it reports any process it left behind."""
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
