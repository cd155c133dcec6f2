"""Plausible wrong answers to lesson 06's exercises: each check must catch them."""

import torch
import torch.distributed as dist


def bucketed_dp_step(model, optimizer, group):
    grads = [param.grad for param in model.parameters()]
    bucket = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(bucket)  # wrong: forgot group=, so the teachers' gradients are averaged in
    bucket /= dist.get_world_size()
    for grad, average in zip(grads, bucket.split([grad.numel() for grad in grads])):
        grad.copy_(average.view_as(grad))
    optimizer.step()
