"""The model of lesson 09: a Llama-style model with HF parameter names, its column/row-parallel
TP shards, and a TP forward pass (greedy next token). Weights are made from a seed, any tensor
on any rank alone; nothing is downloaded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from weight_sync.groups import Group

ROPE_THETA = 500000.0  # Llama 3's rotary base
NAMES = {1: "A", 2: "B", 3: "C"}  # the course's models by seed: the engine starts with A


class LlamaShape(NamedTuple):
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int


Weights = dict[str, torch.Tensor]  # {HF name: tensor}, full tensors or one TP rank's shards
Spec = tuple[str, tuple[int, ...], int | None]  # (HF name, full shape, the dim split over TP)

PRESETS = {
    # lessons and tests: 21 tensors, every split divides by TP = 1, 2, 3 (and 6)
    "tiny": LlamaShape(vocab=384, hidden=96, intermediate=192, layers=2, heads=12, kv_heads=6),
    # the CPU benchmark: 39 tensors, 110 M parameters (220 MB in bf16)
    "small": LlamaShape(32000, 1024, 2816, 4, 16, 8),
    # exact HF shapes; lm_head kept as a tensor of its own (147 and 291 tensors, 3.0 and 16.1 GB)
    "llama-3.2-1b": LlamaShape(128256, 2048, 8192, 16, 32, 8),
    "llama-3.1-8b": LlamaShape(128256, 4096, 14336, 32, 32, 8),
}


def model_name(seed: int) -> str:
    """How the course calls the model made from `seed`: A, B, C, else by its seed."""
    return f"model {NAMES[seed]}" if seed in NAMES else f"the model of seed {seed}"


def llama_specs(shape: LlamaShape) -> list[Spec]:
    """[(HF name, full shape, the dim split across TP ranks or None)], in the engine's order.
    Column-parallel (q/k/v, gate/up, lm_head, the vocab-parallel embedding) split dim 0,
    row-parallel (o, down) split dim 1, norms are replicated."""
    hd = shape.hidden // shape.heads
    h, q, kv, inter = shape.hidden, shape.heads * hd, shape.kv_heads * hd, shape.intermediate
    specs = [("model.embed_tokens.weight", (shape.vocab, h), 0)]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,), None),
            (p + "self_attn.q_proj.weight", (q, h), 0),
            (p + "self_attn.k_proj.weight", (kv, h), 0),
            (p + "self_attn.v_proj.weight", (kv, h), 0),
            (p + "self_attn.o_proj.weight", (h, q), 1),
            (p + "post_attention_layernorm.weight", (h,), None),
            (p + "mlp.gate_proj.weight", (inter, h), 0),
            (p + "mlp.up_proj.weight", (inter, h), 0),
            (p + "mlp.down_proj.weight", (h, inter), 1),
        ]
    return specs + [("model.norm.weight", (h,), None), ("lm_head.weight", (shape.vocab, h), 0)]


def one_weight(shape: LlamaShape, name: str, seed: int, device: torch.device | str) -> torch.Tensor:
    """One tensor of the model `seed`, made alone: each has its own generator, so any rank can
    make any tensor of it, and the same seed gives the same values on every device of one type."""
    index, full = next((i, full) for i, (n, full, _) in enumerate(llama_specs(shape)) if n == name)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    value = torch.randn(full, generator=generator, device=device).mul_(0.02)
    return value.add_(1.0) if name.endswith("norm.weight") else value


def make_weights(
    shape: LlamaShape,
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    into: Weights | None = None,
) -> Weights:
    """The model `seed` as {name: tensor}; with `into` ({name: view}), written into those views."""
    out = {} if into is None else into
    for name, _, _ in llama_specs(shape):
        value = one_weight(shape, name, seed, device)
        if into is None:
            out[name] = value.to(dtype)
        else:
            out[name].copy_(value)
    return out


def shard_of(full: torch.Tensor, split_dim: int | None, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The part of `full` that engine rank `tp_rank` of `tp_size` holds (a view, no copy)."""
    return full if split_dim is None else full.chunk(tp_size, split_dim)[tp_rank]


def forward(
    weights: Weights,
    shape: LlamaShape,
    tokens: Sequence[int] | torch.Tensor,
    tp_rank: int = 0,
    tp_size: int = 1,
    tp_group: Group | None = None,
) -> torch.Tensor:
    """Logits of the last position after `tokens`, computed in float32 by one TP rank holding the
    shards `weights`. With tp_size 1 and full weights: the single-process reference."""

    def reduce(x):  # a row-parallel product is a partial sum on each rank: add them up
        if tp_size > 1:
            tp_group.all_reduce(x).wait()
        return x

    def w(name):
        return weights[name].float()

    def norm(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w(name)

    tokens = torch.as_tensor(tokens, device=weights["model.norm.weight"].device)
    n, hd = len(tokens), shape.hidden // shape.heads
    heads, kv_heads = shape.heads // tp_size, shape.kv_heads // tp_size
    embed = w("model.embed_tokens.weight")  # vocab-parallel: this rank's rows of the vocabulary
    local = tokens - tp_rank * embed.shape[0]
    inside = ((local >= 0) & (local < embed.shape[0])).unsqueeze(1)
    x = reduce(F.embedding(local.clamp(0, embed.shape[0] - 1), embed) * inside)
    inverse = ROPE_THETA ** (-torch.arange(0, hd, 2, device=x.device) / hd)
    angles = torch.arange(n, device=x.device)[:, None] * inverse[None]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)

    def rope(t):  # t: [heads, n, hd]
        return t * cos + torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], -1) * sin

    for i in range(shape.layers):
        p = f"model.layers.{i}."
        h = norm(x, p + "input_layernorm.weight")
        q = rope((h @ w(p + "self_attn.q_proj.weight").T).view(n, heads, hd).transpose(0, 1))
        k = rope((h @ w(p + "self_attn.k_proj.weight").T).view(n, kv_heads, hd).transpose(0, 1))
        v = (h @ w(p + "self_attn.v_proj.weight").T).view(n, kv_heads, hd).transpose(0, 1)
        k, v = (t.repeat_interleave(heads // kv_heads, 0) for t in (k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1)
        x = x + reduce(att.reshape(n, heads * hd) @ w(p + "self_attn.o_proj.weight").T)
        h = norm(x, p + "post_attention_layernorm.weight")
        up = F.silu(h @ w(p + "mlp.gate_proj.weight").T) * (h @ w(p + "mlp.up_proj.weight").T)
        x = x + reduce(up @ w(p + "mlp.down_proj.weight").T)
    logits = norm(x[-1:], "model.norm.weight") @ w("lm_head.weight").T  # this rank's vocab slice
    if tp_size > 1:
        parts = [torch.empty_like(logits) for _ in range(tp_size)]
        tp_group.all_gather(parts, logits).wait()
        logits = torch.cat(parts, dim=1)
    return logits[0]
