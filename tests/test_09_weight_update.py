"""Lesson 09 beyond what test_lessons.py and test_exercises.py cover: SGLang's A/B test of the
weight-update API on engines of TP=1 and TP=2 (naive and fast path), every bad input and fault
of the issue, the exercise check on TP=1 and TP=2, bytes on the wire, and the benchmark.

The engine runs as a torchrun job of its own (python -m weight_sync), the trainer as a
separate process running one of this file's scenarios (python tests/test_09_weight_update.py
SCENARIO PORT_FILE): two jobs, two worlds, as in RLHF, so a trainer can die and the engine live
on. Every run is bounded (conftest); a scenario prints `RESULT name: text` lines and exits
non-zero, with the reason, when one of its own checks fails."""

import contextlib
import json
import re
import runpy
import signal
import sys
import time
from pathlib import Path

import pytest

from course.check import run_check, solution_file

from conftest import (
    ROOT,
    die_after_sends,
    engine_address,
    engine_job,
    report,
    reported,
    run_python,
    run_ranks,
    text,
)

THIS = Path(__file__).resolve()
ENGINE_TIMEOUT_S = 8  # the engine's waits; the trainer's are longer: the engine answers first
TRAINER_TIMEOUT_S = 20
WRONG = ROOT / "tests" / "wrong" / "09_weight_update.py"
UNCHANGED = "weights byte-identical, version 0, next token as before"


# ---------------------------------------------------------------------------------------------
# pytest side: an engine job in a thread, scenarios as processes
@contextlib.contextmanager
def engine(tp, folder, preset="tiny"):
    """An engine of `tp` ranks as its own torchrun job; yields (port file, its result box)."""
    port_file = folder / f"engine-tp{tp}.addr"
    args = ["--port-file", port_file, "--timeout", ENGINE_TIMEOUT_S, "--idle", 120]
    with engine_job("weight_sync", tp, args + ["--preset", preset], port_file, THIS) as box:
        yield port_file, box


def scenario(name, port_file, *args, timeout=150):
    result = run_python(THIS, [name, port_file, *args], timeout=timeout)
    out = text(result)
    return result, out, reported(out)


@pytest.mark.parametrize("tp, preset", [(1, "tiny"), (2, "tiny"), (2, "tiny-mqa")])
def test_a_b_update_naive_and_fast(tp, preset, tmp_path):
    """SGLang's test: the engine starts with A, the trainer holds B; after the update, sampled
    weights read back equal B and differ from A; then back to A and on to B by the fast path.
    tiny-mqa's one KV head is replicated on both engine ranks (TP > KV heads)."""
    with engine(tp, tmp_path, preset) as (port_file, box):
        result, out, results = scenario("ab", port_file)
        assert result.returncode == 0, out
    assert box["result"].returncode == 0, text(box["result"])
    steps = ("before", "naive", "fast shard", "fast broadcast")
    for step in (*steps, "first of two plans", "second of two plans"):
        assert results[step].startswith("ok"), out
    assert results["versions"] == "[1, 2, 3, 4]", out


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """One TP=2 engine, every bad input of the issue thrown at it in turn by one trainer."""
    with engine(2, tmp_path_factory.mktemp("bad")) as (port_file, box):
        result, out, results = scenario("bad-inputs", port_file)
    return result, out, results, box["result"]


@pytest.mark.parametrize(
    "case, says",
    [
        ("shape", "shape mismatch for model.embed_tokens.weight"),
        ("dtype", "dtype mismatch for model.embed_tokens.weight"),
        ("name", "no tensor 'model.layers.0.self_attn.qkv_proj.weight'"),
        ("naive name", "no tensor 'lm_head.weights'"),
        ("corrupted", "checksum mismatch"),
        ("nan", "non-finite value (NaN or Inf) in model.layers.1.self_attn.k_proj.weight"),
        ("naive inf", "non-finite value (NaN or Inf) in model.norm.weight"),
        (
            "naive three",
            "no tensor 'lm_head.weights' (did you mean 'lm_head.weight'?) (received and dropped, "
            "with the 1 tensor(s) after it; the 1 before it went in: the update is torn)",
        ),
        (
            "naive lengths",
            "2 names, 1 dtypes, 2 shapes: one of each per tensor (nothing received; group "
            "'naive-2' dropped",
        ),
        ("shape after prepare", "shape mismatch for lm_head.weight: the trainer's is now"),
    ],
)
def test_bad_update_is_refused_before_the_live_weights_change(bad_inputs, case, says):
    """Refused with a message naming the tensor; the live weights are byte-identical after
    (sha256 of every rank's tensors), the version is unchanged, the engine still answers."""
    result, out, results, engine_result = bad_inputs
    assert result.returncode == 0, out
    assert says in results[case], out
    assert results[f"{case} after"] == UNCHANGED, out
    assert engine_result.returncode == 0, text(engine_result)


