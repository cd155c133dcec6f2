"""Answers to lesson 06's exercises that get the right numbers but skip what the exercise
teaches: each check must catch them and say why (tests/test_checks_catch.py)."""

import torch.distributed as dist


def bucketed_dp_step(model, optimizer, group):
    # Skips the point: one all_reduce per parameter, many small messages instead of one bucket.
    for param in model.parameters():
        dist.all_reduce(param.grad, group=group)
        param.grad /= dist.get_world_size(group)
    optimizer.step()
