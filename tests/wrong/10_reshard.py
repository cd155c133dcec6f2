"""Plausible wrong answers to lesson 10's exercises: their checks must catch them."""

from weight_sync import reshard as rs


def megatron_qkv_to_vllm(shard, shape, tp_rank, tp_size, engine_tp):
    # wrong: reads the shard as HF's concatenation [all q | all k | all v], not per query group.
    # Shapes and row counts are right; with one group per rank it is even right.
    hd, groups = shape.hidden // shape.heads, shape.kv_heads // tp_size
    q_per_group = shape.heads // shape.kv_heads
    q_all, k_all, v_all = shard.split([groups * q_per_group * hd, groups * hd, groups * hd])
    q_rows = shape.heads // engine_tp * hd
    kv_each = max(1, shape.kv_heads // engine_tp)
    out = []
    for j in range(groups):
        g = tp_rank * groups + j
        q = q_all[j * q_per_group * hd : (j + 1) * q_per_group * hd]
        k, v = k_all[j * hd : (j + 1) * hd], v_all[j * hd : (j + 1) * hd]
        for e in range(engine_tp):
            lo = max(g * q_per_group * hd, e * q_rows)
            hi = min((g + 1) * q_per_group * hd, (e + 1) * q_rows)
            if lo < hi:
                out.append(
                    (e, lo - e * q_rows, q[lo - g * q_per_group * hd : hi - g * q_per_group * hd])
                )
            first = e * kv_each if shape.kv_heads >= engine_tp else e * shape.kv_heads // engine_tp
            if first <= g < first + kv_each:
                at = q_rows + (g - first) * hd
                out += [(e, at, k), (e, at + kv_each * hd, v)]
    return out


def plan_span(dst, span, holders, turn=0):
    # wrong: every piece from the first rank holding it, so DP replica 0 sends everything
    lo, hi = span.hf_start, span.hf_stop
    cuts = sorted(
        {lo, hi} | {c for _, h in holders for c in (h.hf_start, h.hf_stop) if lo < c < hi}
    )
    out = []
    for a, b in zip(cuts, cuts[1:]):
        who = [(r, h) for r, h in holders if h.hf_start <= a and b <= h.hf_stop]
        if not who:
            raise rs.PlanError(f"coverage: no trainer rank holds {span.hf_name} [{a}:{b})")
        rank, h = who[0]
        out.append(rs.Transfer(rank, h.name, dst, span.name, span.dim, h.start + a - h.hf_start,
                               span.start + a - span.hf_start, b - a, span.hf_name))  # fmt: skip
    return out
