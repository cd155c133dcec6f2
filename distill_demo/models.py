"""The models distill_demo trains: a small GPT-style transformer, in a larger teacher size and a
smaller student size. Importable on its own (rpc_demo uses the same models):

    from distill_demo.models import SIZES, TinyTransformer, make_teacher, make_student
    teacher = make_teacher("tiny", vocab=256, seq=32)   # seeded: the same weights on every rank
    logits = teacher(ids)            # (batch, seq, vocab)
    hidden = teacher.hidden(ids)     # (batch, seq, dim): what lm_head turns into logits

`hidden()` and `lm_head` are separate so the teacher can ship its hidden states and a student
that holds a copy of the teacher's lm_head can form the teacher's logits itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    vocab: int  # token ids 0..vocab-1
    seq: int  # longest sequence (learned position embeddings)
    dim: int  # width of the residual stream
    layers: int
    heads: int  # attention heads; dim must divide by it


# (dim, layers, heads) of the teacher and of the student, by size. "tiny" runs in seconds on a
# laptop CPU; "large" is for GPUs (with --vocab 131072 --seq 2048 about 370M teacher parameters,
# most of them its embedding and lm_head).
SIZES = {
    "tiny": {"teacher": (64, 2, 4), "student": (32, 1, 2)},
    "small": {"teacher": (256, 4, 4), "student": (128, 2, 2)},
    "large": {"teacher": (1024, 8, 16), "student": (512, 4, 8)},
}
TEACHER_SEED, STUDENT_SEED = 1, 2  # every rank that builds a model builds the same one


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP, each added to the stream."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=-1)
        q, k, v = (
            t.view(batch, seq, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v)
        )  # (batch, heads, seq, head_dim)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash on GPUs
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, dim))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Token + position embeddings, `layers` blocks, a final norm, an untied lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.positions = nn.Embedding(cfg.seq, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        for module in self.modules():  # GPT-2's initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) ids -> (batch, seq, dim): the last hidden states, normed, before lm_head."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tokens(ids) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) ids -> (batch, seq, vocab) logits for the next token."""
        return self.lm_head(self.hidden(ids))


def config(size: str, role: str, vocab: int, seq: int) -> ModelConfig:
    dim, layers, heads = SIZES[size][role]
    return ModelConfig(vocab, seq, dim, layers, heads)


def make_teacher(size: str, vocab: int, seq: int) -> TinyTransformer:
    torch.manual_seed(TEACHER_SEED)
    return TinyTransformer(config(size, "teacher", vocab, seq))


def make_student(size: str, vocab: int, seq: int) -> TinyTransformer:
    torch.manual_seed(STUDENT_SEED)
    return TinyTransformer(config(size, "student", vocab, seq))