@pytest.mark.parametrize(
    "case, says",
    [
        ("twice, trainer", "already has a weight-update group named 'wu'"),
        ("twice, engine", "already exists on this engine"),
        ("wrong name", "created no weight-update group named 'wu-typo' (it created: wu, wu-2)"),
        ("unknown group", "no weight-update group named 'nope' on this engine"),
    ],
)
def test_group_mistakes_are_clear_errors_not_hangs(bad_inputs, case, says):
    result, out, results, _ = bad_inputs
    assert result.returncode == 0, out
    assert says in results[case], out


def test_a_naive_request_refused_half_way_keeps_the_group_in_step(bad_inputs):
    """Refused at its second tensor of three, the engine still receives the third, so the next
    request's tensor lands where it belongs (it used to receive the stale third one). A request
    it cannot receive at all drops the group, so the trainer's broadcast fails at once."""
    result, out, results, _ = bad_inputs
    assert results["naive three, then one"] == "True", out
    assert re.fullmatch(r"failed after \d+\.\d s", results["naive lengths, broadcast"]), out
    assert float(results["naive lengths, broadcast"].split()[2]) < TRAINER_TIMEOUT_S / 2, out


def test_requests_with_mismatched_lists_or_tokens_are_refused(bad_inputs):
    result, out, results, _ = bad_inputs
    assert "21 names, 0 dtypes, 0 shapes: one of each per tensor" in results["prepare lengths"]
    assert "each in 0..383 (384 is not)" in results["tokens"], out


def test_trainer_killed_mid_transfer_engine_keeps_the_old_weights(tmp_path):
    """The trainer dies (SIGKILL) after two buckets: the engine's receive fails, it keeps
    version 0 with its weights byte-identical, and a new trainer finds it serving."""
    with engine(2, tmp_path) as (port_file, box):
        killed, out, _ = scenario("die-mid-transfer", port_file)
        assert killed.returncode == -signal.SIGKILL, out
        result, out, results = scenario("inspect", port_file)
        assert result.returncode == 0, out
    engine_out = text(box["result"])
    assert box["result"].returncode == 0, engine_out
    assert "update rejected, kept version 0: the transfer failed" in engine_out, engine_out
    assert (
        results["after the death"] == "version 0, weights byte-identical to model A, "
        "sampled rows equal A, next token as A's"
    ), out


def test_dead_engine_rank_fails_the_push_naming_it(tmp_path):
    """Engine rank 1 exits after one bucket: the trainer's push fails, bounded (this process
    has a timeout), with a message that names engine rank 1 as dead."""
    with engine(2, tmp_path) as (port_file, box):
        result, out, results = scenario("engine-rank-dies", port_file)
        assert result.returncode == 0, out
    assert "engine rank 1 (weight-update rank 2) is dead" in results["push"], out
    assert "fault injected: dying after 1 bucket(s)" in text(box["result"])


def test_an_engine_tp_that_does_not_fit_is_refused_on_every_rank_before_anything_runs():
    """tiny has 6 KV heads: an engine of TP 4 can neither split nor replicate them evenly. The
    lesson at 5 ranks and an engine of 4 ranks on their own are refused at once, on every
    rank, naming the sizes that work."""
    lesson = run_ranks(ROOT / "lessons" / "09_weight_update.py", 5, timeout=120)
    out = text(lesson)
    assert lesson.returncode != 0, out
    for rank in range(5):
        assert f"[rank {rank}] error: tiny: engine TP 4 does not fit this model" in out, out
    assert "Engine TP sizes that work: 1, 2, 3, 6, 12. Start 1 + that many ranks" in out, out
    alone = run_ranks("weight_sync", 4, ["--timeout", 5], timeout=120)
    out = text(alone)
    assert alone.returncode != 0, out
    says = "6 KV heads neither split over 4 ranks nor replicate evenly on them (4 is not a "
    says += "multiple of 6). Engine TP sizes that work: 1, 2, 3, 6, 12"
    assert all(f"[rank {r}] error: tiny on 4 engine ranks: " in out for r in range(4)), out
    assert says in out, out
    assert "control plane" not in out and "model A" not in out, out


