"""Lesson 05 - hooks on gradient-accumulator nodes: run code the moment a parameter's gradient
is ready, and build DDP from scratch with it.

The idea
    backward() walks the autograd graph from the loss back to the parameters; the last node on
    the way to a parameter p is its AccumulateGrad node, which adds the incoming gradient into
    p.grad. A hook on that node runs as soon as p.grad is complete, while backward still works
    on earlier layers. torch's DDP and Megatron-LM start their gradient all_reduce there, so the
    last layers' communication overlaps the first layers' computation. The node is
    p.expand_as(p).grad_fn.next_functions[0][0]; keep a reference to it: p holds only a weak one.

Run it
    torchrun --nproc-per-node 4 lessons/05_hooks.py
    python lessons/05_hooks.py --nproc 2              # plain python: starts torchrun for you

What you should see (4 ranks, no GPU)
    [rank 0] no GPU: using gloo on CPU
    [rank 0] hooks on y = w * x, in the order they fired, and w.grad at that moment:
    [rank 0]   MulBackward0 hook                        w.grad None
    [rank 0]   w.register_hook                          w.grad None   <- may replace the grad
    [rank 0]   w.register_post_accumulate_grad_hook     w.grad [6.0, 8.0]
    [rank 0]   AccumulateGrad node hook                 w.grad [6.0, 8.0]
    [rank 0] checked: operator, tensor, post-accumulate, node hook, in that order; w.grad = 2x
    [rank 0] checked: a hook on an AccumulateGrad node nobody keeps never fires; kept, it does
    [rank 0] error against float64 after           4        8       16       32 micro-batches
    [rank 0]   summed in bf16, as p.grad     2.7e-03  3.7e-03  5.0e-03  6.9e-03   <- grows
    [rank 0]   summed in fp32, main_grad     0.0e+00  4.2e-10  8.1e-10  1.6e-09   <- fp32 rounding
    [rank 0] checked: main_grad is the exact sum to float32's rounding; p.grad is None
    [rank 0] checked: 3 SGD steps on 4 ranks give one process's gradients
    [rank 0] checked: every step, all 8 all_reduces started inside backward
    [rank 0] saved out/05_timeline.png   <- when each all_reduce started, per rank
    [rank 0] Next: exercise 05.1 (bucketed_ddp). Check it: python -m lessons.check 05
Setup, printing: course/ranks.py (lesson 00 writes them out). Picture: course/plots.py.
"""

import copy
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course.plots import ddp_timeline
from course.ranks import parser, print0, setup

SEED = 0  # every rank builds the same model and draws the same batches from this seed
WIDTH, DEPTH = 256, 4  # the model: DEPTH Linear(WIDTH, WIDTH) layers, tanh between them
LOCAL_BATCH = 16  # samples per rank per step; the full batch is LOCAL_BATCH * world size
STEPS, LR = 3, 0.1  # SGD steps of the DDP run, each compared with one process; learning rate
MICRO_BATCHES, REPORT_AT = 32, (4, 8, 16, 32)  # main_grad demo: micro-batches; errors shown after


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
    return fired
    # --8<-- [end:order]


# --8<-- [start:lost]
def lost_hook(device):
    """Register a hook on an AccumulateGrad node without keeping the node, then with."""
    w, calls = torch.nn.Parameter(torch.ones(2, device=device)), []
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


