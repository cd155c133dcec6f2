"""Lesson 11 beyond what test_lessons.py and test_exercises.py cover: the engine's layout against
a single-process construction, the checksum tables of both sides, handles keyed by GPU, every
bad input and fault of the issue (a handle for another GPU, a layout mismatch, a second update in
flight, the trainer dying while the engine holds its handles), the two-stage plan, the
exercise's other wrong answers, and the benchmark on CPU.

The fault runs as two plain processes (python tests/test_11_colocate.py fault), not under one
torchrun, which would stop the engine as soon as the trainer died."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course.check import run_check
from weight_sync import PRESETS
from weight_sync import colocate as cl

from conftest import ROOT, free_port, run_python, run_ranks, text

THIS = Path(__file__).resolve()
TINY = PRESETS["tiny"]
BF16 = torch.bfloat16


@pytest.mark.parametrize("tp", [1, 2, 3, 6, 12])
def test_engine_layout_is_vllms_fused_shards(tp):
    """Each rank's tensors, built from spans, equal the fused shards made by hand from the full
    HF tensors: [Q_r | K_r | V_r], [gate_r | up_r], row-parallel o/down, vocab-parallel embed
    and lm_head, KV heads replicated past kv_heads."""
    from weight_sync.model import make_weights

    full = {k: v.to(BF16) for k, v in make_weights(TINY, 2, "cpu").items()}
    kv_heads, hd = TINY.kv_heads, TINY.hidden // TINY.heads
    for r in range(tp):
        got = cl.reference(TINY, 2, r, tp, BF16, 1024).views
        p = "model.layers.1."
        q = full[p + "self_attn.q_proj.weight"].chunk(tp)[r]
        if tp <= kv_heads:
            k, v = (full[p + f"self_attn.{x}_proj.weight"].chunk(tp)[r] for x in "kv")
        else:
            h = r * kv_heads // tp
            k, v = (full[p + f"self_attn.{x}_proj.weight"][h * hd : (h + 1) * hd] for x in "kv")
        assert torch.equal(got[p + "self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
        gate, up = (full[p + f"mlp.{x}_proj.weight"].chunk(tp)[r] for x in ("gate", "up"))
        assert torch.equal(got[p + "mlp.gate_up_proj.weight"], torch.cat([gate, up]))
        o = full[p + "self_attn.o_proj.weight"].chunk(tp, 1)[r]
        assert torch.equal(got[p + "self_attn.o_proj.weight"], o)
        down = full[p + "mlp.down_proj.weight"].chunk(tp, 1)[r]
        assert torch.equal(got[p + "mlp.down_proj.weight"], down)
        embed = full["model.embed_tokens.weight"].chunk(tp)[r]
        assert torch.equal(got["model.embed_tokens.weight"], embed)
        assert torch.equal(got["lm_head.weight"], full["lm_head.weight"].chunk(tp)[r])
        assert torch.equal(got["model.norm.weight"], full["model.norm.weight"])


def test_trainer_table_equals_the_engine_layouts_table():
    """The trainer's table (span by span, no engine tensors built) is the one the engine
    computes over its flat buffer; a changed tensor changes its entry only."""
    _, weights = cl.flat_weights(TINY, 2, torch.device("cpu"))
    for tp, r in [(1, 0), (2, 1), (12, 5)]:
        spans = cl.vllm_spans(TINY, r, tp)
        engine = cl.reference(TINY, 2, r, tp, BF16, 1024)
        assert torch.equal(
            cl.trainer_table(spans, weights, engine.layout), engine.layout.table(engine.flat)
        )
    engine.views["model.norm.weight"][3] += 1
    changed = engine.layout.table(engine.flat) != cl.trainer_table(spans, weights, engine.layout)
    assert engine.names_at(changed.nonzero().flatten().tolist()) == ["model.norm.weight"]


@pytest.mark.parametrize("mistake", ["gate and up swapped", "two q heads swapped"])
def test_a_misplaced_block_changes_the_checksum(mistake):
    """The bytes all arrive but land in the wrong place, the typical layout bug: the engine's
    checksum weights each word by its place, so its tensor is refused (a plain sum of the
    words would not change)."""
    tp, r = 2, 1
    _, weights = cl.flat_weights(TINY, 2, torch.device("cpu"))
    spans = cl.vllm_spans(TINY, r, tp)
    layout = cl.EngineLayout(TINY, spans, BF16, 1024)
    staging = cl.Buffers.allocate(layout, "cpu")
    swap = {"gate_proj": "up_proj", "up_proj": "gate_proj"}
    for s in spans:
        name = s.hf_name
        if mistake == "gate and up swapped" and name.split(".")[-2] in swap:
            name = name.replace(name.split(".")[-2], swap[name.split(".")[-2]])
        n = s.stop - s.start
        staging.views[s.name].narrow(s.dim, s.start, n).copy_(
            weights[name].narrow(s.dim, s.hf_start, n)
        )
    qkv, hd = "model.layers.0.self_attn.qkv_proj.weight", TINY.hidden // TINY.heads
    if mistake == "two q heads swapped":
        rows = staging.views[qkv]
        rows[: 2 * hd] = torch.cat([rows[hd : 2 * hd], rows[:hd]]).clone()
    plain = [staging.views[qkv].view(torch.int64).sum()]  # what an order-blind sum would see
    expected = cl.reference(TINY, 2, r, tp, BF16, 1024)
    assert not torch.equal(staging.flat, expected.flat)
    if mistake == "two q heads swapped":
        assert plain == [expected.views[qkv].view(torch.int64).sum()]
    bad = layout.table(staging.flat) != cl.trainer_table(spans, weights, layout)
    refused = layout.names_at(bad.nonzero().flatten().tolist())
    wanted = "mlp.gate_up_proj" if mistake == "gate and up swapped" else "self_attn.qkv_proj"
    assert refused and all(wanted in name for name in refused), refused


def test_the_benchmarks_kernels_agree_with_chunk_sums(monkeypatch):
    """benchmarks/colocate.py's checksums: the Triton kernel (copy + checksums, and checksums
    alone), run by Triton's interpreter on CPU, and the CPU slab version, all bit for bit
    cl.chunk_sums'. Skipped where Triton is not installed (CI; it comes with torch's GPU wheels)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton was imported before this test could ask for its interpreter")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read as triton is imported
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import colocate as bench

    copy_sum, chunk = bench.triton_copy_sum(), bench.CHUNK_BYTES
    src = torch.randint(0, 256, (67 * chunk,), dtype=torch.uint8)
    want = cl.chunk_sums(src, chunk, slab=3)
    dst, cpu_dst = torch.zeros_like(src), torch.zeros_like(src)
    assert torch.equal(copy_sum(src, dst), want) and torch.equal(dst, src)
    assert torch.equal(copy_sum(src), want)
    assert torch.equal(bench.cpu_copy_sum(src, cpu_dst, slab=2 * chunk), want)
    assert torch.equal(cpu_dst, src)