@pytest.mark.parametrize("nproc", [2, 3, 13])
def test_exercise_check_on_tp_1_2_and_12(nproc):
    """test_exercises.py runs the check on 4 ranks (TP=3); here TP=1, TP=2 and TP=12, where
    each of tiny's 6 KV heads is replicated on 2 engine ranks (the engine's forward, its
    checksums and its coverage all in that layout)."""
    status, lines = run_check(["09.1"], solution_file("09"), nproc)
    assert status == {"09.1": "pass"}, "\n".join(lines)
    status, lines = run_check(["09.1"], WRONG, nproc)
    assert status == {"09.1": "mismatch"}, "\n".join(lines)


@pytest.mark.parametrize(
    "name, says",
    [
        ("checksums", "the table is (49,) torch.int64, expected (90,) torch.int64: one per piece"),
        ("waits", "at most 1 send in flight: each waited for before the next is launched"),
        ("serial", "at most 1 send in flight: each waited for before the next is launched"),
    ],
)
def test_exercise_check_says_what_is_wrong(name, says):
    """Per-bucket checksums where broadcast-then-slice needs each shard's: a mismatch naming the
    checksum table, never a crash of the check itself. Waiting after every send: right bytes,
    but it skips the point of 09.1, so a mismatch saying the sends must overlap."""
    status, lines = run_check(["09.1"], ROOT / "tests" / "wrong" / f"09_weight_update_{name}.py")
    assert status == {"09.1": "mismatch"}, "\n".join(lines)
    assert says in "\n".join(lines), "\n".join(lines)


def test_every_collective_agrees_in_dtype_and_count(tmp_path):
    """NCCL needs each rank's tensors of one collective to agree in dtype and element count;
    gloo only needs the bytes to. The lesson (TP=3: naive path, TP forward, read-back, timing)
    and the check (fast path, both ways of resharding) log every op of every group; per group,
    every rank's sequence of collectives must be the same, and each send must meet its recv.
    The log's path goes in each run's own environment: ranks forked from a warm launcher do
    not see this process's later changes to its environment."""
    log = {"COURSE09_OPS_LOG": str(tmp_path / "lesson")}
    assert run_ranks(ROOT / "lessons" / "09_weight_update.py", 4, env=log).returncode == 0
    log = {"COURSE09_OPS_LOG": str(tmp_path / "check")}  # a process of its own: its own ranks
    check = run_python("-m", ["lessons.check", "09", "--solution"], timeout=240, env=log)
    assert check.returncode == 0 and "PASS on all 4 ranks" in text(check), text(check)
    for run, groups in (("lesson", {"naive", "engine"}), ("check", {"fast", "engine"})):
        collectives, p2p = {}, {"send": {}, "recv": {}}
        for log in tmp_path.glob(f"{run}.*"):
            for line in log.read_text().splitlines():
                group, rank, op, peer, dtype, numel = line.split()
                if op in p2p:  # keyed by (sender, receiver)
                    pair = (rank, peer) if op == "send" else (peer, rank)
                    p2p[op].setdefault((group, *pair), []).append((dtype, numel))
                else:
                    collectives.setdefault(group, {}).setdefault(rank, []).append(
                        (op, peer, dtype, numel)
                    )
        assert set(collectives) == groups, (run, collectives.keys())
        for group, ranks in collectives.items():
            first, *others = ranks.values()
            assert others and all(seq == first for seq in others), f"{run}, {group}: disagree"
        assert p2p["send"] == p2p["recv"] and (run == "lesson") == (not p2p["send"]), run


