"""Colocated weight updates: trainer and engine as two processes on ONE GPU, three designs against
the copy floor.

    python benchmarks/colocate.py                      # GPU: Llama-3.2-1B and 3.1-8B shapes
    python benchmarks/colocate.py --presets small      # CPU: shared memory, the "small" model
    python benchmarks/colocate.py --out docs/figures   # where the table (.md, .json) goes

Rank 0 trains, rank 1 is the engine (TP=1, vLLM's fused qkv_proj / gate_up_proj), both on cuda:0
(on CPU, shared memory stands in for CUDA IPC). The trainer holds bf16 weights. Per model:
- floor: one flat device-to-device copy of the engine's bytes, in the trainer's process (HBM
  read + write; on CPU a memcpy);
- (a) OpenRLHF: every update, clone each tensor, a fresh IPC handle per tensor, the engine opens
  each and copies it into its layout; clones freed after the ack, then ipc_collect;
- (b) verl: one flat bucket shared once; the trainer packs it (_foreach_copy_), the engine copies
  each tensor out into its layout;
- (c) the course's: the trainer keeps its parameters in one flat buffer laid out as the engine's
  (q, k, v adjacent, so qkv_proj is a plain range): the handle is opened once, and each update
  the engine pulls everything into staging in one pass that also takes every 64 kB chunk's
  checksum (a Triton kernel on the GPU; on CPU a copy, then the sums), checks them against the
  trainer's table in its layout, and swaps staging in (atomic: the old version or the new one,
  never a mix; the price is a second copy of the engine's weights). Shown twice: the table made
  by the trainer's step (one read of its weights, timed apart), and the table made inside the
  update call.
Every time is end to end, on the trainer's clock, from its call to the engine's acknowledged
new version; warm medians of --repeats after --warmup. Before each design, untimed, the trainer's
weights are drawn anew (another seed per design, as after an optimizer step), so the check after
it sees what that design wrote, not what the one before left in the engine. Checksums are
verified for (c) every update and, after each design, for the engine's live weights. The table
names the device and the machine (on CPU: its cores) it was measured on.
"""

import json
import os
import platform
import statistics
from pathlib import Path

import torch

from course.ranks import EVEN, parser, print0, setup, whole_number
from weight_sync import PRESETS
from weight_sync import colocate as cl

CHUNK_BYTES = 64 * 1024  # one checksum per 64 kB chunk; each engine tensor starts on a chunk
TARGETS = {"llama-3.1-8b": 1.2, "llama-3.2-1b": 1.5}  # (c) / floor, the course's targets
SEEDS = {"(a)": 1, "(b)": 2, "(c)": 3}  # the trainer's weights before each design: new bytes


