"""A wrong answer to exercise 11.1: one fused copy, but no verification: it never refuses, so
an update whose weights changed after their checksums would be committed."""

import torch


def pull(spans, trainer, staging, table):
    dst = [staging.views[s.name].narrow(s.dim, s.start, s.stop - s.start) for s in spans]
    src = [trainer[s.hf_name].narrow(s.dim, s.hf_start, s.stop - s.start) for s in spans]
    torch._foreach_copy_(dst, src)
    return []
