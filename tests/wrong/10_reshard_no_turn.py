"""A wrong answer to exercise 10.2 that skips a point of it: every plan is right and DP replicas
share big pieces, but `turn` is ignored, so a piece with fewer rows than holders is always sent
by the same first holders. The check must say the sending does not rotate."""


def plan_span(dst, span, holders, turn=0):
    lo, hi = span.hf_start, span.hf_stop
    cuts = {lo, hi} | {c for _, h in holders for c in (h.hf_start, h.hf_stop) if lo < c < hi}
    cuts, out = sorted(cuts), []
    for a, b in zip(cuts, cuts[1:]):
        who = [(r, h) for r, h in holders if h.hf_start <= a and b <= h.hf_stop]
        if not who:
            raise rs.PlanError(f"coverage: no trainer rank holds {span.hf_name} [{a}:{b})")
        shares = min(len(who), b - a)
        for i in range(shares):
            start, stop = a + (b - a) * i // shares, a + (b - a) * (i + 1) // shares
            rank, h = who[i]  # the first holders, whatever the turn
            src_start, dst_start = h.start + start - h.hf_start, span.start + start - span.hf_start
            out.append(
                rs.Transfer(rank, h.name, dst, span.name, span.dim, src_start, dst_start,
                            stop - start, span.hf_name)
            )  # fmt: skip
    return out
