"""Lesson 09 - weight update: a trainer pushes new weights into a running inference engine.

The idea
    In RLHF the trainer and the inference engine are separate jobs, each with its own world (its
    own process group: the trainer's FSDP ranks, the engine's TP ranks). After a training step
    the trainer pushes its new weights into the engine over a third group made only for that:
    trainer rank 0 + every engine rank (SGLang's init_weight_update_group / update_weights_from_
    distributed / get_weights_by_name; OpenRLHF, verl and ChatLearn do the same). A control
    plane tells the engine what is coming; the weights themselves go over the group.
    This file is the trainer's side, the slow way SGLang first did it: one control request per
    tensor, an engine that polls for requests with short sleeps, one broadcast per tensor, no
    warm-up of the new group. It measures where the time goes, reads the weights back the way
    SGLang's own test does, and shows why a host timer around GPU work lies.
    Exercise 09.1 makes it fast: metadata once, flat buckets back to back, each engine rank's TP
    shard cut on the trainer, dtype converted on send, checksummed, committed atomically.

Run it
    torchrun --nproc-per-node 4 lessons/09_weight_update.py   # trainer + an engine of TP=3
    torchrun --nproc-per-node 2 lessons/09_weight_update.py   # trainer + an engine of TP=1
    python lessons/09_weight_update.py --nproc 3              # trainer + an engine of TP=2
    python -m lessons.check 09                                # exercise 09.1: make it fast
    torchrun --nproc-per-node 2 benchmarks/weight_update.py   # naive vs fast, with a chart

What you should see (4 ranks, no GPU; timings and the port are yours)
    [rank 0] world of 4 ranks: rank 0 is the trainer, the others an inference engine of TP=3; ...
    [rank 0] checked: before the update, sampled weights read back from the engine equal model A
             and differ from model B
    [rank 0] naive update: 21 tensors, 0.96 MB, one request each
    [rank 0]   end to end           108.2 ms     <- then: control plane, first broadcast, transfer
    [rank 0] checked: after the naive update, sampled weights read back ... equal model B ...
    [rank 0] checked: the engine's greedy next token (TP forward on 3 rank(s)) equals ...
    [rank 0] a 16 MiB broadcast to 3 engine rank(s), timed three ways:
    [rank 0]   host clock after the launch       0.060 ms  <- not the transfer
    [rank 0]   after wait(), before a sync      22.279 ms  <- gloo: wait() blocks the host, ...
    [rank 0]   after a sync, slowest rank       23.352 ms  = 0.72 GB/s
    [rank 0] resharding for TP=3, bytes landing on the engine ranks together: broadcast then
             slice 1441.5 kB, each rank only its shard 483.1 kB

The engine (model, TP forward, control plane, staging, groups built from a store) is the
package weight_sync/; this file reads without it. Setup comes from course/ranks.py:
torchrun's world only starts everybody, then each role builds its own (lesson 07).
"""
import statistics
import time

import torch
import torch.distributed as dist

from course.ranks import AT_LEAST_2, parser, print0, setup
# the engine's side, not the lesson; checksum_pieces and shard_of: for exercise 09.1
from weight_sync.control import EngineError, engine_client
from weight_sync.engine import POLL_S, serve_engine
from weight_sync.groups import RecordingGroup
from weight_sync.model import PRESETS, forward, llama_specs, make_weights, shard_of
from weight_sync.plan import Plan, checksum_pieces, reference_checksums
from weight_sync.trainer import FastUpdater, create_update_group

NEEDS = AT_LEAST_2  # rank 0 trains, every other rank is one TP rank of the engine
PRESET = "tiny"  # the model's shape: 21 tensors whose splits all divide by TP = 1, 2, 3
SEED_A, SEED_B, SEED_C = 1, 2, 3  # the engine starts with A ("instruct"); the trainer holds B
ENGINE_DTYPE = torch.bfloat16  # what the engine serves in; the trainer keeps float32
SAMPLED = ("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight",
           "model.norm.weight", "lm_head.weight")  # read back after an update, as SGLang's test
TRUNCATE = 4  # rows of each sampled tensor read back
PROMPT = [5, 17, 42, 101]  # token ids: the engine's greedy next token must match the reference
TIMED_MIB = 16  # the broadcast the timing section measures
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
        ticket = client.submit("update_weights_from_distributed", names=[name],
                               dtypes=[str(tensor.dtype)], shapes=[list(tensor.shape)],
                               group_name=group.name)
        group.broadcast(tensor, 0).wait()  # the engine joins when it sees the request
        group.sync()  # and a host sync after every tensor
        answers = ticket.result()
        stats.append((time.perf_counter() - start, max(a["recv_s"][0] for a in answers),
                      max(a["load_s"][0] for a in answers)))
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
    print0(f"  control plane     {control * 1e3:8.1f} ms  ({len(stats)} round trips to an engine "
           f"that naps {POLL_S * 1e3:g} ms between looks)")
    print0(f"  first broadcast   {first_call * 1e3:8.1f} ms  beyond the usual: the group's "
           "connections (no warm-up)")
    print0(f"  transfer          {(sum(recv) - first_call) * 1e3:8.1f} ms")
    print0(f"  copy into live    {copy_in * 1e3:8.1f} ms")
