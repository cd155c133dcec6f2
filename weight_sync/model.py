"""The model of lesson 09: a Llama model read from an HF-style config (LlamaShape), with HF's
parameter names, and a TP forward pass (greedy next token) over the shards one rank holds as
vLLM does (vllm_layout.py); it equals transformers' LlamaForCausalLM. Weights are made from a
seed, any tensor on any rank alone; nothing is downloaded."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from weight_sync.groups import Group

NAMES = {1: "A", 2: "B", 3: "C"}  # the course's models by seed: the engine starts with A


class LlamaShape(NamedTuple):
    """A Llama model's config: HF's LlamaConfig fields under short names (hf_config() gives
    HF's). rope_scaling: None, or HF's dict for Llama 3's {"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    rope_theta: float = 500000.0  # Llama 3's rotary base
    rms_norm_eps: float = 1e-5
    rope_scaling: dict | None = None


HF_KEYS = {  # LlamaShape field -> HF LlamaConfig key
    "vocab": "vocab_size",
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "rope_scaling": "rope_scaling",
}


def shape_from_hf(config: dict | object) -> LlamaShape:
    """A LlamaShape from an HF-style config: a dict (config.json) or an object (LlamaConfig),
    with rope_theta and rope_scaling (transformers 4) or rope_parameters (transformers 5).
    Refuses what this model does not compute (biases, tied embeddings, another head_dim)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    values = {f: get(k) for f, k in HF_KEYS.items() if get(k) is not None}
    values.setdefault("kv_heads", values["heads"])
    rope = dict(get("rope_parameters") or get("rope_scaling") or {})
    values["rope_theta"] = float(rope.pop("rope_theta", values.get("rope_theta", 500000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    values["rope_scaling"] = rope if kind != "default" else None
    shape = LlamaShape(**values)
    unsupported = {
        "attention_bias": get("attention_bias", False),
        "mlp_bias": get("mlp_bias", False),
        "tie_word_embeddings": get("tie_word_embeddings", False),
        "hidden_act": get("hidden_act", "silu") != "silu",
        "head_dim": (get("head_dim") or shape.hidden // shape.heads) != shape.hidden // shape.heads,
        f"rope_type {kind!r}": kind not in ("default", "llama3"),
    }
    if any(unsupported.values()):
        raise ValueError(
            f"this model does not compute {[k for k, v in unsupported.items() if v]}: use a Llama "
            "config without them (silu, head_dim = hidden_size / heads, rope default or llama3)"
        )
    return shape


def hf_config(shape: LlamaShape) -> dict:
    """HF's LlamaConfig keyword arguments for `shape` (untied lm_head, no biases)."""
    out = {k: getattr(shape, f) for f, k in HF_KEYS.items()}
    return {**out, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}


Weights = dict[str, torch.Tensor]  # {HF name: tensor}, full tensors or one TP rank's shards
Spec = tuple[str, tuple[int, ...], int | None]  # (HF name, full shape, the dim split over TP)

LLAMA3_ROPE = {  # Llama 3.1's rope_scaling (3.2-1B: factor 32)
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
PRESETS = {
    # lessons and tests: 21 tensors, every split divides by TP = 1, 2, 3 (and 6)
    "tiny": LlamaShape(vocab=384, hidden=96, intermediate=192, layers=2, heads=12, kv_heads=6),
    # tests: one KV head (multi-query), replicated on every engine rank at TP > 1
    "tiny-mqa": LlamaShape(vocab=384, hidden=96, intermediate=192, layers=2, heads=12, kv_heads=1),
    # the CPU benchmark: 39 tensors, 110 M parameters (220 MB in bf16)
    "small": LlamaShape(32000, 1024, 2816, 4, 16, 8),
    # exact HF shapes; lm_head kept as a tensor of its own (147 and 291 tensors, 3.0 and 16.1 GB)
    "llama-3.2-1b": LlamaShape(
        128256, 2048, 8192, 16, 32, 8, rope_scaling=LLAMA3_ROPE | {"factor": 32.0}
    ),
    "llama-3.1-8b": LlamaShape(128256, 4096, 14336, 32, 32, 8, rope_scaling=LLAMA3_ROPE),
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
    """Rank tp_rank's part of an even split of `full` along split_dim (a view, no copy). The
    engine's own shards are vllm_layout.py's (fused, KV heads replicated past their count)."""
    return full if split_dim is None else full.chunk(tp_size, split_dim)[tp_rank]


def rope_frequencies(shape: LlamaShape, device: torch.device | str) -> torch.Tensor:
    """The rotary inverse frequencies, as HF computes them (Llama 3's scaling included)."""
    hd = shape.hidden // shape.heads
    exponents = torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd
    inverse = 1.0 / (shape.rope_theta**exponents)
    scaling = shape.rope_scaling
    if not scaling:
        return inverse
    factor, low, high = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inverse
    # long wavelengths (beyond the original context / low) are slowed by `factor`, short ones
    # (below it / high) kept, and those between blended smoothly
    scaled = torch.where(wavelength > old / low, inverse / factor, inverse)
    smooth = (old / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelength >= old / high) & (wavelength <= old / low)
    return torch.where(between, blended, scaled)


def swiglu(h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Llama's MLP on h: silu(gate) * up, then down; gate_up is [gate | up] by rows."""
    gate, up = (h @ gate_up.T).chunk(2, dim=1)
    return (F.silu(gate) * up) @ down.T


def dense_mlp(h: torch.Tensor, w, p: str) -> torch.Tensor:
    """One layer's MLP by one TP rank (a partial sum): its [gate_r | up_r] rows, down's columns."""
    return swiglu(h, w(p + "gate_up_proj.weight"), w(p + "down_proj.weight"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **how) -> torch.Tensor:
    """[heads, n, hd] from q [heads, n, hd] and k, v [kv_heads, m, hd]: each KV head serves
    heads // kv_heads query heads (grouped-query attention)."""
    k, v = (t.repeat_interleave(q.shape[0] // k.shape[0], 0) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, **how)


def _engine_weights(weights: Weights, shape: LlamaShape, tp_size: int, check=True) -> Weights:
    """`weights` as the engine holds them: at TP 1, full HF weights are converted first (the
    single-process reference). check: refuse a model that does not split over tp_size."""
    from weight_sync.vllm_layout import check_engine_tp, hf_to_vllm

    if check:
        check_engine_tp(shape, tp_size)
    if tp_size == 1 and "model.layers.0.self_attn.q_proj.weight" in weights:
        return hf_to_vllm(weights, shape, 0, 1)
    return weights


def _layers(weights, shape, tokens, positions, attend, mlp, rows, tp_rank, tp_size, tp_group):
    """The logits of x[rows] after every layer, [rows, vocab] gathered over TP, in float32.
    tokens and positions: [n]; attend(i, q, k, v) -> [heads, n, hd] is layer i's attention
    (q, k roped, [heads or kv_heads, n, hd]); mlp(h, w, prefix): one rank's partial sum."""

    def reduce(x):  # a row-parallel product is a partial sum on each rank: add them up
        if tp_size > 1:
            tp_group.all_reduce(x).wait()
        return x

    def w(name):
        return weights[name].float()

    def norm(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + shape.rms_norm_eps) * w(name)

    n, hd = len(tokens), shape.hidden // shape.heads
    heads, kv_heads = shape.heads // tp_size, max(1, shape.kv_heads // tp_size)  # this rank's
    embed = w("model.embed_tokens.weight")  # vocab-parallel: this rank's rows of the vocabulary
    local = tokens - tp_rank * embed.shape[0]
    inside = ((local >= 0) & (local < embed.shape[0])).unsqueeze(1)
    x = reduce(F.embedding(local.clamp(0, embed.shape[0] - 1), embed) * inside)
    angles = positions[:, None].float() * rope_frequencies(shape, x.device)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)

    def rope(t):  # t: [heads, n, hd]
        return t * cos + torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], -1) * sin

    def heads_of(t, count):  # [n, count * hd] -> [count, n, hd]
        return t.view(n, count, hd).transpose(0, 1)

    for i in range(shape.layers):
        p = f"model.layers.{i}."
        h = norm(x, p + "input_layernorm.weight")
        qkv = h @ w(p + "self_attn.qkv_proj.weight").T  # [Q_r | K_r | V_r]: one product
        q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=1)
        q, k, v = rope(heads_of(q, heads)), rope(heads_of(k, kv_heads)), heads_of(v, kv_heads)
        att = attend(i, q, k, v).transpose(0, 1).reshape(n, heads * hd)
        x = x + reduce(att @ w(p + "self_attn.o_proj.weight").T)
        h = norm(x, p + "post_attention_layernorm.weight")
        x = x + reduce(mlp(h, w, p + "mlp."))
    logits = norm(x[rows], "model.norm.weight") @ w("lm_head.weight").T  # this rank's vocab slice
    if tp_size > 1:
        parts = [torch.empty_like(logits) for _ in range(tp_size)]
        tp_group.all_gather(parts, logits).wait()
        logits = torch.cat(parts, dim=1)
    return logits


def forward(
    weights: Weights,
    shape: LlamaShape,
    tokens: Sequence[int] | torch.Tensor,
    tp_rank: int = 0,
    tp_size: int = 1,
    tp_group: Group | None = None,
    every_position: bool = False,
    mlp: Callable | None = None,
) -> torch.Tensor:
    """Logits of the last position after `tokens` (every_position: of each position), in
    float32, by one TP rank holding the shards `weights` as vLLM does (vllm_layout.py: fused
    qkv_proj and gate_up_proj, KV heads replicated when TP exceeds them). With tp_size 1, full
    HF weights are accepted too (converted first): the single-process reference. mlp: another
    MLP for every layer, mlp(h, w, prefix) -> this rank's partial sum (moe.py's experts)."""
    # another MLP (moe.py's experts, by TP or EP) splits its own way: its caller checks that
    weights = _engine_weights(weights, shape, tp_size, check=mlp is None)
    tokens = torch.as_tensor(tokens, device=weights["model.norm.weight"].device)
    positions = torch.arange(len(tokens), device=tokens.device)

    def causal(i, q, k, v):
        return attention(q, k, v, is_causal=True)

    rows = slice(None) if every_position else slice(-1, None)
    tp = (tp_rank, tp_size, tp_group)
    logits = _layers(weights, shape, tokens, positions, causal, mlp or dense_mlp, rows, *tp)
    return logits if every_position else logits[0]


def forward_cached(
    weights: Weights,
    shape: LlamaShape,
    segments: Sequence[Sequence[int]],
    caches: list[list],
    tp_rank: int = 0,
    tp_size: int = 1,
    tp_group: Group | None = None,
) -> torch.Tensor:
    """One step of a continuous batch: segments[j], the new tokens of request j, follow what
    its KV cache caches[j] holds (a list with one [k, v] per layer, [] for a fresh request: a
    prefill); every segment goes through the linear layers packed together, attention is per
    request. Appends each request's new keys and values to its cache and returns the logits of
    each segment's last position, [len(segments), vocab], in float32. Equal to `forward` on
    each request's whole sequence; same shards, TP ranks and collectives."""
    weights = _engine_weights(weights, shape, tp_size)
    device = weights["model.norm.weight"].device
    lengths = [len(s) for s in segments]
    starts = [c[0][0].shape[1] if c else 0 for c in caches]  # tokens already cached
    tokens = torch.tensor([t for s in segments for t in s], device=device)
    positions = torch.tensor(
        [p for s, at in zip(lengths, starts) for p in range(at, at + s)], device=device
    )

    def per_request(i, q, k, v):  # each request's queries see its cache and its own tokens
        outs, at = [], 0
        for j, (length, start) in enumerate(zip(lengths, starts)):
            mine = slice(at, at + length)
            if i == len(caches[j]):
                caches[j].append([k[:, :0], v[:, :0]])
            cache = caches[j][i]
            cache[0] = torch.cat([cache[0], k[:, mine]], 1)
            cache[1] = torch.cat([cache[1], v[:, mine]], 1)
            # query at position start + a sees keys 0 .. start + a (the cache and itself)
            mask = torch.arange(start + length, device=device) <= (
                start + torch.arange(length, device=device)[:, None]
            )
            outs.append(attention(q[:, mine], *cache, attn_mask=mask))
            at += length
        return torch.cat(outs, 1)

    ends = torch.tensor(lengths, device=device).cumsum(0) - 1  # each segment's last position
    tp = (tp_rank, tp_size, tp_group)
    return _layers(weights, shape, tokens, positions, per_request, dense_mlp, ends, *tp)
