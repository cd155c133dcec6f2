"""Answers to lesson 03's exercises that get the right numbers but skip what the exercise
teaches: each check must catch them and say why (tests/test_checks_catch.py)."""

import torch
import torch.distributed as dist


def sharded_softmax(shard):
    # Skips the point: gathers the whole vector onto every rank, then a full softmax. The
    # exercise shares two numbers per rank (a max, a sum), never the vector.
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, shard.cpu())  # shards may differ in length: objects
    start = sum(len(piece) for piece in pieces[: dist.get_rank()])
    full = torch.softmax(torch.cat(pieces), 0)
    return full[start : start + len(shard)].to(shard.device)


def vocab_parallel_logsumexp(logits):
    # Skips the point: each rank's slice of the vocabulary, zero-padded to the whole vocabulary,
    # summed with all_reduce: every rank holds every logit, then a full logsumexp.
    rank, world_size = dist.get_rank(), dist.get_world_size()
    widths = torch.zeros(world_size, dtype=torch.int64, device=logits.device)
    widths[rank] = logits.shape[1]
    dist.all_reduce(widths)
    start = int(widths[:rank].sum())
    full = logits.new_zeros(logits.shape[0], int(widths.sum()))
    full[:, start : start + logits.shape[1]] = logits
    dist.all_reduce(full)
    return torch.logsumexp(full, dim=1)