# --8<-- [end:breakdown]


# --8<-- [start:read_back]
def check_read_back(client, expected, other, when, names):
    """SGLang's test of this API: sampled tensors read back from the engine (first rows,
    gathered over its TP ranks) equal the model we expect and differ from the other one."""
    for name in SAMPLED:
        got = torch.tensor(client.call("get_weights_by_name", name=name,
                                       truncate_size=TRUNCATE)[0])  # TP rank 0's answer
        want, not_want = (m[name][:TRUNCATE].to(ENGINE_DTYPE).float().cpu()
                          for m in (expected, other))
        assert torch.equal(got, want), f"rank 0: {name} read back {when}: {got}, expected {want}"
        assert not torch.equal(got, not_want), f"rank 0: {name} {when} still equals the other model"
    print0(f"checked: {when}, sampled weights read back from the engine equal model {names[0]} "
           f"and differ from model {names[1]}")
# --8<-- [end:read_back]


def check_generate(client, weights, tp_size):
    """Every engine rank's greedy next token against the single-process forward pass."""
    tokens = {a["token"] for a in client.call("generate", tokens=PROMPT)}
    held = {name: w.to(ENGINE_DTYPE) for name, w in weights.items()}  # what the engine holds
    expected = int(forward(held, PRESETS[PRESET], PROMPT).argmax())
    assert tokens == {expected}, f"rank 0: engine ranks said {tokens}, the reference {expected}"
    print0(f"checked: the engine's greedy next token (TP forward on {tp_size} rank(s)) equals the "
           "single-process forward pass of model B")


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
    print0(f"a {nbytes >> 20} MiB broadcast to {group.size - 1} engine rank(s), timed three ways:")
    print0(f"  host clock after the launch    {launched * 1e3:8.3f} ms  <- not the transfer")
    print0(f"  after wait(), before a sync    {waited * 1e3:8.3f} ms  <- "
           + ("NCCL: still the launch" if cuda else "gloo: wait() blocks the host, so true here"))
    if cuda:
        print0(f"  CUDA events around it          {begin.elapsed_time(end):8.3f} ms")
    print0(f"  after a sync, slowest rank     {slowest * 1e3:8.3f} ms  = "
           f"{nbytes / slowest / 1e9:.2f} GB/s")
# --8<-- [end:timing]


# --8<-- [start:ex-09-1]
def pack_bucket(bucket, weights, out):
    """Exercise 09.1 (1 of 2): fill `out`, the bytes of `bucket`, from the trainer's full tensors.

    For each piece of bucket.pieces: take weights[piece.name], cut out the shard engine rank
    piece.tp_rank holds (shard_of(full, piece.split_dim, piece.tp_rank, piece.tp_size)), keep
    its rows piece.start:piece.stop, and copy them into out at piece.offset (piece.nbytes bytes)
    as piece.dtype, the engine's dtype: copy_ into a view of that dtype converts.
    """
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 09.1: pack the pieces of a bucket, each one a shard's "
                              "rows converted to the engine's dtype (about 4 lines)")


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
    raise NotImplementedError("Exercise 09.1: send every bucket without waiting, reusing two "
                              "buffers, then the checksums (about 18 lines)")
# --8<-- [end:ex-09-1]


# --8<-- [start:check]
def check_fast_update(ctx, pack_bucket, push_update):
    """Rank 0 pushes model B (each rank's shard only), then model C (broadcast, then sliced by
    the engine) with your functions; the other ranks are the engine. Each engine rank compares
    what it holds with its shard of C, cut and converted single-process; rank 0 compares the
    versions and the checksums it sent with the single-process table."""
    shape, tp_size = PRESETS[PRESET], ctx.world_size - 1
    model_b, model_c = (make_weights(shape, seed, ctx.device) for seed in (SEED_B, SEED_C))
    plans = [Plan(llama_specs(shape), ENGINE_DTYPE, tp_size, BUCKET_BYTES, resharding)
             for resharding in ("shard", "broadcast")]
    push_update(RecordingGroup(ctx.device, tp_size), plans[0], model_b)  # a dry run, every rank:
    if ctx.rank > 0:  # a stub raises here, before any rank talks to another
        engine = serve_engine(ctx.rank - 1, tp_size, ctx.backend, ctx.device, preset=PRESET,
                              seed=SEED_A, dtype=ENGINE_DTYPE, timeout_s=20, quiet=True)
        differ = [name for name, _, split in llama_specs(shape) if not torch.equal(
            engine.weights[name], shard_of(model_c[name], split, ctx.rank - 1, tp_size).to(
                ENGINE_DTYPE))]  # against this rank's shard of C, made here single-process
        result = ({"version": engine.version, "tensors unlike my shard of model C": differ},
                  {"version": 2, "tensors unlike my shard of model C": []})
    else:
        result = push_twice(ctx, tp_size, push_update, (model_b, model_c), plans)
    dist.barrier()  # torchrun's world, to end together: no rank leaves before all have a verdict
    return result


