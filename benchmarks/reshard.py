"""Lesson 10's three ways to move a resharded update, side by side, against a same-run p2p baseline.

    torchrun --nproc-per-node 6 benchmarks/reshard.py            # trainer TP2 x PP2 + engine TP2
    torchrun --nproc-per-node 8 benchmarks/reshard.py --trainer 2,1,2 --engine 4
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 6 benchmarks/reshard.py --backend nccl

One world: trainer ranks first (Megatron layout, float32), engine ranks after (vLLM layout,
bf16). For each path (gather to trainer rank 0 then push; direct, every trainer rank to the
engine ranks it feeds; ChatLearn's two-stage, one engine rank per replica receiving and
forwarding) it runs one update to warm up, then --repeats verified updates (checksums,
coverage, vote, commit; the buffers are kept from one to the next; the engine starts from another
model, its staging is NaN before each update and, after it, every engine tensor must equal one
process's layout of the trainer's model, bit for bit) and reports the median
time of the move itself (every rank starts after a barrier; the slowest rank's time), bytes
out of the busiest trainer rank, bytes into each engine rank, the most extra memory any rank
allocated for the move, the busiest link's GB/s (the most bytes one rank sent or received,
over the time) as a share of one p2p send of as many bytes from trainer rank 0 to the first
engine rank (the baseline: the median of as many sends), and every engine rank's bytes
together over the time (on a few CPU cores, all the links share the cores' memory copies).
Target: the direct path at >= 80% of the baseline. Writes 10_reshard_<backend>.md and .json
to --out (out/).
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from course.ranks import AT_LEAST_2, parser, print0, setup, usage_error, whole_number
from weight_sync import reshard as rs
from weight_sync.megatron import hf_to_megatron, trainer_rank
from weight_sync.model import PRESETS, make_weights
from weight_sync.vllm_layout import hf_to_vllm

DTYPE = torch.bfloat16  # the engine's
TARGET = 0.80  # the direct path's busiest sender, as a share of the baseline's GB/s


def sizes(what, least, most):
    """A flag's comma-separated sizes, each 1 or more: a type for argparse, so a bad value is one
    line and exit code 2 (on every rank under torchrun), not a traceback from deep in a rank."""

    def parse(text):
        try:
            numbers = [int(x) for x in text.split(",")]
        except ValueError:
            numbers = []
        if not least <= len(numbers) <= most or min(numbers) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: give {what}, whole numbers of 1 or more")
        return numbers

    return parse


def check_live(engine, expected, path, rank):
    """After an update: every engine tensor bit for bit what one process lays out from the
    trainer's model (hf_to_vllm). Checksums and coverage prove the bytes arrived and each element
    was written once; only this proves each landed in the right place and became live."""
    for name, want in expected.items():
        have = engine.live[name]
        if not torch.equal(have, want):
            at = tuple((have != want).nonzero()[0].tolist())  # NaN: never written
            raise RuntimeError(f"{path}: after an update, engine rank {rank}'s {name} differs "
                               f"from one process's layout at {at}: {have[at].item()} here, "
                               f"{want[at].item()} expected")  # fmt: skip


def main():
    p = parser(__doc__)
    p.add_argument("--trainer", type=sizes("tp,pp,dp", 3, 3), default="2,2,1",
                   help="tp,pp,dp (2,2,1)")  # fmt: skip
    p.add_argument("--engine", type=sizes("tp[,replicas]", 1, 2), default="2",
                   help="tp[,replicas] (2)")  # fmt: skip
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model (small)")
    p.add_argument("--repeats", type=whole_number(1), default=5, help="updates per path (5)")
    args = p.parse_args()
    with setup(args, AT_LEAST_2) as ctx:
        tp, pp, dp = args.trainer
        engine_tp, replicas = (args.engine + [1])[:2]
        world, shape = rs.World(tp, pp, dp, engine_tp, replicas), PRESETS[args.preset]
        if world.size != ctx.world_size:
            usage_error(f"--trainer {tp},{pp},{dp} --engine {engine_tp},{replicas} needs "
                        f"{world.size} ranks: torchrun --nproc-per-node {world.size} "
                        "benchmarks/reshard.py")  # fmt: skip
        destinations = rs.engine_spans(shape, world)
        plan = rs.plan_transfers(rs.trainer_spans(shape, world), destinations)
        group, tp_rank = rs.engine_world(world, ctx.device)
        engine = weights = None
        hf = make_weights(shape, 1, "cpu")  # the trainer's model
        if world.is_trainer(ctx.rank):
            t = trainer_rank(ctx.rank, tp, pp, dp)
            weights = hf_to_megatron(hf, shape, t.tp_rank, tp, t.pp_rank, pp)
            weights = {n: w.to(ctx.device) for n, w in weights.items()}
        else:
            expected = hf_to_vllm(hf, shape, tp_rank, engine_tp)  # one process's layout of it
            expected = {n: w.to(ctx.device, DTYPE) for n, w in expected.items()}
            # the engine starts from another model: an update that never becomes live shows
            other = hf_to_vllm(make_weights(shape, 2, "cpu"), shape, tp_rank, engine_tp)
            live = {n: w.to(ctx.device, DTYPE) for n, w in other.items()}
            engine = rs.Engine(shape, tp_rank, engine_tp, live, group)
        del hf
        model_bytes = sum(rs.sent_by(plan, shape, DTYPE.itemsize).values())
        label = (f"{ctx.backend}, {args.preset}, trainer TP{tp} x PP{pp} x DP{dp}, "
                 f"engine TP{engine_tp} x {replicas}")  # fmt: skip
        print0(f"{label}: {model_bytes / 1e6:.1f} MB into the engine per update")
        rows = []
        for path in rs.PATHS:
            runs = []
            for _ in range(args.repeats + 1):
                if engine is not None:  # untimed: an element that no update writes stays NaN
                    for w in engine.staging.values():
                        w.fill_(float("nan"))
                result = rs.update(path, plan, world, ctx.rank, shape, weights, DTYPE,
                                   ctx.device, engine)  # fmt: skip
                if not result.ok:
                    raise RuntimeError(f"{path}: rank {ctx.rank}: the update was refused: "
                                       f"{result.why}")  # fmt: skip
                if engine is not None:
                    check_live(engine, expected, path, ctx.rank)
                runs.append(rs.slowest(result.moved, ctx.device))
            seconds = statistics.median(r["seconds"] for r in runs[1:])  # the first: warm-up
            stats = runs[-1]
            busiest = max(max(stats["sent"]), max(stats["received"]))  # the busiest link's
            rows.append(dict(path=path, seconds=seconds, busiest=busiest,
                             trainer_out=max(stats["sent"][: world.trainers]),
                             engine_in=stats["received"][world.trainers :],
                             extra=max(stats["extra"])))  # fmt: skip
        direct = next(r for r in rows if r["path"] == "direct")
        baseline = rs.link_baseline(world, direct["busiest"], ctx.device, args.repeats)
        base_gbs = direct["busiest"] / baseline / 1e9
        lines = [f"same-run baseline: one p2p send trainer rank 0 -> engine rank {world.trainers}: "
                 f"{baseline * 1e3:.1f} ms = {base_gbs:.2f} GB/s", "",
                 "| path | ms (median) | out of busiest trainer rank | busiest rank in or out | "
                 "into each engine rank | peak extra memory | busiest link GB/s | of baseline | "
                 "all links GB/s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            gbs = r["busiest"] / r["seconds"] / 1e9
            r["gbs"], r["of_baseline"] = gbs, gbs / base_gbs
            into = ", ".join(f"{b / 1e6:.1f}" for b in r["engine_in"])
            lines.append(f"| {r['path']} | {r['seconds'] * 1e3:.1f} | "
                         f"{r['trainer_out'] / 1e6:.1f} MB | {r['busiest'] / 1e6:.1f} MB | "
                         f"{into} MB | {r['extra'] / 1e6:.1f} MB | {gbs:.2f} | "
                         f"{gbs / base_gbs:.0%} | "
                         f"{sum(r['engine_in']) / r['seconds'] / 1e9:.2f} |")  # fmt: skip
        met = "met" if direct["of_baseline"] >= TARGET else "NOT met"
        lines += ["", f"target: direct path >= {TARGET:.0%} of the baseline's GB/s: {met} "
                  f"({direct['of_baseline']:.0%})"]  # fmt: skip
        print0("\n".join(lines))
        print0(
            "checked: every update committed on every engine rank (checksums, coverage, "
            "vote); after each, every engine tensor equals one process's layout, bit for bit"
        )
        if ctx.rank == 0:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            table = label + "\n\n" + "\n".join(lines) + "\n"
            (out / f"10_reshard_{ctx.backend}.md").write_text(table)
            meta = dict(label=label, baseline_s=baseline, baseline_gbs=base_gbs, rows=rows)
            (out / f"10_reshard_{ctx.backend}.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