def accumulate(device):
    """main_grad over MICRO_BATCHES bf16 micro-batches, next to p.grad summing them in bf16, both
    against their exact sum. The loss is model(x).sum(), so the weight's gradient is x itself."""
    model = torch.nn.Linear(WIDTH * WIDTH, 1, bias=False, device=device, dtype=torch.bfloat16)
    plain = copy.deepcopy(model)  # no hooks: its p.grad piles the gradients up in bf16
    _grad_accs = attach_main_grad(model)  # held while the model trains: the hooks live with them
    g, exact, errors = torch.Generator().manual_seed(SEED), 0, {}  # micro-batches -> errors
    for done in range(1, MICRO_BATCHES + 1):
        x = torch.randn(1, WIDTH * WIDTH, generator=g).to(device, torch.bfloat16)
        model(x).sum().backward()  # the hook adds x into main_grad and drops p.grad
        plain(x).sum().backward()  # AccumulateGrad adds x into p.grad, in bf16
        exact = exact + x.double()  # float64 holds a sum of a few bf16 numbers exactly
        if done in REPORT_AT:
            sums = plain.weight.grad.double(), model.weight.main_grad.double()
            errors[done] = [((s - exact).norm() / exact.norm()).item() for s in sums]
    print0(f"{'error against float64 after':<30}{''.join(f'{k:>9}' for k in errors)} micro-batches")
    for i, what in enumerate(("summed in bf16, as p.grad", "summed in fp32, main_grad")):
        print0(f"  {what:<28}" + "".join(f"{e[i]:9.1e}" for e in errors.values()))
    assert model.weight.grad is None and errors[MICRO_BATCHES][1] < 1e-6, errors
    print0("checked: main_grad is the exact sum to float32's rounding; p.grad is None")


# --8<-- [start:ddp]
def overlap_ddp(model, log):
    """DDP from scratch, one bucket per parameter: the moment backward has written p.grad, start
    an all_reduce of it in the background and let backward carry on. log(what, which) records
    each step. Returns finish(): wait for every all_reduce; call it before optimizer.step()."""
    pending, grad_accs = [], []  # (name, all_reduce) per hook fired in this backward; the nodes
    for name, p in model.named_parameters():

        def hook(*_, name=name, p=p):
            log("hook", name)
            p.grad.div_(dist.get_world_size())  # each rank's loss is a mean: average them too
            # Every rank's backward runs the same graph, so the hooks fire, and the all_reduces
            # start, in the same order on every rank, as collectives must.
            pending.append((name, dist.all_reduce(p.grad, async_op=True)))
            log("launch", name)

        acc = p.expand_as(p).grad_fn.next_functions[0][0]
        acc.register_hook(hook)
        grad_accs.append(acc)
    model.grad_accs = grad_accs  # keep the nodes as long as the model (see lost_hook)

    def finish():
        # No gradient (outside the loss): no hook, no all_reduce. Stop (DDP does, a step later).
        if missing := [name for name, _ in model.named_parameters() if name not in dict(pending)]:
            raise RuntimeError(f"no gradient for {missing}: make every rank's loss use them")
        for _, work in pending:
            work.wait()  # on GPU this makes the next kernels wait for NCCL; the CPU goes on
        log("waited", f"{len(pending)} all_reduces")
        pending.clear()

    return finish
    # --8<-- [end:ddp]


def train(ctx, make_ddp, steps=STEPS):
    """`steps` SGD steps of make_ddp(model, log) -> finish, next to one process on the full batch.
    Returns the model, its log [(step, what, which, time)], {"step s, name.grad": (its, one's)}."""
    torch.manual_seed(SEED)  # the same weights on every rank: no broadcast needed to start
    layers = [m for _ in range(DEPTH) for m in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh())]
    model = torch.nn.Sequential(*layers[:-1]).to(ctx.device)
    reference = copy.deepcopy(model)  # the single-process model: the full batch, no collectives
    events, grads, step = [], {}, 0
    finish = make_ddp(model, lambda *what: events.append((step, *what, time.perf_counter())))
    mine = slice(ctx.rank * LOCAL_BATCH, (ctx.rank + 1) * LOCAL_BATCH)  # my share of a batch
    for step in range(steps):
        g = torch.Generator().manual_seed(SEED + 1 + step)  # the full batch, alike on all ranks
        x, y = torch.randn(2, LOCAL_BATCH * ctx.world_size, WIDTH, generator=g).to(ctx.device)
        events.append((step, "backward", "starts", time.perf_counter()))
        F.mse_loss(model(x[mine]), y[mine]).backward()  # the hooks start all_reduces meanwhile
        events.append((step, "backward", "returns", time.perf_counter()))
        finish()  # every gradient averaged over the ranks: now the optimizer may step
        F.mse_loss(reference(x), y).backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            grads[f"step {step}, {name}.grad"] = p.grad.clone(), q.grad.clone()
        with torch.no_grad():  # SGD by hand: torch.optim imports torch._dynamo, seconds per rank
            for p in [*model.parameters(), *reference.parameters()]:
                p -= LR * p.grad
                p.grad = None
    return model, events, grads


