"""Checks for lesson 13's exercise (lessons/13_experts.py). Run it: python -m lessons.check 13

The exercise is a pure function: every rank runs the same check, on several trainer/engine
layouts, against the single-process regroup (hf_to_vllm's experts) and by the engine's output
(the engine ranks' MoE partial sums, added up, against one process's MoE layer)."""

import torch

from weight_sync.megatron import from_hf, megatron_spans
from weight_sync.moe import PRESETS, engine_moe, hf_moe, make_moe_weights, route
from weight_sync.vllm_layout import hf_to_vllm

SHAPE = PRESETS["tiny-moe"]
P = "model.layers.0.mlp."
RIGHT = "every expert row as the engine holds it, written once"
SAME = "the engine's MoE output equals one process's"
CASES = [  # (trainer EP, expert TP, engine ranks, engine experts by)
    (2, 1, 2, "tp"),
    (2, 2, 4, "tp"),
    (4, 1, 2, "tp"),
    (2, 1, 2, "ep"),
    (2, 2, 4, "ep"),
    (1, 2, 8, "ep"),
]


# --8<-- [start:check-1]
def check_split(ctx, split_experts):
    """For each layout: every trainer rank's layer-0 experts, cut by your function, written into
    NaN-filled engine tensors; each must equal hf_to_vllm's, every element written once. Then
    the engine's MoE layer over what you wrote, on hidden states that route to every expert,
    must equal one process's (a wrong expert order passes the shapes, not this)."""
    hf = make_moe_weights(SHAPE, 3)
    h = torch.randn(64, SHAPE.hidden, generator=torch.Generator().manual_seed(0))
    assert bool(route(h, hf[P + "gate.weight"], SHAPE.top_k).gt(0).any(0).all()), "not every expert"
    yours, expected = {}, {}
    for ep, etp, engine_tp, by in CASES:
        key = f"trainer EP {ep} x expert TP {etp} -> engine {engine_tp} ranks, experts by {by}"
        expected[key], expected[key + ": output"] = RIGHT, SAME
        try:
            yours[key], yours[key + ": output"] = split_case(split_experts, hf, h, ep, etp,
                                                             engine_tp, by)  # fmt: skip
        except NotImplementedError:
            raise  # the stub: "not attempted"
        except Exception as err:  # a wrong answer's crash is a verdict, not the check's crash
            yours[key] = f"raised {type(err).__name__}: {str(err)[:120]}"
            yours[key + ": output"] = "not computed"
    return yours, expected
    # --8<-- [end:check-1]


def split_case(fn, hf, h, ep, etp, engine_tp, by):
    want = [hf_to_vllm(hf, SHAPE, t, engine_tp, by) for t in range(engine_tp)]
    got = [{n: torch.full_like(w, float("nan")) for n, w in ws.items()} for ws in want]
    count = [{n: torch.zeros(w.shape[1 if "w2_" in n else 0], dtype=torch.int32)
              for n, w in ws.items()} for ws in want]  # fmt: skip
    for b in range(ep):
        for a in range(etp):
            held = from_hf(megatron_spans(SHAPE, 0, 1, 0, 1, (b, ep, a, etp)), SHAPE, hf)
            x = "decoder.layers.0.mlp.experts.local_experts."
            local = {k: (held[f"{x}{k}.linear_fc1.weight"].clone(),
                         held[f"{x}{k}.linear_fc2.weight"].clone())
                     for k in range(SHAPE.experts // ep)}  # fmt: skip
            for item in fn(local, SHAPE, b, ep, a, etp, engine_tp, by) or []:
                if problem := write(item, got, count, engine_tp):
                    return f"EP rank {b}, expert-TP rank {a}: {problem}", "not computed"
    for t in range(engine_tp):
        for n, c in count[t].items():
            if ".experts.w" in n and "layers.0." in n and not bool((c == 1).all()):
                bad = (c != 1).nonzero().flatten().tolist()
                return (f"engine rank {t}'s {n.split('mlp.')[1]} [{bad[0]}..{bad[-1]}] written "
                        f"{int(c[bad[0]])} times, not once"), "not computed"  # fmt: skip
    pieces = RIGHT
    for t in range(engine_tp):
        for n, w in want[t].items():
            if ".experts.w" in n and "layers.0." in n and not torch.equal(got[t][n], w):
                pieces = (f"engine rank {t}'s {n.split('mlp.')[1]} holds another expert's "
                          "weights: the expert order?")  # fmt: skip
                break
    out = sum(engine_moe(h, lambda n, t=t: reader(got[t], want[t], n), P, SHAPE, t,
                         engine_tp, by) for t in range(engine_tp))  # fmt: skip
    ref = hf_moe(h, lambda n: hf[n], P, SHAPE)
    gap = (out - ref).abs().max().item()
    return (
        pieces,
        SAME if gap < 1e-5 else f"the engine's MoE output is {gap:.4f} away from one process's",
    )


def reader(got, want, name):
    return (got if ".experts.w" in name else want)[name]  # the router, the shared expert: as is


def write(item, got, count, engine_tp):
    """Write one (engine rank, j, kind, start, slab) into NaN-filled tensors; what is wrong."""
    try:
        t, j, kind, start, slab = item
    except (TypeError, ValueError):
        return f"{str(item)[:60]} is not (engine rank, j, 'w13' or 'w2', start, slab)"
    name = f"{P}experts.{kind}_weight.{j}"
    if not (isinstance(t, int) and 0 <= t < engine_tp and name in got[t]):
        return f"engine rank {t} holds no {kind}_weight.{j}"
    dim = 1 if kind == "w2" else 0
    there = got[t][name]
    if not torch.is_tensor(slab) or slab.dim() != 2 or slab.shape[1 - dim] != there.shape[1 - dim]:
        return f"the slab for {kind}_weight.{j} of engine rank {t} has the wrong shape"
    if not 0 <= start <= start + slab.shape[dim] <= there.shape[dim]:
        return (f"{kind}_weight.{j} of engine rank {t} [{start}:{start + slab.shape[dim]}) is "
                f"outside its {there.shape[dim]} {'columns' if dim else 'rows'}")  # fmt: skip
    there.narrow(dim, start, slab.shape[dim]).copy_(slab)
    count[t][name][start : start + slab.shape[dim]] += 1
    return None


# Exercise id -> (its check, the function you write, defined in the lesson).
EXERCISES = {"13.1": (check_split, "split_experts")}
