"""Answers to lesson 04's exercises that get the right numbers, even the right bytes, but skip
what the exercise teaches: each check must catch them and say why (tests/test_checks_catch.py)."""

import torch.distributed as dist


def shard_rows(full, piece, src):
    # Skips the point: every rank receives the whole tensor (broadcast), then copies its rows
    # into `piece`. The piece holds only its rows, but each rank had room for all of them.
    n, rank = dist.get_world_size(), dist.get_rank()
    whole = full if rank == src else piece.new_empty(piece.shape[0] * n, *piece.shape[1:])
    dist.broadcast(whole, src=src)
    return piece.copy_(whole.chunk(n)[rank])


def unshard_rows(piece):
    # Skips the point: each rank's rows in a zero tensor of the whole size, summed over the
    # ranks: n times the traffic of all_gather, and additions where none are needed.
    n, rank = dist.get_world_size(), dist.get_rank()
    whole = piece.new_zeros(piece.shape[0] * n, *piece.shape[1:])
    whole[rank * piece.shape[0] : (rank + 1) * piece.shape[0]] = piece
    dist.all_reduce(whole)
    return whole
