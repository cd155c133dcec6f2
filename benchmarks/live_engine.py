"""What does updating an engine that serves cost: the update, and the requests in flight?

    torchrun --nproc-per-node 3 benchmarks/live_engine.py     # CPU/gloo, "small", engine TP=2
    torchrun --nproc-per-node 3 benchmarks/live_engine.py --out docs/figures   # the docs' table
    torchrun --nproc-per-node 2 benchmarks/live_engine.py     # one GPU: engine TP=1 on it
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 3 benchmarks/live_engine.py --backend nccl
        # a GPU per rank: trainer on GPU 0, engine TP=2 on GPUs 1-2, every group NCCL

Rank 0 is the trainer and the client (a thread sending a request every --every-ms), ranks 1..
the engine (weight_sync/serve.py). First an update with no traffic (the baseline, per waiting
style); then, for each policy (drain, abort, keep) and waiting style (the seed's polling with
NAP_S naps, event-driven), the same run: traffic, --updates updates --gap-s apart, traffic on.
Per row: the update end to end on the trainer (mean), what it adds over no traffic, what the
commit waited (for the step in flight, or the whole batch under drain) and, of that, the
handoff: from the last step's end to the commit holding the lock, the waiting style's own cost.
Latency p50/p99 per token (the gap before each token) and per request (sent to answered),
before the first update, during one (overlapping an update's window) and after. Ratios: the
event-driven handoff against the 1 ms target, polling's against event-driven's. Writes
12_live_engine_<backend>.md (the table), .json (every number) and 12_live_engine_timeline.png
(the requests around the first update, one panel per policy, event-driven) to --out (out/).

On one GPU (torchrun of 2 ranks; NCCL refuses two ranks on one GPU): the engine's weights,
KV caches and steps are on the GPU (its TP group has one rank, so no collective), the trainer on
CPU; the update crosses over gloo, whose broadcast takes CUDA tensors.
"""

import json
import os
import statistics
import time
from pathlib import Path

import torch

import weight_sync as ws
from course.ranks import AT_LEAST_2, parser, print0, setup, whole_number
from weight_sync import serve, traffic

SEEDS = (2, 3)  # the trainer's models, pushed in turn; the engine starts with seed 1
DTYPES = ("float32", "bfloat16", "float16", "float64")  # the engine's weights: floating point


def where(ctx, args):
    """(backend of every group, the engine's device, the trainer's device)."""
    if ctx.backend == "nccl":  # a GPU per rank
        return "nccl", ctx.device, ctx.device
    if args.backend != "gloo" and torch.cuda.is_available() and ctx.world_size == 2:
        local = int(os.environ.get("LOCAL_RANK", 0))
        return "gloo", torch.device("cuda", local % torch.cuda.device_count()), "cpu"
    return "gloo", torch.device("cpu"), torch.device("cpu")


