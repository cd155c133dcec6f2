"""Lesson 12 beyond what test_lessons.py and test_exercises.py cover: the KV-cache decode against
the plain forward pass, both locks under threads, every policy under continuous load with
repeated updates (replies against single-process greedy decodes), a request that asks for a
version, and a trainer killed mid-update while the engine serves.

The engine runs as a torchrun job of its own (python -m weight_sync.serve, TP=2), the trainer
and client as a separate process running one of this file's scenarios (python
tests/test_12_live_engine.py SCENARIO PORT_FILE), as in test_09_weight_update.py: a trainer can
die and the engine live on. A scenario prints `RESULT name: text` lines; "ok..." is a pass."""

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from course.check import exercise_file, load, run_check

from conftest import (
    ROOT,
    die_after_sends,
    engine_address,
    engine_job,
    report,
    reported,
    run_python,
    text,
)

THIS = Path(__file__).resolve()
ENGINE_TIMEOUT_S = 8  # the engine's waits (its start too): a dead trainer's update fails after this
TIMEOUT_S = 20  # the trainer's and the client's
WRONG = ROOT / "tests" / "wrong"


# ---------------------------------------------------------------------------------------------
# pytest side
def test_kv_cache_decode_equals_the_forward_pass():
    """A continuous batch (a prefill joining decodes, requests of different lengths) through
    forward_cached equals forward() on each request's whole sequence, step after step."""
    import torch

    from weight_sync.model import PRESETS, forward, forward_cached, make_weights

    for preset in ("tiny", "tiny-mqa"):
        shape = PRESETS[preset]
        weights = make_weights(shape, 1, "cpu")
        sequences, caches, feeds = [[5, 17, 42, 101], [3, 9]], [[], []], [[5, 17, 42, 101], [3, 9]]
        for step in range(4):
            if step == 2:  # a request joins mid-way: its prefill in the same step as decodes
                sequences.append([7, 8, 9])
                caches.append([])
                feeds.append([7, 8, 9])
            logits = forward_cached(weights, shape, feeds, caches)
            for j, sequence in enumerate(sequences):
                expected = forward(weights, shape, sequence)
                torch.testing.assert_close(logits[j], expected, rtol=0, atol=1e-5)
            tokens = logits.argmax(-1).tolist()
            for sequence, token in zip(sequences, tokens):
                sequence.append(token)
            feeds = [[t] for t in tokens]


@pytest.mark.parametrize("waiting", ["event", "polling"])
def test_locks_under_threads(waiting):
    """serve.py's two locks pass the exercise's load test: steps together, none inside a
    commit, no commit starved, nothing stuck (polling is right, only slower)."""
    from weight_sync import serve

    checks = load(exercise_file("12"))
    yours, expected = checks.under_threads(serve.LOCKS[waiting]())
    assert yours == expected


@pytest.mark.parametrize(
    "name, says",
    [
        ("12_live_engine.py", "no: at most 1 at a time; steps share the lock"),
        ("12_live_engine_overlap.py", "steps inside a commit"),
    ],
)
def test_wrong_locks_fail_the_check(name, says):
    """A plain mutex (steps never together) and a lock that lets steps in during the commit."""
    status, lines = run_check(["12.1"], WRONG / name, 4)
    assert status == {"12.1": "mismatch"}, "\n".join(lines)
    assert says in "\n".join(lines), "\n".join(lines)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """One engine of TP=2 serving every scenario in turn; yields its port file."""
    port_file = tmp_path_factory.mktemp("live") / "engine.addr"
    args = ["--port-file", port_file, "--timeout", ENGINE_TIMEOUT_S, "--idle", 120]
    with engine_job("weight_sync.serve", 2, args, port_file, THIS) as box:
        yield port_file
    assert box["result"].returncode == 0, text(box["result"])


def scenario(name, port_file, timeout=150):
    result = run_python(THIS, [name, port_file], timeout=timeout)
    out = text(result)
    assert result.returncode == 0, out
    return out, reported(out)


