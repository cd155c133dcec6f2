"""Lesson 05 - hooks on gradient-accumulator nodes: run code the moment a parameter's gradient
is ready, and build DDP from scratch with it.

The idea
    backward() walks the autograd graph from the loss back to the parameters. The last node on
    the way to a parameter p is its AccumulateGrad node, which adds the incoming gradient into
    p.grad. A hook on that node runs as soon as p.grad is complete, while backward is still
    busy with earlier layers. torch's DDP and Megatron-LM start their gradient all_reduce from
    there, so the communication for the last layers overlaps the computation of the first.
    You reach the node with p.expand_as(p).grad_fn.next_functions[0][0], and you must keep a
    reference to it: p itself holds only a weak one.

Run it
    torchrun --nproc-per-node 4 lessons/05_hooks.py
    python lessons/05_hooks.py --nproc 2              # plain python: starts torchrun for you

What you should see (4 ranks, no GPU)
    [rank 0] hooks on y = w * x, in the order they fired, and w.grad at that moment:
    [rank 0]   MulBackward0 hook                      w.grad None
    [rank 0]   w.register_hook                        w.grad None       <- may replace the grad
    [rank 0]   w.register_post_accumulate_grad_hook   w.grad [6.0, 8.0]
    [rank 0]   AccumulateGrad node hook               w.grad [6.0, 8.0]
    [rank 0] checked: ... one line each for the order, the lost hook, main_grad, and DDP
    [rank 0] saved out/05_timeline.png   <- when each all_reduce started, per rank
"""
import collections
import copy
import time
from pathlib import Path

import torch
import torch.distributed as dist

from course.ranks import parser, print0, setup

SEED = 0  # every rank builds the same model and draws the same batches from this seed
WIDTH, DEPTH = 256, 4  # the model: DEPTH Linear(WIDTH, WIDTH) layers, tanh between them
LOCAL_BATCH = 16  # samples per rank per step; the full batch is LOCAL_BATCH * world size
STEPS = 3  # SGD steps of the DDP run, each compared with the single-process model
LR = 0.1  # SGD learning rate
MICRO_BATCHES = 32  # main_grad demo: gradients accumulated over this many micro-batches
REPORT_AT = (4, 8, 16, 32)  # ... and compared with float64 after this many
CHECK_WIDTH = 4  # exercise 05.1's check: a narrow model, so a mismatch prints small tensors
BUCKET_BYTES = 100  # ... and buckets of up to 100 bytes: a [4, 4] weight and a bias or two


def make_model(device, width=WIDTH):
    torch.manual_seed(SEED)  # the same weights on every rank: no broadcast needed to start
    layers = [m for _ in range(DEPTH) for m in (torch.nn.Linear(width, width), torch.nn.Tanh())]
    return torch.nn.Sequential(*layers[:-1]).to(device)


def batch(step, world_size, device, width=WIDTH):
    """The full batch of a step, drawn alike on every rank: rank r trains on its slice of it."""
    g = torch.Generator().manual_seed(SEED + 1 + step)
    x = torch.randn(LOCAL_BATCH * world_size, width, generator=g)
    return x.to(device), torch.randn(x.shape, generator=g).to(device)


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)  # a mean over the samples it is given


