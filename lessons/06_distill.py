"""Lesson 06 - distillation: students learn from teachers that run on other ranks.

The idea
    In knowledge distillation a small student model learns to copy a large teacher's output
    distribution. The teacher only runs forward passes, so it can live on its own ranks: half
    the ranks are students, half teachers; student i and teacher i talk in a group of their
    own. Each step a student sends its input ids to its teacher (lesson 02's shape handshake),
    runs its own forward pass while the teacher works (the overlap), receives the teacher's
    probabilities, takes the KL divergence to its own, and averages its gradients over the
    students only (lesson 05's data parallelism, teachers left out). When training ends each
    student sends its teacher STOP and the teacher returns: nothing is left to kill.

Run it
    torchrun --nproc-per-node 4 lessons/06_distill.py     # 2 students, 2 teachers
    torchrun --nproc-per-node 8 lessons/06_distill.py     # 4 students, 4 teachers
    python lessons/06_distill.py --nproc 2                # 1 student, 1 teacher

What you should see (4 ranks, no GPU; all is seeded: a machine prints the same losses each run)
    [rank 0] no GPU: using gloo on CPU
    [rank 0] students: ranks 0, 1; teachers: ranks 2, 3 (pairs 0-2, 1-3)
    [rank 0] step   loss rank 0   loss rank 1          mean
    [rank 0]    1     1.238e-01     1.156e-01     1.197e-01
    ...
    [rank 0]   30     3.912e-08     1.094e-08     2.503e-08   <- other CPUs round these otherwise
    [rank 0] checked: mean loss fell from 1.197e-01 to 2.503e-08 < 0.0001
    [rank 0] a KL is never below 0, but a float32 sum of terms of ~1e-8 can round to just below
    [rank 0] checked: all students hold the same weights (spread 0 over the student group of 2)
    [rank 0] checked: losses and weights match one process training on all 2 batches at once
    [rank 0] checked: each teacher answered 30 requests and stopped on the stop message
    [rank 0] Next: exercise 06.1 (bucketed_dp_step above). Check it: python -m lessons.check 06
Setup and printing: course/ranks.py. distill_demo/ grows this lesson into a full trainer.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Messages between a student and its teacher: lesson 02's shape handshake plus STOP (training is
# over), send_tensor / recv_tensor / send_stop in course/header.py.
from course.header import recv_tensor, send_stop, send_tensor

# on_lost_peer: a peer that died becomes one line naming it, not a traceback (course/ranks.py)
from course.ranks import EVEN, on_lost_peer, parser, print0, setup, spread, usage_error

NEEDS = EVEN  # one teacher per student: an odd world size is refused before any collective

VOCAB = 16  # token ids 0..15: the teacher maps each to a distribution over the next one
TEACHER_WIDTH = 64  # the teacher's hidden width
STUDENT_WIDTH = 32  # half the teacher's, but >= VOCAB: wide enough to copy it exactly
BATCH, SEQ = 4, 8  # each student's input ids per step: a (4, 8) tensor, 32 tokens
STEPS, TARGET_LOSS = 30, 1e-4  # with these, the mean loss ends below TARGET_LOSS
LR = 0.05  # Adam's learning rate, decayed linearly to 0 so Adam settles instead of circling
BETAS = (0.5, 0.9)  # shorter memories than the default (0.9, 0.999): faster on this tiny task
TEACHER_SEED, STUDENT_SEED = 1, 2  # every rank builds the same teacher, the same student


def make_model(width, seed):
    """id -> logits over the vocabulary. Seeded: every rank that builds it builds the same one."""
    torch.manual_seed(seed)
    layers = torch.nn.Embedding(VOCAB, width), torch.nn.Tanh(), torch.nn.Linear(width, VOCAB)
    return torch.nn.Sequential(*layers)


def input_ids(step, student):
    """The batch of student number `student` at `step`: different for each, same on every run."""
    generator = torch.Generator().manual_seed(1000 * step + student)
    return torch.randint(VOCAB, (BATCH, SEQ), generator=generator)


def answer(teacher, ids):
    """What a teacher computes: its probabilities for the next token after each id."""
    with torch.no_grad():  # a teacher never trains: no graph to keep
        return teacher(ids).softmax(-1)


def kl_loss(student_logits, teacher_probs):
    """KL(teacher || student), averaged over tokens: zero exactly when the student copies."""
    log_q = student_logits.log_softmax(-1).flatten(0, -2)  # (tokens, vocab)
    return F.kl_div(log_q, teacher_probs.flatten(0, -2), reduction="batchmean")


# --8<-- [start:roles]
def roles(world_size):
    """First half students, second half teachers (rank 0, which prints, is a student)."""
    half = world_size // 2
    return list(range(half)), list(range(half, world_size))


def make_groups(student_ranks, teacher_ranks, timeout):
    """Every rank creates every group, in the same order, even the ones it is not in. A group does
    not inherit the world's timeout: without `timeout`, a dead peer waits out torch's default."""
    student_group = dist.new_group(student_ranks, timeout=timeout)  # students' all_reduce only
    pair_groups = [
        dist.new_group([s, t], timeout=timeout) for s, t in zip(student_ranks, teacher_ranks)
    ]
    return student_group, pair_groups
    # --8<-- [end:roles]


# --8<-- [start:teacher]
def serve(teacher, student_rank, pair_group, device):
    """A teacher's whole job: answer its student until it says STOP. Returns requests answered."""
    answered = 0
    while (ids := recv_tensor(student_rank, pair_group, device)) is not None:
        probs = answer(teacher, ids)
        for request in send_tensor(probs, student_rank, pair_group):
            request.wait()  # `probs` must stay untouched until it has left
        answered += 1
    return answered
    # --8<-- [end:teacher]


