"""Reference solutions for lessons/06_distill.py. Check them: python -m lessons.check 06 --solution

Each function runs in the lesson's namespace: torch, dist and the lesson's helpers are in scope.
"""

import torch
import torch.distributed as dist


# --8<-- [start:ex-06-1]
def bucketed_dp_step(model, optimizer, group):
    """Exercise 06.1: one data-parallel optimizer step with a single all_reduce.

    Flatten every parameter's .grad into one bucket tensor, average the bucket over the ranks
    of `group` (and only those) with ONE all_reduce, copy the averages back into each .grad,
    then call optimizer.step(). One big message instead of one per parameter: fewer, larger
    collectives, which is what DDP's gradient buckets do.
    """
    # YOUR CODE BELOW
    grads = [param.grad for param in model.parameters()]
    bucket = torch.cat([grad.reshape(-1) for grad in grads])  # a copy: one flat tensor
    dist.all_reduce(bucket, group=group)  # SUM over the group's ranks: one collective in all
    bucket /= dist.get_world_size(group)  # the group's size, not the world's
    for grad, average in zip(grads, bucket.split([grad.numel() for grad in grads])):
        grad.copy_(average.view_as(grad))  # back into .grad, where the optimizer reads it
    optimizer.step()
    # --8<-- [end:ex-06-1]
