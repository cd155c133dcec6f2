"""Reference solutions for lessons/04_scatter.py.
Check them: python -m lessons.check 04 --solution

Each function runs in the lesson's namespace: torch, dist and the lesson's helpers are in scope.
"""

import torch
import torch.distributed as dist


# --8<-- [start:ex-04-1]
def shard_rows(full, piece: torch.Tensor, src: int) -> torch.Tensor:
    """Exercise 04.1: rank `src` holds `full`, a [rows, cols] tensor whose rows split evenly
    among the ranks; every other rank passes full=None. `piece` is an empty [rows // world
    size, cols] tensor on every rank. Fill it, with one scatter, with this rank's block of rows
    (rank r gets the r-th block) and return it. No rank but `src` may hold the whole tensor.
    """
    # YOUR CODE BELOW
    blocks = list(full.chunk(dist.get_world_size())) if dist.get_rank() == src else None
    dist.scatter(piece, blocks, src=src)  # only src passes a list; the others receive
    return piece


def unshard_rows(piece: torch.Tensor) -> torch.Tensor:
    """Exercise 04.1: the way back. Every rank passes its block of rows; return the whole
    [rows, cols] tensor, on every rank, collected with all_gather (or all_gather_single).
    """
    # YOUR CODE BELOW
    whole = piece.new_empty(piece.shape[0] * dist.get_world_size(), *piece.shape[1:])
    ALL_GATHER_SINGLE(whole, piece)  # straight into one tensor: no list, no torch.cat copy
    return whole
    # --8<-- [end:ex-04-1]
