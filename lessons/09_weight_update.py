"""Lesson 09 - weight update: a trainer pushes new weights into a running inference engine.

The idea
    In RLHF the trainer and the inference engine are separate jobs, each with its own world (the
    trainer's FSDP ranks, the engine's TP ranks). After a training step the trainer pushes its new
    weights into the engine over a third group made only for that: trainer rank 0 + every engine
    rank (SGLang's init_weight_update_group / update_weights_from_distributed; OpenRLHF, verl and
    ChatLearn do the same). A control plane tells the engine what is coming; the weights go over
    the group. This file is the trainer's side, done the slow way SGLang first did it: one
    request and one broadcast per tensor, an engine that polls, no warm-up. It measures where
    the time goes, and why a host timer lies. Exercise 09.1 makes it fast: flat buckets sent
    back to back, each engine rank's shard cut on the trainer in the engine's layout (vLLM's:
    q, k and v fused in one qkv_proj per TP rank), converted on send, checksummed.

Run it
    torchrun --nproc-per-node 4 lessons/09_weight_update.py   # trainer + an engine of TP=3
    torchrun --nproc-per-node 2 lessons/09_weight_update.py   # trainer + an engine of TP=1
    python lessons/09_weight_update.py --nproc 3              # trainer + an engine of TP=2
    python -m lessons.check 09                                # exercise 09.1: make it fast
    torchrun --nproc-per-node 2 benchmarks/weight_update.py   # naive vs fast, with a chart

What you should see (4 ranks, no GPU; timings and the port are yours; 1 kB = 1000 bytes)
    [rank 0] no GPU: using gloo on CPU
    [rank 0] rank 0 trains, ranks 1..3 are an inference engine of TP=3: two roles, two worlds
    [rank 0] engine control plane at 127.0.0.1:43809
    [rank 0] checked: before the update, weights read back from the engine are model A's, not B's
    [rank 0] weight-update group 'naive': trainer rank 0 + engine ranks 1..3, no warm-up
    [rank 0] naive update: 21 tensors, 0.96 MB, one request each
    [rank 0]   end to end            82.8 ms
    [rank 0]   control plane         48.4 ms  (21 round trips, the engine naps 2 ms between looks)
    [rank 0]   first broadcast        0.0 ms  beyond the usual: the group's connections
    [rank 0]   transfer              31.6 ms
    [rank 0]   copy into live         2.8 ms
    [rank 0] checked: after the naive update, weights read back from the engine are model B's
    [rank 0] checked: the engine's next token, a forward pass over 3 TP ranks, is B's
    [rank 0] a 16 MB broadcast to 3 engine rank(s), timed three ways:
    [rank 0]   host clock after the launch       0.073 ms  (the launch, not the transfer)
    [rank 0]   after wait(), before a sync      17.414 ms  (gloo: wait() blocks the host)
    [rank 0]   after a sync, slowest rank       28.062 ms  = 0.57 GB/s
    [rank 0] into 3 engine ranks: 1441.5 kB broadcast then sliced, 483.1 kB as shards
    [rank 0] Next: exercise 09.1 makes it fast. Check it: python -m lessons.check 09
    [rank 1] engine rank 0: model A (tiny), 15 tensors, 161.0 kB of torch.bfloat16, as much staging
    [rank 2] engine rank 1: model A (tiny), 15 tensors, 161.0 kB of torch.bfloat16, as much staging
    [rank 3] engine rank 2: model A (tiny), 15 tensors, 161.0 kB of torch.bfloat16, as much staging
The engine, its model, control plane and groups, and SGLang's checks are the package
weight_sync/, imported as ws. Setup comes from course/ranks.py.
"""

import statistics
import time

import torch

import weight_sync as ws
from course.ranks import AT_LEAST_2, parser, print0, setup, usage_error
from weight_sync import checksum_pieces  # noqa: F401 (exercise 09.1 uses it)

PRESET = "tiny"  # the model: 21 HF tensors, 12 heads, 6 KV heads (TP 12 replicates them)
NEEDS = AT_LEAST_2  # rank 0 trains, every other rank is one TP rank of the engine
SEED_A, SEED_B, SEED_C = 1, 2, 3  # models A ("instruct", the engine's first), B, C: the trainer's
ENGINE_DTYPE = torch.bfloat16  # what the engine serves in; the trainer keeps float32
TIMED_BYTES = 16_000_000  # the broadcast the timing section measures: 16 MB
BUCKET_BYTES = 16 * 1024  # exercise 09.1: small buckets, so big tensors are cut into pieces