# --8<-- [start:student]
def average_gradients(model, group):
    """Data parallelism over `group`: every member ends with the mean of everyone's gradients."""
    size = dist.get_world_size(group)
    for param in model.parameters():  # one all_reduce per parameter (exercise 06.1: one in all)
        dist.all_reduce(param.grad, group=group)  # SUM over the students only, not the teachers
        param.grad /= size


def student_step(step, student, optimizer, ids, teacher_rank, pair_group, student_group):
    """One training step of a student; returns its loss."""
    lost = f"teacher rank {teacher_rank} stopped answering at step {step}"
    with on_lost_peer(lost):
        sending = send_tensor(ids, teacher_rank, pair_group)  # returns at once...
    logits = student(ids)  # ...so this forward runs while the teacher computes its answer
    with on_lost_peer(lost):
        teacher_probs = recv_tensor(teacher_rank, pair_group, ids.device)
        for request in sending:
            request.wait()
    if teacher_probs is None:
        raise RuntimeError(f"teacher rank {teacher_rank} sent STOP: only students stop the pair")
    loss = kl_loss(logits, teacher_probs)
    optimizer.zero_grad()
    loss.backward()
    with on_lost_peer(f"a student left the gradient all_reduce at step {step}"):
        average_gradients(student, student_group)  # now every student has the same gradient...
    optimizer.step()  # ...so the same Adam step keeps every student's weights identical
    return loss.detach().reshape(1)  # 1 element, for gather
    # --8<-- [end:student]


def make_optimizer(model, steps):
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)