# --8<-- [start:order]
def hook_order(device):
    """Every kind of hook between a loss and w.grad, on y = w * x: which fires when."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], device=device))
    x = torch.tensor([3.0, 4.0], device=device)
    fired = []  # (hook, what w.grad held when it ran)

    def note(hook):
        fired.append((hook, None if w.grad is None else w.grad.tolist()))

    def double(grad):  # a hook on the tensor gets the gradient on its way in...
        note("w.register_hook")
        return grad * 2  # ...and what it returns goes on in its place

    w.register_hook(double)
    # w is a leaf: it has no grad_fn. expand_as(w) makes a throwaway node whose only input is
    # w's AccumulateGrad node, the one that writes w.grad.
    acc = w.expand_as(w).grad_fn.next_functions[0][0]
    acc.register_hook(lambda grad_inputs, grad_outputs: note("AccumulateGrad node hook"))
    # The public way since torch 2.1: a hook on the tensor that runs after accumulation, gets
    # the parameter, and needs no node kept alive. (DDP predates it and uses the node.)
    w.register_post_accumulate_grad_hook(lambda p: note("w.register_post_accumulate_grad_hook"))
    y = w * x
    y.grad_fn.register_hook(lambda grad_inputs, grad_outputs: note(f"{y.grad_fn.name()} hook"))
    y.sum().backward()
    return fired, w.grad.tolist()
# --8<-- [end:order]


# --8<-- [start:lost]
def lost_hook(device):
    """Register a hook on an AccumulateGrad node without keeping the node, then with."""
    w = torch.nn.Parameter(torch.ones(2, device=device))
    calls = []
    # Nothing refers to this node after the line ends, so it is freed: w points to its node
    # only weakly. The next forward finds no node and makes a fresh one, with no hook.
    w.expand_as(w).grad_fn.next_functions[0][0].register_hook(lambda *_: calls.append("lost"))
    (w * 2).sum().backward()
    kept = w.expand_as(w).grad_fn.next_functions[0][0]  # this one lives as long as `kept`
    kept.register_hook(lambda *_: calls.append("kept"))
    (w * 2).sum().backward()
    return calls
# --8<-- [end:lost]


# --8<-- [start:main_grad]
def attach_main_grad(model):
    """Megatron-LM's trick: every parameter gets an fp32 `main_grad`; its AccumulateGrad hook
    adds p.grad into it and drops p.grad. Returns the nodes: keep them as long as the model."""
    grad_accs = []
    for p in model.parameters():
        p.main_grad = torch.zeros_like(p, dtype=torch.float32)

        def hook(*_, p=p):  # p=p: each hook its own parameter, not the loop's last one
            p.main_grad += p.grad  # bf16 gradient into an fp32 sum: no rounding to bf16
            p.grad = None  # the next micro-batch writes a fresh p.grad instead of adding to it

        acc = p.expand_as(p).grad_fn.next_functions[0][0]
        acc.register_hook(hook)
        grad_accs.append(acc)
    return grad_accs
# --8<-- [end:main_grad]


def accumulate(ctx):
    """main_grad over MICRO_BATCHES bf16 micro-batches, against sums done outside autograd."""
    model = make_model(ctx.device).to(torch.bfloat16)
    truth = copy.deepcopy(model).double()  # the same weights, float64: the exact answer
    probe = copy.deepcopy(model)  # hook-free copy: each micro-batch's gradient on its own
    grad_accs = attach_main_grad(model)  # held while the model trains: the hooks live with them
    main_grads = [p.main_grad for p in model.parameters()]  # the hooks add into these in place
    g = torch.Generator().manual_seed(SEED)
    fp32_sum = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
    bf16_sum = [torch.zeros_like(p) for p in model.parameters()]  # what p.grad would pile up
    errors = {}  # micro-batches so far -> (error of the bf16 sum, error of main_grad)
    for done in range(1, MICRO_BATCHES + 1):
        x, y = (torch.randn(4, WIDTH, generator=g).to(ctx.device) for _ in range(2))
        loss_fn(model, x.bfloat16(), y.bfloat16()).backward()  # the hooks fill main_grad
        grads = torch.autograd.grad(loss_fn(probe, x.bfloat16(), y.bfloat16()),
                                    list(probe.parameters()))
        fp32_sum = [s + grad for s, grad in zip(fp32_sum, grads)]  # fp32 + bf16 adds in fp32
        bf16_sum = [s + grad for s, grad in zip(bf16_sum, grads)]
        loss_fn(truth, x.double(), y.double()).backward()
        if done in REPORT_AT:
            errors[done] = (error(bf16_sum, truth), error(main_grads, truth))
    for p, expected in zip(model.parameters(), fp32_sum):
        gap = (p.main_grad - expected).abs().max().item()
        assert p.grad is None and torch.allclose(p.main_grad, expected, rtol=1e-5, atol=1e-8), \
            f"rank {ctx.rank}: main_grad differs from the fp32 sum by {gap}"
    print0(f"checked: main_grad after {MICRO_BATCHES} micro-batches equals the fp32 sum of their "
           "bf16 gradients, and p.grad is None")
    print0(f"{'error against float64 after':<30}" + "".join(f"{k:>9}" for k in errors)
           + " micro-batches")
    for i, what in enumerate(("summed in bf16, as p.grad", "summed in fp32, main_grad")):
        print0(f"  {what:<28}" + "".join(f"{e[i]:9.1e}" for e in errors.values()))


def error(sums, truth):
    """Distance of a list of gradients from truth's float64 ones, relative, over all of them."""
    diff = sum(float((s.double() - t.grad).norm() ** 2) for s, t in zip(sums, truth.parameters()))
    return (diff / sum(float(t.grad.norm() ** 2) for t in truth.parameters())) ** 0.5


