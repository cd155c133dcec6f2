"""The trainer's side of lesson 10: a Llama-style model held the way Megatron-LM holds it, as
Spans (the format of weight_sync/vllm_layout.py), and the conversions to and from HF's layout.

Megatron (mcore GPT, local layer spec), per TP rank of each pipeline stage:
    decoder.layers.{j}.self_attention.linear_qkv.weight   per query group g of this rank:
                                                          [q heads of g..., k_g, v_g] rows
    decoder.layers.{j}.self_attention.linear_proj.weight  row-parallel (dim 1): o_proj
    decoder.layers.{j}.mlp.linear_fc1.weight              [gate_r; up_r] rows
    decoder.layers.{j}.mlp.linear_fc2.weight              row-parallel (dim 1): down_proj
    decoder.layers.{j}.input_layernorm.weight, .pre_mlp_layernorm.weight  replicated
    embedding.word_embeddings.weight (first stage), output_layer.weight and
    decoder.final_layernorm.weight (last stage): vocab-parallel, replicated
j is the stage-local layer number: global layer = the stage's first layer + j.

A mixture of experts (moe.py, lesson 13) replaces each MLP with
    decoder.layers.{j}.mlp.router.weight                  replicated
    decoder.layers.{j}.mlp.experts.local_experts.{k}.linear_fc1.weight   [gate; up] rows
    decoder.layers.{j}.mlp.experts.local_experts.{k}.linear_fc2.weight   down's columns
    decoder.layers.{j}.mlp.shared_experts.linear_fc{1,2}.weight          split by TP, as dense
Routed experts live on EP ranks: EP rank b holds experts b * E/ep .. (b+1) * E/ep - 1 as local
experts k = 0, 1, ..., each split over expert-TP (ETP) ranks like a dense MLP. Megatron folds
the expert axes onto the same ranks as the dense ones: within a stage, the tp * dp ranks are
read again as ETP x EP x expert-DP, ETP fastest (expert_rank below).

A Span (name, dim, start, stop, hf_name, hf_start, hf_stop) says: rows [start:stop) along `dim`
of this rank's tensor `name` hold HF tensor hf_name's [hf_start:hf_stop) along the same dim
(the other dim whole). Every conversion here is a copy of spans, nothing else."""

from __future__ import annotations

from typing import NamedTuple

import torch

from weight_sync.model import LlamaShape, Weights
from weight_sync.moe import is_moe
from weight_sync.vllm_layout import Span, hf_specs


class TrainerRank(NamedTuple):
    tp_rank: int
    pp_rank: int
    dp_rank: int


