"""How a vLLM-style engine holds a Llama model over TP ranks, and the conversions between that
and HF's layout (the exchange format): pure functions, no process groups.

Per TP rank, vLLM fuses q/k/v into one `qkv_proj` = [Q_r | K_r | V_r] (rows) and gate/up into
one `gate_up_proj` = [gate_r | up_r]; o_proj and down_proj are split by columns, the embedding
and lm_head by vocabulary rows, the norms replicated. When TP exceeds the KV heads, each KV head
is replicated on tp_size / kv_heads consecutive ranks (vLLM's QKVParallelLinear does the same).

A mixture of experts (moe.py's MoeShape, lesson 13) keeps the router replicated and the shared
expert split as a dense MLP; its routed experts are held, by a flag, either by TP (every rank a
slice of every expert: w13 = [gate_r | up_r] rows, w2 its columns, as vLLM's FusedMoE) or by EP
(experts // tp_size whole experts per rank). vLLM keeps one [local experts, ...] tensor each for
w13 and w2; here local expert j is `mlp.experts.w13_weight.{j}` (that tensor's [j]).

A Span says where a part of an HF tensor lands in one rank's tensor; the planner of a
resharded update (Megatron -> HF -> vLLM) and the engine's loader both read them."""

from __future__ import annotations

from typing import NamedTuple

import torch

from weight_sync.model import LlamaShape, Spec, Weights, llama_specs
from weight_sync.moe import expert_names, is_moe, moe_specs


class Span(NamedTuple):
    """[start:stop) along `dim` of this rank's tensor `name` holds HF tensor `hf_name`'s
    [hf_start:hf_stop) along the same dim (the whole of the other dim)."""

    name: str
    dim: int
    start: int
    stop: int
    hf_name: str
    hf_start: int
    hf_stop: int


def hf_specs(shape) -> list[Spec]:
    """The HF tensors of `shape`, dense Llama or mixture of experts."""
    return moe_specs(shape) if is_moe(shape) else llama_specs(shape)


def engine_tp_sizes(shape: LlamaShape, up_to: int = 64, experts_by: str = "tp") -> list[int]:
    """Every engine TP size up to `up_to` that check_engine_tp accepts for `shape`."""
    return [tp for tp in range(1, up_to + 1) if _problem(shape, tp, experts_by) is None]


def _problem(shape, tp, experts_by="tp"):
    if tp < 1:
        return f"engine TP {tp}: it must be at least 1"
    if is_moe(shape) and experts_by == "ep" and tp > shape.experts:
        return (f"engine EP {tp} needs more experts per rank than exist: {shape.experts} experts "
                f"cannot give each of {tp} ranks a whole one")  # fmt: skip
    if is_moe(shape) and experts_by == "ep" and shape.experts % tp:
        return f"EP {tp} must divide the {shape.experts} experts (whole experts per rank)"
    if is_moe(shape) and experts_by == "tp" and shape.expert_intermediate % tp:
        return f"its experts' intermediate size {shape.expert_intermediate} does not split by {tp}"
    if experts_by not in ("tp", "ep"):
        return f"experts by {experts_by!r}: by tp or ep"
    for what, n in (
        ("attention heads", shape.heads),
        ("intermediate size", shape.intermediate),
        ("vocabulary", shape.vocab),
    ):
        if n % tp:
            return f"its {n} {what} do not split into {tp} equal parts"
    if shape.kv_heads % tp and tp % shape.kv_heads:
        return (
            f"its {shape.kv_heads} KV heads neither split over {tp} ranks nor replicate evenly "
            f"on them ({tp} is not a multiple of {shape.kv_heads})"
        )
    return None


def check_engine_tp(shape: LlamaShape, tp_size: int, experts_by: str = "tp") -> None:
    """Raise ValueError, naming the sizes that work, if `shape` cannot be served at tp_size:
    TP must divide heads, intermediate size and vocabulary, and either divide the KV heads
    or be a multiple of them (then each KV head is replicated on tp_size / kv_heads ranks)."""
    problem = _problem(shape, tp_size, experts_by)
    if problem:
        sizes = ", ".join(map(str, engine_tp_sizes(shape, max(64, tp_size), experts_by)))
        raise ValueError(
            f"engine TP {tp_size} does not fit this model: {problem}. "
            f"Engine TP sizes that work: {sizes}"
        )


