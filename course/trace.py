"""See what the ranks did: record every rank with torch.profiler, merge the ranks into one timeline.

    torchrun --nproc-per-node 4 lessons/03_collectives.py --trace out/trace03
    python -m course.trace out/trace03 --window 120:180   # merge again, zoomed to 120-180 ms

`--trace DIR` (any lesson that uses course.ranks.setup) runs the lesson's `with` block under
torch.profiler on every rank: CPU activity on gloo, CPU and CUDA on NCCL. Nothing is patched:
the collectives appear as the backends report them to the profiler, gloo as `gloo:all_reduce`
ranges with the tensor's shape and dtype, NCCL as its GPU kernels and `record_param_comms`
events (op, element count, dtype, peer). When the block ends, each rank writes its full trace,
DIR/rank{N}.json, keeps only the communication, the annotations and the busy spans, and
sends that to rank 0 through torchrun's store (no collective: whatever the lesson did to
the default group, the merge works). Rank 0 writes
    DIR/trace.json     one Chrome/Perfetto trace, a process per rank (https://ui.perfetto.dev)
    DIR/timeline.png   a lane per rank: a box per collective or p2p op labelled with the op and
                       this rank's bytes, a line from each send to the recv that took it
Clocks: the time axis starts when the ranks leave a barrier at the start of the recording.
Ranks on one host read one clock, so their timestamps are used as they are; a rank on another
host is shifted so that its exit from that barrier lines up with rank 0's (ranks leave a
barrier within about one network latency of each other).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from course import watch

SYNC = "trace: clock sync"  # the annotation around the barrier that starts every recording
# Bytes per element, by the dtype names gloo ("float", "c10::BFloat16") and NCCL ("BFloat16") use.
ITEMSIZE = {
    "float": 4,
    "double": 8,
    "half": 2,
    "bfloat16": 2,
    "long": 8,
    "longint": 8,
    "int": 4,
    "short": 2,
    "shortint": 2,
    "char": 1,
    "signedchar": 1,
    "byte": 1,
    "unsignedchar": 1,
    "bool": 1,
    "float8e4m3fn": 1,
    "float8e5m2": 1,
}
# Canonical op names, keyed by the name with everything but letters dropped (AllReduce, allreduce_).
OPS = {
    "allreduce": "all_reduce",
    "allgather": "all_gather",
    "reducescatter": "reduce_scatter",
    "alltoall": "all_to_all",
    "recvanysource": "recv",
    "sendrecv": "send_recv",
    "broadcast": "broadcast",
    "reduce": "reduce",
    "gather": "gather",
    "scatter": "scatter",
    "barrier": "barrier",
    "send": "send",
    "recv": "recv",
}
COLORS = {
    "all_reduce": "#4c78a8",
    "broadcast": "#f58518",
    "all_gather": "#54a24b",
    "reduce_scatter": "#b279a2",
    "all_to_all": "#9d755d",
    "send": "#e45756",
    "recv": "#ff9da6",
    "send_recv": "#e45756",
    "barrier": "#bab0ac",
    "gather": "#eeca3b",
    "scatter": "#72b7b2",
    "reduce": "#79706e",
}
BUSY = "busy: CPU ops (gloo) or GPU kernels (NCCL)"  # the timeline's legend for the grey spans
NOTE = "record_function annotation"
MERGE_TIMEOUT_S = 300  # rank 0 draws the timeline while the others wait (seconds under load)


@contextlib.contextmanager
def recording(folder: str | Path | None) -> Iterator[None]:
    """Profile this rank for the length of a `with` block; rank 0 then merges all ranks.
    `folder` None: do nothing. Needs the process group, and every rank must enter it."""
    if not folder:
        yield
        return
    folder, rank = Path(folder), dist.get_rank()
    folder.mkdir(parents=True, exist_ok=True)
    nccl = dist.get_backend() == "nccl"
    if not nccl:  # torch 2.13's profiler prints USDT lines on CPU; KINETO_LOG_LEVEL=0 shows them
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if nccl:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities, record_shapes=True)  # shapes: bytes
    profiler.start()
    try:
        with torch.profiler.record_function(SYNC):  # time 0 of the timeline: all ranks leave it
            dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)
        yield
    finally:  # also when the block failed: the rank's own trace is often what explains why
        if nccl:
            torch.cuda.synchronize()
        profiler.stop()
        profiler.export_chrome_trace(str(folder / f"rank{rank}.json"))
    # The groups the lesson made while recording (the trace lists those that existed at start).
    # A private helper, the one the profiler itself uses; without it p2p peers are guessed.
    groups = [g["ranks"] for g in getattr(dist.distributed_c10d, "_get_all_pg_configs", list)()]
    mine = digest(json.loads((folder / f"rank{rank}.json").read_text()), groups or None)
    # Through torchrun's store, not a collective: a lesson may have used the default group in a
    # way that leaves the ranks' sequence numbers apart (p2p between two of them: lesson 07), and
    # --debug's checks then refuse any collective on it.
    store = watch.run_store(MERGE_TIMEOUT_S)
    store.set(f"trace/{rank}", json.dumps(mine))
    if rank == 0:
        keys = [f"trace/{r}" for r in range(dist.get_world_size())]
        store.wait(keys)
        digests = [json.loads(store.get(key)) for key in keys]
        (folder / "digests.json").write_text(json.dumps(digests))  # for re-merging: __main__
        print(f"[rank 0] trace: {merge(digests, folder)}", flush=True)
        store.set("trace/merged", "1")
    # Every rank leaves once rank 0 has merged. Once torch.profiler has run, a gloo group
    # outlives destroy_process_group (torch 2.13: its worker threads are still there after it;
    # without a profiler they are gone), so they run into interpreter exit; a worker still
    # releasing a collective's tensors then needs the GIL while Python shuts down, and the rank
    # dies with "terminate called without an active exception" (SIGABRT) after its work is done
    # (gdb: pt_gloo_runloop in ~AsyncGatherWork, about 1 run in 12). Waiting gives them time.
    store.wait(["trace/merged"])


def digest(trace: dict, groups: list[list[int]] | None = None) -> dict:
    """One rank's trace -> what the merge needs: its communication ops, annotations and busy
    spans, with times in microseconds on the host's clock."""
    base = trace.get("baseTimeNanoseconds", 0) / 1000  # kineto's ts are relative to this
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    for e in events:
        e["start"], e["end"] = base + e["ts"], base + e["ts"] + e["dur"]
    info = trace.get("distributedInfo", {})
    sync = [e for e in events if e["name"] == SYNC and e.get("cat") == "user_annotation"]
    main_tid = sync[0]["tid"] if sync else None
    calls = [e for e in events if e["name"] in ("c10d::send", "c10d::recv_")]  # gloo p2p peers
    comms = [e for e in events if e.get("name") == "record_param_comms"]
    params = {e["args"].get("External id"): e["args"] for e in comms}  # NCCL metadata, by op id
    kernels = [e for e in events if e.get("cat") == "kernel"]
    ops = [
        _op(e, e["args"], e["name"][5:], calls) for e in events if e["name"].startswith("gloo:")
    ]  # gloo: the work, as gloo did it
    nccl = [e for e in kernels if "nccl" in e["name"].lower()]  # NCCL: the kernels, on the GPU
    ops += [
        _op(e, {**params.get(e["args"].get("External id"), {}), **e["args"]}, e["name"])
        for e in nccl
    ]
    if not ops:  # no backend ranges and no kernels: fall back on the CPU-side metadata
        ops = [_op(e, e["args"], "") for e in comms if e["args"].get("Collective name") != "wait"]
    busy = [e for e in kernels if e not in nccl] or [
        e
        for e in events
        if e.get("cat") == "cpu_op"
        and e["tid"] == main_tid
        and not e["name"].startswith(("c10d::", "record_param_comms"))
    ]
    notes = [
        e
        for e in events
        if e.get("cat") == "user_annotation"
        and e["name"] != SYNC
        and not e["name"].startswith(("gloo:", "nccl:", "##"))
    ]
    start = sync[0]["end"] if sync else min(e["start"] for e in events)
    return {
        "rank": info.get("rank", 0),
        "backend": info.get("backend", "?"),
        "groups": groups or [g["ranks"] for g in info.get("pg_config", []) if "ranks" in g],
        "host": trace.get("host_name") or socket.gethostname(),
        "sync": start,
        "ops": [op for op in ops if op and op["end"] > start],  # not the start barrier's
        "notes": [(e["name"], e["start"], e["end"], e["tid"]) for e in notes],
        "busy": _union((e["start"], e["end"]) for e in busy),
    }


