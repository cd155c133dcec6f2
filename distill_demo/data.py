"""The data distill_demo trains on: token sequences from a seeded random Markov chain, generated
on the fly (nothing to download). Each token has `branching` possible successors with random
probabilities, so the next token is partly predictable: a trained teacher's distribution is
peaked on a few tokens, which is what makes top-k distillation work. Importable on its own:

    from distill_demo.data import MarkovData
    data = MarkovData(vocab=256, seq=32)
    ids = data.batch(step=0, shard=1, size=8)   # (8, 32) int64; the same on every call and rank
"""

from __future__ import annotations

import torch

BRANCHING = 4  # successors per token: the chain's entropy is at most log(4) nats a token


class MarkovData:
    def __init__(self, vocab: int, seq: int, seed: int = 0, branching: int = BRANCHING):
        self.vocab, self.seq, self.seed = vocab, seq, seed
        generator = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(vocab, (vocab, branching), generator=generator)
        weights = -torch.rand(vocab, branching, generator=generator).log()  # Dirichlet(1, ...)
        self.cumulative = (weights / weights.sum(-1, keepdim=True)).cumsum(-1)

    def batch(self, step: int, shard: int, size: int) -> torch.Tensor:
        """The `size` sequences for `shard` (e.g. a student's index) at `step`: reproducible,
        different for every (step, shard)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + shard)
        ids = torch.empty(size, self.seq, dtype=torch.int64)
        ids[:, 0] = torch.randint(self.vocab, (size,), generator=generator)
        draws = torch.rand(size, self.seq, generator=generator)
        last = self.cumulative.shape[1] - 1
        for t in range(1, self.seq):  # each token picks one of its predecessor's successors
            current = ids[:, t - 1]
            choice = (draws[:, t, None] > self.cumulative[current]).sum(-1).clamp(max=last)
            ids[:, t] = self.successors[current, choice]
        return ids

    def entropy(self) -> float:
        """The chain's average entropy per token in nats: the best loss a model can reach."""
        probs = torch.diff(self.cumulative, dim=-1, prepend=torch.zeros(self.vocab, 1))
        return float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