@pytest.mark.parametrize(
    "what",
    [
        "drain/event",
        "drain/polling",
        "abort/event",
        "keep/event",
        "keep/polling",
        "abort retried",
        "keep switched mid-request",
        "min_version",
    ],
)
def test_policies_under_load(engine, policies, what):
    """Continuous load, repeated updates: under drain and abort no reply mixes versions, under
    keep versions never go down; every token equals a single-process greedy decode switching
    weights at the same token; every request answered once, none twice (engine's count too)."""
    out, results = policies
    assert results[what].startswith("ok"), out


@pytest.fixture(scope="module")
def policies(engine):
    return scenario("policies", engine)


@pytest.fixture(scope="module")
def bad_requests(engine, policies):
    return scenario("bad", engine)


@pytest.mark.parametrize(
    "what", ["no tokens", "no new tokens", "a token past the vocabulary", "then a good one"]
)
def test_bad_requests_are_refused_and_the_engine_goes_on(bad_requests, what):
    """A prompt of no tokens failed inside a step, and a request for no tokens never finished:
    either stopped generation for everyone. Each is refused with a reason, at once."""
    out, results = bad_requests
    assert results[what].startswith("ok"), out


def test_trainer_killed_mid_update_engine_keeps_serving(engine, policies):
    """A trainer SIGKILLed after two buckets: the update fails on every engine rank after the
    engine's timeout, generation never stops (no gap between steps near that long), every
    reply meanwhile comes from the old version, and a new trainer's update then goes in."""
    out, results = scenario("dies", engine)
    for key in ("killed", "replies meanwhile", "stall", "after"):
        assert results[key].startswith("ok"), out


# ---------------------------------------------------------------------------------------------
# scenario side: one process, the trainer and the client
def connect(port_file):
    from weight_sync import traffic

    return traffic.LiveClient(engine_address(port_file), TIMEOUT_S)


def updater_for(client, name, weights, bucket_bytes=1 << 16):
    import weight_sync as ws
    from weight_sync import serve

    group = ws.create_update_group(client, name, "gloo", "cpu", warmup=True, timeout_s=TIMEOUT_S)
    updater = ws.FastUpdater(client, group, weights, serve.push_update, bucket_bytes=bucket_bytes)
    updater.prepare()
    return updater


def verdict(wrong):
    problems = [w for lines in wrong.values() for w in lines]
    return "ok" if not problems else f"FAILED: {problems[:3]}"


def run_policies(port_file):
    import weight_sync as ws
    from course.check import lesson_module
    from weight_sync import serve, traffic

    lesson = lesson_module("12")
    shape, client = ws.PRESETS[lesson.PRESET], connect(port_file)
    models = {0: ws.make_weights(shape, 1, "cpu")}
    updater = updater_for(client, "live", models[0])
    aborted = mixed = 0
    for policy, waiting in [(p, "event") for p in serve.POLICIES] + [
        ("drain", "polling"),
        ("keep", "polling"),
    ]:
        load, _ = lesson.serve_while_updating(client, updater, models, policy, waiting, TIMEOUT_S)
        wrong = traffic.check_responses(load, models, shape, policy)
        twice = client.call("serving_stats", clear=True)[0]["twice"]
        wrong["twice"] = [f"engine served {twice} twice"] if twice else []
        report(f"{policy}/{waiting}", verdict(wrong) + f" ({len(load.done)} replies)")
        aborted += len(load.aborted) if policy == "abort" else 0
        if policy == "keep":
            mixed += sum(len(set(r["versions"])) > 1 for _, r, _, _ in load.done)
    report("abort retried", f"ok, {aborted}" if aborted else "FAILED: nothing was aborted")
    report("keep switched mid-request", f"ok, {mixed}" if mixed else "FAILED: no switch seen")
    wanted = client.version + 1
    load = traffic.Load(client.address, TIMEOUT_S, 1.0, lesson.MAX_NEW)
    load.send(load.prompt(0), min_version=wanted)
    time.sleep(0.2)
    early = load.done[:]  # nothing may be served before the version exists
    updater.weights = ws.make_weights(shape, 2, "cpu")
    models[updater.update()[0]["version"]] = updater.weights
    load.finish()
    versions = load.done[0][1]["versions"] if load.done else None
    ok = not early and versions == [wanted] * lesson.MAX_NEW
    report("min_version", "ok" if ok else f"FAILED: early {early}, versions {versions}")


