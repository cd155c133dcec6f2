"""Reference solution for lessons/13_experts.py. Check: python -m lessons.check 13 --solution

Each function runs in the lesson's namespace; this file needs nothing else."""


# --8<-- [start:ex-13-1]
def split_experts(local, shape, ep_rank, ep, etp_rank, etp, engine_tp, experts_by):
    """Exercise 13.1: cut one trainer rank's routed experts (one layer) into the engine's pieces.

    local: {k: (fc1, fc2)}, this rank's local expert k (expert ep_rank * experts // ep + k),
    its expert-TP slice etp_rank of etp: fc1 = [gate; up] rows (each intermediate // etp), fc2
    = down's columns. Return [(engine rank t, its local expert j, "w13" or "w2", start, slab)]:
    slab goes into t's w13_weight.{j} at row `start` (its gate rows, then its up rows) or into
    its w2_weight.{j} at column `start`. experts_by "tp": every engine rank holds rows
    t * intermediate // engine_tp.. of every expert (j = the expert); "ep": whole experts,
    experts // engine_tp per rank from t's first (j counts from there).
    """
    # YOUR CODE BELOW
    by_ep, inter = experts_by == "ep", shape.expert_intermediate
    mine = inter // etp  # rows of each expert this rank holds: from etp_rank * mine
    theirs = inter if by_ep else inter // engine_tp  # rows of each expert an engine rank holds
    per_rank, out = shape.experts // engine_tp, []
    for k, (fc1, fc2) in local.items():
        e = ep_rank * (shape.experts // ep) + k  # the global expert: EP ranks hold contiguous runs
        for t in range(engine_tp):
            if by_ep and e // per_rank != t:
                continue  # engine rank t does not hold expert e
            j, first = (e % per_rank, 0) if by_ep else (e, t * theirs)
            lo, hi = max(first, etp_rank * mine), min(first + theirs, (etp_rank + 1) * mine)
            if lo >= hi:
                continue  # none of t's rows of expert e are in my slice
            src, dst, n = lo - etp_rank * mine, lo - first, hi - lo
            out += [
                (t, j, "w13", dst, fc1[src : src + n]),  # gate rows
                (t, j, "w13", theirs + dst, fc1[mine + src : mine + src + n]),  # up rows
                (t, j, "w2", dst, fc2[:, src : src + n]),  # down's columns
            ]
    return out
    # --8<-- [end:ex-13-1]
