"""Plausible wrong answers to lesson 09's exercise: its check must catch them."""

import torch

from weight_sync import checksum_pieces, shard_of


def pack_bucket(bucket, weights, out):
    for p in bucket.pieces:
        shard = shard_of(weights[p.name], p.split_dim, p.tp_rank, p.tp_size)
        # wrong: always the shard's first rows. Right while every tensor fits in one bucket;
        # a tensor cut over two buckets gets its first rows twice and never its last ones.
        rows = shard[: p.stop - p.start]
        out[p.offset : p.offset + p.nbytes].view(p.dtype).view(rows.shape).copy_(rows)


def push_update(group, plan, weights):
    flat = plan.flat_source(weights)
    buffers = [] if flat is not None else plan.new_buffers(group.device)
    works, checksums = [], []
    for k, bucket in enumerate(plan.buckets):
        if flat is not None:
            data = flat[bucket.start : bucket.end]
        else:
            if k >= len(buffers):
                works[k - len(buffers)].wait()
            data = buffers[k % len(buffers)][: bucket.nbytes]
            pack_bucket(bucket, weights, data)
        works.append(group.send(data, bucket.dst))
        checksums.append(checksum_pieces(bucket, data))
    if plan.slices_after_broadcast:
        checksums = plan.shard_checksums(weights, pack_bucket)
    table = torch.cat(checksums)
    works.append(group.broadcast(table, 0))
    for work in works:
        work.wait()
    return table
