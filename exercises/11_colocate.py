"""Checks for lesson 11's exercise (lessons/11_colocate.py). Run it: python -m lessons.check 11

Rank 2p is a trainer and rank 2p+1 engine TP rank p, as in the lesson. Every rank first runs your
pull in one process (the trainer's tensors and the engine's staging side by side); then each
engine rank runs it again on the trainer's memory opened through a handle. Each returns (yours,
expected); expected comes from the engine's layout built single-process (cl.reference).
"""

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from course.check import lesson_module
from weight_sync import PRESETS
from weight_sync import colocate as cl

lesson = lesson_module("11")
COPIES = ("aten.copy_", "aten.clone", "aten._to_copy", "aten.cat", "aten.stack")
ONE_FUSED = "one _foreach_copy_ for every span, no other copy"  # what 11.1 teaches


class OpLog(TorchDispatchMode):
    """Records the name of every aten op run inside it (views and reductions too)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def copies_said(ops):
    """What the op log shows of the copy, in words: the point of 11.1 is one fused copy."""
    fused = ops.count("aten._foreach_copy_")
    others = {op.removeprefix("aten."): ops.count(op) for op in COPIES if op in ops}
    if fused == 1 and not others:
        return ONE_FUSED
    other = ", ".join(f"{n} {op}" for op, n in others.items()) or "no other copy"
    return f"{fused} _foreach_copy_ and {other}: one fused call copies every span (no clones)"


def run_pull(pull, spans, trainer, staging, table):
    """Your pull under the op log, its answer, and what the log shows of its copies. An error
    in it is an answer too (the stub's NotImplementedError goes on: not attempted)."""
    with OpLog() as log:
        try:
            bad = pull(spans, trainer, staging, table)
        except NotImplementedError:
            raise
        except Exception as err:
            bad = f"raised {type(err).__name__}: {str(err)[:90]}"
    return bad, copies_said(log.ops)


# --8<-- [start:check]
def check_pull(ctx, pull):
    """In one process on every rank: a good update (nothing refused, staging equal to the
    engine's layout of model B, one fused copy), then an update whose table differs in one
    tensor (that tensor refused). Then each engine rank pulls through a handle to its trainer's
    flat buffer (shared memory on CPU)."""
    shape, tp_size, p = PRESETS[lesson.PRESET], ctx.world_size // 2, ctx.rank // 2
    device = cl.colocated_device(ctx.local_rank)  # as in the lesson: a pair shares GPU p
    gpu = cl.gpu_id(device, [r // 2 for r in range(ctx.world_size)])
    spans = cl.vllm_spans(shape, p, tp_size)
    expected = cl.reference(
        shape, lesson.SEED_B, p, tp_size, lesson.ENGINE_DTYPE, lesson.CHUNK_BYTES, device
    )
    layout = expected.layout
    flat, weights = cl.flat_weights(shape, lesson.SEED_B, device)
    table = cl.trainer_table(spans, weights, layout)
    staging = cl.Buffers.allocate(layout, device)
    bad, copies = run_pull(pull, spans, weights, staging, table)  # a stub raises on every rank
    same = torch.equal(staging.flat, expected.flat)
    torn = table.clone()
    torn[layout.index["model.norm.weight"]] += 1  # as if the trainer stepped after its table
    refused, _ = run_pull(pull, spans, weights, cl.Buffers.allocate(layout, device), torn)
    yours = {
        "refused, good update": bad,
        "staging equals the engine's layout of model B": same,
        "copies": copies,
        "refused, one tensor changed": refused,
    }
    wanted = {
        "refused, good update": [],
        "staging equals the engine's layout of model B": True,
        "copies": ONE_FUSED,
        "refused, one tensor changed": ["model.norm.weight"],
    }
    pair = cl.Pair(ctx.rank + 1 if ctx.rank % 2 == 0 else ctx.rank - 1, listen=ctx.rank % 2 == 1)
    if ctx.rank % 2 == 0:  # the trainer: share once, keep the memory alive until the engine is done
        pair.send(cl.OPEN, obj={"flat": {gpu: cl.share(flat)}, "meta": meta_of(flat, weights)})
        pair.recv()
    else:
        sent = pair.recv()[3]
        opened = cl.open_shared(sent["flat"], gpu, device)  # keyed by the GPU, as the lesson
        trainer = {n: opened[at : at + s.numel()].view(s) for n, (s, at) in sent["meta"].items()}
        staging = cl.Buffers.allocate(layout, device)
        bad, _ = run_pull(pull, spans, trainer, staging, table)
        yours["through a handle: staging equals the reference"] = (
            torch.equal(staging.flat, expected.flat) and bad == []
        )
        wanted["through a handle: staging equals the reference"] = True
        del trainer, opened
        pair.send(cl.ACK)
    dist.barrier()  # torchrun's world, to end together
    return yours, wanted
    # --8<-- [end:check]


def meta_of(flat, weights):
    """{name: (shape, offset in elements)} of tensors that are views of `flat`."""
    base = flat.data_ptr()
    return {n: (t.shape, (t.data_ptr() - base) // t.element_size()) for n, t in weights.items()}


# Exercise id -> (its check, the functions you write, defined in the lesson).
EXERCISES = {"11.1": (check_pull, "pull")}