def test_bytes_on_the_wire_and_the_packed_bytes():
    """A dry run of the solution's push (nothing moves): each rank's packed bytes are its
    shards laid out single-process, and the bytes on the wire are what the plan says."""
    import torch

    from weight_sync.groups import RecordingGroup
    from weight_sync.model import PRESETS, make_weights
    from weight_sync.plan import Plan, digest, lay_out_shards, reference_checksums

    solution = runpy.run_path(str(solution_file("09")))
    shape, tp = PRESETS["tiny"], 3
    weights = make_weights(shape, 2, "cpu")
    received = {}
    for resharding in ("shard", "broadcast"):
        plan = Plan(shape, torch.bfloat16, tp, 16384, resharding)
        group = RecordingGroup("cpu", tp)
        table = solution["push_update"](group, plan, weights)
        assert torch.equal(table, reference_checksums(plan, weights))
        received[resharding] = group.received() - tp * table.numel() * 8  # without the table
        assert received[resharding] == plan.bytes_received()
        for r, layout in enumerate(plan.layouts):  # each rank's buckets, packed, vs reference
            mine = torch.zeros(layout.size, dtype=torch.uint8)
            for b in plan.rank_buckets[r]:
                solution["pack_bucket"](b, weights, mine[b.start : b.end])
            reference = torch.zeros(layout.size, dtype=torch.uint8)
            lay_out_shards(layout, weights, reference)
            assert digest(layout, mine) == digest(layout, reference)
    assert received["broadcast"] == tp * plan.wire.size > received["shard"]


