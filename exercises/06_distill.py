"""Checks for lesson 06's exercises (lessons/06_distill.py). Run them: python -m lessons.check 06

Each check runs on every rank, calls the learner's function and returns (yours, expected), the
expected value computed in one process, without collectives. It also watches how your function
gets there (unittest.mock: dist.all_reduce works as before and counts its calls), so that an
answer which skips what the exercise teaches fails, saying why.
"""

from unittest import mock

import torch
import torch.distributed as dist

from course.check import lesson_module

lesson = lesson_module("06")


def flat_grads(model):
    """Every .grad in one vector (NaN where a .grad is None)."""
    grads = [
        torch.full_like(p, torch.nan) if p.grad is None else p.grad for p in model.parameters()
    ]
    return torch.cat([grad.reshape(-1) for grad in grads])


def check_bucketed_dp_step(ctx, bucketed_dp_step):
    """Every rank: two steps data-parallel within its half (students with students, teachers
    with teachers), against one process that averages the half's gradients itself."""
    students, teachers = lesson.roles(ctx.world_size)
    # Both groups, on every rank.
    groups = [dist.new_group(r, timeout=ctx.timeout) for r in (students, teachers)]
    mine, group = (students, groups[0]) if ctx.rank in students else (teachers, groups[1])
    teacher = lesson.make_model(lesson.TEACHER_WIDTH, lesson.TEACHER_SEED).to(ctx.device)

    def backward(model, ranks, step):  # the gradient of the mean loss over `ranks`' batches
        batches = [lesson.input_ids(step, r).to(ctx.device) for r in ranks]
        losses = [lesson.kl_loss(model(ids), lesson.answer(teacher, ids)) for ids in batches]
        sum(loss / len(ranks) for loss in losses).backward()

    make_student = lambda: lesson.make_model(lesson.STUDENT_WIDTH, lesson.STUDENT_SEED)
    yours, expected = (make_student().to(ctx.device) for _ in range(2))
    yours_opt, expected_opt = (lesson.make_optimizer(m, 2)[0] for m in (yours, expected))
    all_reduces = []  # per step: how many dist.all_reduce calls yours made
    for step in range(2):  # two steps: the second uses Adam's state from the first
        yours_opt.zero_grad()
        backward(yours, [ctx.rank], step)  # my batch only
        with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce:
            bucketed_dp_step(yours, yours_opt, group)
        all_reduces.append(all_reduce.call_count)
        expected_opt.zero_grad()
        backward(expected, mine, step)  # the whole half's batches, in this one process
        expected_opt.step()
    one = all_reduces == [1, 1] or (
        f"no: it called dist.all_reduce {all_reduces} times in steps 0 and 1; the exercise "
        "flattens every .grad into one bucket and all_reduces it once per step"
    )
    return [
        {
            "weights after 2 steps": lesson.flat_weights(m),
            "averaged gradient": flat_grads(m),
            "one all_reduce per step": said,
        }
        for m, said in ((yours, one), (expected, True))
    ]


# Exercise id -> (its check, the function(s) you write, defined in the lesson).
EXERCISES = {"06.1": (check_bucketed_dp_step, "bucketed_dp_step")}
# The checks run on 4 ranks, then on 2: an answer written for 4 ranks only fails.
WORLD_SIZES = (4, 2)