def _op(event: dict, args: dict, name: str, calls: Iterable[dict] = ()) -> dict | None:
    """A communication op from a profiler event: name, bytes of this rank's input, peer."""
    name = args.get("Collective name") or re.sub(r"^nccl(Dev)?Kernel_([A-Za-z]+).*", r"\2", name)
    op = OPS.get(
        re.sub(r"[^a-z]", "", name.lower())
        .replace("base", "")
        .replace("coalesced", "")
        .replace("intotensor", "")
        .replace("tensor", "")
    )
    if op is None:
        return None
    if "In msg nelems" in args:  # NCCL's metadata: element count and dtype name
        nbytes = int(args["In msg nelems"]) * _itemsize(str(args.get("dtype", "")))
    else:  # gloo's range carries the tensor's shape and dtype (record_shapes=True)
        dims, types = args.get("Input Dims", []), args.get("Input type", [])
        nbytes = sum(_numel(d) * _itemsize(t) for d, t in zip(dims, types) if isinstance(t, str))
    peer = args.get("Dst Rank" if op == "send" else "Src Rank") if op in ("send", "recv") else None
    group_peer = None  # NCCL's metadata names the peer by its global rank; gloo does not
    if peer is None and op in ("send", "recv"):
        # gloo's p2p range starts inside the c10d op that names the peer, as its rank in the
        # group the op ran on (which the trace does not say): resolve_peers() finds the rank.
        call = [
            e
            for e in calls
            if e["tid"] == event["tid"] and e["start"] <= event["start"] <= e["end"]
        ]
        with contextlib.suppress(IndexError, KeyError, ValueError):
            group_peer = int(call[0]["args"]["Concrete Inputs"][2])
    return {
        "op": op,
        "bytes": nbytes or None,
        "start": event["start"],
        "end": event["end"],
        "peer": None if peer is None else int(peer),
        "group_peer": group_peer,
        "tid": event["tid"],
        "args": {k: v for k, v in args.items() if k != "External id"},
    }