# --8<-- [start:naive]
def push_naive(client, group, weights):
    """SGLang's first design: for each tensor, a control request (its name, dtype and shape),
    then one broadcast, then wait for every engine rank to answer. The engine polls for
    requests with short sleeps, receives, and copies its shard straight into the live weights.
    Returns, per tensor: (seconds end to end, the slowest engine rank's seconds receiving,
    its seconds copying in)."""
    stats = []
    for name, tensor in weights.items():
        start = time.perf_counter()
        ticket = client.submit(
            "update_weights_from_distributed",
            names=[name],
            dtypes=[str(tensor.dtype)],
            shapes=[list(tensor.shape)],
            group_name=group.name,
        )
        group.broadcast(tensor, 0).wait()  # the engine joins when it sees the request
        group.sync()  # and a host sync after every tensor
        answers = ticket.result()
        stats.append(
            (
                time.perf_counter() - start,
                max(a["recv_s"][0] for a in answers),
                max(a["load_s"][0] for a in answers),
            )
        )
    return stats
    # --8<-- [end:naive]


# --8<-- [start:breakdown]
def print_breakdown(stats, nbytes):
    """Split the naive update's time: what the engine spent receiving is the transfer (its
    first broadcast pays for the group's connections), the rest is the control plane."""
    total, recv = sum(s[0] for s in stats), [s[1] for s in stats]
    usual = statistics.median(recv[1:]) if len(recv) > 1 else recv[0]
    first_call = max(0.0, recv[0] - usual)  # what the first broadcast took beyond the usual
    copy_in = sum(s[2] for s in stats)
    control = total - sum(recv) - copy_in
    print0(f"naive update: {len(stats)} tensors, {nbytes / 1e6:.2f} MB, one request each")
    print0(f"  end to end        {total * 1e3:8.1f} ms")
    naps = f"the engine naps {ws.POLL_S * 1e3:g} ms between looks"
    print0(f"  control plane     {control * 1e3:8.1f} ms  ({len(stats)} round trips, {naps})")
    print0(
        f"  first broadcast   {first_call * 1e3:8.1f} ms  beyond the usual: the group's connections"
    )
    print0(f"  transfer          {(sum(recv) - first_call) * 1e3:8.1f} ms")
    print0(f"  copy into live    {copy_in * 1e3:8.1f} ms")
    # --8<-- [end:breakdown]


