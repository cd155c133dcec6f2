"""Lesson 06 - distillation: students learn from teachers that run on other ranks.

The idea
    In knowledge distillation a small student model learns to copy a large teacher's output
    distribution. The teacher only runs forward passes, so it can live on its own ranks: half
    the ranks are students, half teachers. Student i and teacher i form a pair with their own
    group; the students together form a data-parallel group. Each step a student
      1. sends its input ids to its teacher (lesson 02's shape handshake: header, then payload),
      2. runs its own forward pass while the teacher works on the same ids (the overlap),
      3. receives the teacher's probabilities and takes the KL divergence to its own,
      4. backpropagates, averages its gradients over the student group only (lesson 05's
         data parallelism, with the teachers left out) and steps Adam.
    When training ends each student sends its teacher a STOP message and the teacher returns:
    no loop is left running and nothing needs killing.

Run it
    torchrun --nproc-per-node 4 lessons/06_distill.py     # 2 students, 2 teachers
    torchrun --nproc-per-node 8 lessons/06_distill.py     # 4 students, 4 teachers
    python lessons/06_distill.py --nproc 2                # 1 student, 1 teacher
    An odd world size is refused on every rank before any collective.

What you should see (4 ranks, no GPU)
    [rank 0] students: ranks 0, 1; teachers: ranks 2, 3 (pairs 0-2, 1-3)
    [rank 0] step   loss rank 0   loss rank 1          mean      <- one row per step
    [rank 0]    1     1.238e-01     1.156e-01     1.197e-01
    ...
    [rank 0]   30    -5.355e-09     1.676e-08     5.704e-09      <- ~0 up to float32 rounding
    [rank 0] checked: mean loss fell from 1.197e-01 to 5.704e-09, below 1e-04, in 30 steps
    [rank 0] checked: every student holds the same weights (spread 0 over the student group of 2)
    [rank 0] checked: losses and weights match one process training on every student's batch ...
    [rank 0] checked: each teacher answered 30 requests and stopped on the stop message
distill_demo/ grows this into a trainer with transformer models and three ways to ship the
teacher's knowledge. Setup and printing come from course/ranks.py (lesson 00 writes them out).
"""
import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course.ranks import EVEN, parser, print0, print_rank, setup, usage_error

NEEDS = EVEN  # one teacher per student: an odd world size is refused before any collective

VOCAB = 16  # token ids 0..15: the teacher maps each to a distribution over the next one
TEACHER_WIDTH = 64  # the teacher's hidden width
STUDENT_WIDTH = 32  # half the teacher's, but >= VOCAB: wide enough to copy it exactly
BATCH, SEQ = 4, 8  # each student's input ids per step: a (4, 8) tensor, 32 tokens
STEPS = 30  # with these, the mean loss ends below TARGET_LOSS
TARGET_LOSS = 1e-4
LR = 0.05  # Adam's learning rate, decayed linearly to 0 so Adam settles instead of circling
BETAS = (0.5, 0.9)  # shorter memories than the default (0.9, 0.999): faster on this tiny task
TEACHER_SEED, STUDENT_SEED = 1, 2  # every rank builds the same teacher, the same student