# --8<-- [start:ddp]
def overlap_ddp(model, log):
    """DDP from scratch, one bucket per parameter: the moment backward has written p.grad, start
    an all_reduce of it in the background and let backward carry on. log(what, which) records
    each step. Returns finish(): wait for every all_reduce; call it before optimizer.step()."""
    world_size = dist.get_world_size()
    pending = []  # the all_reduces started during this backward
    grad_accs = []
    for name, p in model.named_parameters():
        def hook(*_, name=name, p=p):
            log("hook", name)
            p.grad.div_(world_size)  # each rank's loss is a mean over its share: average them
            # Every rank's backward runs the same graph, so the hooks fire, and the all_reduces
            # start, in the same order on every rank, as collectives must.
            pending.append(dist.all_reduce(p.grad, async_op=True))
            log("launch", name)

        acc = p.expand_as(p).grad_fn.next_functions[0][0]
        acc.register_hook(hook)
        grad_accs.append(acc)
    model.grad_accs = grad_accs  # keep the nodes as long as the model (see lost_hook)

    def finish():
        for work in pending:
            work.wait()  # on GPU this makes the next kernels wait for NCCL; the CPU goes on
        log("waited", f"{len(pending)} all_reduces")
        pending.clear()

    return finish
# --8<-- [end:ddp]


def train(ctx, make_ddp, steps=STEPS, width=WIDTH):
    """`steps` SGD steps of a model made data-parallel by make_ddp(model, log) -> finish, next to
    a single-process model on the full batch. Returns both models, the log as (step, what, which,
    time), and {"step s, name.grad": (the DDP model's, the reference's)}."""
    model = make_model(ctx.device, width)
    reference = copy.deepcopy(model)  # the single-process model: the full batch, no collectives
    events, grads, step = [], {}, 0
    finish = make_ddp(model, lambda what, which: events.append(
        (step, what, which, time.perf_counter())))
    mine = slice(ctx.rank * LOCAL_BATCH, (ctx.rank + 1) * LOCAL_BATCH)  # my share of a batch
    for step in range(steps):
        x, y = batch(step, ctx.world_size, ctx.device, width)
        loss = loss_fn(model, x[mine], y[mine])
        events.append((step, "backward", "starts", time.perf_counter()))
        loss.backward()  # the hooks start all_reduces meanwhile
        events.append((step, "backward", "returns", time.perf_counter()))
        finish()  # every gradient averaged over the ranks: now the optimizer may step
        loss_fn(reference, x, y).backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            grads[f"step {step}, {name}.grad"] = p.grad.clone(), q.grad.clone()
        with torch.no_grad():  # SGD by hand: torch.optim imports torch._dynamo, seconds per rank
            for p in [*model.parameters(), *reference.parameters()]:
                p -= LR * p.grad
                p.grad = None
    return model, reference, events, grads


def what_hooks_did(events, names, steps):
    """From train()'s log, per step: each parameter's hook calls, and what was launched; over
    all steps: how many launches came after backward had returned."""
    hooks = [[sum(e[:3] == (s, "hook", n) for e in events) for n in names] for s in range(steps)]
    launched = [[e[2] for e in events if e[:2] == (s, "launch")] for s in range(steps)]
    returned = {e[0]: i for i, e in enumerate(events) if e[1:3] == ("backward", "returns")}
    late = sum(1 for i, e in enumerate(events) if e[1] == "launch" and i > returned[e[0]])
    return hooks, launched, late


def check_and_plot(ctx, model, reference, events, out):
    names = [name for name, _ in model.named_parameters()]
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-5), \
            f"rank {ctx.rank}: {name} differs by {(p - q).abs().max().item():.2e}"
    print0(f"checked: after {STEPS} SGD steps the {ctx.world_size}-rank model equals the "
           "single-process model trained on the full batch (to 1e-5)")
    hooks, launched, late = what_hooks_did(events, names, STEPS)
    assert hooks == [[1] * len(names)] * STEPS, f"rank {ctx.rank}: hook calls {hooks}"
    print0(f"checked: every parameter's hook fired exactly once per step "
           f"({len(names)} parameters x {STEPS} steps)")
    assert late == 0 and all(len(step) == len(names) for step in launched), \
        f"rank {ctx.rank}: {events}"
    print0(f"checked: all {len(names)} all_reduces of every step started before backward returned")
    timelines = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object([e for e in events if e[0] == STEPS - 1], timelines, dst=0)  # last step
    if ctx.rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        plot_timeline(timelines, Path(out) / "05_timeline.png")
        print0(f"saved {out}/05_timeline.png")


