"""A plausible wrong answer to exercise 13.1: experts in the wrong order. Every shape and
every row count is right, every element written once; the experts land in the wrong slots."""


def split_experts(local, shape, ep_rank, ep, etp_rank, etp, engine_tp, experts_by):
    # wrong: takes local expert k of EP rank b for expert k * ep + b (round-robin placement)
    by_ep, inter = experts_by == "ep", shape.expert_intermediate
    mine = inter // etp
    theirs = inter if by_ep else inter // engine_tp
    per_rank, out = shape.experts // engine_tp, []
    for k, (fc1, fc2) in local.items():
        e = k * ep + ep_rank
        for t in range(engine_tp):
            if by_ep and e // per_rank != t:
                continue
            j, first = (e % per_rank, 0) if by_ep else (e, t * theirs)
            lo, hi = max(first, etp_rank * mine), min(first + theirs, (etp_rank + 1) * mine)
            if lo >= hi:
                continue
            src, dst, n = lo - etp_rank * mine, lo - first, hi - lo
            out += [
                (t, j, "w13", dst, fc1[src : src + n]),
                (t, j, "w13", theirs + dst, fc1[mine + src : mine + src + n]),
                (t, j, "w2", dst, fc2[:, src : src + n]),
            ]
    return out
