"""Checks for lesson 09's exercise (lessons/09_weight_update.py). Run it: python -m lessons.check 09

The check runs on every rank: rank 0 is the trainer and pushes with your functions, the other
ranks are the engine. Each returns (yours, expected), the expected value computed in one process.
"""

import torch
import torch.distributed as dist

import weight_sync as ws
from course.check import lesson_module

lesson = lesson_module("09")


# --8<-- [start:check]
def check_fast_update(ctx, pack_bucket, push_update):
    """Rank 0 pushes model B (each rank's shard only), then model C (broadcast, then sliced by
    the engine) with your functions; the other ranks are the engine. Each engine rank compares
    what it holds with its shard of C, cut and converted single-process; rank 0 compares the
    versions and the checksums it sent with the single-process table."""
    shape, tp_size, dtype = ws.PRESETS[lesson.PRESET], ctx.world_size - 1, lesson.ENGINE_DTYPE
    model_b, model_c = (
        ws.make_weights(shape, s, ctx.device) for s in (lesson.SEED_B, lesson.SEED_C)
    )
    plans = [
        ws.Plan(ws.llama_specs(shape), dtype, tp_size, lesson.BUCKET_BYTES, resharding)
        for resharding in ("shard", "broadcast")
    ]
    push_update(ws.RecordingGroup(ctx.device, tp_size), plans[0], model_b)  # a dry run, every rank:
    if ctx.rank > 0:  # a stub raises here, before any rank talks to another
        engine = ws.serve_engine(
            ctx.rank - 1,
            tp_size,
            ctx.backend,
            ctx.device,
            preset=lesson.PRESET,
            seed=lesson.SEED_A,
            dtype=dtype,
            timeout_s=20,
            quiet=True,
        )
        mine = {
            name: ws.shard_of(model_c[name], split, ctx.rank - 1, tp_size).to(dtype)
            for name, _, split in ws.llama_specs(shape)
        }  # my shard of C, single-process
        differ = [name for name in mine if not torch.equal(engine.weights[name], mine[name])]
        result = (
            {"version": engine.version, "tensors unlike my shard of model C": differ},
            {"version": 2, "tensors unlike my shard of model C": []},
        )
    else:
        result = push_twice(tp_size, push_update, (model_b, model_c), plans, ctx)
    dist.barrier()  # torchrun's world, to end together: no rank leaves before all have a verdict
    return result


def push_twice(tp_size, push_update, models, plans, ctx):
    """The trainer's side of the check: the versions it got back, and the pieces whose checksum
    it sent differs from the single-process one (expected: none)."""
    references = [ws.reference_checksums(plan, model) for plan, model in zip(plans, models)]
    client, yours = ws.engine_client(20), {"versions": [], "pieces with a wrong checksum": []}
    try:
        group = ws.create_update_group(
            client, "fast", ctx.backend, ctx.device, warmup=True, timeout_s=20
        )
        for model, plan, reference in zip(models, plans, references):
            updater = ws.FastUpdater(
                client,
                group,
                model,
                push_update,
                bucket_bytes=lesson.BUCKET_BYTES,
                resharding=plan.resharding,
            )
            pieces = [
                f"{p.name} rows {p.start}:{p.stop} of rank {p.tp_rank}"
                for b in plan.checksummed
                for p in b.pieces
            ]
            updater.prepare()
            try:
                yours["versions"].append(updater.update()[0]["version"])
            except ws.EngineError as err:  # a refused update is a wrong answer, not a crash
                yours["versions"].append(f"refused: {str(err)[:160]}...")
            sent = updater.table.cpu() if updater.table is not None else torch.zeros_like(reference)
            yours["pieces with a wrong checksum"] += [
                pieces[i] for i in range(len(pieces)) if sent[i] != reference[i]
            ][:3]
    finally:
        client.shutdown()
    return yours, {"versions": [1, 2], "pieces with a wrong checksum": []}
    # --8<-- [end:check]


# Exercise id -> (its check, the functions you write, defined in the lesson).
EXERCISES = {"09.1": (check_fast_update, "pack_bucket", "push_update")}
