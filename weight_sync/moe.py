"""The mixture-of-experts variant of the course's Llama model (lesson 13): each layer's MLP is a
router and N routed experts (top-k of them per token), plus optionally one shared expert that
every token goes through. HF names as Qwen2-MoE / Mixtral write them:

    model.layers.{i}.mlp.gate.weight                       the router, [experts, hidden]
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
    model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj.weight   (when intermediate > 0)

(Qwen2-MoE also gates its shared expert with a sigmoid; this model does not.) Routing: softmax
over the router's logits, the top_k experts per token with ties broken towards the lower
expert index, their probabilities renormalized to sum to 1 (Mixtral's rule). Weights are made
from a seed as model.py's are; forward() is the single-process reference and the engine's TP
forward over vllm_layout.py's layout, experts split by TP or by EP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from weight_sync.model import Spec, Weights, llama_specs, swiglu
from weight_sync.model import forward as llama_forward

if TYPE_CHECKING:
    from weight_sync.groups import Group


class MoeShape(NamedTuple):
    """LlamaShape's fields (same names, so model.py's helpers read it), plus the experts.
    intermediate: the shared expert's size (0: no shared expert)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    expert_intermediate: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    rope_scaling: dict | None = None


PRESETS = {
    # the lesson and tests: 8 experts of 32, top 2, a shared expert of 64; splits by 1, 2, 4, 8
    "tiny-moe": MoeShape(256, 64, 64, 2, 8, 4, experts=8, top_k=2, expert_intermediate=32),
    # the benchmark: 16 experts, 4 layers, 103 M parameters (206 MB in bf16), 86% of it experts
    "small-moe": MoeShape(8192, 512, 512, 4, 8, 4, experts=16, top_k=2, expert_intermediate=896),
}


def is_moe(shape) -> bool:
    return getattr(shape, "experts", 0) > 0


def expert_names(i: int, e: int) -> list[str]:
    p = f"model.layers.{i}.mlp.experts.{e}."
    return [p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"]


def moe_specs(shape: MoeShape) -> list[Spec]:
    """[(HF name, full shape, TP split dim)]: llama_specs with each MLP replaced by the router,
    the routed experts and the shared expert."""
    h, ei, si = shape.hidden, shape.expert_intermediate, shape.intermediate
    out = []
    for name, full, dim in llama_specs(shape):
        if ".mlp." in name:
            continue
        out.append((name, full, dim))
        if name.endswith("post_attention_layernorm.weight"):
            p = name.removesuffix("post_attention_layernorm.weight") + "mlp."
            i = int(name.split(".")[2])
            out.append((p + "gate.weight", (shape.experts, h), None))
            for e in range(shape.experts):
                gate, up, down = expert_names(i, e)
                out += [(gate, (ei, h), 0), (up, (ei, h), 0), (down, (h, ei), 1)]
            if si:
                s = p + "shared_expert."
                out += [(s + "gate_proj.weight", (si, h), 0), (s + "up_proj.weight", (si, h), 0),
                        (s + "down_proj.weight", (h, si), 1)]  # fmt: skip
    return out


def make_moe_weights(shape: MoeShape, seed: int, device="cpu", dtype=torch.float32) -> Weights:
    """The model `seed` as {HF name: tensor}, each tensor from its own generator (as model.py)."""
    out = {}
    for index, (name, full, _) in enumerate(moe_specs(shape)):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
        value = torch.randn(full, generator=generator, device=device).mul_(0.02)
        out[name] = (value.add_(1.0) if name.endswith("norm.weight") else value).to(dtype)
    return out


# --8<-- [start:route]
def route(h: torch.Tensor, router: torch.Tensor, top_k: int) -> torch.Tensor:
    """[tokens, experts]: each token's weight for each expert, zero outside its top_k. A stable
    sort breaks ties towards the lower expert index, the same way on every rank and run."""
    probs = torch.softmax(h @ router.T, dim=-1)
    chosen = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    top = probs.gather(1, chosen)
    return torch.zeros_like(probs).scatter_(1, chosen, top / top.sum(1, keepdim=True))
    # --8<-- [end:route]


def hf_moe(h, w, p, shape, hits=None):
    """The reference MLP of one layer, straight from HF's per-expert tensors."""
    combine = route(h, w(p + "gate.weight"), shape.top_k)
    if hits is not None:
        hits.append(combine.gt(0))
    out = torch.zeros_like(h)
    for e in range(shape.experts):
        gate, up, down = (w(f"{p}experts.{e}.{x}_proj.weight") for x in ("gate", "up", "down"))
        out += combine[:, e, None] * swiglu(h, torch.cat([gate, up]), down)
    if shape.intermediate:
        s = p + "shared_expert."
        gate_up = torch.cat([w(s + "gate_proj.weight"), w(s + "up_proj.weight")])
        out += swiglu(h, gate_up, w(s + "down_proj.weight"))
    return out


def engine_moe(h, w, p, shape, tp_rank, tp_size, experts_by):
    """One engine rank's share of one layer's MLP (a partial sum: the caller adds the ranks').
    By TP: a slice of every expert (w13 = [gate_r | up_r], w2 its columns). By EP: whole
    experts, experts // tp_size of them from tp_rank's first."""
    combine = route(h, w(p + "gate.weight"), shape.top_k)  # replicated: same on every rank
    local = shape.experts // tp_size if experts_by == "ep" else shape.experts
    first = tp_rank * local if experts_by == "ep" else 0
    out = torch.zeros_like(h)
    for j in range(local):  # vLLM's FusedMoE runs these as one grouped kernel
        w13, w2 = w(f"{p}experts.w13_weight.{j}"), w(f"{p}experts.w2_weight.{j}")
        out += combine[:, first + j, None] * swiglu(h, w13, w2)
    if shape.intermediate:  # the shared expert: split by TP, as a dense MLP
        out += swiglu(h, w(p + "shared_expert.gate_up_proj.weight"),
                      w(p + "shared_expert.down_proj.weight"))  # fmt: skip
    return out


def forward(
    weights: Weights,
    shape: MoeShape,
    tokens: Sequence[int] | torch.Tensor,
    tp_rank: int = 0,
    tp_size: int = 1,
    tp_group: Group | None = None,
    experts_by: str = "tp",
    hits: list | None = None,
    every_position: bool = False,
) -> torch.Tensor:
    """Logits of the last position after `tokens` (every_position: of each), float32, by one
    engine rank holding
    vllm_layout.py's shards (experts by TP or EP): model.py's forward with this MLP. Full HF
    weights at tp_size 1: the single-process reference, whose MLP reads HF's per-expert
    tensors (hf_moe); `hits` then collects each layer's [tokens, experts] routing mask."""
    reference = "model.layers.0.self_attn.q_proj.weight" in weights  # HF's tensors

    def mlp(h, w, p):  # w reads the engine's tensors (attention fused as the engine holds it)
        if reference:
            return hf_moe(h, lambda name: weights[name].float(), p, shape, hits)
        return engine_moe(h, w, p, shape, tp_rank, tp_size, experts_by)

    args = (weights, shape, tokens, tp_rank, tp_size, tp_group, every_position)
    return llama_forward(*args, mlp=mlp)


def experts_missed(hf: Weights, shape: MoeShape, tokens: Sequence[int]) -> list[str]:
    """The experts no token of `tokens` is routed to, as 'layer i expert e' (empty: all hit)."""
    hits = []
    forward(hf, shape, tokens, hits=hits)
    return [f"layer {i} expert {e}" for i, m in enumerate(hits)
            for e in range(shape.experts) if not bool(m[:, e].any())]  # fmt: skip
