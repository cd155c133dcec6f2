"""An answer to exercise 06.1 written for 4 ranks: it averages over 2 students, hard-coded. It
passes on 4 ranks (2 students, 2 teachers); the check runs on 2 as well, where it must fail
(tests/test_checks_catch.py)."""

import torch
import torch.distributed as dist


def bucketed_dp_step(model, optimizer, group):
    grads = [param.grad for param in model.parameters()]
    bucket = torch.cat([grad.reshape(-1) for grad in grads])  # a copy: one flat tensor
    dist.all_reduce(bucket, group=group)  # SUM over the group's ranks: one collective in all
    bucket /= 2  # written for 4 ranks: two students
    for grad, average in zip(grads, bucket.split([grad.numel() for grad in grads])):
        grad.copy_(average.view_as(grad))  # back into .grad, where the optimizer reads it
    optimizer.step()