def push_twice(ctx, tp_size, push_update, models, plans):
    """The trainer's side of the check: the versions it got back, and the pieces whose checksum
    it sent differs from the single-process one (expected: none)."""
    references = [reference_checksums(plan, model) for plan, model in zip(plans, models)]
    client, yours = engine_client(20), {"versions": [], "pieces with a wrong checksum": []}
    try:
        group = create_update_group(client, "fast", ctx.backend, ctx.device, warmup=True,
                                    timeout_s=20)
        for model, plan, reference in zip(models, plans, references):
            updater = FastUpdater(client, group, model, push_update, bucket_bytes=BUCKET_BYTES,
                                  resharding=plan.resharding)
            pieces = [f"{p.name} rows {p.start}:{p.stop} of rank {p.tp_rank}"
                      for b in plan.checksummed for p in b.pieces]
            updater.prepare()
            try:
                yours["versions"].append(updater.update()[0]["version"])
            except EngineError as err:  # a refused update is a wrong answer, not a crash
                yours["versions"].append(f"refused: {str(err)[:160]}...")
            sent = updater.table.cpu() if updater.table is not None else torch.zeros_like(reference)
            yours["pieces with a wrong checksum"] += [pieces[i] for i in range(len(pieces))
                                                      if sent[i] != reference[i]][:3]
    finally:
        client.shutdown()
    return yours, {"versions": [1, 2], "pieces with a wrong checksum": []}


# --8<-- [end:check]


# Exercise id -> (its check, the functions you write). Check: python -m lessons.check 09
EXERCISES = {"09.1": (check_fast_update, "pack_bucket", "push_update")}


def trainer(ctx, client, tp_size, timeout_s):
    shape = PRESETS[PRESET]
    model_a = make_weights(shape, SEED_A, ctx.device)  # only to check against: the engine's own
    model_b = make_weights(shape, SEED_B, ctx.device)  # the trainer's new weights, float32
    check_read_back(client, model_a, model_b, "before the update", "AB")
    group = create_update_group(client, "naive", ctx.backend, ctx.device, warmup=False,
                                timeout_s=timeout_s)
    print0(f"weight-update group {group.name!r}: trainer rank 0 + engine ranks 1..{tp_size}, "
           "created without a warm-up")
    stats = push_naive(client, group, model_b)
    print_breakdown(stats, sum(w.numel() * w.element_size() for w in model_b.values()))
    check_read_back(client, model_b, model_a, "after the naive update", "BA")
    check_generate(client, model_b, tp_size)
    time_broadcast(client, group, TIMED_MIB << 20)
    # --8<-- [start:resharding]
    shard, whole = (Plan(llama_specs(shape), ENGINE_DTYPE, tp_size, BUCKET_BYTES, resharding)
                    for resharding in ("shard", "broadcast"))
    print0(f"resharding for TP={tp_size}, bytes landing on the engine ranks together: "
           f"broadcast then slice {whole.bytes_received() / 1e3:.1f} kB, "
           f"each rank only its shard {shard.bytes_received() / 1e3:.1f} kB")
    # --8<-- [end:resharding]
    print0("Next: exercise 09.1 makes it fast. Check it: python -m lessons.check 09; "
           "time it: torchrun --nproc-per-node 2 benchmarks/weight_update.py")


def main():
    args = parser(__doc__).parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:  # torchrun's world: here only to start everybody
        tp_size = ctx.world_size - 1
        if ctx.rank > 0:  # an engine rank: serves until the trainer says stop
            serve_engine(ctx.rank - 1, tp_size, ctx.backend, ctx.device, preset=PRESET,
                         seed=SEED_A, dtype=ENGINE_DTYPE, timeout_s=args.timeout, poll_s=POLL_S)
            return
        print0(f"world of {ctx.world_size} ranks: rank 0 is the trainer, the others an inference "
               f"engine of TP={tp_size}; each role builds its own process group")
        client = engine_client(args.timeout)
        print0(f"engine control plane at {client.address}")
        try:
            trainer(ctx, client, tp_size, args.timeout)
        finally:
            client.shutdown()


if __name__ == "__main__":
    main()