# --8<-- [start:timing]
def time_broadcast(client, group, nbytes):
    """Three clocks around one broadcast. The host regains control as soon as the work is
    launched (gloo and NCCL alike); under NCCL even wait() only makes the GPU's stream wait.
    Only a device sync (or CUDA events) times the transfer; and a barrier first, the slowest
    rank, and a discarded warm-up make it a fair number."""
    ticket = client.submit("broadcast_sweep", group_name=group.name, sizes=[nbytes], repeats=1)
    data = torch.ones(nbytes // 4, device=group.device)  # float32, as the engine's side has it
    group.barrier()  # everybody starts together: nobody's time includes waiting for others
    group.broadcast(data, 0).wait()  # warm-up, discarded
    group.barrier()
    cuda = group.device.type == "cuda"
    if cuda:  # GPU timestamps, recorded in the stream's order
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    start = time.perf_counter()
    work = group.broadcast(data, 0)
    launched = time.perf_counter() - start  # the lie: the launch, not the transfer
    work.wait()
    waited = time.perf_counter() - start  # gloo: done; NCCL: the host has not waited at all
    if cuda:
        end.record()  # after wait(): the stream has waited for the broadcast
    group.sync()
    synced = time.perf_counter() - start  # this rank's truth
    slowest = group.slowest(synced)  # the update is done when the slowest rank is
    ticket.result()
    print0(f"a {nbytes / 1e6:g} MB broadcast to {group.size - 1} engine rank(s), timed three ways:")
    print0(
        f"  host clock after the launch    {launched * 1e3:8.3f} ms  (the launch, not the transfer)"
    )
    print0(
        f"  after wait(), before a sync    {waited * 1e3:8.3f} ms  ("
        + ("NCCL: still the launch)" if cuda else "gloo: wait() blocks the host)")
    )
    if cuda:
        print0(f"  CUDA events around it          {begin.elapsed_time(end):8.3f} ms")
    print0(
        f"  after a sync, slowest rank     {slowest * 1e3:8.3f} ms  = "
        f"{nbytes / slowest / 1e9:.2f} GB/s"
    )
    # --8<-- [end:timing]


# --8<-- [start:ex-09-1]
def pack_bucket(bucket, weights, out):
    """Exercise 09.1 (1 of 2): fill `out`, the bytes of `bucket`, from the trainer's full tensors.

    For each piece of bucket.pieces: take the part weights[piece.hf_name][piece.hf_index] of
    the HF tensor (rows of engine rank piece.tp_rank's shard, which the engine holds fused as
    vLLM does: q, k and v in one qkv_proj), and copy it into out at piece.offset (piece.nbytes
    bytes) as piece.dtype, the engine's dtype: copy_ into a view of that dtype converts.
    """
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 09.1: pack a bucket's pieces, converted (about 3 lines)")


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
    raise NotImplementedError(
        "Exercise 09.1: send every bucket, then the checksums (about 18 lines)"
    )
    # --8<-- [end:ex-09-1]


def trainer(ctx, client, tp_size, timeout_s):
    shape = ws.PRESETS[PRESET]
    model_a = ws.make_weights(shape, SEED_A, ctx.device)  # only to check against: the engine's
    model_b = ws.make_weights(shape, SEED_B, ctx.device)  # the trainer's new weights, float32
    ws.check_read_back(client, model_a, model_b, ENGINE_DTYPE)  # as SGLang's test of this API
    print0("checked: before the update, weights read back from the engine are model A's, not B's")
    group = ws.create_update_group(
        client, "naive", ctx.backend, ctx.device, warmup=False, timeout_s=timeout_s
    )
    print0(f"weight-update group 'naive': trainer rank 0 + engine ranks 1..{tp_size}, no warm-up")
    stats = push_naive(client, group, model_b)
    print_breakdown(stats, sum(w.numel() * w.element_size() for w in model_b.values()))
    ws.check_read_back(client, model_b, model_a, ENGINE_DTYPE)
    print0("checked: after the naive update, weights read back from the engine are model B's")
    ws.check_generate(client, model_b, ENGINE_DTYPE, shape)  # every TP rank's, vs one process's
    print0(f"checked: the engine's next token, a forward pass over {tp_size} TP ranks, is B's")
    time_broadcast(client, group, TIMED_BYTES)
    # --8<-- [start:resharding]
    whole, shard = (
        ws.Plan(shape, ENGINE_DTYPE, tp_size, BUCKET_BYTES, how) for how in ("broadcast", "shard")
    )  # every engine rank's bytes, all together
    print0(
        f"into {tp_size} engine ranks: {whole.bytes_received() / 1e3:.1f} kB broadcast then "
        f"sliced, {shard.bytes_received() / 1e3:.1f} kB as shards"
    )
    # --8<-- [end:resharding]
    print0("Next: exercise 09.1 makes it fast. Check it: python -m lessons.check 09")


def main():
    args = parser(__doc__).parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:  # only to start everybody
        tp_size = ctx.world_size - 1
        try:  # before anything runs, on every rank: can the engine hold tiny at this TP?
            ws.check_engine_tp(ws.PRESETS[PRESET], tp_size)
        except ValueError as err:
            usage_error(f"{PRESET}: {err}. Start 1 + that many ranks, e.g. --nproc-per-node 4")
        if ctx.rank > 0:  # an engine rank: serves until the trainer says stop
            engine = dict(preset=PRESET, seed=SEED_A, dtype=ENGINE_DTYPE, poll_s=ws.POLL_S)
            ws.serve_engine(
                ctx.rank - 1, tp_size, ctx.backend, ctx.device, **engine, timeout_s=args.timeout
            )
            return
        print0(
            f"rank 0 trains, ranks 1..{tp_size} are an inference engine of TP={tp_size}: two "
            "roles, two worlds"
        )
        client = ws.engine_client(args.timeout)
        print0(f"engine control plane at {client.address}")
        try:
            trainer(ctx, client, tp_size, args.timeout)
        finally:
            client.shutdown()


if __name__ == "__main__":
    main()
