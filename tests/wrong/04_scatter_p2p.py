"""A wrong answer to exercise 04.1 that skips half its point: one scatter out, but the way back
is every rank sending its rows to every other rank, point to point, instead of one all_gather.
The check must say the way back is one all_gather."""

import torch
import torch.distributed as dist


def shard_rows(full, piece, src):
    blocks = list(full.chunk(dist.get_world_size())) if dist.get_rank() == src else None
    dist.scatter(piece, blocks, src=src)
    return piece


def unshard_rows(piece):
    n, rank = dist.get_world_size(), dist.get_rank()
    parts = [piece if r == rank else torch.empty_like(piece) for r in range(n)]
    ops = [dist.P2POp(dist.isend, piece, r) for r in range(n) if r != rank]
    ops += [dist.P2POp(dist.irecv, parts[r], r) for r in range(n) if r != rank]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return torch.cat(parts)