def run_ddp(ctx, out):
    """overlap_ddp against one process, and when its all_reduces started; rank 0 draws them."""
    model, events, grads = train(ctx, overlap_ddp)
    for what, (mine, one) in grads.items():
        assert torch.allclose(mine, one, atol=1e-6), f"rank {ctx.rank}: {what}: {mine}, {one}"
    returned = {e[0]: e[3] for e in events if e[1:3] == ("backward", "returns")}  # step -> time
    early = sorted((s, name) for s, what, name, t in events if what == "launch" and t < returned[s])
    assert early == sorted((s, n) for s in range(STEPS) for n, _ in model.named_parameters()), early
    print0(f"checked: {STEPS} SGD steps on {ctx.world_size} ranks give one process's gradients")
    print0(f"checked: every step, all {len(early) // STEPS} all_reduces started inside backward")
    ddp_timeline([e for e in events if e[0] == STEPS - 1], Path(out) / "05_timeline.png")


# --8<-- [start:ex-05-1]
def bucketed_ddp(model, bucket_bytes: int, log):
    """Exercise 05.1: overlap_ddp with buckets, as torch's DDP does: fewer, bigger all_reduces.

    Fill buckets from model.named_parameters() in reverse (backward reaches the last layer
    first): a parameter joins the current bucket unless that takes it past bucket_bytes. On
    each parameter's AccumulateGrad node (keep the nodes alive) register a hook that calls
    log("hook", name). When a bucket's last gradient is in, start one async all_reduce of its
    gradients flattened into one tensor (to an average), call log("launch", bucket index);
    launch in index order. Return finish(): raise RuntimeError naming every parameter whose
    hook did not fire this step; else wait for every bucket, copy the averages into p.grad, reset.
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 05.1: buckets, AccumulateGrad hooks, one all_reduce per bucket (about 40 lines)"
    )
    # --8<-- [end:ex-05-1]


def main():
    args = parser(__doc__).parse_args()
    with setup(args, relaunch=True, trace=args.trace) as ctx:  # any world size
        fired = hook_order(ctx.device)
        print0("hooks on y = w * x, in the order they fired, and w.grad at that moment:")
        print0("\n".join(f"  {hook:<40} w.grad {grad_then}" for hook, grad_then in fired))
        order = ["MulBackward0 hook", "w.register_hook", "w.register_post_accumulate_grad_hook"]
        grads = [None, None, [6.0, 8.0], [6.0, 8.0]]  # w.grad when each ran: 2 x [3.0, 4.0]
        assert fired == list(zip([*order, "AccumulateGrad node hook"], grads)), (ctx.rank, fired)
        print0("checked: operator, tensor, post-accumulate, node hook, in that order; w.grad = 2x")
        assert (calls := lost_hook(ctx.device)) == ["kept"], f"rank {ctx.rank}: hooks ran {calls}"
        print0("checked: a hook on an AccumulateGrad node nobody keeps never fires; kept, it does")
        accumulate(ctx.device)
        run_ddp(ctx, args.out)
        print0("Next: exercise 05.1 (bucketed_ddp). Check it: python -m lessons.check 05")


if __name__ == "__main__":
    main()
