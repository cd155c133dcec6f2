"""weight_sync/vllm_layout.py: HF <-> vLLM per TP rank (fused qkv_proj and gate_up_proj, KV
heads split or replicated), single-process: round trips, exact coverage, and the refusals."""

import pytest
import torch

from weight_sync.model import PRESETS, LlamaShape, llama_specs, make_weights
from weight_sync.vllm_layout import (
    check_engine_tp,
    engine_tp_sizes,
    hf_to_vllm,
    narrow,
    vllm_spans,
    vllm_specs,
    vllm_to_hf,
)

TINY = PRESETS["tiny"]  # 12 heads, 6 KV heads: TP 12 replicates each KV head on 2 ranks
EIGHT_KV = LlamaShape(vocab=384, hidden=128, intermediate=192, layers=2, heads=16, kv_heads=8)


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 6, 12])
def test_round_trip_hf_vllm_hf(tp):
    shape = EIGHT_KV if tp == 4 else TINY  # tiny's 6 KV heads do not fit TP 4 (refused below)
    hf = make_weights(shape, 2, "cpu")
    per_rank = [hf_to_vllm(hf, shape, r, tp) for r in range(tp)]
    for weights in per_rank:
        assert [(n, tuple(t.shape)) for n, t in weights.items()] == vllm_specs(shape, tp)
    back = vllm_to_hf(per_rank, shape)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[n], hf[n]) for n in hf)


def test_vllm_to_hf_then_back_is_the_same_shards():
    per_rank = [hf_to_vllm(make_weights(TINY, 3, "cpu"), TINY, r, 3) for r in range(3)]
    again = [hf_to_vllm(vllm_to_hf(per_rank, TINY), TINY, r, 3) for r in range(3)]
    for a, b in zip(per_rank, again):
        assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("tp", [1, 2, 3, 6, 12])
def test_spans_cover_every_byte_of_every_rank_exactly_once(tp):
    specs = dict(vllm_specs(TINY, tp))
    hf_full = {name: full for name, full, _ in llama_specs(TINY)}
    hf_seen = {name: torch.zeros(full, dtype=torch.int32) for name, full in hf_full.items()}
    for r in range(tp):
        seen = {name: torch.zeros(shard, dtype=torch.int32) for name, shard in specs.items()}
        for s in vllm_spans(TINY, r, tp):
            narrow(seen[s.name], s.dim, s.start, s.stop).add_(1)
            narrow(hf_seen[s.hf_name], s.dim, s.hf_start, s.hf_stop).add_(1)
            assert s.stop - s.start == s.hf_stop - s.hf_start
        assert all(bool((count == 1).all()) for count in seen.values()), r
    # every HF byte reaches some rank; KV heads reach tp / 6 ranks when TP > 6, norms all of them
    for name, count in hf_seen.items():
        if name.endswith("norm.weight"):
            want = tp
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            want = max(1, tp // TINY.kv_heads)
        else:
            want = 1
        assert bool((count == want).all()), name


def test_fused_layout_of_one_rank():
    """TP 12 on tiny: rank 5 holds Q head 5 and KV head 2 (heads 4 and 5 share it)."""
    spans = [s for s in vllm_spans(TINY, 5, 12) if "layers.0.self_attn.qkv" in s.name]
    assert [(s.hf_name.split(".")[-2], s.start, s.stop, s.hf_start, s.hf_stop) for s in spans] == [
        ("q_proj", 0, 8, 40, 48),
        ("k_proj", 8, 16, 16, 24),
        ("v_proj", 16, 24, 16, 24),
    ]
    assert dict(vllm_specs(TINY, 2))["model.layers.0.mlp.gate_up_proj.weight"] == (192, 96)


@pytest.mark.parametrize(
    "tp, says",
    [
        (4, "6 KV heads neither split over 4 ranks nor replicate evenly"),
        (5, "12 attention heads do not split into 5 equal parts"),
        (24, "12 attention heads do not split into 24 equal parts"),
        (0, "it must be at least 1"),
    ],
)
def test_refusals_name_the_sizes_that_work(tp, says):
    with pytest.raises(ValueError) as err:
        check_engine_tp(TINY, tp)
    assert says in str(err.value)
    assert "Engine TP sizes that work: 1, 2, 3, 6, 12" in str(err.value)
    with pytest.raises(ValueError):
        vllm_spans(TINY, 0, tp)


def test_sizes_that_work_for_the_real_shapes():
    assert engine_tp_sizes(TINY) == [1, 2, 3, 6, 12]
    assert engine_tp_sizes(PRESETS["llama-3.1-8b"], 16) == [1, 2, 4, 8, 16]


def test_replicas_that_differ_are_refused():
    """TP 12: ranks 0 and 1 both hold KV head 0; vllm_to_hf refuses copies that disagree."""
    per_rank = [hf_to_vllm(make_weights(TINY, 2, "cpu"), TINY, r, 12) for r in range(12)]
    per_rank[1]["model.layers.0.self_attn.qkv_proj.weight"][8, 0] += 1  # rank 1's K, row 0
    with pytest.raises(ValueError, match="k_proj.weight \\[0:8\\) along dim 0: rank 1's copy"):
        vllm_to_hf(per_rank, TINY)
