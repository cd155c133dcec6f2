"""An answer to exercise 05.1 from before the check asked for it: no word when a parameter gets
no gradient. finish() returns as if all were well; the check must catch it, saying why, and not
hang (tests/test_checks_catch.py)."""

import torch
import torch.distributed as dist


def bucketed_ddp(model, bucket_bytes, log):
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

    def finish():  # wrong: never asks whether every parameter's hook fired
        for (work, flat), bucket in zip(started, buckets):
            work.wait()
            grads = flat.split([p.numel() for _, p in bucket])
            for (_, p), grad in zip(bucket, grads):
                p.grad.copy_(grad.view_as(p))
        started.clear()
        arrived[:] = [0] * len(buckets)

    return finish