def ms(values, q):
    """The q-quantile of `values` (seconds) in ms; None if there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def phases(load, windows):
    """Per-token gaps and per-request latencies, split by phase: before the first update,
    during one (overlapping a window), after."""
    first = windows[0][0]
    tokens = {"before": [], "during": [], "after": []}
    requests = {"before": [], "during": [], "after": []}

    def phase(lo, hi):
        if any(lo < end and hi > start for start, end in windows):
            return "during"
        return "before" if hi < first else "after"

    for _, reply, sent, answered in load.done:
        before = sent
        for at in reply["times"]:
            tokens[phase(before, at)].append(at - before)
            before = at
        requests[phase(sent, answered)].append(answered - sent)
    return tokens, requests


def run_config(client, updater, models, policy, waiting, args):
    client.call("configure_serving", policy=policy, waiting=waiting)
    client.call("serving_stats", clear=True)
    load = traffic.Load(client.address, args.timeout, args.every_ms / 1e3, args.max_new, 8, 32000)
    load.start()
    windows, answers, totals = [], [], []
    for k in range(args.updates):
        time.sleep(args.gap_s)
        updater.weights = models[k % 2]
        start = time.monotonic()
        answers.append(updater.update()[0])
        windows.append((start, time.monotonic()))
        totals.append(windows[-1][1] - start)
    time.sleep(args.gap_s)
    load.finish()
    stats = client.call("serving_stats", clear=True)[0]
    mixed = sum(len(set(r["versions"])) > 1 for _, r, _, _ in load.done)
    down = sum(r["versions"] != sorted(r["versions"]) for _, r, _, _ in load.done)
    tokens, requests = phases(load, windows)
    row = {
        "policy": policy,
        "waiting": waiting,
        "update_ms": statistics.mean(totals) * 1e3,
        "waited_ms": statistics.mean(a["drained_s"] for a in answers) * 1e3,
        "handoff_ms": statistics.mean(a["handoff_s"] for a in answers) * 1e3,
        "handoff_max_ms": max(a["handoff_s"] for a in answers) * 1e3,
        "replies": len(load.done),
        "retried": len(load.aborted),
        "mixed": mixed,
        "versions_down": down,
        "served_twice": len(stats["twice"]),
        "errors": load.errors,
    }
    for name, values in (("token", tokens), ("request", requests)):
        for ph, xs in values.items():
            row[f"{name}_{ph}_p50_ms"], row[f"{name}_{ph}_p99_ms"] = ms(xs, 0.5), ms(xs, 0.99)
    return row, (load, stats)


def cell(row, name, phase):
    p50, p99 = row[f"{name}_{phase}_p50_ms"], row[f"{name}_{phase}_p99_ms"]
    return "-" if p50 is None else f"{p50:.0f} / {p99:.0f}"


def wrong_rows(rows):
    """The rows whose replies broke a policy's promise: a version going down, a request served
    twice, an error, or (under drain and abort) one reply mixing versions."""
    bad = [r for r in rows if r["versions_down"] or r["served_twice"] or r["errors"]]
    return bad + [r for r in rows if r["policy"] != "keep" and r["mixed"] and r not in bad]


def table(rows, idle, setting):
    lines = [
        f"Live engine, {setting}. Update: end to end on the trainer, mean of the row's updates; "
        f"no traffic: {idle['event']:.1f} ms (event), {idle['polling']:.1f} ms (polling). "
        "Latency p50 / p99 in ms.",
        "",
        "| policy | waiting | update ms | + over no traffic | commit waited ms | handoff ms "
        "| token before | token during | token after | request before | request during "
        "| request after | replies | retried | mixed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        latency = [
            cell(r, n, ph) for n in ("token", "request") for ph in ("before", "during", "after")
        ]
        lines.append(
            f"| {r['policy']} | {r['waiting']} | {r['update_ms']:.1f} "
            f"| {r['update_ms'] - idle[r['waiting']]:+.1f} | {r['waited_ms']:.1f} "
            f"| {r['handoff_ms']:.2f} (max {r['handoff_max_ms']:.2f}) | "
            + " | ".join(latency)
            + f" | {r['replies']} | {r['retried']} | {r['mixed']} |"
        )
    event = [r["handoff_ms"] for r in rows if r["waiting"] == "event"]
    polling = [r["handoff_ms"] for r in rows if r["waiting"] == "polling"]
    worst = max(r["handoff_max_ms"] for r in rows if r["waiting"] == "event")
    lines += [
        "",
        f"Event-driven handoff: mean {statistics.mean(event):.3f} ms, worst {worst:.3f} ms "
        f"(target <= 1 ms: {'met' if worst <= 1 else 'NOT met'}); polling's "
        f"{statistics.mean(polling):.2f} ms, "
        f"{statistics.mean(polling) / statistics.mean(event):.0f}x.",
    ]
    for policy in serve.POLICIES:
        ev, po = (
            next(r for r in rows if r["policy"] == policy and r["waiting"] == w)
            for w in serve.WAITING[::-1]
        )
        lines.append(
            f"{policy}: update polling / event-driven = {po['update_ms'] / ev['update_ms']:.2f}x; "
            f"request p99 during updates polling / event-driven = "
            + (
                f"{po['request_during_p99_ms'] / ev['request_during_p99_ms']:.2f}x"
                if po["request_during_p99_ms"] and ev["request_during_p99_ms"]
                else "-"
            )
        )
    bad = wrong_rows(rows)
    lines.append(
        "Checked: no reply mixes versions under drain and abort, none goes down under keep, none "
        "served twice."
        if not bad
        else f"WRONG: {[(r['policy'], r['waiting']) for r in bad]}"
    )
    return "\n".join(lines)


def main():
    p = parser(__doc__)
    p.add_argument("--preset", default="small", choices=sorted(ws.PRESETS))
    # float32: a CPU step would convert every bf16 weight to float32 first (3x slower here)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="the engine's weights")
    p.add_argument("--every-ms", type=float, default=500.0, help="a request this often")
    p.add_argument("--max-new", type=int, default=8, help="tokens per request")
    p.add_argument(
        "--updates", type=whole_number(1), default=3, help="updates per policy x waiting style"
    )
    p.add_argument("--gap-s", type=float, default=1.5, help="traffic before, between, after")
    args = p.parse_args()
    with setup(args, AT_LEAST_2, trace=args.trace) as ctx:
        backend, engine_device, trainer_device = where(ctx, args)
        if ctx.rank > 0:
            serve.serve_live(
                ctx.rank - 1,
                ctx.world_size - 1,
                backend,
                engine_device,
                preset=args.preset,
                seed=1,
                dtype=args.dtype,
                timeout_s=args.timeout,
                quiet=True,
            )
            return
        client = traffic.LiveClient(ws.engine_client(args.timeout).address, args.timeout)
        try:
            run(client, ctx, args, backend, engine_device, trainer_device)
        finally:
            client.shutdown()


def run(client, ctx, args, backend, engine_device, trainer_device):
    name = torch.cuda.get_device_name(engine_device) if engine_device.type == "cuda" else "CPU"
    setting = (
        f"{args.preset}, {args.dtype}, engine TP={client.tp_size} on {engine_device} ({name}), "
        f"trainer on {trainer_device}, groups {backend}; a request every {args.every_ms:g} ms, "
        f"{args.max_new} new tokens"
    )
    print0(setting)
    shape = ws.PRESETS[args.preset]
    models = [ws.make_weights(shape, seed, trainer_device) for seed in SEEDS]
    group = ws.create_update_group(
        client, "live", backend, trainer_device, warmup=True, timeout_s=args.timeout
    )
    updater = ws.FastUpdater(client, group, models[0], serve.push_update, bucket_bytes=64 << 20)
    updater.prepare()
    idle = {}
    for waiting in serve.WAITING:  # no traffic: nothing to wait for
        client.call("configure_serving", policy="keep", waiting=waiting)
        times = []
        for k in range(3):
            updater.weights = models[k % 2]
            start = time.monotonic()
            updater.update()
            times.append(time.monotonic() - start)
        idle[waiting] = statistics.median(times[1:]) * 1e3  # the first one warms up
    rows, runs = [], {}
    for policy in serve.POLICIES:
        for waiting in serve.WAITING:
            row, run_ = run_config(client, updater, models, policy, waiting, args)
            rows.append(row)
            print0(
                f"{policy:6s} {waiting:8s} update {row['update_ms']:7.1f} ms, commit waited "
                f"{row['waited_ms']:6.1f} ms, handoff {row['handoff_ms']:6.2f} ms, "
                f"{row['replies']} replies"
            )
            if waiting == "event":
                runs[f"{policy}, event-driven"] = run_
    text = table(rows, idle, setting)
    print0(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "gloo" if engine_device.type == "cpu" else "nccl" if backend == "nccl" else "gpu_tp1"
    stem = out / f"12_live_engine_{kind}"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(
        json.dumps({"setting": setting, "idle_ms": idle, "rows": rows}, indent=1)
    )
    picture = out / "12_live_engine_timeline.png"
    title = f"requests around an update ({args.preset}, TP={client.tp_size}, {name})"
    traffic.plot_timeline(runs, picture, title, window=(-1e3 * args.gap_s, 1.5e3 * args.gap_s))
    print0(f"wrote {stem}.md, .json and {picture}")
    if bad := wrong_rows(rows):  # what was measured is written; the run still fails
        print0(
            "error: replies broke their policy's promise (mixed versions, a version going down, "
            f"served twice, or errors) in {[(r['policy'], r['waiting']) for r in bad]}: see the "
            "table's WRONG line"
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main()
