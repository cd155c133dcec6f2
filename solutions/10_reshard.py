"""Reference solution for lessons/10_reshard.py. Check: python -m lessons.check 10 --solution

Each function runs in the lesson's namespace: the lesson's helpers (rs: weight_sync.reshard)
are in scope; the import below makes this file usable on its own too."""

from weight_sync import reshard as rs


# --8<-- [start:ex-10-1]
def megatron_qkv_to_vllm(shard, shape, tp_rank, tp_size, engine_tp):
    """Exercise 10.1: cut one Megatron TP rank's fused QKV shard into the engine ranks' slices.

    shard: trainer rank tp_rank's linear_qkv (of tp_size), rows per query group g of this rank:
    [q heads of g (heads // kv_heads of them), k_g, v_g], head_dim rows each. Return a list of
    (engine rank, first row in its qkv_proj, rows) for every piece of `shard` some engine rank
    of engine_tp holds. Engine rank e's qkv_proj is [Q_e | K_e | V_e]: query heads
    e * heads // engine_tp onwards, then its KV heads: kv_heads // engine_tp of them from
    e * that, or, when engine_tp > kv_heads, one: head e // (engine_tp // kv_heads).
    """
    # YOUR CODE BELOW
    hd, q_per_group = shape.hidden // shape.heads, shape.heads // shape.kv_heads
    q_rows = shape.heads // engine_tp * hd  # Q rows of each engine rank
    kv_each = max(1, shape.kv_heads // engine_tp)  # KV heads of each engine rank
    out = []
    for j in range(shape.kv_heads // tp_size):  # this rank's query groups, in order
        g = tp_rank * (shape.kv_heads // tp_size) + j  # the group's global number = its KV head
        q, k, v = shard[j * (q_per_group + 2) * hd :][: (q_per_group + 2) * hd].split(
            [q_per_group * hd, hd, hd]
        )  # per group: its q heads, then k, then v (the interleave)
        for e in range(engine_tp):
            lo = max(g * q_per_group * hd, e * q_rows)  # the group's q rows engine rank e holds
            hi = min((g + 1) * q_per_group * hd, (e + 1) * q_rows)
            if lo < hi:
                out.append(
                    (e, lo - e * q_rows, q[lo - g * q_per_group * hd : hi - g * q_per_group * hd])
                )
            first = e * kv_each if shape.kv_heads >= engine_tp else e * shape.kv_heads // engine_tp
            if first <= g < first + kv_each:  # replicated: several engine ranks hold head g
                at = q_rows + (g - first) * hd
                out += [(e, at, k), (e, at + kv_each * hd, v)]
    return out
    # --8<-- [end:ex-10-1]


# --8<-- [start:ex-10-2]
def plan_span(dst, span, holders, turn=0):
    """Exercise 10.2: the planner's core. Return the Transfers that fill one destination span.

    span: a Span of engine rank dst (its tensor span.name's [start:stop) along span.dim holds
    HF tensor span.hf_name's [hf_start:hf_stop)); holders: [(trainer rank, Span)] of every
    trainer span of the same HF tensor. Cut the HF range wherever a holder's range starts or
    stops; each cut piece must be held whole by at least one rank (else raise rs.PlanError);
    split it into equal shares, one per holder, so DP replicas share the work (use `turn` to
    rotate who sends when there are fewer rows than holders). A Transfer names (src, src_name,
    dst, dst_name, dim, src_start, dst_start, length, hf_name), starts in each side's tensor.
    """
    # YOUR CODE BELOW
    lo, hi = span.hf_start, span.hf_stop
    cuts = {lo, hi} | {c for _, h in holders for c in (h.hf_start, h.hf_stop) if lo < c < hi}
    cuts, out = sorted(cuts), []
    for a, b in zip(cuts, cuts[1:]):
        who = [(r, h) for r, h in holders if h.hf_start <= a and b <= h.hf_stop]
        if not who:
            raise rs.PlanError(f"coverage: no trainer rank holds {span.hf_name} [{a}:{b})")
        shares = min(len(who), b - a)  # one equal share per holder, none empty
        for i in range(shares):
            start, stop = a + (b - a) * i // shares, a + (b - a) * (i + 1) // shares
            rank, h = who[(i + turn) % len(who)]
            src_start, dst_start = h.start + start - h.hf_start, span.start + start - span.hf_start
            out.append(
                rs.Transfer(rank, h.name, dst, span.name, span.dim, src_start, dst_start,
                            stop - start, span.hf_name)
            )  # fmt: skip
    return out
    # --8<-- [end:ex-10-2]
