"""Plausible wrong answers to lesson 04's exercises: each check must catch them."""

import torch
import torch.distributed as dist


def shard_rows(full, piece, src):
    # wrong: broadcast the whole tensor and slice it. The values are right, but every rank
    # holds all the rows: the slice is a view that keeps the whole storage alive.
    n, rank = dist.get_world_size(), dist.get_rank()
    whole = full if rank == src else piece.new_empty(piece.shape[0] * n, *piece.shape[1:])
    dist.broadcast(whole, src=src)
    return whole.chunk(n)[rank]


def unshard_rows(piece):
    pieces = [torch.empty_like(piece)] * dist.get_world_size()  # wrong: one tensor n times
    dist.all_gather(pieces, piece)
    return torch.cat(pieces)
