"""A wrong answer to exercise 02.2 that skips its point: the sum comes from torch's all_reduce,
imported by name (the check's watch on dist.all_reduce does not see that call). No message goes
round a ring, and the check must say so."""

from torch.distributed import all_reduce


def ring_all_reduce(x):
    y = x.clone()
    all_reduce(y)  # no ring at all
    return y