def _itemsize(dtype: str) -> int:
    """Bytes per element of a dtype named as gloo ("c10::BFloat16") or NCCL ("BFloat16") does."""
    return ITEMSIZE.get(re.sub(r"c10::|[^a-z0-9]", "", dtype.lower()), 0)


def _numel(dims: list) -> int:
    if dims and isinstance(dims[0], list):  # a list of tensors
        return sum(_numel(d) for d in dims)
    n = 1
    for d in dims:
        n *= d
    return n


def _union(spans: Iterable[tuple[float, float]], gap: float = 20.0) -> list[list[float]]:
    """Overlapping or nearly touching (gap, us) spans merged: when this rank was busy."""
    merged = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1] + gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def resolve_peers(digests: list[dict]) -> None:
    """gloo names a p2p peer by its rank in the op's group, and the trace does not say which
    group. Candidates: that position in each group this rank belongs to (torch lists them in
    the trace). With several, pick the rank whose own p2p ops mirror these (a recv from this
    rank for a send, same bytes): the other end of the conversation."""
    by_rank = {d["rank"]: d for d in digests}

    def candidates(rank, group_peer):
        groups = by_rank[rank]["groups"] or [list(by_rank)]
        return {g[group_peer] for g in groups if rank in g and group_peer < len(g)} - {rank}

    for d in digests:
        for op in d["ops"]:
            if op["peer"] is None and op["group_peer"] is not None:
                found = candidates(d["rank"], op["group_peer"])
                if len(found) > 1:
                    mirror = "recv" if op["op"] == "send" else "send"
                    found = [
                        max(
                            found,
                            key=lambda b: sum(
                                o["op"] == mirror
                                and o["bytes"] == op["bytes"]
                                and o["group_peer"] is not None
                                and d["rank"] in candidates(b, o["group_peer"])
                                for o in by_rank[b]["ops"]
                            ),
                        )
                    ]
                op["peer"] = next(iter(found), None)


def matched_pairs(digests: list[dict]) -> list[tuple[int, dict, int, dict]]:
    """(sender, send op, receiver, recv op): the k-th send from a to b took the k-th recv on b
    from a (messages between two ranks arrive in order)."""
    sends, recvs = {}, {}
    for d in digests:
        for op in sorted(d["ops"], key=lambda o: o["start"]):
            if op["peer"] is not None and op["peer"] != d["rank"] and op["op"] in ("send", "recv"):
                key = (d["rank"], op["peer"]) if op["op"] == "send" else (op["peer"], d["rank"])
                (sends if op["op"] == "send" else recvs).setdefault(key, []).append(op)
    return [(a, s, b, r) for (a, b), ss in sends.items() for s, r in zip(ss, recvs.get((a, b), []))]


