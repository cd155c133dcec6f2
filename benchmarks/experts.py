"""Lesson 13's regroups side by side: a mixture-of-experts update with no regroup, with the
trainer's experts regrouped by all_to_all, and by all_gather, same run, same model.

    torchrun --nproc-per-node 4 benchmarks/experts.py              # trainer DP2 = EP2 + engine TP2
    torchrun --nproc-per-node 8 benchmarks/experts.py --trainer 1,1,4,4 --engine 4
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 8 benchmarks/experts.py --backend nccl \\
        --trainer 1,1,4,4 --engine 4

One world: trainer ranks first (Megatron layout with EP, float32), engine ranks after (vLLM
layout, bf16, experts by --experts-by). For each regroup it runs one round to warm up, then
--repeats rounds of: the regroup (trainer ranks only), then one verified update along lesson
10's direct path (checksums, coverage, vote, commit), and reports the median times (slowest
rank), the bytes the busiest trainer rank sends in the regroup, the most memory a rank
allocated for the regroup and for the update's buffers, and how many engine ranks each trainer
rank sends experts to. The engine starts from another model; before every update, untimed, each
engine rank fills its staging with NaN; after it, every engine tensor must equal one process's
vLLM layout of the model, bit for bit, so an element that an update did not write, or an update
that never became live, shows. Writes 13_experts_<backend>.md, .json and
13_experts_flows.png (who sends how many bytes to whom) to --out (out/).
"""

import argparse
import collections
import json
import statistics
from pathlib import Path

import torch

from course.ranks import AT_LEAST_2, parser, print0, setup, usage_error, whole_number
from weight_sync import regroup as rg
from weight_sync import reshard as rs
from weight_sync.megatron import from_hf
from weight_sync.moe import PRESETS, make_moe_weights
from weight_sync.vllm_layout import hf_to_vllm

DTYPE = torch.bfloat16  # the engine's


def sizes(what, least, most, zero_last=False):
    """A flag's comma-separated sizes, each 1 or more (the last may be 0 with zero_last): a
    type for argparse, so a bad value is one line and exit code 2 (on every rank under
    torchrun), not a traceback from deep in a rank."""

    def parse(text):
        try:
            numbers = [int(x) for x in text.split(",")]
        except ValueError:
            numbers = []
        lowest = [1] * len(numbers)
        if zero_last and len(numbers) == most:
            lowest[-1] = 0
        if not least <= len(numbers) <= most or any(n < m for n, m in zip(numbers, lowest)):
            zero = " (etp may be 0: the trainer's TP)" if zero_last else ""
            raise argparse.ArgumentTypeError(
                f"{text!r}: give {what}, whole numbers of 1 or more{zero}"
            )
        return numbers

    return parse


def flows(shape, world, how, plan, itemsize):
    """{"regroup": {(src, dst): bytes}, "update": {(src, dst): bytes}}: who sends what to whom."""
    out = {"regroup": collections.Counter(), "update": collections.Counter()}
    full = {n: f for n, f, _ in rs.hf_specs(shape)}
    for ts in plan.values():
        for t in ts:
            out["update"][t.src, t.dst] += rs.transfer_numel(t, full) * DTYPE.itemsize
    for rank in range(world.trainers) if how != "none" else ():
        if how == "all_to_all":
            for t in rg.regroup_plan(shape, world, rank).get(rank, []):
                if t.src != rank:
                    out["regroup"][t.src, rank] += rs.transfer_numel(t, full) * itemsize
        else:
            spans = [s for s in rs.trainer_spans(shape, world)[rank] if rg.is_expert(s)]
            mine = sum((s.stop - s.start) * full[s.hf_name][1 - s.dim] for s in spans)
            for peer in rg.expert_group(world, rank, ep_only=True):
                if peer != rank:
                    out["regroup"][rank, peer] += mine * itemsize
    return out


