"""What a teacher sends and how a student turns it into a loss, for each transfer mode. No
communication here: comms.py moves the tensors, train.py decides when.

    full    the teacher's probabilities over the whole vocabulary, fp32 (what softmax returns)
    topk    its k largest logits and their indices (int32); the student renormalises them,
            which is the same as renormalising the top-k probabilities
    hidden  its last hidden states (its compute dtype); the student holds a copy of the
            teacher's lm_head and forms the teacher's logits itself

Bytes per token (V = vocab, d = teacher width, e = 2 for bf16, 4 for fp32):
    full 4V      topk k*e + 4k      hidden d*e
The losses are importable on their own (rpc_demo uses them):

    from distill_demo.knowledge import kl_full, kl_topk
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_demo.models import TinyTransformer

MODES = ("full", "topk", "hidden")


# --8<-- [start:modes]
def teacher_message(
    mode: str, teacher: TinyTransformer, ids: torch.Tensor, k: int
) -> list[torch.Tensor]:
    """The tensors a teacher sends back for a batch of ids (rows stay rows: batch-first)."""
    with torch.no_grad():
        hidden = teacher.hidden(ids)
        if mode == "hidden":
            return [hidden]
        logits = teacher.lm_head(hidden)
        if mode == "full":
            return [logits.float().softmax(-1)]
        values, indices = logits.topk(k, dim=-1)  # the k largest logits, largest first
        return [values, indices.to(torch.int32)]  # int32: any vocab below 2**31, half of int64


def student_loss(
    mode: str,
    student_logits: torch.Tensor,
    message: list[torch.Tensor],
    lm_head: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distillation loss from what the teacher sent (`lm_head`: the teacher's, for hidden)."""
    if mode == "full":
        return kl_full(student_logits, message[0])
    if mode == "topk":
        return kl_topk(student_logits, *message)
    teacher_logits = message[0] @ lm_head.t()  # the teacher's own last matmul, done here
    return kl_full(student_logits, teacher_logits.float().softmax(-1))


def kl_full(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over tokens; computed in fp32."""
    log_q = student_logits.float().log_softmax(-1).flatten(0, -2)
    return F.kl_div(log_q, teacher_probs.float().flatten(0, -2), reduction="batchmean")


def kl_topk(
    student_logits: torch.Tensor, topk_logits: torch.Tensor, topk_indices: torch.Tensor
) -> torch.Tensor:
    """KL from the teacher's renormalised top-k distribution to the student's, over those k
    entries: sum_i p_i (log p_i - log q_i). Zero only if the student puts exactly p_i on each
    (and so nothing elsewhere); with k = vocab it equals kl_full."""
    log_p = topk_logits.float().log_softmax(-1)  # renormalised over the k kept entries
    log_q = student_logits.float().log_softmax(-1).gather(-1, topk_indices.long())
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


# --8<-- [end:modes]


def bytes_per_token(mode: str, vocab: int, k: int, teacher_dim: int, compute_bytes: int) -> int:
    """What one token's answer costs on the wire (payload only; headers are extra)."""
    return {
        "full": 4 * vocab,
        "topk": k * (compute_bytes + 4),
        "hidden": teacher_dim * compute_bytes,
    }[mode]