def _per_rank(shape, tp_rank, tp_size, experts_by="tp"):
    """(head_dim, Q rows, KV rows, first KV row, intermediate rows) of one rank."""
    check_engine_tp(shape, tp_size, experts_by)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is not a rank of TP {tp_size}")
    hd = shape.hidden // shape.heads
    kv_heads = max(1, shape.kv_heads // tp_size)  # this rank's; 1 when replicated
    first_kv = (
        tp_rank * kv_heads if shape.kv_heads >= tp_size else tp_rank * shape.kv_heads // tp_size
    )
    return (
        hd,
        shape.heads // tp_size * hd,
        kv_heads * hd,
        first_kv * hd,
        shape.intermediate // tp_size,
    )


def vllm_specs(
    shape: LlamaShape, tp_size: int, experts_by: str = "tp"
) -> list[tuple[str, tuple[int, ...]]]:
    """[(vLLM name, this rank's shard shape)] in the engine's order; the same on every rank."""
    return [(name, shard) for name, shard, _ in _tensors(shape, 0, tp_size, experts_by)]


def vllm_spans(shape: LlamaShape, tp_rank: int, tp_size: int, experts_by: str = "tp") -> list[Span]:
    """Every Span of rank tp_rank, in the engine's order: together they cover each byte of
    each of its tensors exactly once."""
    return [span for _, _, spans in _tensors(shape, tp_rank, tp_size, experts_by) for span in spans]


def vllm_tensors(
    shape: LlamaShape, tp_rank: int, tp_size: int, experts_by: str = "tp"
) -> list[tuple[str, tuple[int, ...], list[Span]]]:
    """[(vLLM name, shard shape, its Spans)] of rank tp_rank, in the engine's order."""
    return _tensors(shape, tp_rank, tp_size, experts_by)


def _tensors(shape, tp_rank, tp_size, experts_by="tp"):
    hd, q, kv, first_kv, inter = _per_rank(shape, tp_rank, tp_size, experts_by)
    h, vocab = shape.hidden, shape.vocab // tp_size
    out = []

    def rows(name, width, *parts):  # parts: (HF name, first HF row, row count), fused by rows
        spans, at = [], 0
        for hf_name, hf_start, n in parts:
            spans.append(Span(name, 0, at, at + n, hf_name, hf_start, hf_start + n))
            at += n
        out.append((name, (at, width), spans))

    def columns(name, height, hf_name, width):  # split by columns (row-parallel)
        spans = [Span(name, 1, 0, width, hf_name, tp_rank * width, (tp_rank + 1) * width)]
        out.append((name, (height, width), spans))

    def replicated(name):
        out.append((name, (h,), [Span(name, 0, 0, h, name, 0, h)]))

    rows("model.embed_tokens.weight", h, ("model.embed_tokens.weight", tp_rank * vocab, vocab))
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        replicated(p + "input_layernorm.weight")
        rows(
            a + "qkv_proj.weight",
            h,
            (a + "q_proj.weight", tp_rank * q, q),
            (a + "k_proj.weight", first_kv, kv),
            (a + "v_proj.weight", first_kv, kv),
        )
        columns(a + "o_proj.weight", h, a + "o_proj.weight", q)
        replicated(p + "post_attention_layernorm.weight")
        if is_moe(shape):
            _experts(rows, columns, out, shape, i, tp_rank, tp_size, experts_by)
            if not shape.intermediate:
                continue
            m += "shared_expert."  # split by TP as a dense MLP
        rows(
            m + "gate_up_proj.weight",
            h,
            (m + "gate_proj.weight", tp_rank * inter, inter),
            (m + "up_proj.weight", tp_rank * inter, inter),
        )
        columns(m + "down_proj.weight", h, m + "down_proj.weight", inter)
    replicated("model.norm.weight")
    rows("lm_head.weight", h, ("lm_head.weight", tp_rank * vocab, vocab))
    return out


def _experts(rows, columns, out, shape, i, tp_rank, tp_size, experts_by):
    """Layer i's router (whole on every rank) and this rank's routed experts."""
    p, h, e_all = f"model.layers.{i}.mlp.", shape.hidden, shape.experts
    rows(p + "gate.weight", h, (p + "gate.weight", 0, e_all))
    by_ep = experts_by == "ep"
    local = e_all // tp_size if by_ep else e_all
    inter = shape.expert_intermediate // (1 if by_ep else tp_size)
    start = 0 if by_ep else tp_rank * inter  # by TP: this rank's rows of every expert
    for j in range(local):
        e = tp_rank * local + j if by_ep else j
        gate, up, down = expert_names(i, e)
        rows(f"{p}experts.w13_weight.{j}", h, (gate, start, inter), (up, start, inter))
        name = f"{p}experts.w2_weight.{j}"
        if by_ep:  # whole: its columns [0, inter)
            out.append((name, (h, inter), [Span(name, 1, 0, inter, down, 0, inter)]))
        else:
            columns(name, h, down, inter)


def narrow(tensor: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    """tensor[start:stop) along dim (a view)."""
    return tensor.narrow(dim, start, stop - start)


def hf_to_vllm(
    hf_weights: Weights, shape: LlamaShape, tp_rank: int, tp_size: int, experts_by: str = "tp"
) -> Weights:
    """Rank tp_rank's vLLM tensors (new, contiguous) from full HF tensors."""
    out = {}
    for name, shard, spans in _tensors(shape, tp_rank, tp_size, experts_by):
        some = hf_weights[spans[0].hf_name]
        out[name] = t = torch.empty(shard, dtype=some.dtype, device=some.device)
        for s in spans:
            narrow(t, s.dim, s.start, s.stop).copy_(
                narrow(hf_weights[s.hf_name], s.dim, s.hf_start, s.hf_stop)
            )
    return out


def vllm_to_hf(per_rank: list[Weights], shape: LlamaShape, experts_by: str = "tp") -> Weights:
    """The full HF tensors from every rank's vLLM tensors (per_rank[r]: rank r's). A KV head
    or norm held by several ranks is read from the first of them; ValueError if another copy
    differs from it (replicas must agree)."""
    tp_size = len(per_rank)
    some = next(iter(per_rank[0].values()))
    out = {
        name: torch.empty(full, dtype=some.dtype, device=some.device)
        for name, full, _ in hf_specs(shape)
    }
    done = set()
    for r, weights in enumerate(per_rank):
        for s in vllm_spans(shape, r, tp_size, experts_by):
            part = narrow(weights[s.name], s.dim, s.start, s.stop)
            target = narrow(out[s.hf_name], s.dim, s.hf_start, s.hf_stop)
            if (s.hf_name, s.dim, s.hf_start) not in done:
                done.add((s.hf_name, s.dim, s.hf_start))
                target.copy_(part)
            elif not torch.equal(target, part):
                raise ValueError(
                    f"{s.hf_name} [{s.hf_start}:{s.hf_stop}) along dim {s.dim}: rank {r}'s copy "
                    "differs from a lower rank's (a replicated part must be equal on every rank)"
                )
    return out
