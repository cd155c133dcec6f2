"""Plausible wrong answers to lesson 09's exercise: its check must catch them."""

import torch

from weight_sync import checksum_pieces


def pack_bucket(bucket, weights, out):
    for p in bucket.pieces:
        rows = weights[p.hf_name][p.hf_index]
        # wrong: every piece at the start of the bucket, not at p.offset. Right while a bucket
        # holds one piece; a fused qkv_proj is three pieces at least, so q is overwritten.
        out[: p.nbytes].view(p.dtype).view(rows.shape).copy_(rows)


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