def test_a_handle_for_another_gpu_is_refused():
    with pytest.raises(cl.WrongDevice, match="no handle for this engine's GPU gpu-b.*UUID"):
        cl.open_shared({"gpu-a": b""}, "gpu-b", torch.device("cpu"))


def test_a_layout_mismatch_is_refused_before_any_copy():
    layout = cl.reference(TINY, 1, 0, 2, BF16, 1024).layout
    _, weights = cl.flat_weights(TINY, 2, torch.device("cpu"))
    meta = {n: (tuple(t.shape), str(t.dtype), 0) for n, t in weights.items()}
    cl.check_layout(layout.spans, meta, layout)  # the right one passes
    meta["model.layers.1.mlp.up_proj.weight"] = ((100, 96), "torch.float32", 0)
    del meta["lm_head.weight"]
    with pytest.raises(
        cl.LayoutMismatch, match=r"up_proj.weight is \(100, 96\).*lm_head.* missing"
    ):
        cl.check_layout(layout.spans, meta, layout)


class Recorder:
    def __init__(self):
        self.sent = []

    def send(self, *args, **kwargs):
        self.sent.append(args)


def test_a_second_update_in_flight_is_refused():
    flat, weights = cl.flat_weights(TINY, 2, torch.device("cpu"))
    trainer = cl.Trainer(Recorder(), flat, weights, torch.device("cpu"))
    table = torch.zeros(3, dtype=torch.int64)
    trainer.start(1, table)
    with pytest.raises(cl.InFlight, match="update 2 started while update 1 is in flight"):
        trainer.start(2, table)
    assert len(trainer.pair.sent) == 1  # nothing sent for the refused one


