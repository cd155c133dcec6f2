"""A wrong answer to exercise 09.1 that skips its point: right bytes, right checksums, but
before packing each bucket it waits for the send before it, so one bucket is on the wire at a
time and the wire idles while the next is packed. Only the checksum table, broadcast last, is
ever in flight beside a bucket. Its check must say the sends must overlap."""

import torch

from weight_sync import checksum_pieces


# --8<-- [start:ex-09-1]
def pack_bucket(bucket, weights, out):
    """Exercise 09.1 (1 of 2): fill `out`, the bytes of `bucket`, from the trainer's full tensors.

    For each piece of bucket.pieces: take the part weights[piece.hf_name][piece.hf_index] of
    the HF tensor (rows of engine rank piece.tp_rank's shard, which the engine holds fused as
    vLLM does: q, k and v in one qkv_proj), and copy it into out at piece.offset (piece.nbytes
    bytes) as piece.dtype, the engine's dtype: copy_ into a view of that dtype converts.
    """
    # YOUR CODE BELOW
    for p in bucket.pieces:
        rows = weights[p.hf_name][p.hf_index]
        # a strided slice (a row-parallel shard) and float32 -> bf16 both happen in this one copy
        out[p.offset : p.offset + p.nbytes].view(p.dtype).view(rows.shape).copy_(rows)


def push_update(group, plan, weights):
    """Exercise 09.1 (2 of 2): push `weights` to every engine rank, back to back; return the
    checksum table sent.

    For each bucket of plan.buckets, in order: its bytes are a slice of
    plan.flat_source(weights) if that is not None (no copy), else a buffer of
    plan.new_buffers(group.device) filled by pack_bucket; a buffer is free again once the send
    that last used it is done: wait() for that one only. Send with group.send(data, bucket.dst)
    without waiting, and keep checksum_pieces(bucket, data). If plan.slices_after_broadcast,
    the checksums are plan.shard_checksums(weights, pack_bucket) instead. Last, broadcast
    torch.cat(checksums) from rank 0, then wait() for every work.
    """
    # YOUR CODE BELOW
    flat = plan.flat_source(weights)  # the trainer's own buffer, if laid out like the wire
    buffers = [] if flat is not None else plan.new_buffers(group.device)
    works, checksums = [], []
    for k, bucket in enumerate(plan.buckets):
        if flat is not None:
            data = flat[bucket.start : bucket.end]  # zero copy
        else:
            if works:
                works[-1].wait()  # wrong: the send before, not the one that last used this buffer
            data = buffers[k % len(buffers)][: bucket.nbytes]
            pack_bucket(bucket, weights, data)
        works.append(group.send(data, bucket.dst))
        # summed on the trainer's device while the send runs, and before the buffer is reused
        checksums.append(checksum_pieces(bucket, data))
    if plan.slices_after_broadcast:  # what went on the wire is not what each rank will hold
        checksums = plan.shard_checksums(weights, pack_bucket)
    table = torch.cat(checksums)
    works.append(group.broadcast(table, 0))  # last: the engine checks after every bucket is in
    for work in works:  # one wait at the end (NCCL: the stream waits, the host does not)
        work.wait()
    return table
    # --8<-- [end:ex-09-1]
