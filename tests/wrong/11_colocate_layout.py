"""A wrong answer to exercise 11.1: one fused copy, verified, but it reads each span into the
engine's tensor at the HF tensor's rows (hf_start), not at the span's place in the fused tensor:
k and v land on q's rows, gate_up's up half on its gate half."""

import torch


def pull(spans, trainer, staging, table):
    dst = [staging.views[s.name].narrow(s.dim, s.hf_start, s.stop - s.start) for s in spans]
    src = [trainer[s.hf_name].narrow(s.dim, s.hf_start, s.stop - s.start) for s in spans]
    torch._foreach_copy_(dst, src)
    sums = staging.layout.table(staging.flat)
    return staging.names_at((sums != table).nonzero().flatten().tolist())