def flat_weights(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


# --8<-- [start:ex-06-1]
def bucketed_dp_step(model, optimizer, group):
    """Exercise 06.1: one data-parallel optimizer step with a single all_reduce.

    Flatten every parameter's .grad into one bucket tensor, average the bucket over the ranks
    of `group` (and only those) with ONE all_reduce, copy the averages back into each .grad,
    then call optimizer.step(). One big message instead of one per parameter: fewer, larger
    collectives, which is what DDP's gradient buckets do.
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 06.1: one bucket, all_reduce it over `group`, averages back, step (about 7 lines)"
    )
    # --8<-- [end:ex-06-1]


# --8<-- [start:main]
def train(ctx, args, student_ranks, teacher_ranks, student_group, pair_groups):
    """A student's side of the run: every step, its loss gathered to rank 0 and printed there."""
    me = student_ranks.index(ctx.rank)
    student = make_model(STUDENT_WIDTH, STUDENT_SEED).to(ctx.device)
    optimizer, schedule = make_optimizer(student, args.steps)
    print0("step" + "".join(f"  {f'loss rank {s}':>12}" for s in student_ranks) + "          mean")
    means, pair = [], (teacher_ranks[me], pair_groups[me])  # my teacher, and our group of two
    for step in range(args.steps):
        ids = input_ids(step, me).to(ctx.device)
        loss = student_step(step + 1, student, optimizer, ids, *pair, student_group)
        schedule.step()
        losses = [torch.empty_like(loss) for _ in student_ranks] if ctx.rank == 0 else None
        dist.gather(loss, losses, dst=0, group=student_group)  # rank 0 prints them, in order
        if ctx.rank == 0:
            losses = [x.item() for x in losses]
            means.append(sum(losses) / len(losses))
            print0(f"{step + 1:4d}" + "".join(f"  {x:12.3e}" for x in [*losses, means[-1]]))
    send_stop(*pair, ctx.device)  # its teacher can return now
    return student, means


def main():
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps ({STEPS})")
    args = p.parse_args()
    if args.steps < 1:
        usage_error(f"--steps {args.steps}: train for at least 1 step")
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        students, teachers = roles(ctx.world_size)
        student_group, pair_groups = make_groups(students, teachers, ctx.timeout)
        pairs = ", ".join(f"{s}-{t}" for s, t in zip(students, teachers))
        s, t = (str(ranks)[1:-1] for ranks in (students, teachers))  # "0, 1"
        print0(f"students: ranks {s}; teachers: ranks {t} (pairs {pairs})")
        answered = None
        if ctx.rank in students:
            student, means = train(ctx, args, students, teachers, student_group, pair_groups)
            gap = spread(flat_weights(student), student_group)  # over the students only
            assert gap == 0.0, f"rank {ctx.rank}: student weights differ across ranks by {gap}"
        else:
            pair = teachers.index(ctx.rank)
            teacher = make_model(TEACHER_WIDTH, TEACHER_SEED).to(ctx.device)
            with on_lost_peer(f"student rank {students[pair]} left without sending STOP"):
                answered = serve(teacher, students[pair], pair_groups[pair], ctx.device)
        everyone = [None] * ctx.world_size if ctx.rank == 0 else None
        dist.gather_object(answered, everyone, dst=0)  # teachers report how many they answered
        if ctx.rank == 0:
            report(args, means, flat_weights(student), everyone[len(students) :])  # teachers'
    # --8<-- [end:main]


def report(args, means, weights, answered):
    """Rank 0: what the run did, against one process training the same student on every
    student's batches at once (equal batches: the mean over all is the mean of the means)."""
    n, steps = len(answered), args.steps  # students: one per teacher
    if steps >= STEPS:  # the default run gets there; a shorter one may not
        assert means[-1] < TARGET_LOSS, f"rank 0: mean loss {means[-1]:.3e} >= {TARGET_LOSS}"
        print0(f"checked: mean loss fell from {means[0]:.3e} to {means[-1]:.3e} < {TARGET_LOSS}")
        print0("a KL is never below 0, but a float32 sum of terms of ~1e-8 can round to just below")
    print0(f"checked: all students hold the same weights (spread 0 over the student group of {n})")
    teacher = make_model(TEACHER_WIDTH, TEACHER_SEED)
    student = make_model(STUDENT_WIDTH, STUDENT_SEED)
    optimizer, schedule = make_optimizer(student, steps)
    losses = []
    for step in range(steps):
        ids = torch.cat([input_ids(step, s) for s in range(n)])
        loss = kl_loss(student(ids), answer(teacher, ids))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    mine, one = (torch.tensor(means), weights.cpu()), (torch.tensor(losses), flat_weights(student))
    torch.testing.assert_close(mine, one, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank 0: {m}")
    print0(f"checked: losses and weights match one process training on all {n} batches at once")
    assert answered == [steps] * n, f"rank 0: teachers answered {answered}"
    print0(f"checked: each teacher answered {steps} requests and stopped on the stop message")
    print0("Next: exercise 06.1 (bucketed_dp_step above). Check it: python -m lessons.check 06")


if __name__ == "__main__":
    main()
