"""How fast does a trainer push new weights into a running inference engine? Naive vs fast.

    torchrun --nproc-per-node 2 benchmarks/weight_update.py          # CPU/gloo, the "small" model
    torchrun --nproc-per-node 2 benchmarks/weight_update.py --out docs/figures   # the docs' chart
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/weight_update.py --backend nccl
        # 2 GPUs: trainer on GPU 0, engine TP=1 on GPU 1; Llama-3.2-1B and 3.1-8B shapes

Rank 0 is the trainer, ranks 1.. one inference engine (TP = ranks - 1). One run prints:
1. a broadcast sweep on a weight-update group (1 MiB .. --sweep-mib), the slowest rank's time
   per broadcast, after a barrier and a discarded warm-up;
2. per model (random bf16 weights, exact HF shapes), per path: the naive path (SGLang's first
   design, lessons/09_weight_update.py) and the fast path (exercise 09.1's solution, or yours
   with --solution FILE; the trainer's bf16 weights sent from its flat buffer, then float32
   weights converted on send): group set-up, the cold update (the first on a new group) and the
   warm one (median of --repeats), end to end from the trainer's call to every engine rank's
   acknowledged new version; GB/s; efficiency = model bytes / time / the GB/s of one broadcast
   of the model's bytes, timed right after each warm update (and, stricter, / the sweep's best
   GB/s at 64 MiB and more);
   the course's targets and whether they are met;
3. where the fast path's warm time goes, measured: control plane, transfer, verify + commit,
   ack, and what the trainer's checksums cost alone;
4. the correctness of each model's update: sampled weights read back from the engine equal the
   trainer's and differ from the engine's first model; the greedy next token matches.
Writes 09_weight_update_<backend>.md (the table), .json (every number) and .png (a bar chart) to
--out (out/). Timing is wall clock on the trainer, whose ack comes after the engine synchronized
its GPU; the engine's phase times are host clocks of the same machine.
"""

import argparse
import json
import runpy
import statistics
import time
from pathlib import Path

import torch

from course.launcher import ROOT, lesson_path
from course.ranks import AT_LEAST_2, parser, print0, setup, whole_number
from weight_sync.control import engine_client
from weight_sync.engine import POLL_S, serve_engine
from weight_sync.model import PRESETS, forward, make_weights, one_weight
from weight_sync.plan import Layout, checksum_pieces
from weight_sync.timing import broadcast_timing
from weight_sync.trainer import FastUpdater, create_update_group

SEED_A, SEED_B = 1, 2  # the engine starts each model as A ("instruct"); the trainer pushes B
DTYPE = torch.bfloat16  # the engine's weights, and the trainer's in the zero-copy run
# The course's targets, end to end, warm: (seconds at most, fraction of the same run's broadcast
# GB/s). On gloo the "small" model stands in for a smaller model.
TARGETS = {
    ("nccl", "llama-3.2-1b"): (12e-3, 0.80),
    ("nccl", "llama-3.1-8b"): (55e-3, 0.85),
    ("gloo", "small"): (None, 0.80),
}
SAMPLED = ("model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight", "lm_head.weight")
PROMPT = [128000, 791, 6460, 374]  # token ids for the greedy next-token check
REFERENCE_MAX = 4 << 30  # the same-run reference broadcast: the model's bytes, up to 4 GiB