def make_model(width, seed):
    """id -> logits over the vocabulary. Seeded: every rank that builds it builds the same one."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, VOCAB))


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
    """Every rank creates every group, in the same order, even the ones it is not in. A group
    does not inherit the world's timeout: without `timeout`, a dead peer waits out torch's
    default."""
    student_group = dist.new_group(student_ranks, timeout=timeout)  # students' all_reduce only
    pair_groups = [dist.new_group([s, t], timeout=timeout)
                   for s, t in zip(student_ranks, teacher_ranks)]
    return student_group, pair_groups
# --8<-- [end:roles]


# --8<-- [start:protocol]
# Lesson 02's shape handshake, with its header layout, plus one kind of message it did not
# need: STOP. A message is a header the receiver can always allocate - 11 int64s: kind,
# dtype code, ndim, 8 sizes - then, for a TENSOR, the payload, which it can allocate only once
# the header has told it the shape. A STOP header has no payload: training is over.
TENSOR, STOP = 20_202, 20_204  # lesson 02's TENSOR; unlikely values for a payload read by mistake
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64)  # 02's codes
HEADER = 11


def send_tensor(tensor, dst, group):
    """Start sending `tensor` to `dst`; returns the two requests (wait() on them before reuse)."""
    sizes = [*tensor.shape] + [0] * (HEADER - 3 - tensor.dim())  # unused sizes are 0
    header = torch.tensor([TENSOR, DTYPES.index(tensor.dtype), tensor.dim(), *sizes],
                          device=tensor.device)
    # isend returns at once; the same pair's messages arrive in the order they were sent.
    return [dist.isend(header, dst, group), dist.isend(tensor.contiguous(), dst, group)]


def send_stop(dst, group, device):
    dist.send(torch.tensor([STOP] + [0] * (HEADER - 1), device=device), dst, group)


def recv_tensor(src, group, device):
    """The next tensor from `src`, or None if `src` sent STOP."""
    header = torch.empty(HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src, group)
    kind, dtype, ndim, *sizes = header.tolist()
    if kind not in (TENSOR, STOP):
        raise RuntimeError(f"rank {dist.get_rank()}: rank {src} sent {kind} where a header goes")
    if kind == STOP:
        return None
    tensor = torch.empty(sizes[:ndim], dtype=DTYPES[dtype], device=device)
    dist.recv(tensor, src, group)
    return tensor
# --8<-- [end:protocol]


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


@contextlib.contextmanager
def on_lost_peer(what):
    """A rank that dies closes its connections: gloo fails the next send or recv with it at once
    (any backend: after --timeout). Say in one line what was lost, instead of a traceback."""
    try:
        yield
    except RuntimeError as err:  # gloo's says "[...pair.cc:553] Connection closed by peer ..."
        print_rank(f"error: {what} ({str(err).split('] ')[-1].split('. ')[0]})")
        raise SystemExit(1) from None


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


def reference_training(n_students, steps, device):
    """The single-process answer: one student trained on every student's batches at once."""
    teacher = make_model(TEACHER_WIDTH, TEACHER_SEED).to(device)
    student = make_model(STUDENT_WIDTH, STUDENT_SEED).to(device)
    optimizer, schedule = make_optimizer(student, steps)
    losses = []
    for step in range(steps):  # equal batches: the mean over all is the mean of the means
        ids = torch.cat([input_ids(step, s) for s in range(n_students)]).to(device)
        loss = kl_loss(student(ids), answer(teacher, ids))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses, flat_weights(student)


def flat_weights(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def spread(tensor, group):
    """Largest minus smallest across the ranks of `group`, element-wise: zero iff all agree."""
    high, low = tensor.clone(), -tensor
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MAX, group=group)  # max of -x is -(min of x)
    return (high + low).max().item()


# --8<-- [start:ex-06-1]
def bucketed_dp_step(model, optimizer, group):
    """Exercise 06.1: one data-parallel optimizer step with a single all_reduce.

    Flatten every parameter's .grad into one bucket tensor, average the bucket over the ranks
    of `group` (and only those) with ONE all_reduce, copy the averages back into each .grad,
    then call optimizer.step(). One big message instead of one per parameter: fewer, larger
    collectives, which is what DDP's gradient buckets do.
    """
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 06.1: flatten the grads into one bucket, all_reduce it "
                              "over `group`, divide, copy back, step (about 7 lines)")
# --8<-- [end:ex-06-1]


def check_bucketed_dp_step(ctx, bucketed_dp_step):
    """Every rank: two steps data-parallel within its half (students with students, teachers
    with teachers), against one process that averages the half's gradients itself."""
    students, teachers = roles(ctx.world_size)
    # Both groups, on every rank.
    groups = [dist.new_group(r, timeout=ctx.timeout) for r in (students, teachers)]
    mine, group = (students, groups[0]) if ctx.rank in students else (teachers, groups[1])
    teacher = make_model(TEACHER_WIDTH, TEACHER_SEED).to(ctx.device)

    def backward(model, ranks, step):  # the gradient of the mean loss over `ranks`' batches
        batches = [input_ids(step, r).to(ctx.device) for r in ranks]
        sum(kl_loss(model(ids), answer(teacher, ids)) / len(ranks) for ids in batches).backward()

    yours, expected = (make_model(STUDENT_WIDTH, STUDENT_SEED).to(ctx.device) for _ in range(2))
    yours_opt, expected_opt = make_optimizer(yours, 2)[0], make_optimizer(expected, 2)[0]
    for step in range(2):  # two steps: the second uses Adam's state from the first
        yours_opt.zero_grad()
        backward(yours, [ctx.rank], step)  # my batch only
        bucketed_dp_step(yours, yours_opt, group)
        expected_opt.zero_grad()
        backward(expected, mine, step)  # the whole half's batches, in this one process
        expected_opt.step()
    return [{"weights after 2 steps": flat_weights(m), "averaged gradient": flat_grads(m)}
            for m in (yours, expected)]