def align(digests: list[dict]) -> list[dict]:
    """A copy of the digests in rank order, times in ms since rank 0 left the start barrier.
    Same host as rank 0: one clock, used as it is. Another host: shifted so that its exit from
    that barrier lines up with rank 0's."""
    digests = sorted(json.loads(json.dumps(digests)), key=lambda d: d["rank"])  # a deep copy
    t0 = digests[0]["sync"]
    for d in digests:
        shift = 0.0 if d["host"] == digests[0]["host"] else t0 - d["sync"]
        d["shift_us"] = shift
        for op in d["ops"]:
            op["t"] = ((op["start"] + shift - t0) / 1000, (op["end"] + shift - t0) / 1000)
        d["notes"] = [
            (n, (s + shift - t0) / 1000, (e + shift - t0) / 1000, tid)
            for n, s, e, tid in d["notes"]
        ]
        d["busy"] = [((s + shift - t0) / 1000, (e + shift - t0) / 1000) for s, e in d["busy"]]
    resolve_peers(digests)
    return digests


def merge(
    digests: list[dict],
    folder: str | Path,
    window: tuple[float, float] | None = None,
    png: str | Path | None = None,
    title: str | None = None,
) -> str:
    """Write folder/trace.json and the timeline PNG (folder/timeline.png unless `png`) from
    every rank's digest; `window`: (start, end) in ms to draw. Returns a one-line summary."""
    digests, folder = align(digests), Path(folder)
    pairs = matched_pairs(digests)
    (folder / "trace.json").write_text(json.dumps(_chrome(digests, pairs)))
    png = Path(png) if png else folder / "timeline.png"
    draw(
        digests,
        pairs,
        png,
        title or f"{folder.name}: {len(digests)} ranks, {digests[0]['backend']}",
        window,
    )
    n_ops = sum(len(d["ops"]) for d in digests)
    return (
        f"{len(digests)} ranks, {n_ops} communication ops, {len(pairs)} send->recv pairs; "
        f"wrote {folder / 'trace.json'} (open it in https://ui.perfetto.dev) and {png}"
    )


def _chrome(digests: list[dict], pairs: list[tuple[int, dict, int, dict]]) -> dict:
    """The merged Chrome trace: a process per rank; times in us since the start barrier."""
    out = []
    for d in digests:
        r = d["rank"]
        out.append(
            {
                "ph": "M",
                "name": "process_name",
                "pid": r,
                "args": {"name": f"rank {r} ({d['backend']}, {d['host']})"},
            }
        )
        out.append({"ph": "M", "name": "process_sort_index", "pid": r, "args": {"sort_index": r}})
        out.append(
            {
                "ph": "M",
                "name": "thread_name",
                "pid": r,
                "tid": 0,
                "args": {"name": "busy (CPU ops or GPU kernels, merged)"},
            }
        )
        for s, e in d["busy"]:
            out.append(
                {
                    "ph": "X",
                    "name": "busy",
                    "pid": r,
                    "tid": 0,
                    "ts": s * 1000,
                    "dur": (e - s) * 1000,
                }
            )
        for name, s, e, tid in d["notes"]:
            out.append(
                {
                    "ph": "X",
                    "cat": "annotation",
                    "name": name,
                    "pid": r,
                    "tid": tid,
                    "ts": s * 1000,
                    "dur": (e - s) * 1000,
                }
            )
        for op in d["ops"]:
            out.append(
                {
                    "ph": "X",
                    "cat": "communication",
                    "name": _label(op),
                    "pid": r,
                    "tid": op["tid"],
                    "ts": op["t"][0] * 1000,
                    "dur": (op["t"][1] - op["t"][0]) * 1000,
                    "args": op["args"],
                }
            )
    for i, (a, send, b, recv) in enumerate(pairs):  # flow arrows from each send to its recv
        out.append(
            {
                "ph": "s",
                "cat": "p2p",
                "name": "send->recv",
                "id": i,
                "pid": a,
                "tid": send["tid"],
                "ts": sum(send["t"]) * 500,
            }
        )  # mid-slice: binds to it
        out.append(
            {
                "ph": "f",
                "bp": "e",
                "cat": "p2p",
                "name": "send->recv",
                "id": i,
                "pid": b,
                "tid": recv["tid"],
                "ts": sum(recv["t"]) * 500,
            }
        )
    return {
        "traceEvents": out,
        "displayTimeUnit": "ms",
        "otherData": {
            "clock": "us since the ranks left the barrier that starts the "
            "recording; ranks on another host than rank 0 shifted by: "
            + json.dumps({d["rank"]: d["shift_us"] for d in digests})
        },
    }


