"""An answer to exercise 05.1 that gets the right gradients, hooks and launch log, but skips
what the exercise teaches: it all_reduces every parameter on its own, as overlap_ddp does, and
only logs buckets. The check must catch it and say why (tests/test_checks_catch.py)."""

import torch.distributed as dist


def bucketed_ddp(model, bucket_bytes, log):
    buckets, used = [], 0  # lists of (name, parameter), the last layer's first
    for name, p in reversed(list(model.named_parameters())):
        size = p.numel() * p.element_size()
        if not buckets or used + size > bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append((name, p))
        used += size
    arrived, fired, works, grad_accs = [0] * len(buckets), set(), [], []

    for i, bucket in enumerate(buckets):
        for name, p in bucket:

            def hook(*_, i=i, name=name, p=p):
                log("hook", name)
                fired.add(name)
                # Skips the point: one all_reduce per parameter, not one per bucket.
                p.grad.div_(dist.get_world_size())
                works.append(dist.all_reduce(p.grad, async_op=True))
                arrived[i] += 1
                if arrived[i] == len(buckets[i]):
                    log("launch", i)  # the log says "bucket", the wire says otherwise

            acc = p.expand_as(p).grad_fn.next_functions[0][0]
            acc.register_hook(hook)
            grad_accs.append(acc)
    model.grad_accs = grad_accs

    def finish():
        missing = [name for bucket in buckets for name, _ in bucket if name not in fired]
        if missing:
            raise RuntimeError(f"no gradient for {missing}: make every rank's loss use them")
        for work in works:
            work.wait()
        works.clear()
        fired.clear()
        arrived[:] = [0] * len(buckets)

    return finish
