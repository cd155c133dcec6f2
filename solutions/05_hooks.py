"""Reference solutions for lessons/05_hooks.py.
Check them: python -m lessons.check 05 --solution

Each function runs in the lesson's namespace: torch, dist and the lesson's helpers are in scope.
"""

import torch
import torch.distributed as dist


# --8<-- [start:ex-05-1]
def bucketed_ddp(model, bucket_bytes: int, log):
    """Exercise 05.1: overlap_ddp with buckets, as torch's DDP does: fewer, bigger all_reduces.

    Go through model.named_parameters() in reverse (backward reaches the last layer first)
    and fill buckets: a parameter joins the current bucket unless that takes it past
    bucket_bytes; then it starts the next one. On each parameter's AccumulateGrad node register
    a hook that calls log("hook", name). When a bucket's last gradient is in, flatten the
    bucket's gradients into one tensor, start one async all_reduce of it (to an average) and
    call log("launch", bucket index); launch buckets in index order. Keep the nodes alive.
    Return finish(): wait for every bucket, copy the averages into p.grad, reset for next step.
    """
    # YOUR CODE BELOW
    world_size = dist.get_world_size()
    buckets, used = [], 0  # lists of (name, parameter), the last layer's first
    for name, p in reversed(list(model.named_parameters())):
        size = p.numel() * p.element_size()
        if not buckets or used + size > bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append((name, p))
        used += size
    arrived = [0] * len(buckets)  # gradients in so far, per bucket
    started = []  # (work, flat gradients) per launched bucket; len(started) = next to launch

    def launch_ready():  # in index order: a bucket waits for the ones before it
        while len(started) < len(buckets) and arrived[len(started)] == len(buckets[len(started)]):
            i = len(started)
            flat = torch.cat([p.grad.reshape(-1) for _, p in buckets[i]]).div_(world_size)
            started.append((dist.all_reduce(flat, async_op=True), flat))
            log("launch", i)

    grad_accs = []
    for i, bucket in enumerate(buckets):
        for name, p in bucket:

            def hook(*_, i=i, name=name):
                log("hook", name)
                arrived[i] += 1
                launch_ready()

            acc = p.expand_as(p).grad_fn.next_functions[0][0]
            acc.register_hook(hook)
            grad_accs.append(acc)
    model.grad_accs = grad_accs  # without this the nodes die and no hook ever fires

    def finish():
        for (work, flat), bucket in zip(started, buckets):
            work.wait()
            grads = flat.split([p.numel() for _, p in bucket])
            for (_, p), grad in zip(bucket, grads):
                p.grad.copy_(grad.view_as(p))
        started.clear()
        arrived[:] = [0] * len(buckets)

    return finish
    # --8<-- [end:ex-05-1]