def test_a_flat_trainer_is_sent_zero_copy_until_a_tensor_is_replaced():
    """Plan.flat_source: weights that are views of one buffer laid out as the wire are sent
    from it; once a tensor in the middle is replaced by another (a new allocation), they are
    not, and the bytes sent are the new tensor's (a cache keyed on the ends missed that)."""
    import torch

    from weight_sync.model import PRESETS, make_weights
    from weight_sync.plan import Layout, Plan

    shape = PRESETS["tiny"]
    layout = Layout.vllm(shape, torch.bfloat16, 0, 1)
    flat = torch.zeros(layout.size, dtype=torch.uint8)
    weights = make_weights(shape, 2, "cpu", into=layout.hf_views(flat))
    plan = Plan(shape, torch.bfloat16, 1, 16384, "shard")
    assert plan.flat_source(weights) is not None
    assert plan.flat_source(weights).data_ptr() == flat.data_ptr()
    middle = list(weights)[len(weights) // 2]
    weights[middle] = weights[middle].clone()
    assert plan.flat_source(weights) is None


def test_benchmark_prints_the_table_and_saves_the_chart(tmp_path):
    result = run_ranks(
        ROOT / "benchmarks" / "weight_update.py",
        2,
        ["--models", "tiny", "--sweep-mib", "2", "--repeats", "2", "--out", tmp_path],
        timeout=240,
    )
    out = text(result)
    assert result.returncode == 0, out
    for line in (
        "Broadcast sweep on the weight-update group",
        "| MiB | ms | GB/s |",
        "| tiny | naive |",
        "| tiny | fast |",
        "| tiny | fast, fp32 trainer |",
        "where the warm time goes",
        "checked: fast: sampled weights read back equal the trainer's B",
    ):
        assert line in out, out
    for suffix in ("md", "json", "png"):
        assert (tmp_path / f"09_weight_update_gloo.{suffix}").stat().st_size > 0


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_the_docs_tables_are_the_benchmarks_own_rendering_of_its_saved_run(backend, monkeypatch):
    """docs/figures/09_weight_update_<backend>.md, sweep included, is what the benchmark's table()
    makes of the .json written beside it by the same run: no figure in it is laid out by hand."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import weight_update as bench

    stem = ROOT / "docs" / "figures" / f"09_weight_update_{backend}"
    saved = json.loads(stem.with_suffix(".json").read_text())
    shown = stem.with_suffix(".md").read_text()
    rendered = bench.table(saved["rows"], saved["backend"], saved["device"], saved["sweep"])
    assert shown == rendered + "\n", f"{stem.name}.md is not its .json rendered: run the benchmark"
    size, seconds = saved["sweep"][-1]
    assert f"| {size >> 20} | {seconds * 1e3:.3f} | {size / seconds / 1e9:.2f} |" in shown


# ---------------------------------------------------------------------------------------------
# Scenario side: the trainer, a process of its own
def connect(port_file):
    from weight_sync.control import EngineClient

    return EngineClient(engine_address(port_file), TRAINER_TIMEOUT_S)


class Trainer:
    """What every scenario needs: the client, the models, the reference digests."""

    def __init__(self, port_file):
        import torch

        from weight_sync.model import LlamaShape, make_weights

        self.torch = torch
        self.client = connect(port_file)
        self.tp = self.client.tp_size
        self.shape = LlamaShape(**self.client.call("describe")[0]["shape"])
        self.models = {seed: make_weights(self.shape, seed, "cpu") for seed in (1, 2, 3)}
        lesson = runpy.run_path(str(ROOT / "lessons" / "09_weight_update.py"))
        solution = runpy.run_path(str(solution_file("09")))
        self.push_naive, self.push_update = lesson["push_naive"], solution["push_update"]

    def digests(self, seed):
        """Every engine rank's sha256 equals that of model `seed`'s shards, made here?"""
        from weight_sync.plan import reference_digest

        got = [d["sha256"] for d in self.client.call("weights_digest")]
        return got == [
            reference_digest(self.shape, seed, self.torch.bfloat16, r, self.tp)
            for r in range(self.tp)
        ]

    def rows_equal(self, seed):
        """Sampled rows read back by HF name equal model `seed`'s: the engine gathers them
        from its fused tensors (k_proj whole: split over TP ranks, or replicated on them)."""
        for name, rows in (
            ("model.embed_tokens.weight", 4),
            ("model.layers.1.self_attn.o_proj.weight", 4),
            ("model.layers.0.self_attn.k_proj.weight", 100),
            ("model.layers.1.mlp.up_proj.weight", 4),
            ("model.norm.weight", 4),
            ("lm_head.weight", 4),
        ):
            got = self.torch.tensor(
                self.client.call("get_weights_by_name", name=name, truncate_size=rows)[0]
            )
            if not self.torch.equal(got, self.models[seed][name][:rows].bfloat16().float()):
                return False
        return True

    def token_of(self, seed):
        """Every engine rank's greedy token and logits are those of one process's forward pass
        of model `seed` in HF's layout (logits within 1e-4: TP sums round differently)."""
        from weight_sync.model import forward

        answers = self.client.call("generate", tokens=[5, 17, 42, 101], logits=True)
        held = {k: v.bfloat16() for k, v in self.models[seed].items()}
        reference = forward(held, self.shape, [5, 17, 42, 101])
        return all(
            a["token"] == int(reference.argmax())
            and (self.torch.tensor(a["logits"]) - reference).abs().max() < 1e-4
            for a in answers
        )

    def group(self, name, warmup=True):
        from weight_sync.trainer import create_update_group

        return create_update_group(
            self.client, name, "gloo", "cpu", warmup=warmup, timeout_s=TRAINER_TIMEOUT_S
        )

    def updater(self, group, seed, resharding="shard", bucket_bytes=16384):
        from weight_sync.trainer import FastUpdater

        updater = FastUpdater(
            self.client,
            group,
            self.models[seed],
            self.push_update,
            bucket_bytes=bucket_bytes,
            resharding=resharding,
        )
        updater.prepare()
        return updater

    def same_as_before(self):
        """The check after every refused update: nothing changed, the engine still serves."""
        version = {v["version"] for v in self.client.call("get_version")}
        if self.digests(1) and version == {0} and self.token_of(1):
            return UNCHANGED
        return f"CHANGED: version {version}, digests equal A's: {self.digests(1)}"


def expect_error(name, call):
    """Run call(); it must raise: report the message, or say it did not."""
    from weight_sync.control import EngineError

    start = time.monotonic()
    try:
        call()
    except (EngineError, ValueError) as err:
        report(name, f"{str(err)} ({time.monotonic() - start:.1f} s)")
    else:
        report(name, "NO ERROR")


def run_ab(t):
    """A, then B (naive), A (fast, shards), C (fast, broadcast): no update writes what the
    engine's staging still holds (the model before last), so one that wrote nothing fails."""
    ok = lambda seed: (
        "ok"
        if t.rows_equal(seed)
        and not any(t.rows_equal(other) for other in t.models if other != seed)
        and t.digests(seed)
        and t.token_of(seed)
        else "FAILED"
    )
    report("before", ok(1))
    t.push_naive(t.client, t.group("naive", warmup=False), t.models[2])
    report("naive", ok(2))
    fast, versions = t.group("fast"), []
    versions.append(t.updater(fast, 1, "shard").update()[0]["version"])
    report("fast shard", ok(1))
    versions.append(t.updater(fast, 3, "broadcast").update()[0]["version"])
    report("fast broadcast", ok(3))
    # Two updaters prepared on one group, with other buckets: each sends by its own plan (a
    # second prepare used to replace the first's plan, and the first's update crashed the engine).
    first, second = t.updater(fast, 2, bucket_bytes=16384), t.updater(fast, 1, bucket_bytes=4096)
    versions.append(first.update()[0]["version"])
    report("first of two plans", ok(2))
    versions.append(second.update()[0]["version"])
    report("second of two plans", ok(1))
    report("versions", versions)


def run_bad_inputs(t):
    from weight_sync.groups import listening_store, seconds
    from weight_sync.trainer import FastUpdater, destroy_update_group

    torch = t.torch
    group = t.group("wu")
    names = list(t.models[2])

    wrong_shape = dict(t.models[2], **{"model.embed_tokens.weight": torch.zeros(385, 96)})
    expect_error(
        "shape",
        lambda: FastUpdater(
            t.client, group, wrong_shape, t.push_update, bucket_bytes=16384
        ).prepare(),
    )
    report("shape after", t.same_as_before())
    expect_error(
        "dtype",
        lambda: t.client.call(  # float32 declared: not converted on send
            "prepare_weights_update",
            group_name="wu",
            names=names,
            dtypes=["torch.float32"] * 21,
            shapes=[list(w.shape) for w in t.models[2].values()],
            bucket_bytes=16384,
        ),
    )
    report("dtype after", t.same_as_before())
    renamed = {
        k.replace("q_proj", "qkv_proj") if k.startswith("model.layers.0.") else k: v
        for k, v in t.models[2].items()
    }
    expect_error(
        "name",
        lambda: FastUpdater(t.client, group, renamed, t.push_update, bucket_bytes=16384).prepare(),
    )
    report("name after", t.same_as_before())
    naive = t.group("naive", warmup=False)  # one bad name in a naive run of two tensors
    typo = {
        "model.norm.weight": t.models[2]["model.norm.weight"],
        "lm_head.weights": t.models[2]["lm_head.weight"],
    }
    expect_error("naive name", lambda: t.push_naive(t.client, naive, typo))
    t.push_naive(t.client, naive, {"model.norm.weight": t.models[1]["model.norm.weight"]})
    report("naive name after", t.same_as_before())  # (the first tensor went in: put A back)
    # One request of three tensors, the second misnamed: the engine receives all three (the
    # trainer broadcasts them all), loads only the first, and the group stays in step.
    norm0, norm1 = (f"model.layers.{i}.input_layernorm.weight" for i in (0, 1))
    three = {norm0: t.models[2][norm0], "lm_head.weights": t.models[2]["lm_head.weight"]}
    three[norm1] = t.models[2][norm1]
    ticket = t.client.submit(
        "update_weights_from_distributed",
        names=list(three),
        dtypes=[str(w.dtype) for w in three.values()],
        shapes=[list(w.shape) for w in three.values()],
        group_name="naive",
    )
    for w in three.values():
        naive.broadcast(w, 0).wait()
    expect_error("naive three", ticket.result)
    t.push_naive(t.client, naive, {norm1: t.models[3][norm1]})  # the next update lands whole
    got = torch.tensor(t.client.call("get_weights_by_name", name=norm1, truncate_size=96)[0])
    report("naive three, then one", torch.equal(got, t.models[3][norm1].bfloat16().float()))
    t.push_naive(t.client, naive, {n: t.models[1][n] for n in (norm0, norm1)})
    report("naive three after", t.same_as_before())
    lengths = t.group("naive-2", warmup=False)  # two names, one dtype: nothing can be received
    ticket = t.client.submit(
        "update_weights_from_distributed",
        names=[norm0, norm1],
        dtypes=["torch.float32"],
        shapes=[[96], [96]],
        group_name="naive-2",
    )
    expect_error("naive lengths", ticket.result)
    start = time.monotonic()
    try:  # the engine dropped the group: the trainer's broadcast fails at once, not at its timeout
        lengths.broadcast(t.models[2][norm0], 0).wait()
    except RuntimeError:
        report("naive lengths, broadcast", f"failed after {time.monotonic() - start:.1f} s")
    else:
        report("naive lengths, broadcast", "NO ERROR")
    report("naive lengths after", t.same_as_before())
    expect_error(
        "prepare lengths",
        lambda: t.client.call(
            "prepare_weights_update",
            group_name="wu",
            names=names,
            dtypes=[],
            shapes=[],
            bucket_bytes=16384,
        ),
    )
    expect_error("tokens", lambda: t.client.call("generate", tokens=[5, 384]))

    updater = t.updater(group, 2)
    send, calls = group.send, []

    def corrupt(data, dst):  # one flipped byte on the wire, after the checksum
        calls.append(dst)
        if len(calls) == 2:
            data = data.clone()
            data[7] ^= 1
        return send(data, dst)

    group.send = corrupt
    expect_error("corrupted", updater.update)
    group.send = send
    report("corrupted after", t.same_as_before())

    nan = {k: v.clone() for k, v in t.models[2].items()}  # checksums match: the trainer sent it
    nan["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")
    poisoned = t.updater(group, 2)
    poisoned.weights = nan
    expect_error("nan", poisoned.update)
    report("nan after", t.same_as_before())
    inf = {"model.norm.weight": t.models[2]["model.norm.weight"].clone()}
    inf["model.norm.weight"][7] = float("inf")
    expect_error("naive inf", lambda: t.push_naive(t.client, naive, inf))
    report("naive inf after", t.same_as_before())
    grown = t.updater(group, 2)  # prepared; then the trainer's lm_head grows: refused at once
    grown.weights = dict(t.models[2], **{"lm_head.weight": torch.zeros(385, 96)})
    expect_error("shape after prepare", grown.update)
    report("shape after prepare after", t.same_as_before())

    t.group("wu-2")
    expect_error("twice, trainer", lambda: t.group("wu"))
    destroy_update_group(t.client, "wu-2")  # both ends: the name is free again
    t.group("wu-2")
    expect_error(
        "twice, engine",
        lambda: t.client.call(
            "init_weight_update_group",
            master_address="127.0.0.1",
            master_port=1,
            rank_offset=1,
            world_size=1 + t.tp,
            group_name="wu",
            backend="gloo",
        ),
    )
    store, port = listening_store("127.0.0.1", 0, seconds(TRAINER_TIMEOUT_S))
    store.set("announce/wu", "1")
    store.set("announced", "wu, wu-2")
    expect_error(
        "wrong name",
        lambda: t.client.call(
            "init_weight_update_group",
            master_address="127.0.0.1",
            master_port=port,
            rank_offset=1,
            world_size=1 + t.tp,
            group_name="wu-typo",
            backend="gloo",
        ),
    )
    expect_error(
        "unknown group",
        lambda: t.client.call("update_weights", group_name="nope", bucket_bytes=16384),
    )
    report("in the end", t.same_as_before())


def run_die_mid_transfer(t):
    group = t.group("wu")
    updater = t.updater(group, 2, bucket_bytes=4096)  # many buckets: die after two
    die_after_sends(group)
    updater.update()
    report("survived", "SHOULD HAVE DIED")


def run_inspect(t):
    version = {v["version"] for v in t.client.call("get_version")}
    ok = version == {0} and t.digests(1) and t.rows_equal(1) and t.token_of(1)
    report(
        "after the death",
        "version 0, weights byte-identical to model A, sampled rows equal A, next token as A's"
        if ok
        else f"FAILED: version {version}",
    )


def run_engine_rank_dies(t):
    group = t.group("wu")
    updater = t.updater(group, 2)
    t.client.call("inject_fault", kind="die", tp_rank=1, after_buckets=1)
    expect_error("push", updater.update)
    expect_error("shutdown", lambda: t.client.shutdown(timeout_s=3))  # rank 1 cannot answer


SCENARIOS = {
    "ab": run_ab,
    "bad-inputs": run_bad_inputs,
    "die-mid-transfer": run_die_mid_transfer,
    "inspect": run_inspect,
    "engine-rank-dies": run_engine_rank_dies,
}

if __name__ == "__main__":
    what, port_file = sys.argv[1:3]
    if what == "shutdown":  # only to end an engine a failed scenario left running
        with contextlib.suppress(Exception):
            connect(port_file).shutdown()
        raise SystemExit(0)
    trainer = Trainer(port_file)
    try:
        SCENARIOS[what](trainer)
    finally:
        with contextlib.suppress(Exception):
            trainer.client.shutdown() if what != "die-mid-transfer" else None
