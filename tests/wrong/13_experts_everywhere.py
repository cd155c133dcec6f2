"""A wrong answer to exercise 13.1 that skips the regroup: every local expert, whole, to every
engine rank (as if every engine rank gathered everything)."""


def split_experts(local, shape, ep_rank, ep, etp_rank, etp, engine_tp, experts_by):
    inter = shape.expert_intermediate // etp
    out = []
    for k, (fc1, fc2) in local.items():
        e = ep_rank * (shape.experts // ep) + k
        for t in range(engine_tp):
            j = e % (shape.experts // engine_tp) if experts_by == "ep" else e
            out += [(t, j, "w13", 0, fc1[:inter]), (t, j, "w13", inter, fc1[inter:]),
                    (t, j, "w2", 0, fc2)]  # fmt: skip
    return out