# Exercise id -> (its check, the function you write). Check: python -m lessons.check 06
EXERCISES = {"06.1": (check_bucketed_dp_step, "bucketed_dp_step")}


# --8<-- [start:main]
def train(ctx, args, student_ranks, teacher_ranks, student_group, pair_groups):
    """A student's side of the run: every step, its loss gathered to rank 0 and printed there."""
    me = student_ranks.index(ctx.rank)
    student = make_model(STUDENT_WIDTH, STUDENT_SEED).to(ctx.device)
    optimizer, schedule = make_optimizer(student, args.steps)
    print0("step" + "".join(f"  {f'loss rank {s}':>12}" for s in student_ranks) + "          mean")
    means = []
    for step in range(args.steps):
        ids = input_ids(step, me).to(ctx.device)
        loss = student_step(step + 1, student, optimizer, ids, teacher_ranks[me],
                            pair_groups[me], student_group)
        schedule.step()
        losses = [torch.empty_like(loss) for _ in student_ranks] if ctx.rank == 0 else None
        dist.gather(loss, losses, dst=0, group=student_group)  # rank 0 prints them, in order
        if ctx.rank == 0:
            losses = [x.item() for x in losses]
            means.append(sum(losses) / len(losses))
            print0(f"{step + 1:4d}" + "".join(f"  {x:12.3e}" for x in [*losses, means[-1]]))
    send_stop(teacher_ranks[me], pair_groups[me], ctx.device)  # its teacher can return now
    return student, means


def main():
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps ({STEPS})")
    args = p.parse_args()
    if args.steps < 1:
        usage_error(f"--steps {args.steps}: train for at least 1 step")
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        student_ranks, teacher_ranks = roles(ctx.world_size)
        student_group, pair_groups = make_groups(student_ranks, teacher_ranks, ctx.timeout)
        print0(f"students: ranks {', '.join(map(str, student_ranks))}; teachers: ranks "
               f"{', '.join(map(str, teacher_ranks))} (pairs "
               f"{', '.join(f'{s}-{t}' for s, t in zip(student_ranks, teacher_ranks))})")
        answered = None
        if ctx.rank in student_ranks:
            student, means = train(ctx, args, student_ranks, teacher_ranks, student_group,
                                   pair_groups)
            gap = spread(flat_weights(student), student_group)  # over the students only
            assert gap == 0.0, f"rank {ctx.rank}: student weights differ across ranks by {gap}"
        else:
            pair = teacher_ranks.index(ctx.rank)
            teacher = make_model(TEACHER_WIDTH, TEACHER_SEED).to(ctx.device)
            with on_lost_peer(f"student rank {student_ranks[pair]} left without sending STOP"):
                answered = serve(teacher, student_ranks[pair], pair_groups[pair], ctx.device)
        everyone = [None] * ctx.world_size if ctx.rank == 0 else None
        dist.gather_object(answered, everyone, dst=0)  # teachers report how many they answered
        if ctx.rank == 0:
            report(args, len(student_ranks), means, flat_weights(student),
                   answered=everyone[len(student_ranks):])
# --8<-- [end:main]


def report(args, n_students, means, weights, answered):
    """Rank 0: what the run did, against what one process computes."""
    if args.steps >= STEPS:
        assert means[-1] < TARGET_LOSS, f"rank 0: mean loss {means[-1]:.3e} >= {TARGET_LOSS}"
        print0(f"checked: mean loss fell from {means[0]:.3e} to {means[-1]:.3e}, below "
               f"{TARGET_LOSS:.0e}, in {args.steps} steps")
    print0("checked: every student holds the same weights (spread 0 over the student group "
           f"of {n_students})")
    ref_losses, ref_weights = reference_training(n_students, args.steps, weights.device)
    torch.testing.assert_close((torch.tensor(means), weights.cpu()),
                               (torch.tensor(ref_losses), ref_weights.cpu()), rtol=1e-4, atol=1e-5,
                               msg=lambda m: f"rank 0, against one process: {m}")
    print0("checked: losses and weights match one process training on every student's batch "
           f"at once ({n_students} x {BATCH}x{SEQ} ids a step)")
    assert answered == [args.steps] * n_students, f"rank 0: teachers answered {answered}"
    print0(f"checked: each teacher answered {args.steps} requests and stopped on the stop message")


if __name__ == "__main__":
    main()