def _size(nbytes):
    if not nbytes:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.3g} {unit}"
        nbytes /= 1024


def _label(op):
    arrow = {"send": f" ->{op['peer']}", "recv": f" <-{op['peer']}"}.get(op["op"], "")
    return f"{op['op']}{arrow if op['peer'] is not None else ''} {_size(op['bytes'])}".strip()


def _lanes(ops):
    """Overlapping ops (async work, several streams) go to sub-lanes: index per op."""
    ends, lane_of = [], []
    for op in ops:
        free = next((i for i, end in enumerate(ends) if end <= op["t"][0]), len(ends))
        ends[free : free + 1] = [op["t"][1]]
        lane_of.append(free)
    return lane_of, max(len(ends), 1)


def draw(
    digests: list[dict],
    pairs: list[tuple],
    path: str | Path,
    title: str,
    window: tuple[float, float] | None = None,
) -> None:
    """The swimlane PNG, drawn by course/plots.py: per rank, annotations on top, communication
    boxes (overlapping ones in sub-lanes), busy spans below; an arrow from each send to its recv,
    dashed red where the two disagree on the bytes."""
    from course.plots import timeline

    ops = [op for d in digests for op in d["ops"]]
    ends = [op["t"][1] for op in ops] + [e for d in digests for _, e, *_ in d["busy"] + d["notes"]]
    lo, hi = window or (0.0, max([1.0, *ends]))
    thin = (hi - lo) / 2000  # the narrowest box: an op too short to see still shows
    lanes, box = {}, {}  # rank -> its boxes; id(op) -> the op's box, for the arrows
    for d in digests:
        boxes = [
            dict(start=s, end=e, color="#c8c8c8", kind=BUSY, y=0.30, h=0.12) for s, e in d["busy"]
        ]
        boxes += [
            dict(start=s, end=e, color="#555555", kind=NOTE, y=-0.44, h=0.10, text=name, above=True)
            for name, s, e, _ in d["notes"]
        ]
        mine = sorted(d["ops"], key=lambda o: o["t"][0])
        lane_of, n = _lanes(mine)
        for op, lane in zip(mine, lane_of):
            (s, e), label = op["t"], _label(op) if n <= 3 else None  # 4+ sub-lanes: too thin
            color = COLORS.get(op["op"], "#999999")
            box[id(op)] = dict(
                start=s,
                end=max(e, s + thin),
                color=color,
                kind=op["op"],
                y=-0.3 + lane * 0.6 / n,
                h=0.6 / n,
                alpha=0.9,
                edge="black",
                text=label,
            )
            boxes.append(box[id(op)])
        lanes[f"rank {d['rank']}"] = boxes
    arrows = [(box[id(s)], box[id(r)], s["bytes"] == r["bytes"]) for _, s, _, r in pairs]
    xlabel = "ms since the ranks left the barrier that starts the recording"
    legend = sorted({op["op"] for op in ops}) + [BUSY, NOTE]
    timeline(
        {"": lanes},
        path,
        title,
        xlabel,
        arrows=arrows,
        window=(lo, hi),
        legend=legend,
        width=13,
        lane=0.9,
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folder", help="a --trace folder holding rank0.json, rank1.json, ...")
    p.add_argument("--window", help="START:END in ms: draw only that part of the timeline")
    p.add_argument("--png", help="where to write the picture (FOLDER/timeline.png)")
    p.add_argument("--title", help="the picture's title")
    args = p.parse_args()
    folder = Path(args.folder)
    files = sorted(folder.glob("rank*.json"), key=lambda f: int(f.stem[4:]))
    if (folder / "digests.json").is_file():  # what the run's rank 0 merged
        digests = json.loads((folder / "digests.json").read_text())
    elif files:  # a run that failed before merging: each rank still wrote its own trace
        digests = [digest(json.loads(f.read_text())) for f in files]
    else:
        p.error(f"no rank*.json in {folder}: run a lesson with --trace {folder} first")
    window = tuple(float(x) for x in args.window.split(":")) if args.window else None
    print(merge(digests, folder, window, args.png, args.title))


if __name__ == "__main__":
    main()