def trainer_rank(rank: int, tp: int, pp: int, dp: int) -> TrainerRank:
    """Megatron's order of ranks: TP fastest, then DP, then PP (its default "tp-dp-pp")."""
    return TrainerRank(rank % tp, rank // (tp * dp), rank // tp % dp)


class ExpertRank(NamedTuple):
    etp_rank: int
    ep_rank: int
    edp_rank: int


def expert_rank(rank: int, tp: int, dp: int, ep: int, etp: int) -> ExpertRank:
    """Megatron's folding: a stage's tp * dp ranks, in their order, read as ETP x EP x EDP."""
    local = rank % (tp * dp)
    return ExpertRank(local % etp, local // etp % ep, local // (etp * ep))


def stage_layers(layers: int, pp_rank: int, pp_size: int) -> range:
    """The global layers of stage pp_rank: contiguous, as even as can be (earlier stages get the
    extra ones when pp_size does not divide the layers)."""
    base, extra = divmod(layers, pp_size)
    first = pp_rank * base + min(pp_rank, extra)
    return range(first, first + base + (pp_rank < extra))


def check_trainer(shape: LlamaShape, tp: int, pp: int) -> None:
    """Refuse a trainer layout Megatron cannot hold, naming the rule."""
    rules = [
        (shape.kv_heads % tp, f"TP {tp} must divide the {shape.kv_heads} KV heads (Megatron "
         "splits whole query groups over TP ranks)"),
        (shape.intermediate % tp, f"TP {tp} must divide intermediate {shape.intermediate}"),
        (shape.vocab % tp, f"TP {tp} must divide the vocabulary {shape.vocab}"),
        (pp > shape.layers, f"PP {pp} must be at most the {shape.layers} layers"),
    ]  # fmt: skip
    for broken, rule in rules:
        if broken:
            raise ValueError(f"trainer layout TP {tp} x PP {pp}: {rule}")


def megatron_spans(
    shape: LlamaShape,
    tp_rank: int,
    tp_size: int,
    pp_rank: int = 0,
    pp_size: int = 1,
    experts: tuple[int, int, int, int] = (0, 1, 0, 1),
) -> list[Span]:
    """What trainer rank (tp_rank, pp_rank) holds, as Spans of HF tensors; of a mixture of
    experts, `experts` = (ep_rank, ep, etp_rank, etp) says which routed experts."""
    check_trainer(shape, tp_size, pp_size)
    spans = _dense_spans(shape, tp_rank, tp_size, pp_rank, pp_size)
    if not is_moe(shape):
        return spans
    out = []  # the MLP's spans are the shared expert's (or none), the experts added per layer
    for s in spans:
        if ".mlp." not in s.hf_name:
            out.append(s)
        elif shape.intermediate:
            name, hf = s.name.replace("mlp.", "mlp.shared_experts."), s.hf_name
            out.append(s._replace(name=name, hf_name=hf.replace("mlp.", "mlp.shared_expert.")))
        if s.name.endswith("pre_mlp_layernorm.weight"):
            j = int(s.name.split(".")[2])
            out += expert_spans(shape, j, stage_layers(shape.layers, pp_rank, pp_size)[j], *experts)
    return out


def expert_spans(
    shape, j: int, i: int, ep_rank: int, ep: int, etp_rank: int, etp: int
) -> list[Span]:
    """Stage-local layer j (global i): the router, and EP rank ep_rank's experts, ETP-split."""
    e_all, m, p = shape.experts, f"decoder.layers.{j}.mlp.", f"model.layers.{i}.mlp."
    local, inter = e_all // ep, shape.expert_intermediate // etp
    out = [Span(m + "router.weight", 0, 0, e_all, p + "gate.weight", 0, e_all)]
    for k in range(local):
        e, x = ep_rank * local + k, f"{m}experts.local_experts.{k}."
        hf, part = f"{p}experts.{e}.", _part(inter, etp_rank)
        out += [
            Span(x + "linear_fc1.weight", 0, 0, inter, hf + "gate_proj.weight", *part),
            Span(x + "linear_fc1.weight", 0, inter, 2 * inter, hf + "up_proj.weight", *part),
            Span(x + "linear_fc2.weight", 1, 0, inter, hf + "down_proj.weight", *part),
        ]
    return out


def _dense_spans(shape, tp_rank, tp_size, pp_rank, pp_size):
    hd = shape.hidden // shape.heads
    q_per_group = shape.heads // shape.kv_heads  # query heads per KV head (GQA)
    groups = shape.kv_heads // tp_size  # query groups on this TP rank
    inter, vocab = shape.intermediate // tp_size, shape.vocab // tp_size
    o_cols = shape.heads * hd // tp_size

    def whole(name, hf, size):
        return Span(name, 0, 0, size, hf, 0, size)

    spans = []
    if pp_rank == 0:
        e = "embedding.word_embeddings.weight"
        spans.append(Span(e, 0, 0, vocab, "model.embed_tokens.weight", *_part(vocab, tp_rank)))
    for j, i in enumerate(stage_layers(shape.layers, pp_rank, pp_size)):
        m, p = f"decoder.layers.{j}.", f"model.layers.{i}."
        qkv = m + "self_attention.linear_qkv.weight"
        spans.append(
            whole(m + "input_layernorm.weight", p + "input_layernorm.weight", shape.hidden)
        )
        for g_local in range(groups):  # per query group: its q heads, then its k, then its v
            g = tp_rank * groups + g_local
            row = g_local * (q_per_group + 2) * hd
            q = q_per_group * hd
            spans += [
                Span(qkv, 0, row, row + q, p + "self_attn.q_proj.weight", g * q, (g + 1) * q),
                Span(qkv, 0, row + q, row + q + hd, p + "self_attn.k_proj.weight", g * hd,
                     (g + 1) * hd),
                Span(qkv, 0, row + q + hd, row + q + 2 * hd, p + "self_attn.v_proj.weight",
                     g * hd, (g + 1) * hd),
            ]  # fmt: skip
        spans += [
            Span(m + "self_attention.linear_proj.weight", 1, 0, o_cols,
                 p + "self_attn.o_proj.weight", *_part(o_cols, tp_rank)),
            whole(m + "pre_mlp_layernorm.weight", p + "post_attention_layernorm.weight",
                  shape.hidden),
            Span(m + "mlp.linear_fc1.weight", 0, 0, inter, p + "mlp.gate_proj.weight",
                 *_part(inter, tp_rank)),
            Span(m + "mlp.linear_fc1.weight", 0, inter, 2 * inter, p + "mlp.up_proj.weight",
                 *_part(inter, tp_rank)),
            Span(m + "mlp.linear_fc2.weight", 1, 0, inter, p + "mlp.down_proj.weight",
                 *_part(inter, tp_rank)),
        ]  # fmt: skip
    if pp_rank == pp_size - 1:
        spans += [
            whole("decoder.final_layernorm.weight", "model.norm.weight", shape.hidden),
            Span("output_layer.weight", 0, 0, vocab, "lm_head.weight", *_part(vocab, tp_rank)),
        ]
    return spans


def _part(size, rank):
    return rank * size, (rank + 1) * size


def hf_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    return {name: full for name, full, _ in hf_specs(shape)}


def tensor_shapes(spans: list[Span], shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape on the rank holding `spans`: its spans' extent along their dim, the
    HF tensor's size along the other."""
    full, out = hf_shapes(shape), {}
    for s in spans:
        size = list(out.get(s.name, full[s.hf_name]))
        if s.name not in out:
            size[s.dim] = 0
        size[s.dim] = max(size[s.dim], s.stop)
        out[s.name] = tuple(size)
    return out


def from_hf(spans: list[Span], shape: LlamaShape, hf: Weights) -> Weights:
    """A rank's tensors, cut out of the full HF tensors by its spans (copies)."""
    any_hf = next(iter(hf.values()))
    out = {
        n: torch.empty(s, dtype=any_hf.dtype, device=any_hf.device)
        for n, s in tensor_shapes(spans, shape).items()
    }
    for s in spans:
        part = hf[s.hf_name].narrow(s.dim, s.hf_start, s.hf_stop - s.hf_start)
        out[s.name].narrow(s.dim, s.start, s.stop - s.start).copy_(part)
    return out


def to_hf(ranks: list[tuple[list[Span], Weights]], shape: LlamaShape) -> Weights:
    """The full HF tensors, put together from every rank's (spans, tensors). Raises if an HF
    element is held by no rank, or by two that disagree."""
    any_w = next(iter(ranks[0][1].values()))
    out = {n: torch.empty(f, dtype=any_w.dtype) for n, f in hf_shapes(shape).items()}
    seen = {n: torch.zeros(f, dtype=torch.bool) for n, f in hf_shapes(shape).items()}
    for spans, weights in ranks:
        for s in spans:
            part = weights[s.name].narrow(s.dim, s.start, s.stop - s.start).cpu()
            there = out[s.hf_name].narrow(s.dim, s.hf_start, s.hf_stop - s.hf_start)
            mask = seen[s.hf_name].narrow(s.dim, s.hf_start, s.hf_stop - s.hf_start)
            if (mask & (there != part)).any():
                raise ValueError(f"{s.hf_name}: two ranks hold different values of it")
            there.copy_(part)
            mask.fill_(True)
    missing = [n for n, m in seen.items() if not m.all()]
    if missing:
        raise ValueError(f"no rank holds all of {', '.join(missing[:3])}")
    return out


def hf_to_megatron(
    hf: Weights, shape: LlamaShape, tp_rank: int, tp_size: int, pp_rank: int = 0, pp_size: int = 1
) -> Weights:
    """What Megatron trainer rank (tp_rank, pp_rank) holds of the HF weights `hf`."""
    return from_hf(megatron_spans(shape, tp_rank, tp_size, pp_rank, pp_size), shape, hf)


def megatron_to_hf(
    per_rank: dict[tuple[int, int], Weights], shape: LlamaShape, tp_size: int, pp_size: int
) -> Weights:
    """The HF weights from every (tp_rank, pp_rank)'s Megatron tensors."""
    return to_hf(
        [
            (megatron_spans(shape, t, tp_size, p, pp_size), per_rank[t, p])
            for t in range(tp_size)
            for p in range(pp_size)
        ],
        shape,
    )