@pytest.mark.parametrize(
    "trainer_gpus, engine_gpus", [([0, 1], [0, 1, 2]), ([0], [0, 1]), ([3, 2], [2, 3]), ([1], [0])]
)
def test_two_stage_plan_never_pairs_one_gpu_over_nccl(trainer_gpus, engine_gpus):
    plan = cl.two_stage_plan(trainer_gpus, engine_gpus)
    pairs = cl.pairs_over_nccl(plan, trainer_gpus, engine_gpus)
    assert pairs and all(a != b for a, b in pairs), plan
    assert sorted(plan[1][2]) == list(range(len(engine_gpus)))  # every engine rank gets it


@pytest.mark.parametrize("trainer_gpus, engine_gpus", [([0], [0]), ([0, 1], [1, 1]), ([2, 2], [2])])
def test_two_stage_plan_refuses_an_infeasible_map(trainer_gpus, engine_gpus):
    with pytest.raises(ValueError, match="NCCL"):
        cl.two_stage_plan(trainer_gpus, engine_gpus)


def test_two_stage_route_runs_on_gloo_with_a_simulated_gpu_map():
    """Trainer rank 0 on GPU 0; engine ranks 1, 2, 3 (TP=3) on GPUs 0, 1, 2: the trainer sends to
    the engine rank on GPU 1, which broadcasts; every engine rank then holds its fused shard."""
    result = run_ranks(THIS, 4, ["two-stage"], timeout=120)
    out = text(result)
    assert result.returncode == 0, out
    assert out.count("RESULT shard equals the reference: True") == 3, out
    assert "RESULT plan: [('send', 0, 1), ('broadcast', 1, [0, 1, 2])]" in out, out


def test_trainer_dies_engine_keeps_serving_its_last_version():
    result = run_python(THIS, ["fault"], timeout=150)
    out = text(result)
    assert result.returncode == 0, out
    assert "the trainer is gone" in out and "still serving version 1" in out, out
    assert "RESULT engine serves model B, version 1: True" in out, out


@pytest.mark.parametrize(
    "name, key",
    [
        ("11_colocate_unverified.py", "refused, one tensor changed"),
        ("11_colocate_layout.py", "staging equals the engine's layout of model B"),
    ],
)
def test_exercise_check_catches_each_wrong_answer(name, key):
    status, lines = run_check(["11.1"], ROOT / "tests" / "wrong" / name, 4)
    assert status == {"11.1": "mismatch"}, "\n".join(lines)
    assert f"  {key}:" in "\n".join(lines), "\n".join(lines)


def test_lesson_refuses_nccl_and_odd_worlds():
    lesson = ROOT / "lessons" / "11_colocate.py"
    result = run_ranks(lesson, 2, ["--backend", "nccl"], timeout=90)
    assert result.returncode != 0 and "NCCL refuses two ranks of one GPU" in text(result)
    result = run_python(lesson, ["--nproc", "3"], timeout=60)  # before any rank starts
    assert result.returncode != 0 and "needs an even number of ranks" in text(result)
    result = run_ranks(lesson, 8, [], timeout=120)  # an engine of TP=4: 6 KV heads do not split
    out = text(result)
    assert result.returncode != 0 and "TP=4 does not divide the model's heads" in out, out