def sweep(client, group, sweep_mib):
    """Seconds per broadcast for 1 MiB, 4 MiB, ... sweep_mib, the slowest rank's; the engine runs
    the same broadcast_timing through its broadcast_sweep request."""
    sizes = [1 << 20 << 2 * i for i in range(12) if 1 << 2 * i <= sweep_mib]
    repeats = [max(3, min(20, (256 << 20) // size)) for size in sizes]
    tickets = [
        client.submit("broadcast_sweep", group_name=group.name, sizes=[s], repeats=r)
        for s, r in zip(sizes, repeats)
    ]
    times = [broadcast_timing(group, s, r) for s, r in zip(sizes, repeats)]
    for ticket in tickets:
        ticket.result()
    points = [(size, t) for size, t in zip(sizes, times)]
    print0("\n".join(sweep_table(points)))
    return points


def sweep_table(points):
    """The sweep's lines of the table: one row per message size."""
    lines = [
        "Broadcast sweep on the weight-update group (the slowest rank's time after a barrier, "
        "warm-up discarded):",
        "",
        "| MiB | ms | GB/s |",
        "|---:|---:|---:|",
    ]
    rows = [f"| {size >> 20} | {t * 1e3:.3f} | {size / t / 1e9:.2f} |" for size, t in points]
    return lines + rows


def timed_naive(client, group, weights, push_naive):
    start = time.perf_counter()
    stats = push_naive(client, group, weights)
    return time.perf_counter() - start, stats


def run_naive(client, ctx, model, weights, push_naive, repeats, timeout):
    client.call("configure", poll_s=POLL_S)  # the naive engine naps between looks for requests
    start = time.perf_counter()
    group = create_update_group(
        client, f"naive-{model}", ctx.backend, ctx.device, warmup=False, timeout_s=timeout
    )
    setup_s = time.perf_counter() - start
    runs = [timed_naive(client, group, weights, push_naive) for _ in range(1 + repeats)]
    client.call("configure", poll_s=None)
    recv = [s[1] for s in runs[0][1]]
    first_call = max(0.0, recv[0] - statistics.median(recv[1:]))
    print0(
        f"  naive, cold: {runs[0][0] * 1e3:.1f} ms, of which the first broadcast's extra "
        f"(a group without warm-up) {first_call * 1e3:.1f} ms; the engine received for "
        f"{sum(recv) * 1e3:.1f} ms in all; the rest is {len(recv)} control round trips"
    )
    return {
        "setup_s": setup_s,
        "cold_s": runs[0][0],
        "warm_s": statistics.median(r[0] for r in runs[1:]),
    }


def reference_broadcast(client, group, nbytes):
    """One broadcast of the model's bytes in one message (at most REFERENCE_MAX), timed like
    the sweep's; returns seconds per byte."""
    nbytes = min(nbytes, REFERENCE_MAX)
    ticket = client.submit("broadcast_sweep", group_name=group.name, sizes=[nbytes], repeats=1)
    seconds = broadcast_timing(group, nbytes, 1)
    ticket.result()
    return seconds / nbytes


def run_fast(
    client,
    ctx,
    model,
    weights,
    push_update,
    repeats,
    timeout,
    bucket_bytes,
    label,
    group=None,
    nbytes=None,
):
    """Group (warmed up) and prepare once, then 1 + repeats updates; returns times and phases.
    With nbytes: after each warm update, a broadcast of nbytes in one message, the same-run
    reference the efficiency is measured against (interleaved: both see the same load)."""
    start = time.perf_counter()
    if group is None:
        group = create_update_group(
            client, f"fast-{model}", ctx.backend, ctx.device, warmup=True, timeout_s=timeout
        )
    updater = FastUpdater(client, group, weights, push_update, bucket_bytes=bucket_bytes)
    plan = updater.prepare()
    setup_s = time.perf_counter() - start
    times, phases, references = [], [], []
    for i in range(1 + repeats):
        group.sync()  # the trainer's GPU idle before the clock starts; the engine's already is
        start = time.perf_counter()
        answers = updater.update()
        times.append(time.perf_counter() - start)
        acked = time.monotonic()
        if nbytes and i > 0:  # the reference right after each warm update: the same conditions
            references.append(reference_broadcast(client, group, nbytes))
        last = {k: max(a[k] for a in answers) for k in ("picked_up", "data_in", "committed")}
        phases.append(
            {
                "push launched": updater.pushed - updater.called,
                "control plane": last["picked_up"] - updater.called,
                "transfer": last["data_in"] - last["picked_up"],
                "verify + commit": last["committed"] - last["data_in"],
                "ack": acked - last["committed"],
            }
        )
    versions = {a["version"] for a in answers}
    print0(
        f"  {label}: {len(plan.buckets)} bucket(s) of up to {plan.bucket_bytes >> 20} MiB, "
        f"engine now at version {sorted(versions)}"
    )
    warm = {k: statistics.median(p[k] for p in phases[1:]) for k in phases[0]}
    print0(
        "    where the warm time goes (median): "
        + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in warm.items())
    )
    row = {
        "setup_s": setup_s,
        "cold_s": times[0],
        "warm_s": statistics.median(times[1:]),
        "phases": warm,
        "group": group,
    }
    if nbytes:  # each warm update against the broadcast just after it, then the median
        row["reference_gbs"] = 1 / statistics.median(references) / 1e9
        row["efficiency"] = statistics.median(
            nbytes * ref / t for ref, t in zip(references, times[1:])
        )
        size = min(nbytes, REFERENCE_MAX) / 1e9
        print0(
            f"    one broadcast of the model's bytes ({size:.2f} GB; 4 GiB at most), right "
            f"after each warm update (median): {row['reference_gbs']:.2f} GB/s"
        )
    flat = plan.flat_source(weights)
    if flat is not None:  # what the trainer's checksums cost alone: one pass over the model
        group.sync()
        start = time.perf_counter()
        for bucket in plan.buckets:
            checksum_pieces(bucket, flat[bucket.start : bucket.end])
        group.sync()
        row["phases"]["checksums alone (trainer)"] = time.perf_counter() - start
        print0(
            f"    the trainer's checksums alone, one pass over the model: "
            f"{row['phases']['checksums alone (trainer)'] * 1e3:.2f} ms"
        )
    return row


def check_engine(client, shape, model_b, device, label):
    """The engine now holds B: sampled rows equal B's and differ from A's; same greedy token."""
    for name in SAMPLED:
        got = torch.tensor(client.call("get_weights_by_name", name=name, truncate_size=4)[0])
        want = model_b[name][:4].to(DTYPE).float().cpu()
        first = one_weight(shape, name, SEED_A, device)[:4].to(DTYPE).float().cpu()
        assert torch.equal(got, want) and not torch.equal(got, first), f"{label}: {name} differs"
    prompt = [t % shape.vocab for t in PROMPT]
    tokens = {a["token"] for a in client.call("generate", tokens=prompt)}
    expected = int(forward({k: v.to(DTYPE) for k, v in model_b.items()}, shape, prompt).argmax())
    assert tokens == {expected}, f"{label}: the engine says {tokens}, the reference {expected}"
    print0(
        f"  checked: {label}: sampled weights read back equal the trainer's B and differ from "
        f"A; greedy next token {expected} on every engine rank, as the reference"
    )


def benchmark_model(client, ctx, args, model, best_gbs, functions):
    shape, timeout = PRESETS[model], args.timeout
    client.call("load_model", preset=model, seed=SEED_A, dtype=str(DTYPE))
    # the trainer keeps B in one flat buffer, laid out as a TP-1 engine holds it (q, k and v
    # back to back, as its fused qkv_proj): HF's tensors are views of it
    layout = Layout.vllm(shape, DTYPE, 0, 1)
    flat = torch.zeros(layout.size, dtype=torch.uint8, device=ctx.device)
    model_b = make_weights(shape, SEED_B, ctx.device, into=layout.hf_views(flat))
    nbytes = sum(e.nbytes for e in layout.entries)
    print0(f"{model}: {len(model_b)} tensors, {nbytes / 1e6:.1f} MB in {DTYPE}")
    bucket_bytes = int(args.bucket_mib * (1 << 20))
    rows = {
        "naive": run_naive(
            client, ctx, model, model_b, functions["push_naive"], args.repeats, timeout
        )
    }
    check_engine(client, shape, model_b, ctx.device, "naive")
    client.call("load_model", preset=model, seed=SEED_A, dtype=str(DTYPE))  # back to A
    rows["fast"] = run_fast(
        client,
        ctx,
        model,
        model_b,
        functions["push_update"],
        args.repeats,
        timeout,
        bucket_bytes,
        "fast, bf16 flat buffer (zero copy)",
        nbytes=nbytes,
    )
    reference_gbs = rows["fast"]["reference_gbs"]
    check_engine(client, shape, model_b, ctx.device, "fast")
    if not args.no_fp32:  # a float32 trainer: pack, convert on send, two buffers in turn
        model_f32 = make_weights(shape, SEED_B, ctx.device)
        rows["fast, fp32 trainer"] = run_fast(
            client,
            ctx,
            model,
            model_f32,
            functions["push_update"],
            args.repeats,
            timeout,
            bucket_bytes,
            "fast, float32 trainer (convert on send)",
            rows["fast"]["group"],
        )
        check_engine(client, shape, model_b, ctx.device, "fast, fp32 trainer")
        del model_f32
    out = []
    for path, row in rows.items():
        row.pop("group", None)
        gbs = nbytes / row["warm_s"] / 1e9
        out.append(
            {
                "model": model,
                "path": path,
                "tensors": len(model_b),
                "gb": nbytes / 1e9,
                "efficiency": gbs / reference_gbs,
                **row,
                "gbs": gbs,
                "reference_gbs": reference_gbs,
                "of_sweep_best": gbs / best_gbs,
            }
        )
    del flat, model_b
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def verdict(backend, row):
    """'met' / 'MISSED (...)' against the course's targets (the fast path only), or ''."""
    target = TARGETS.get((backend, row["model"]))
    if not target or row["path"] != "fast":  # the targets are the fast path's, bf16 as served
        return ""
    limit, share = target
    misses = []
    if limit and row["warm_s"] > limit:
        misses.append(f"> {limit * 1e3:g} ms")
    if row["efficiency"] < share:
        misses.append(f"< {share:.0%}")
    wanted = " and ".join(x for x in (limit and f"<= {limit * 1e3:g} ms", f">= {share:.0%}") if x)
    return f"{wanted}: " + ("met" if not misses else "MISSED (" + ", ".join(misses) + ")")


def table(rows, backend, device_name, points):
    """The .md the docs include, from what the .json keeps (rows, backend, device, sweep)."""
    lines = [
        f"Weight update, {backend} on {device_name}: end to end from the trainer's call to "
        "every engine rank's acknowledged new version; warm = median of the warm updates. "
        "Efficiency: GB/s against one broadcast of the model's bytes (4 GiB at most) timed "
        "in the same run right after each warm update (fast: the median of those ratios; "
        "the other paths: against their median), and against the sweep's best of 64 MiB "
        "and up.",
        "",
        "| model | path | tensors | MB | set-up ms | cold ms | warm ms | GB/s | efficiency "
        "| of sweep best | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['path']} | {r['tensors']} | {r['gb'] * 1e3:.1f} | "
            f"{r['setup_s'] * 1e3:.1f} | {r['cold_s'] * 1e3:.1f} | {r['warm_s'] * 1e3:.1f}"
            f" | {r['gbs']:.2f} | {r['efficiency']:.0%} | {r['of_sweep_best']:.0%} | "
            f"{verdict(backend, r)} |"
        )
    phased = [r for r in rows if r.get("phases")]
    if phased:
        names = list(dict.fromkeys(n for r in phased for n in r["phases"]))
        lines += [
            "",
            "Where the warm time goes (medians; the trainer's push overlaps the transfer, so the "
            "phases add up to more than the whole):",
            "",
            "| model | path | " + " | ".join(names) + " |",
            "|---|---|" + "---:|" * len(names),
        ]
        for r in phased:
            ms = " | ".join(
                f"{r['phases'][n] * 1e3:.2f} ms" if n in r["phases"] else "" for n in names
            )
            lines.append(f"| {r['model']} | {r['path']} | {ms} |")
    return "\n".join([*lines, "", *sweep_table(points)])


def plot(rows, path, title):
    import matplotlib  # only here: the benchmark's numbers need no matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = {r["path"]: r for r in rows if r["model"] == model}
        x = range(len(paths))
        warm = [mine[p]["warm_s"] * 1e3 for p in paths]
        ax.bar(x, warm, color="tab:blue", label="warm (median)")
        for i, ms in zip(x, warm):
            ax.annotate(f"{ms:.3g} ms", (i, ms), ha="center", va="bottom", fontsize=8)
        ax.scatter(
            x,
            [mine[p]["cold_s"] * 1e3 for p in paths],
            color="tab:red",
            zorder=3,
            label="cold (first update)",
        )
        floor = mine[paths[0]]["gb"] / mine[paths[0]]["reference_gbs"] * 1e3
        ax.axhline(floor, color="gray", linestyle="--", label="one broadcast of the model")
        ax.set_yscale("log")
        ax.set_xticks(list(x), [p.replace(", ", "\n") for p in paths])
        ax.set_ylabel("ms, end to end")
        ax.set_title(f"{model}, {mine[paths[0]]['gb'] * 1e3:.0f} MB")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def load_functions(solution):
    """push_naive from the lesson; pack_bucket and push_update from the solution (or yours)."""
    lesson = runpy.run_path(str(lesson_path("09")))
    mine = runpy.run_path(str(solution))
    missing = [n for n in ("pack_bucket", "push_update") if n not in mine]
    if missing:
        raise SystemExit(f"error: {solution} defines no {', '.join(missing)}")
    # your push_update calls pack_bucket by name: give it yours, in its own namespace
    return {"push_naive": lesson["push_naive"], "push_update": mine["push_update"]}


def presets(text):
    """--models: names of PRESETS, checked before any rank starts (a typo is one line, exit 2)."""
    names = text.split(",")
    if unknown := [n for n in names if n not in PRESETS]:
        raise argparse.ArgumentTypeError(
            f"no preset called {', '.join(unknown)}: choose from {','.join(PRESETS)}"
        )
    return names


def main():
    p = parser(__doc__)
    p.add_argument(
        "--models",
        type=presets,
        help="comma-separated PRESETS (default: small on gloo, llama-3.2-1b,llama-3.1-8b on nccl)",
    )
    p.add_argument("--sweep-mib", type=int, help="largest broadcast of the sweep (256 / 4096)")
    p.add_argument("--bucket-mib", type=float, help="fast path bucket size (256 gloo, 512 nccl)")
    p.add_argument("--repeats", type=whole_number(1), default=5, help="warm updates timed (median)")
    p.add_argument("--no-fp32", action="store_true", help="skip the float32-trainer run")
    p.add_argument(
        "--solution",
        default=str(ROOT / "solutions" / "09_weight_update.py"),
        help="file with your pack_bucket and push_update",
    )
    args = p.parse_args()
    functions = load_functions(args.solution)  # before any rank starts: a bad file fails fast
    with setup(args, AT_LEAST_2, trace=args.trace) as ctx:
        gpu = ctx.backend == "nccl"
        models = args.models or (["llama-3.2-1b", "llama-3.1-8b"] if gpu else ["small"])
        args.sweep_mib = args.sweep_mib or (4096 if gpu else 256)
        # gloo on 2 cores: the socket copies keep both cores busy, so a pipeline of buckets
        # hides nothing and each message costs; NCCL: 512 MiB runs at the link's rate.
        args.bucket_mib = args.bucket_mib or (512 if gpu else 256)
        if ctx.rank > 0:
            serve_engine(
                ctx.rank - 1,
                ctx.world_size - 1,
                ctx.backend,
                ctx.device,
                preset="tiny",
                seed=SEED_A,
                dtype=DTYPE,
                timeout_s=args.timeout,
                quiet=True,
            )
            return
        client = engine_client(args.timeout)
        try:
            run(client, ctx, args, models, functions)
        finally:
            client.shutdown()


def run(client, ctx, args, models, functions):
    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "CPU"
    print0(
        f"trainer: rank 0 on {ctx.device}; engine: TP={client.tp_size} on the other ranks "
        f"({device_name}); backend {ctx.backend}"
    )
    group = create_update_group(
        client, "sweep", ctx.backend, ctx.device, warmup=True, timeout_s=args.timeout
    )
    points = sweep(client, group, args.sweep_mib)
    big = [(size, t) for size, t in points if size >= 64 << 20] or points  # bandwidth, not latency
    best_gbs = max(size / t for size, t in big) / 1e9
    rows = []
    for model in models:
        rows += benchmark_model(client, ctx, args, model, best_gbs, functions)
    text = table(rows, ctx.backend, device_name, points)
    print0(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"09_weight_update_{ctx.backend}"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(
        json.dumps(
            {
                "backend": ctx.backend,
                "device": device_name,
                "sweep": points,
                "best_gbs": best_gbs,
                "rows": rows,
            },
            indent=1,
        )
    )
    plot(rows, stem.with_suffix(".png"), f"weight update, {ctx.backend} on {device_name}")
    print0(f"wrote {stem}.md, .json, .png")


if __name__ == "__main__":
    main()
