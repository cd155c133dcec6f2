"""Reference solution for lessons/11_colocate.py. Check: python -m lessons.check 11 --solution

Runs in the lesson's namespace; the import below makes it usable on its own too."""

import torch


# --8<-- [start:ex-11-1]
def pull(spans, trainer, staging, table):
    """Exercise 11.1: fill `staging` from the trainer's tensors in ONE fused copy, then verify.

    For each span s of `spans`, the destination is staging.views[s.name] narrowed along s.dim
    to [s.start, s.stop), the source trainer[s.hf_name] narrowed along s.dim to
    [s.hf_start, s.hf_stop). Copy all pairs with one torch._foreach_copy_(destinations,
    sources): it converts the dtype. Then compare staging.layout.table(staging.flat), one
    checksum per tensor, with `table`: return staging.names_at(the indices that differ), [] if
    none (the caller commits only then).
    """
    # YOUR CODE BELOW
    destinations, sources = [], []
    for s in spans:  # views only: nothing is copied while the lists are built
        n = s.stop - s.start
        destinations.append(staging.views[s.name].narrow(s.dim, s.start, n))
        sources.append(trainer[s.hf_name].narrow(s.dim, s.hf_start, n))
    torch._foreach_copy_(destinations, sources)  # one call: float32 -> bf16, fused qkv, shards
    sums = staging.layout.table(staging.flat)  # one int64 per tensor of the engine's layout
    return staging.names_at((sums != table).nonzero().flatten().tolist())
    # --8<-- [end:ex-11-1]