def plot_flows(per_how, world, path):
    """One row per regroup: bytes from each trainer rank to each trainer rank (the regroup) and
    to each engine rank (the update), as a matrix."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 2.6 * len(per_how)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(per_how), 2, squeeze=False)
    engines = list(range(world.trainers, world.size))
    for row, (how, f) in enumerate(per_how.items()):
        for col, (step, dsts) in enumerate((("regroup", range(world.trainers)),
                                            ("update", engines))):  # fmt: skip
            grid = [[f[step].get((s, d), 0) / 1e6 for d in dsts] for s in range(world.trainers)]
            ax = axes[row][col]
            top = max(max(line) for line in grid) or 1.0
            ax.imshow(grid, cmap="Blues", vmin=0, vmax=top * 1.6)  # light enough for the text
            for s, line in enumerate(grid):
                for d, mb in enumerate(line):
                    ax.text(d, s, f"{mb:.1f}" if mb else "", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(dsts)), [str(d) for d in dsts])
            ax.set_yticks(range(world.trainers), [str(s) for s in range(world.trainers)])
            ax.set_title(f"{how}: {step}, MB" + (" (none)" if not f[step] else ""), fontsize=9)
            ax.set_xlabel("to trainer rank" if step == "regroup" else "to engine rank", fontsize=8)
            ax.set_ylabel("from trainer rank", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = parser(__doc__)
    p.add_argument("--trainer", type=sizes("tp,pp,dp[,ep[,etp]]", 3, 5, True),
                   default="1,1,2,2", help="tp,pp,dp[,ep[,etp]] (1,1,2,2)")  # fmt: skip
    p.add_argument("--engine", type=sizes("tp[,replicas]", 1, 2), default="2",
                   help="tp[,replicas] (2)")  # fmt: skip
    p.add_argument("--experts-by", choices=("tp", "ep"), default="tp")
    p.add_argument("--preset", default="small-moe", choices=sorted(PRESETS), help="(small-moe)")
    p.add_argument("--repeats", type=whole_number(1), default=5, help="rounds per regroup (5)")
    args = p.parse_args()
    with setup(args, AT_LEAST_2) as ctx:
        tp, pp, dp, ep, etp = args.trainer + [1, 0][len(args.trainer) - 3 :]
        engine_tp, replicas = (args.engine + [1])[:2]
        world = rs.World(tp, pp, dp, engine_tp, replicas, ep, etp, args.experts_by)
        shape = PRESETS[args.preset]
        if world.size != ctx.world_size:
            usage_error(f"--trainer {','.join(map(str, args.trainer))} --engine "
                        f"{engine_tp},{replicas} needs {world.size} ranks: torchrun "
                        f"--nproc-per-node {world.size} benchmarks/experts.py")  # fmt: skip
        destinations, plans, skipped = rs.engine_spans(shape, world), {}, ""
        for how in ("none", *rg.REGROUPS):
            try:
                sources = rg.sources(shape, world, None if how == "none" else how)
            except rs.PlanError as err:
                skipped = f"{how} not run: {err}"
                continue
            plans[how] = (sources, rs.plan_transfers(sources, destinations))
            rs.check_plan(plans[how][1], destinations, shape)
        group, tp_rank = rs.engine_world(world, ctx.device)
        groups = rg.expert_world(world)
        hf = make_moe_weights(shape, 1)
        engine = weights = None
        if world.is_trainer(ctx.rank):
            held = from_hf(plans["none"][0][ctx.rank], shape, hf)
            weights = {n: w.to(ctx.device) for n, w in held.items()}
        else:
            expected = hf_to_vllm(hf, shape, tp_rank, engine_tp, args.experts_by)
            expected = {n: w.to(ctx.device, DTYPE) for n, w in expected.items()}  # one process's
            # the engine starts from another model: an update that never becomes live shows
            other = hf_to_vllm(make_moe_weights(shape, 2), shape, tp_rank, engine_tp,
                               args.experts_by)  # fmt: skip
            live = {n: w.to(ctx.device, DTYPE) for n, w in other.items()}
            engine = rs.Engine(shape, tp_rank, engine_tp, live, group, args.experts_by)
        expert_bytes = sum(w.numel() for n, w in hf.items() if ".mlp.experts." in n) * 4
        label = (f"{ctx.backend}, {args.preset} ({expert_bytes / 1e6:.1f} MB of routed experts "
                 f"in float32), trainer TP{tp} x PP{pp} x DP{dp}, EP{ep} x expert TP"
                 f"{world.expert_tp}, engine TP{engine_tp} x {replicas}, experts by "
                 f"{args.experts_by}")  # fmt: skip
        rows = []
        for how, (sources, plan) in plans.items():
            runs = []
            for _ in range(args.repeats + 1):
                send, regrouped = weights, rs.Moved(0.0, 0, 0, 0)
                if engine is not None:  # untimed: an element that no update writes stays NaN
                    for w in engine.staging.values():
                        w.fill_(float("nan"))
                if weights is not None and how != "none":
                    send, regrouped = rg.regroup(how, shape, world, ctx.rank, weights, groups,
                                                 ctx.device)  # fmt: skip
                result = rs.update("direct", plan, world, ctx.rank, shape, send, DTYPE, ctx.device,
                                   engine, spans=sources.get(ctx.rank))  # fmt: skip
                if not result.ok:
                    raise RuntimeError(f"{how}: rank {ctx.rank}: the update was refused: "
                                       f"{result.why}")  # fmt: skip
                runs.append((rs.slowest(regrouped, ctx.device),
                             rs.slowest(result.moved, ctx.device)))  # fmt: skip
                wrong = [n for n, w in (engine.live if engine else {}).items()
                         if not torch.equal(w, expected[n])]  # fmt: skip
                if wrong:
                    raise RuntimeError(f"{how}: after an update, engine rank {ctx.rank}'s "
                                       f"{wrong[:2]} differ from one process's layout")  # fmt: skip
            r, u = runs[-1]
            experts = [t for ts in plan.values() for t in ts if ".experts." in t.hf_name]
            fed = [len({t.dst for t in experts if t.src == s}) for s in range(world.trainers)]
            rows.append(dict(
                regroup=how, regroup_s=statistics.median(x[0]["seconds"] for x in runs[1:]),
                update_s=statistics.median(x[1]["seconds"] for x in runs[1:]),
                regroup_out=max(r["sent"]), regroup_extra=max(r["extra"]),
                update_extra=max(u["extra"]), into_engine=u["received"][world.trainers:],
                fed=max(fed)))  # fmt: skip
        lines = ["| regroup | regroup ms | update ms | total ms | regroup: out of busiest rank "
                 "| regroup: peak extra memory | update buffers: peak extra memory | into each "
                 "engine rank | engine ranks a trainer rank feeds |",
                 "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for x in rows:
            into = ", ".join(f"{b / 1e6:.1f}" for b in x["into_engine"])
            lines.append(f"| {x['regroup']} | {x['regroup_s'] * 1e3:.1f} | "
                         f"{x['update_s'] * 1e3:.1f} | "
                         f"{(x['regroup_s'] + x['update_s']) * 1e3:.1f} | "
                         f"{x['regroup_out'] / 1e6:.1f} MB | {x['regroup_extra'] / 1e6:.1f} MB | "
                         f"{x['update_extra'] / 1e6:.1f} MB | {into} MB | "
                         f"{x['fed']} |")  # fmt: skip
        if skipped:
            lines += ["", skipped]
        print0(label + "\n\n" + "\n".join(lines))
        print0(
            "checked: every update committed; after each, every engine tensor equals one "
            "process's layout, bit for bit"
        )
        if ctx.rank == 0:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"13_experts_{ctx.backend}.md").write_text(
                label + "\n\n" + "\n".join(lines) + "\n"
            )
            (out / f"13_experts_{ctx.backend}.json").write_text(
                json.dumps(dict(label=label, rows=rows), indent=1)
            )
            per_how = {how: flows(shape, world, how, plan, 4) for how, (_, plan) in plans.items()}
            plot_flows(per_how, world, out / "13_experts_flows.png")
            print0(f"saved {out}/13_experts_{ctx.backend}.md, .json and 13_experts_flows.png")


if __name__ == "__main__":
    main()