def run_dies(port_file):
    import weight_sync as ws
    from course.check import lesson_module
    from weight_sync import traffic

    lesson = lesson_module("12")
    shape, client = ws.PRESETS[lesson.PRESET], connect(port_file)
    model_b = ws.make_weights(shape, 2, "cpu")
    updater = updater_for(client, "before", model_b)
    version = updater.update()[0]["version"]  # a known model serves: B
    models = {version: model_b}
    client.call("configure_serving", policy="drain", waiting="event")
    client.call("serving_stats", clear=True)
    load = traffic.Load(client.address, TIMEOUT_S, 0.02, lesson.MAX_NEW)
    load.start()
    time.sleep(0.2)
    child = subprocess.run(
        [sys.executable, str(THIS), "die", port_file], capture_output=True, text=True, timeout=60
    )
    killed = child.returncode == -signal.SIGKILL and "dying" in child.stdout
    report("killed", "ok" if killed else f"FAILED: {child.returncode} {child.stdout[-300:]}")
    time.sleep(ENGINE_TIMEOUT_S + 1)  # the engine's receive gives up meanwhile
    load.finish()
    wrong = traffic.check_responses(load, models, shape, "drain")
    served = {v for _, r, _, _ in load.done for v in r["versions"]}
    wrong["old version"] = [] if served == {version} else [f"versions {served}"]
    report("replies meanwhile", verdict(wrong) + f" ({len(load.done)} replies, v{version})")
    steps = client.call("serving_stats", clear=True)[0]["steps"]
    gap = max(b[0] - a[1] for a, b in zip(steps, steps[1:]))  # idle or stalled between steps
    ok = gap < ENGINE_TIMEOUT_S / 2
    report("stall", f"{'ok' if ok else 'FAILED'}: longest gap between steps {gap * 1e3:.0f} ms")
    after = updater_for(client, "after", ws.make_weights(shape, 3, "cpu")).update()[0]
    now = client.version
    report("after", "ok" if now == after["version"] == version + 1 else f"FAILED: v{now}")
    client.shutdown()


def run_bad(port_file):
    """Requests the engine must refuse, each with its reason, then a good one it must serve."""
    client = connect(port_file)
    asks = {
        "no tokens": ([], 4),
        "no new tokens": ([5, 17], 0),
        "a token past the vocabulary": ([5, 10**6], 4),
    }
    for what, (prompt, max_new) in asks.items():
        reply = client.response(client.generate(prompt, max_new))
        ok = reply["status"] == "refused" and reply["why"]
        report(what, f"ok: {reply['why']}" if ok else f"FAILED: {reply}")
    reply = client.response(client.generate([5, 17, 42], 3))
    ok = reply["status"] == "ok" and len(reply["tokens"]) == 3
    report("then a good one", "ok" if ok else f"FAILED: {reply}")


def run_die(port_file):
    """The trainer that dies: SIGKILL after two buckets of an update."""
    import weight_sync as ws

    client = connect(port_file)
    updater = updater_for(client, "dying", ws.make_weights(ws.PRESETS["tiny"], 3, "cpu"), 4096)
    die_after_sends(updater.group)
    updater.update()


if __name__ == "__main__":
    what, port_file = sys.argv[1:3]
    if what == "shutdown":  # only to end an engine a failed scenario left running
        with contextlib.suppress(Exception):
            connect(port_file).shutdown()
        raise SystemExit(0)
    scenarios = {"policies": run_policies, "bad": run_bad, "dies": run_dies, "die": run_die}
    scenarios[what](port_file)
