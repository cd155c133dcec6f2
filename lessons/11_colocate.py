"""Lesson 11 - colocated: the trainer and the engine share a GPU, and the weights move by handle.

The idea
    verl, OpenRLHF and ChatLearn usually colocate: the trainer and the inference engine take
    turns on the same GPUs. NCCL cannot send between two ranks of one GPU, so lesson 09's
    weight-update group is out. Instead the trainer hands the engine a handle to its memory
    (CUDA IPC: torch.multiprocessing.reductions.reduce_tensor; on CPU, shared memory plays its
    part), keyed by the physical GPU's UUID, and the engine copies straight out of the trainer's
    tensors into its own layout (fused qkv_proj / gate_up_proj, its TP shard, bf16 from the
    trainer's float32). Here the handle is opened once; every update the engine pulls into
    staging, checks the checksums in its own layout, and swaps staging in: it serves the old
    version or the new one, never a mix. Three designs are timed against a flat copy.

Run it
    torchrun --nproc-per-node 4 lessons/11_colocate.py   # 2 trainer + engine pairs, TP=2
    torchrun --nproc-per-node 2 lessons/11_colocate.py   # one pair on one GPU, TP=1
    python -m lessons.check 11                           # exercise 11.1: one fused pull
    python benchmarks/colocate.py                        # 1B and 8B shapes on one GPU

What you should see (4 ranks, no GPU; timings are yours)
    [rank 0] ranks 0, 2 train; ranks 1, 3 are an engine of TP=2; ranks 2p, 2p+1 share GPU p
    [rank 0] NCCL between them? no GPU here; on one, NCCL fails at its first collective with
             'Duplicate GPU detected : rank 0 and rank 1 both on CUDA device ...': ...
    [rank 0] trainer: model B, 21 float32 tensors in one flat buffer of 0.96 MB, shared once:
    [rank 0]     a handle of 318 bytes for GPU simulated-gpu-0
    [rank 0] checked: a handle for another GPU is refused: no handle for this engine's GPU ...
    [rank 0] checked: a trainer of another shape is refused before any copy: layout mismatch: ...
    [rank 0] checked: a second update while one is in flight is refused: update 2 started ...
    [rank 0] update 1: engine rank 0 pulled 21 spans into its 15 tensors, committed
    [rank 0] checked: an update whose weights changed after their checksums is refused
    [rank 0]     (model.embed_tokens.weight); the engine still serves version 1
    [rank 0] designs, median of 5 (floor: one flat copy of the engine's 0.24 MB):
    [rank 0]   floor: one flat copy                                   0.01 ms
    [rank 0]   (a) clone + fresh handle per tensor, every update      7.31 ms  (held extra: 0.96 MB)
    [rank 0]   (b) one bucket shared once, packed, copied out         0.50 ms  (held extra: 0.48 MB)
    [rank 0]   (c) handle opened once, pull, verify, swap             1.18 ms  (held extra: 0.24 MB)
    [rank 0] checked: every engine rank holds its fused bf16 shard of model B, bit for bit
    [rank 0] two-stage route for trainer GPUs [0, 1], engine GPUs [0, 1, 2]: send trainer 0 ->
    [rank 0]     engine 1 (GPU 0 -> 1), then broadcast from engine 1 to engine ranks [0, 1, 2]
    [rank 0] checked: the two-stage plan pairs no two ranks of one GPU over NCCL; with one GPU
    [rank 0]     for both, it is refused: no engine rank is on a GPU without a trainer ...
    [rank 0] Next: exercise 11.1 makes the pull one fused copy. Check: python -m lessons.check 11
The engine, its layout, the handle plumbing and the designs (a) and (b) are in
weight_sync/colocate.py, imported as cl. Setup comes from course/ranks.py.
"""

import torch
import torch.distributed as dist

from course.ranks import EVEN, parser, print0, print_rank, setup, usage_error
from weight_sync import PRESETS
from weight_sync import colocate as cl

NEEDS = EVEN  # rank 2p trains, rank 2p+1 is engine TP rank p; the two share GPU p
BACKEND = "gloo"  # only to start everybody: NCCL refuses two ranks of one GPU, and handles move
PRESET = "tiny"  # 21 tensors; TP = 1, 2, 3 or 6 divides its heads, KV heads and MLP
SEED_A, SEED_B = 1, 2  # the engine starts with model A; the trainer holds model B
ENGINE_DTYPE = torch.bfloat16  # what the engine serves in; the trainer keeps float32
CHUNK_BYTES = 1024  # checksum chunks; each engine tensor starts on one
WARMUP, REPEATS = 2, 5  # untimed updates per design, then timed ones (the median is shown)


