"""The single-process reference both demos are held against: one process, no communication, the
same teacher (pretrained as prepare_teacher pretrains it) and one student that trains on every
student's batch at once. With equal batches, the mean of the students' losses is the loss of all
their rows together, so the distributed students and this one take the same steps.

Both demos check each training run against it (check_against_reference): the mean loss they
report at every step, and rank 0's trained student; tests/ check their saved students too.
"""

from __future__ import annotations

import torch

from course.ranks import print0
from distill_demo.data import MarkovData
from distill_demo.knowledge import student_loss, teacher_message
from distill_demo.models import TinyTransformer, make_teacher
from distill_demo.report import CheckFailed
from distill_demo.train import Config, new_student, pretrain


def train_reference(
    cfg: Config, mode: str, n_students: int, steps: int
) -> tuple[list[float], TinyTransformer]:
    """`steps` steps of what `n_students` students learn together with --transfer `mode`, in
    one process. Returns (the loss at each step, the student)."""
    data = MarkovData(cfg.vocab, cfg.seq)
    teacher = make_teacher(cfg.size, cfg.vocab, cfg.seq).to(cfg.device)
    if cfg.teacher_steps:
        pretrain(teacher, data, cfg.size, cfg.teacher_steps, cfg.batch, cfg.device)
    teacher = teacher.to(cfg.dtype).eval()
    student, optimizer = new_student(cfg)
    losses, k = [], cfg.topk
    for step in range(steps):
        batches = [data.batch(step, shard, cfg.batch).to(cfg.device) for shard in range(n_students)]
        lm_head = teacher.lm_head.weight.detach()  # for --transfer hidden
        with cfg.autocast():  # equal batches: the mean of the students' losses is the mean loss
            each = [
                student_loss(mode, student(ids), teacher_message(mode, teacher, ids, k), lm_head)
                for ids in batches
            ]
            loss = sum(each) / n_students
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, student


def check_against_reference(
    cfg: Config,
    losses: list[float],
    student: torch.nn.Module,
    ref_losses: list[float],
    ref_student: torch.nn.Module,
) -> None:
    """Losses step by step, and weights. AdamW divides by sqrt(v): where a weight's gradient is
    a sum that cancels to nearly zero, rounding alone decides its sign, and the step moves that
    weight by up to lr. So nearly every weight must agree closely (all but 1 in 100 in float32),
    and none be further apart than AdamW can move it. bf16 autocast on a GPU rounds far more:
    looser bounds there. Rank 0 says how close they were; CheckFailed, showing both, if not."""
    fp32 = cfg.dtype == torch.float32
    loss_rtol, close, share = (
        (1e-3, dict(rtol=1e-4, atol=1e-5), 0.01)
        if fp32
        else (5e-2, dict(rtol=5e-2, atol=5e-3), 0.1)
    )
    if len(losses) != len(ref_losses):
        raise CheckFailed(f"{len(losses)} losses reported, one process took {len(ref_losses)}")
    apart_by = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
    worst = max(apart_by)
    if worst > loss_rtol:
        step = apart_by.index(worst)
        raise CheckFailed(
            f"the students' mean loss at step {step + 1} is {losses[step]:.6g}, one process's "
            f"{ref_losses[step]:.6g}: {worst:.1e} apart (relative), more than {loss_rtol:g}"
        )
    yours, expected = (
        torch.cat([p.detach().reshape(-1).float().cpu() for p in m.parameters()])
        for m in (student, ref_student)
    )
    apart = ~torch.isclose(yours, expected, **close)
    if apart.float().mean() > share:
        raise CheckFailed(
            f"{int(apart.sum())} of {apart.numel()} weights differ from one process's by more "
            f"than {close} (at most {share:.0%} may)"
        )
    furthest = (yours - expected).abs().max().item()
    if furthest > 2 * cfg.lr * len(losses):
        raise CheckFailed(
            f"a weight is {furthest:.3g} from one process's, more than AdamW can move it in "
            f"{len(losses)} steps ({2 * cfg.lr * len(losses):.3g})"
        )
    print0(
        f"checked: losses and weights match one process training one student on every "
        f"student's batch at once (losses within {worst:.1e} relative; {int(apart.sum())} of "
        f"{apart.numel()} weights outside rtol {close['rtol']:g}, atol {close['atol']:g})"
    )
