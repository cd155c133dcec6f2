"""Checks for lesson 09's exercise (lessons/09_weight_update.py). Run it: python -m lessons.check 09

The check runs on every rank: rank 0 is the trainer and pushes with your functions, the other
ranks are the engine. Each returns (yours, expected), the expected value computed in one process.
"""

import torch
import torch.distributed as dist

import weight_sync as ws
from course.check import lesson_module

lesson = lesson_module("09")
OVERLAP = "sends overlap: each launched before the last is waited for"  # what 09.1 teaches


class _Counted:
    """A Work of the dry run's group: its first wait() closes one send in flight."""

    def __init__(self, group):
        self.group, self.open = group, True

    def wait(self, *args):
        self.group.in_flight -= self.open
        self.open = False
        return True


class CountingGroup(ws.RecordingGroup):
    """The dry run's group: counts the sends launched and not yet waited for, the most at once."""

    def __init__(self, device, tp_size):
        super().__init__(device, tp_size)
        self.in_flight = self.most = 0

    def send(self, tensor, dst):
        super().send(tensor, dst)  # a broadcast comes here too
        if tensor.dtype == torch.int64:  # the checksum table, sent last: not a bucket
            done = _Counted(self)
            done.open = False
            return done
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        return _Counted(self)


def overlap(most):
    """What the dry run saw, in words: the point of 09.1 is sends in flight together."""
    if most >= 2:
        return OVERLAP
    return (
        f"at most {most} send in flight: each waited for before the next is launched, so the "
        "wire idles while a bucket is packed (wait only for the send that last used a buffer)"
    )


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
        ws.Plan(shape, dtype, tp_size, lesson.BUCKET_BYTES, resharding)
        for resharding in ("shard", "broadcast")
    ]
    dry_run = CountingGroup(ctx.device, tp_size)
    push_update(dry_run, plans[0], model_b)  # a dry run, every rank: a stub raises here, before
    sends = {"sends": overlap(dry_run.most)}  # any rank talks to another
    if ctx.rank > 0:
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
        mine = ws.hf_to_vllm(model_c, shape, ctx.rank - 1, tp_size)  # my shard of C, as vLLM
        mine = {name: t.to(dtype) for name, t in mine.items()}  # holds it, single-process
        differ = [name for name in mine if not torch.equal(engine.weights[name], mine[name])]
        result = (
            {"version": engine.version, "tensors unlike my shard of model C": differ, **sends},
            {"version": 2, "tensors unlike my shard of model C": [], "sends": OVERLAP},
        )
    else:
        yours, expected = push_twice(tp_size, push_update, (model_b, model_c), plans, ctx)
        result = {**yours, **sends}, {**expected, "sends": OVERLAP}
    dist.barrier()  # torchrun's world, to end together: no rank leaves before all have a verdict
    return result


def push_twice(tp_size, push_update, models, plans, ctx):
    """The trainer's side of the check: the versions it got back, and the pieces whose checksum
    it sent differs from the single-process one (expected: none)."""
    references = [ws.reference_checksums(plan, model) for plan, model in zip(plans, models)]
    key = "pieces with a wrong checksum"
    client, yours = ws.engine_client(20), {"versions": [], key: []}
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
                f"{p.name} rows {p.start}:{p.stop}"
                + (f" ({p.hf_name})" if p.hf_name != p.name else "")
                + f" of rank {p.tp_rank}"
                for b in plan.checksummed
                for p in b.pieces
            ]
            updater.prepare()
            try:
                yours["versions"].append(updater.update()[0]["version"])
            except ws.EngineError as err:  # a refused update is a wrong answer, not a crash
                yours["versions"].append(f"refused: {str(err)[:160]}...")
            wrong = wrong_checksums(updater.table, reference, pieces, plan)
            yours[key] += [w for w in wrong if w not in yours[key]]
    finally:
        client.shutdown()
    return yours, {"versions": [1, 2], key: []}
    # --8<-- [end:check]


def wrong_checksums(table, reference, pieces, plan):
    """Up to 3 lines on what is wrong with the checksum table push_update returned, compared
    with the single-process one: its type, its length, or the pieces whose checksum differs."""
    if not isinstance(table, torch.Tensor):
        return [
            f"push_update returned {type(table).__name__}, not the checksum table sent (a tensor)"
        ]
    if table.shape != reference.shape or table.dtype != reference.dtype:
        why = (
            "one per piece each engine rank holds: broadcast then sliced, that is "
            "plan.shard_checksums(weights, pack_bucket), not the buckets' on the wire"
            if plan.slices_after_broadcast
            else "one per piece: checksum_pieces(bucket, data) for each bucket"
        )
        got = f"{tuple(table.shape)} {table.dtype}"
        return [f"the table is {got}, expected {tuple(reference.shape)} {reference.dtype}: {why}"]
    differ = (table.cpu() != reference).nonzero().flatten().tolist()
    return [pieces[i] for i in differ[:3]]


# Exercise id -> (its check, the functions you write, defined in the lesson).
EXERCISES = {"09.1": (check_fast_update, "pack_bucket", "push_update")}