# --8<-- [start:share]
def share_once(flat, gpu):
    """The trainer, once: a handle to its whole flat buffer (one allocation, so one handle; an
    optimizer that steps in place keeps it valid), keyed by the physical GPU. OpenRLHF gathers
    every GPU's handles and each engine rank opens its own GPU's; a device index would name
    another GPU in a process with other CUDA_VISIBLE_DEVICES."""
    return {gpu: cl.share(flat)}  # CUDA IPC: cudaIpcGetMemHandle; CPU: a shared-memory file
    # --8<-- [end:share]


# --8<-- [start:pull]
def pull_per_span(engine, table, version):
    """The engine, each update: copy every span of the trainer's tensors (opened once, no copy
    so far) into staging, converting float32 to bf16 and fusing qkv and gate/up as it goes; then
    take each tensor's checksum (its words weighted by their places, so a word in the wrong place
    counts) and compare with the trainer's table; swap only if all match."""
    for s in engine.spans:
        n = s.stop - s.start
        src = engine.trainer[s.hf_name].narrow(s.dim, s.hf_start, n)
        engine.staging.views[s.name].narrow(s.dim, s.start, n).copy_(src)
    sums = engine.layout.table(engine.staging.flat)  # one int64 per tensor, in the engine's layout
    bad = engine.staging.names_at((sums != table).nonzero().flatten().tolist())
    engine.commit(version, bad)  # staging <-> live, or keep live if any tensor differs
    return bad
    # --8<-- [end:pull]


# --8<-- [start:ex-11-1]
def pull(spans, trainer, staging, table):
    """Exercise 11.1: fill `staging` from the trainer's tensors in ONE fused copy, then verify.

    For each span s of `spans`, the destination is staging.views[s.name] narrowed along s.dim
    to [s.start, s.stop), the source trainer[s.hf_name] narrowed along s.dim to
    [s.hf_start, s.hf_stop). Copy all pairs with one torch._foreach_copy_(destinations,
    sources): it converts the dtype. Then compare staging.layout.table(staging.flat), one
    checksum per tensor, with `table`: return staging.names_at(the indices that differ), [] if
    none (the caller commits only then).
    """
    # YOUR CODE BELOW
    raise NotImplementedError(
        "Exercise 11.1: one fused copy of every span, then verify (about 8 lines)"
    )
    # --8<-- [end:ex-11-1]