def test_benchmark_on_cpu(tmp_path):
    result = run_python(
        ROOT / "benchmarks" / "colocate.py", ["--presets", "tiny", "--out", tmp_path], timeout=240
    )
    out = text(result)
    assert result.returncode == 0, out
    rows = json.loads((tmp_path / "11_colocate_cpu.json").read_text())
    paths = [r["path"].split(" ")[0] for r in rows]
    assert paths == ["floor:", "(a)", "(b)", "(c)", "(c)", ""], paths
    assert all(r["model"] == "tiny" and r["ms"] > 0 for r in rows), rows
    table = (tmp_path / "11_colocate_cpu.md").read_text()
    assert all(f"| tiny | {r['path']} |" in table for r in rows), table


# ---------------------------------------------------------------------------------------------
# the fault, as two processes: the engine is rank 0 (it hosts the store and outlives the trainer)
def fault_role():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    cl.use_shared_memory()
    cpu, rank = torch.device("cpu"), dist.get_rank()
    pair = cl.Pair(1 - rank, listen=rank == 0)
    if rank == 1:  # the trainer: open, one update, then die while the engine holds the handle
        flat, weights = cl.flat_weights(TINY, 2, cpu)
        trainer = cl.Trainer(pair, flat, weights, cpu)
        assert trainer.open({"gpu": cl.share(flat)}) is None
        engine_layout = cl.reference(TINY, 2, 0, 1, BF16, 1024).layout
        trainer.start(1, cl.trainer_table(engine_layout.spans, weights, engine_layout))
        assert trainer.finish() == (1, [])
        os.kill(os.getpid(), signal.SIGKILL)
    engine = cl.Engine(TINY, 0, 1, BF16, cpu, 1, 1024)

    def on_pull(engine, table, version):
        bad = cl_pull(engine, table)
        engine.commit(version, bad)
        return bad

    cl.serve(engine, pair, "gpu", on_pull, lambda line: print(f"[rank 0] {line}", flush=True))
    served = torch.equal(engine.live.flat, cl.reference(TINY, 2, 0, 1, BF16, 1024).flat)
    print(f"RESULT engine serves model B, version {engine.version}: {served}", flush=True)
    os._exit(0)  # the trainer is gone: no orderly goodbye is possible


def cl_pull(engine, table):
    for s in engine.spans:
        n = s.stop - s.start
        src = engine.trainer[s.hf_name].narrow(s.dim, s.hf_start, n)
        engine.staging.views[s.name].narrow(s.dim, s.start, n).copy_(src)
    sums = engine.layout.table(engine.staging.flat)
    return engine.staging.names_at((sums != table).nonzero().flatten().tolist())


def fault():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env |= {"WORLD_SIZE": "2", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, str(THIS), "fault-role"], env={**env, "RANK": str(r)})
        for r in (0, 1)
    ]
    codes = [p.wait(timeout=40) for p in procs]
    print(f"exit codes: engine {codes[0]}, trainer {codes[1]}", flush=True)
    sys.exit(0 if codes[0] == 0 and codes[1] == -signal.SIGKILL else 1)


def two_stage():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, trainer_gpus, engine_gpus = dist.get_rank(), [0], [0, 1, 2]
    plan = cl.two_stage_plan(trainer_gpus, engine_gpus)
    flat, weights = cl.flat_weights(TINY, 2 if rank == 0 else 1, torch.device("cpu"))  # B, A
    cl.run_two_stage(plan, [0], [1, 2, 3], flat)
    if rank == 0:
        print(f"RESULT plan: {plan}", flush=True)
    else:
        engine = cl.reference(TINY, 2, rank - 1, 3, BF16, 1024)
        mine = cl.Buffers.allocate(engine.layout, "cpu")
        cl.lay_out(engine.layout.spans, weights, mine.views)  # slice and fuse my shard
        print(
            f"RESULT shard equals the reference: {torch.equal(mine.flat, engine.flat)}", flush=True
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    {"fault": fault, "fault-role": fault_role, "two-stage": two_stage}[sys.argv[1]]()
