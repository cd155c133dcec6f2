"""A wrong answer to exercise 11.1 that skips its point: right bytes, right verdicts, but one
copy per span, each through a fresh clone (what a per-tensor design does). Its check must say
one fused copy does it."""

import torch  # noqa: F401


# --8<-- [start:ex-11-1]
def pull(spans, trainer, staging, table):
    for s in spans:
        n = s.stop - s.start
        src = trainer[s.hf_name].narrow(s.dim, s.hf_start, n).clone()
        staging.views[s.name].narrow(s.dim, s.start, n).copy_(src)
    sums = staging.layout.table(staging.flat)
    return staging.names_at((sums != table).nonzero().flatten().tolist())
    # --8<-- [end:ex-11-1]