# --8<-- [start:fused]
def triton_copy_sum():
    """One kernel that copies a buffer and takes each chunk's checksum of what it copied (its
    int64 words, each times 2 * place + 1, summed: cl.chunk_sums): the verification costs no
    extra pass over memory. Without `dst`, the checksums alone (the trainer's table, one read).
    None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def copy_sum(src, dst, sums, WORDS: tl.constexpr, BLOCK: tl.constexpr, COPY: tl.constexpr):
        chunk = tl.program_id(0)
        base = chunk.to(tl.int64) * WORDS
        acc = tl.zeros([BLOCK], dtype=tl.int64)
        for i in range(0, WORDS, BLOCK):
            at = base + i + tl.arange(0, BLOCK)
            words = tl.load(src + at, eviction_policy="evict_first")
            if COPY:
                tl.store(dst + at, words, eviction_policy="evict_first")
            acc += words * (at * 2 + 1)  # a word's weight is its place in the buffer
        tl.store(sums + chunk, tl.sum(acc, axis=0))

    def run(src: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
        src64 = src.view(torch.int64)
        dst64 = src64 if dst is None else dst.view(torch.int64)  # unread without a copy
        words = CHUNK_BYTES // 8
        sums = torch.empty(src64.numel() // words, dtype=torch.int64, device=src.device)
        grid, copy = (sums.numel(),), dst is not None
        copy_sum[grid](src64, dst64, sums, WORDS=words, BLOCK=1024, COPY=copy, num_warps=8)
        return sums

    return run


def cpu_copy_sum(src: torch.Tensor, dst: torch.Tensor | None = None, slab=4 << 20):
    """The same on CPU, slab by slab: the checksums read each slab the copy has just written, from
    the cache, so memory is read once here too."""
    if dst is None:
        return cl.chunk_sums(src, CHUNK_BYTES)
    sums = []
    for at in range(0, src.numel(), slab):
        dst[at : at + slab].copy_(src[at : at + slab])
        sums.append(cl.chunk_sums(dst[at : at + slab], CHUNK_BYTES, first=at // CHUNK_BYTES))
    return torch.cat(sums)


def fused_pull(copy_sum):
    """Design (c)'s engine side: one pass (copy + chunk checksums), one index_add to a checksum per
    tensor, compare, swap. The trainer's buffer is laid out as the engine's, so the whole update
    is one range; else each span would be one element of a _foreach_copy_ (exercise 11.1)."""

    def on_pull(engine, table, version):
        src, staging = engine.trainer_flat.view(torch.uint8), engine.staging.flat
        chunks = copy_sum(src[: staging.numel()], staging)
        owner = engine.layout.owner
        sums = torch.zeros_like(table).index_add_(0, owner, chunks)
        bad = engine.layout.names_at((sums != table).nonzero().flatten().tolist())
        engine.commit(version, bad)
        return bad

    return on_pull
    # --8<-- [end:fused]


def trainer_model(shape, device):
    """The trainer's bf16 weights: HF-named views of one flat buffer in the engine's layout."""
    layout = cl.EngineLayout(shape, cl.vllm_spans(shape, 0, 1), torch.bfloat16, CHUNK_BYTES)
    flat = torch.zeros(layout.size, dtype=torch.uint8, device=device)
    if device.type == "cpu":
        flat.share_memory_()
    views = layout.views(flat)
    weights = {}
    for s in layout.spans:
        weights[s.hf_name] = views[s.name].narrow(s.dim, s.start, s.stop - s.start)
    new_bytes(weights, 0, device)
    return layout, flat, weights


def new_bytes(weights, seed, device):
    """Every trainer weight drawn anew from `seed`, in place (the flat buffer, its handle and
    the bucket's sources stay valid), untimed. Without it every design would write the bytes the
    one before it left in the engine: a design that copied nothing would pass its check."""
    generator = torch.Generator(device=device).manual_seed(seed)  # a CUDA one on the GPU
    for w in weights.values():
        w.normal_(0, 0.02, generator=generator)
    cl.sync(device)  # written before the engine reads them, from its own process


def measure(update, device, warmup, repeats):
    times = []
    for _ in range(warmup + repeats):
        start = cl.clock()
        update()
        cl.sync(device)
        times.append(cl.clock() - start)
    return statistics.median(times[warmup:])


def memory(device):
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def trainer_runs(ctx, pair, preset, args, copy_sum):
    shape, device, gpu = PRESETS[preset], ctx.device, cl.gpu_id(ctx.device)
    layout, flat, weights = trainer_model(shape, device)
    trainer = cl.Trainer(pair, flat.view(torch.bfloat16), weights, device)
    meta = trainer.meta()
    refused = trainer.open({gpu: cl.share(flat.view(torch.bfloat16))}, meta)
    if refused:
        raise RuntimeError(f"the engine refused the trainer's handle: {refused}")
    nbytes, rows, versions = layout.size, [], iter(range(1, 10**9))
    run = lambda update: measure(update, device, args.warmup, args.repeats)  # noqa: E731

    def verified(label):  # the engine's live weights, checked against the trainer's table
        pair.send(cl.CHECK, obj=layout.table(flat).tolist())
        op, _, _, bad = pair.recv()
        if op != cl.ACK:
            raise RuntimeError(f"{label}: the engine's live weights differ in {bad}")

    def row(path, seconds, held, note=""):
        ms, mb = seconds * 1e3, held / 1e6
        rows.append(dict(model=preset, path=path, ms=ms, held_mb=mb, note=note, nbytes=nbytes))

    src, dst = flat, torch.empty_like(flat)
    row("floor: one flat copy of the engine's bytes", run(lambda: dst.copy_(src)), 0)
    dst = None  # the floor's buffer, freed
    new_bytes(weights, SEEDS["(a)"], device)
    before = memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = run(lambda: cl.fresh_handles(trainer, gpu))
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else nbytes
    cuda = device.type == "cuda"
    after = f"after the ack and ipc_collect: {(memory(device) - before) / 1e6:+.0f} MB"
    verified("(a)")
    row("(a) clone + fresh handle per tensor (OpenRLHF)", seconds, peak, after if cuda else "")
    new_bytes(weights, SEEDS["(b)"], device)
    bucket = cl.Bucket(pair, weights, gpu, torch.bfloat16)
    seconds = run(bucket.update)
    verified("(b)")
    held = bucket.nbytes
    pair.send(cl.RELEASE)
    pair.recv()
    del bucket
    if device.type == "cuda":
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()
    freed = memory(device) - before
    freed = f"after the engine let go and the trainer freed it: {freed / 1e6:+.0f} MB"
    row("(b) one bucket shared once (verl)", seconds, held, freed if cuda else "")

    def pull_only(table):
        version = next(versions)
        trainer.start(version, table)
        got = trainer.finish()
        if got != (version, []):
            raise RuntimeError(f"(c): update {version} was not committed: {got}")

    def table_of(flat):  # the trainer's table in one read: the pull's kernel, without its copy
        return layout.table(flat, copy_sum(flat))

    new_bytes(weights, SEEDS["(c)"], device)
    table = table_of(flat)  # made by the trainer's step: its weights do not change here
    if not torch.equal(table, layout.table(flat)):
        raise RuntimeError("the kernel's checksums differ from cl.chunk_sums'")
    table_s = run(lambda: table_of(flat))
    row("(c) handle opened once, fused pull + verify + swap", run(lambda: pull_only(table)), nbytes)
    row(
        "(c) the same, the trainer's table made in the call",
        run(lambda: pull_only(table_of(flat))),
        nbytes,
    )
    verified("(c)")
    row("    the trainer's table alone (one read of its weights)", table_s, 0)
    trainer.stop()
    return rows


def machine(device):
    """Where the table was measured: the GPU's name, or the CPU cores this process may use."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)}), CUDA IPC between the processes"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu ({cores} CPU cores, {platform.machine()}), shared memory between the processes"


def report(rows, device, args):
    floor = {r["model"]: r["ms"] for r in rows if r["path"].startswith("floor")}
    lines = [
        f"Trainer rank 0 and engine rank 1 as two processes on {machine(device)}; control "
        f"messages over a socket (gloo only starts them); torch {torch.__version__}.",
        "",
        "Held extra: what a design holds beyond the trainer's and the engine's weights: (a) the "
        "clones (on a GPU, the measured peak), (b) the bucket, (c) staging.",
        "",
        "| model | path | ms | GB/s | x floor | held extra (MB) | |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        r["gbps"] = r["nbytes"] / (r["ms"] / 1e3) / 1e9
        r["x_floor"] = r["ms"] / floor[r["model"]]
        r["machine"] = machine(device)  # each row of the .json says where it was measured
        lines.append(
            f"| {r['model']} | {r['path']} | {r['ms']:.2f} | {r['gbps']:.2f} | {r['x_floor']:.2f} "
            f"| {r['held_mb']:.1f} | {r['note']} |"
        )
    for model, target in TARGETS.items():
        mine = [r for r in rows if r["model"] == model and r["path"].startswith("(c)")]
        if mine:
            said = ", ".join(f"{r['x_floor']:.2f}x" for r in mine)
            met = "met" if mine[0]["x_floor"] <= target else "NOT met"
            lines.append(
                f"\n(c) on {model}: {said} of the floor (table at the step; in the call); "
                f"target <= {target}x: {met}"
            )
    text = "\n".join(lines)
    print0(text)
    print0("checksums verified: (c) on every update, the engine's live weights after each design")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"11_colocate_{device.type}"
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print0(f"wrote {out / name}.md and .json")


def main():
    p = parser(__doc__)
    p.set_defaults(nproc=2)
    p.add_argument(
        "--presets", help="models (weight_sync.PRESETS); default: 1B and 8B on a GPU, small on CPU"
    )
    p.add_argument(
        "--warmup", type=whole_number(0), default=2, help="untimed updates per path first (2)"
    )
    p.add_argument(
        "--repeats", type=whole_number(1), default=7, help="timed updates per path, median (7)"
    )
    args = p.parse_args()
    args.backend = "gloo"  # only to start both processes; a socket carries the control messages
    with setup(args, EVEN, relaunch=True) as ctx:
        ctx = ctx._replace(device=cl.colocated_device(ctx.local_rank))
        presets = (
            args.presets or ("llama-3.2-1b,llama-3.1-8b" if ctx.device.type == "cuda" else "small")
        ).split(",")
        if ctx.world_size != 2:
            print0("one trainer and one engine: ranks beyond 2 only watch")
        if ctx.rank > 1:
            return
        print0(f"trainer rank 0 and engine rank 1 on {ctx.device}; models {', '.join(presets)}")
        copy_sum = triton_copy_sum() if ctx.device.type == "cuda" else None
        how = "one Triton kernel, copy + chunk checksums"
        if copy_sum is None:
            copy_sum, how = cpu_copy_sum, "slab by slab: a copy, then its chunk checksums"
        print0(f"(c)'s pull: {how}")
        rows = []
        for preset in presets:
            shape = PRESETS[preset]
            if ctx.rank == 0:
                pair = cl.Pair(1, listen=False)
                rows += trainer_runs(ctx, pair, preset, args, copy_sum)
            else:
                engine = cl.Engine(shape, 0, 1, torch.bfloat16, ctx.device, 1, CHUNK_BYTES)
                if ctx.device.type == "cuda":  # the float32 tensors it was loaded from: give back
                    torch.cuda.empty_cache()
                cl.serve(
                    engine,
                    cl.Pair(0, listen=True),
                    cl.gpu_id(ctx.device),
                    fused_pull(copy_sum),
                    print,
                )
                del engine
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
        if ctx.rank == 0:
            report(rows, ctx.device, args)


if __name__ == "__main__":
    main()
