"""An answer to exercise 00.1 written for 4 ranks: it divides by 4, not by the world's size. It
passes on 4 ranks; the check runs on 3 as well, where it must fail (tests/test_checks_catch.py)."""

import torch
import torch.distributed as dist


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    total = x.clone()  # all_reduce overwrites its argument; work on a copy
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # AVG exists too, but not on every backend
    return total / 4  # written for 4 ranks: the world's size, hard-coded