def plot_timeline(timelines, path):
    """One row per rank: backward as a bar with a tick where each all_reduce started, then the
    wait in finish(). Times in ms from the start of that rank's backward (the last step); the
    axis shows backward, the wait runs off its right end with its length written there."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(timelines)))
    right = 0  # the x-axis ends at 1.6 x the longest backward
    for rank, events in enumerate(timelines):
        start = next(t for _, _, which, t in events if which == "starts")
        ms = collections.defaultdict(list)  # "returns", "waited", "launch" -> [ms since start]
        for _, what, which, t in events:
            ms[which if what == "backward" else what].append((t - start) * 1e3)
        (returned,), (waited,), launches = ms["returns"], ms["waited"], ms["launch"]
        right = max(right, 1.6 * returned)
        once = "" if rank == 0 else "_"  # a label starting "_" stays out of the legend
        ax.barh(rank, returned, height=0.5, color="C0", alpha=0.4, label=once + "backward")
        ax.barh(rank, waited - returned, left=returned, height=0.5, color="C7", alpha=0.3,
                label=once + "finish(): waiting for the all_reduces")
        ax.text(0.98, rank, f"finish() returned at {waited:.1f} ms", ha="right", va="center",
                fontsize=8, transform=ax.get_yaxis_transform())  # x: a fraction of the axis
        ax.plot(launches, [rank] * len(launches), "|", color="C3", ms=18, mew=1.5,
                label=once + "an all_reduce starts (one per parameter)")
    ax.set_xlim(0, right)
    ax.set_yticks(range(len(timelines)), [f"rank {r}" for r in range(len(timelines))])
    ax.invert_yaxis()  # rank 0 on top
    ax.set_xlabel("ms since this rank's backward started (last step)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --8<-- [start:ex-05-1]
def bucketed_ddp(model, bucket_bytes: int, log):
    """Exercise 05.1: overlap_ddp with buckets, as torch's DDP does: fewer, bigger all_reduces.

    Go through model.named_parameters() in reverse (backward reaches the last layer first)
    and fill buckets: a parameter joins the current bucket unless that takes it past
    bucket_bytes; then it starts the next one. On each parameter's AccumulateGrad node register
    a hook that calls log("hook", name). When a bucket's last gradient is in, flatten the
    bucket's gradients into one tensor, start one async all_reduce of it (to an average) and
    call log("launch", bucket index); launch buckets in index order. Keep the nodes alive.
    Return finish(): wait for every bucket, write the averaged gradients into each p.grad,
    and get ready for the next step.
    """
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 05.1: buckets of parameters, a hook on each one's "
                              "AccumulateGrad node, one async all_reduce per bucket "
                              "(about 30 lines)")
# --8<-- [end:ex-05-1]


def check_bucketed_ddp(ctx, bucketed_ddp):
    """Two steps through your buckets (train()), next to the single-process gradients."""
    model, _, events, grads = train(ctx, lambda net, log: bucketed_ddp(net, BUCKET_BYTES, log),
                                    steps=2, width=CHECK_WIDTH)
    names = [name for name, _ in model.named_parameters()]
    buckets, used = 0, None  # how many buckets the rule in the docstring makes
    for p in reversed(list(model.parameters())):
        size = p.numel() * p.element_size()
        if used is None or used + size > BUCKET_BYTES:
            buckets, used = buckets + 1, size
        else:
            used += size
    hooks, launched, late = what_hooks_did(events, names, 2)
    yours = {"hook calls per parameter": hooks, "buckets launched": [sorted(s) for s in launched],
             "launched after backward returned": late, **{k: g for k, (g, _) in grads.items()}}
    expected = {"hook calls per parameter": [[1] * len(names)] * 2,
                "buckets launched": [list(range(buckets))] * 2,
                "launched after backward returned": 0, **{k: g for k, (_, g) in grads.items()}}
    return yours, expected


# Exercise id -> (its check, the function you write). Check: python -m lessons.check 05
EXERCISES = {"05.1": (check_bucketed_ddp, "bucketed_ddp")}


def main():
    args = parser(__doc__).parse_args()
    with setup(args, relaunch=True, trace=args.trace) as ctx:  # course/ranks.py: rank, device, init, teardown; any world size
        fired, grad = hook_order(ctx.device)
        print0("hooks on y = w * x, in the order they fired, and w.grad at that moment:\n"
               + "\n".join(f"  {hook:<40} w.grad {grad_then}" for hook, grad_then in fired))
        expected = [("MulBackward0 hook", None), ("w.register_hook", None),
                    ("w.register_post_accumulate_grad_hook", [6.0, 8.0]),
                    ("AccumulateGrad node hook", [6.0, 8.0])]
        assert fired == expected and grad == [6.0, 8.0], f"rank {ctx.rank}: {fired}, {grad}"
        print0("checked: operator hook, tensor hook (its return value doubled the gradient: "
               "w.grad = 2x), post-accumulate hook, node hook: in that order")
        calls = lost_hook(ctx.device)
        assert calls == ["kept"], f"rank {ctx.rank}: the hooks fired as {calls}"
        print0("checked: a hook on an AccumulateGrad node nobody keeps never fires; kept, it does")
        accumulate(ctx)
        model, reference, events, _ = train(ctx, overlap_ddp)
        check_and_plot(ctx, model, reference, events, args.out)
        print0("Next: exercise 05.1 (bucketed_ddp). Check it: python -m lessons.check 05")


if __name__ == "__main__":
    main()