def trainer_side(ctx, flat, weights, handles, gpu, peer, shape, tp_size):
    p = ctx.rank // 2
    trainer = cl.Trainer(cl.Pair(peer, listen=False), flat, weights, ctx.device)
    spans = cl.vllm_spans(shape, p, tp_size)  # the engine rank's layout: both sides derive it
    layout = cl.EngineLayout(shape, spans, ENGINE_DTYPE, CHUNK_BYTES)
    say = print_rank if ctx.rank == 0 else lambda *a: None
    say(
        f"trainer: model B, {len(weights)} float32 tensors in one flat buffer of "
        f"{flat.numel() * 4 / 1e6:.2f} MB, shared once:\n    a handle of {len(handles[gpu])} "
        f"bytes for GPU {gpu}"
    )
    # Faults, each refused before a byte moves: the wrong GPU's handle, another model's shapes.
    why = trainer.open({"another-gpu": handles[gpu]})
    say(f"checked: a handle for another GPU is refused: {why[:60]}...")
    meta, k = trainer.meta(), "model.layers.0.self_attn.k_proj.weight"
    meta[k] = ((meta[k][0][0] // 2, meta[k][0][1]), *meta[k][1:])  # as if half the KV heads
    why = trainer.open(handles, meta)
    say(f"checked: a trainer of another shape is refused before any copy: {why[:40]}...")
    assert trainer.open(handles) is None
    table = cl.trainer_table(spans, weights, layout)  # in the engine's layout
    trainer.start(1, table)
    try:
        trainer.start(2, table)  # too early: update 1 is still in flight
    except cl.InFlight as err:
        say(f"checked: a second update while one is in flight is refused: {str(err)[:30]}...")
    version, bad = trainer.finish()
    assert version == 1 and not bad, (version, bad)
    say(
        f"update 1: engine rank {p} pulled {len(spans)} spans into its "
        f"{len(layout.entries)} tensors, committed"
    )
    # The next optimizer step starts too early: the weights change after their checksums.
    name = next(iter(weights))
    keep = weights[name].clone()
    weights[name].add_(1.0)
    trainer.start(2, table)
    version, bad = trainer.finish()
    weights[name].copy_(keep)
    assert version == 1 and bad == [name], (version, bad)
    say(
        "checked: an update whose weights changed after their checksums is refused\n"
        f"    ({', '.join(bad)}); the engine still serves version {version}"
    )
    time_designs(trainer, layout, spans, gpu, say)
    trainer.stop()


# --8<-- [start:designs]
def time_designs(trainer, layout, spans, gpu, say):
    """Each design: updates timed from the trainer's call to the engine's ack; the median."""
    weights, device, versions = trainer.weights, trainer.device, iter(range(3, 10**6))
    src, dst = (torch.ones(layout.size, dtype=torch.uint8, device=device) for _ in range(2))
    bucket = cl.Bucket(trainer.pair, weights, gpu, ENGINE_DTYPE)  # (b), shared at its first use

    def fused():  # (c): the trainer's table in the engine's layout, then one pull, verify, swap
        trainer.start(version := next(versions), cl.trainer_table(spans, weights, layout))
        assert trainer.finish() == (version, [])

    model = sum(t.numel() * t.element_size() for t in weights.values())
    say(
        f"designs, median of {REPEATS} (floor: one flat copy of the engine's "
        f"{layout.size / 1e6:.2f} MB):"
    )
    for label, update, extra in [
        ("floor: one flat copy", lambda: (dst.copy_(src), cl.sync(device)), 0),
        (
            "(a) clone + fresh handle per tensor, every update",
            lambda: cl.fresh_handles(trainer, gpu),
            model,
        ),
        ("(b) one bucket shared once, packed, copied out", bucket.update, bucket.nbytes),
        ("(c) handle opened once, pull, verify, swap", fused, layout.size),
    ]:
        times = []
        for _ in range(WARMUP + REPEATS):
            start = cl.clock()
            update()
            times.append(cl.clock() - start)
        held = f"  (held extra: {extra / 1e6:.2f} MB)" if extra else ""
        say(f"  {label:<52} {cl.median_ms(times[WARMUP:]):6.2f} ms{held}")
    # --8<-- [end:designs]


def engine_side(ctx, gpu, peer, shape, tp_size):
    p = ctx.rank // 2
    engine = cl.Engine(shape, p, tp_size, ENGINE_DTYPE, ctx.device, SEED_A, CHUNK_BYTES)
    cl.serve(engine, cl.Pair(peer, listen=True), gpu, pull_per_span, print_rank)
    expected = cl.reference(shape, SEED_B, p, tp_size, ENGINE_DTYPE, CHUNK_BYTES, ctx.device)
    return torch.equal(engine.live.flat, expected.flat) and engine.version > 1


def main():
    args = parser(__doc__).parse_args()
    if args.backend == "nccl":
        usage_error(
            "--backend nccl: each GPU holds a trainer and an engine rank, and NCCL refuses"
            " two ranks of one GPU; control messages go over gloo (--backend gloo or auto)"
        )
    args.backend = BACKEND
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:
        tp_size, shape, rank = ctx.world_size // 2, PRESETS[PRESET], ctx.rank
        if shape.heads % tp_size or (shape.kv_heads % tp_size and tp_size % shape.kv_heads):
            usage_error(
                f"an engine of TP={tp_size} does not divide the model's heads: "
                "start 2, 4, 6 or 12 ranks"
            )
        ctx = ctx._replace(device=cl.colocated_device(ctx.local_rank))  # GPU local_rank // 2
        gpu = cl.gpu_id(ctx.device, [r // 2 for r in range(ctx.world_size)])
        trainers, engines = (", ".join(map(str, range(i, ctx.world_size, 2))) for i in (0, 1))
        say = "ranks {} train; ranks {} are" if tp_size > 1 else "rank {} trains; rank {} is"
        print0(
            f"{say.format(trainers, engines)} an engine of TP={tp_size}; ranks 2p, 2p+1 share GPU p"
        )
        print0(f"NCCL between them? {cl.nccl_refusal(ctx.device)}")
        # Trainer and engine ranks work together here (in the notebook: one cell).
        # --8<-- [start:pair]
        if rank % 2 == 0:  # model B in one flat float32 buffer: one allocation, one handle
            flat, weights = cl.flat_weights(shape, SEED_B, ctx.device)
            trainer_side(ctx, flat, weights, share_once(flat, gpu), gpu, rank + 1, shape, tp_size)
        ok = torch.tensor([int(rank % 2 == 0 or engine_side(ctx, gpu, rank - 1, shape, tp_size))])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every engine rank's verdict
        # --8<-- [end:pair]
        if not ok.item():  # on every rank: the verdict was all-reduced
            raise SystemExit("an engine rank's weights differ from its fused bf16 shard of model B")
        print0("checked: every engine rank holds its fused bf16 shard of model B, bit for bit")
        if rank == 0:
            cl.two_stage_demo(print_rank)
        print0(
            "Next: exercise 11.1 makes the pull one fused copy. Check: python -m lessons.check 11"
        )


if __name__ == "__main__":
    main()
