"""Lesson 12 - a live engine: updating the weights of an engine while it serves requests.

The idea
    Lesson 09's engine was idle while the trainer pushed. A real one never is: requests keep
    arriving, and the batch in flight is decoding token after token, each step a forward pass
    over the TP ranks with a KV cache per request. The fast path already receives into staging,
    so generation goes on during the transfer; only the commit (swapping staging and live) must
    fall between two steps, on every TP rank at the same one. That is a read-write lock: steps
    hold it shared, the commit exclusive, and a waiting commit keeps new steps out. The seed
    this course follows waited with short sleeps (asyncio.sleep(0.01) loops, a FIXME asking for
    a read-write lock); this lesson measures both. What happens to requests in flight at the
    commit is a policy: drain (stop admitting, finish them, then commit), abort (end them with
    a status, the client retries) or keep (they continue on the new weights, their KV caches
    dropped and recomputed). Every token says which weight version produced it.

Run it
    torchrun --nproc-per-node 4 lessons/12_live_engine.py   # trainer + client, an engine of TP=3
    python lessons/12_live_engine.py --nproc 2              # trainer + client, an engine of TP=1
    python -m lessons.check 12                              # exercise 12.1: the read-write lock
    torchrun --nproc-per-node 3 benchmarks/live_engine.py   # every policy x waiting, a table

What you should see (4 ranks, no GPU; timings are yours)
    [rank 0] no GPU: using gloo on CPU
    [rank 0] rank 0 trains and sends a request every 20 ms (4-token prompt, 8 new tokens);
                 ranks 1..3 serve them: an engine of TP=3
    [rank 0] an update with no traffic: 7.7 ms
    [rank 0] policy  waiting  requests  retried  update ms  commit waited ms  handoff ms  p50 ms
    [rank 0] drain   polling        47        0      183.4             165.8         3.8   204.7
    [rank 0] drain   event          48        0      188.4             173.7         0.2   227.3
    [rank 0] abort   polling        25       34       33.9              16.9         5.9   200.5
    [rank 0] abort   event          25       33       28.7              13.3         0.1   233.5
    [rank 0] keep    polling        26        0       36.3              20.3         5.0   244.1
    [rank 0] keep    event          24        0       28.3              13.4         0.1   182.4
    [rank 0] keep: versions of the tokens of requests in flight at an update: 66666777 ...
    [rank 0] checked: under drain and abort no reply mixes versions; under keep they never go down
    [rank 0] checked: every reply's tokens equal a single-process greedy decode switching
                 weights at the same token
    [rank 0] checked: every request answered once (an aborted one is sent again), none served twice
    [rank 0] checked: a request asking for version >= 20 was served by 20
    [rank 0] saved out/12_timeline.png
    [rank 0] Next: exercise 12.1 writes the read-write lock. Check it: python -m lessons.check 12
The engine (continuous batching, KV caches, the policies, PollingLock and the step stream that
keeps TP ranks in step) is weight_sync/serve.py, the client weight_sync/traffic.py; the
trainer's push is lesson 09's fast path.
"""

import statistics
import time
from pathlib import Path

import weight_sync as ws
from course.ranks import AT_LEAST_2, parser, print0, setup, usage_error
from weight_sync import serve, traffic

PRESET = "tiny"  # the model of lesson 09: 21 HF tensors, 12 heads, 6 KV heads
NEEDS = AT_LEAST_2  # rank 0 trains and sends requests, every other rank is one TP rank
SEEDS = (2, 3)  # the trainer's models B and C, pushed in turn (the engine starts with A, seed 1)
EVERY_S = 0.02  # the client sends a request this often
MAX_NEW = 8  # tokens each request asks for (prompts are 4 tokens)
UPDATES = 3  # updates per policy and waiting style, GAP_S apart, under traffic
GAP_S = 0.1
RUNS = [(p, w) for p in serve.POLICIES for w in serve.WAITING]  # every policy x waiting style


# --8<-- [start:ex-12-1]
def step_begin(lock):
    """Exercise 12.1 (1 of 4): a generation step enters: wait while a commit holds the lock or
    waits for it (lock.committing, lock.waiting), then count the step in (lock.steps). Every
    wait is lock.cond.wait_for(...) under `with lock.cond:`, never a sleep."""
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 12.1: wait for no commit, count in (about 3 lines)")


def step_end(lock):
    """Exercise 12.1 (2 of 4): a step leaves; the last one out wakes a waiting commit."""
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 12.1: count out, wake the commit (about 4 lines)")


def commit_begin(lock):
    """Exercise 12.1 (3 of 4): the commit asks: say so at once (lock.waiting, which keeps new
    steps out), wait until no step runs and no other commit holds the lock, then hold it."""
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 12.1: announce, wait, hold (about 5 lines)")


def commit_end(lock):
    """Exercise 12.1 (4 of 4): the commit is done: let go and wake the steps held back."""
    # YOUR CODE BELOW
    raise NotImplementedError("Exercise 12.1: let go, wake everyone (about 3 lines)")
    # --8<-- [end:ex-12-1]


# --8<-- [start:run]
def serve_while_updating(client, updater, models, policy, waiting, timeout_s):
    """One policy and waiting style: a client sends a request every EVERY_S while the trainer
    pushes UPDATES updates. Returns the client's Load (its replies) and each update's (end to
    end seconds, seconds the commit waited for steps or a drain, of which the lock's handoff
    after the last step). models: {version: weights},
    extended with each update."""
    client.call("configure_serving", policy=policy, waiting=waiting)
    load = traffic.Load(client.address, timeout_s, EVERY_S, MAX_NEW)
    load.start()
    updates = []
    for _ in range(UPDATES):
        time.sleep(GAP_S)  # traffic: the batch is full of requests in flight
        version = max(models) + 1
        updater.weights = ws.make_weights(updater.plan.shape, SEEDS[version % 2], "cpu")
        start = time.perf_counter()
        answer = updater.update()[0]
        updates.append((time.perf_counter() - start, answer["drained_s"], answer["handoff_s"]))
        models[answer["version"]] = updater.weights
    time.sleep(GAP_S)
    load.finish()
    return load, updates
    # --8<-- [end:run]


def trainer(ctx, client, tp_size, timeout_s, out):
    shape = ws.PRESETS[PRESET]
    models = {0: ws.make_weights(shape, 1, "cpu")}  # version -> the weights that made it
    group = ws.create_update_group(client, "live", "gloo", "cpu", warmup=True, timeout_s=timeout_s)
    updater = ws.FastUpdater(client, group, models[0], serve.push_update, bucket_bytes=1 << 16)
    updater.prepare()  # the metadata once; each update is then one request and one push
    start = time.perf_counter()
    models[updater.update()[0]["version"]] = models[0]  # the same weights, no traffic
    print0(f"an update with no traffic: {(time.perf_counter() - start) * 1e3:.1f} ms")
    print0("policy  waiting  requests  retried  update ms  commit waited ms  handoff ms  p50 ms")
    problems, shown, runs = [], None, {}
    for policy, waiting in RUNS:
        load, updates = serve_while_updating(client, updater, models, policy, waiting, timeout_s)
        wrong = traffic.check_responses(load, models, shape, policy)
        problems += [f"{policy}/{waiting}: {w}" for lines in wrong.values() for w in lines]
        latency = statistics.median(end - sent for _, _, sent, end in load.done) * 1e3
        print0(
            f"{policy:7s} {waiting:8s} {len(load.done):8d} {len(load.aborted):8d} "
            f"{statistics.mean(u[0] for u in updates) * 1e3:10.1f} "
            f"{statistics.mean(u[1] for u in updates) * 1e3:17.1f} "
            f"{statistics.mean(u[2] for u in updates) * 1e3:11.1f} {latency:7.1f}"
        )
        if policy == "keep":
            mixed = [r["versions"] for _, r, _, _ in load.done if len(set(r["versions"])) > 1]
            shown = " ".join("".join(str(v % 10) for v in vs) for vs in mixed[:3])
        stats = client.call("serving_stats", clear=True)[0]  # the engine's steps and commits
        problems += [f"{policy}/{waiting}: request {r} served twice" for r in stats["twice"]]
        if waiting == "event":
            runs[f"{policy}, event-driven"] = load, stats
    print0(f"keep: versions of the tokens of requests in flight at an update: {shown} ...")
    if problems:
        raise SystemExit("\n".join(["wrong replies:", *problems[:10]]))
    print0("checked: under drain and abort no reply mixes versions; under keep they never go down")
    print0(
        "checked: every reply's tokens equal a single-process greedy decode switching weights "
        "at the same token"
    )
    print0("checked: every request answered once (an aborted one is sent again), none served twice")
    wanted = client.version + 1  # a request that only the next version may serve
    load = traffic.Load(client.address, timeout_s, 1.0, MAX_NEW)
    load.send(load.prompt(0), min_version=wanted)
    time.sleep(GAP_S)
    updater.update()
    load.finish()
    versions = load.done[0][1]["versions"]
    assert set(versions) == {wanted}, f"asked for version >= {wanted}, served by {versions}"
    print0(f"checked: a request asking for version >= {wanted} was served by {versions[0]}")
    Path(out).mkdir(parents=True, exist_ok=True)
    title = f"requests around an update (tiny, TP={tp_size}, a request every 20 ms)"
    traffic.plot_timeline(runs, Path(out) / "12_timeline.png", title)
    print0(f"saved {out}/12_timeline.png")
    print0("Next: exercise 12.1 writes the read-write lock. Check it: python -m lessons.check 12")


def main():
    args = parser(__doc__).parse_args()
    with setup(args, NEEDS, relaunch=True, trace=args.trace) as ctx:  # only to start everybody
        tp_size = ctx.world_size - 1
        try:  # before anything runs, on every rank: can the engine hold tiny at this TP?
            ws.check_engine_tp(ws.PRESETS[PRESET], tp_size)
        except ValueError as err:
            usage_error(f"{PRESET}: {err}. Start 1 + that many ranks, e.g. --nproc-per-node 4")
        if ctx.rank > 0:  # an engine rank: generates and takes updates until the trainer stops it
            engine = dict(preset=PRESET, seed=1, dtype="float32", quiet=True)
            serve.serve_live(ctx.rank - 1, tp_size, "gloo", "cpu", **engine, timeout_s=args.timeout)
            return
        print0(
            f"rank 0 trains and sends a request every {EVERY_S * 1e3:g} ms (4-token prompt, "
            f"{MAX_NEW} new tokens); ranks 1..{tp_size} serve them: an engine of TP={tp_size}"
        )
        client = traffic.LiveClient(ws.engine_client(args.timeout).address, args.timeout)
        try:
            trainer(ctx, client, tp_size, args.timeout, args.out)
        finally:
            client.shutdown()


if __name__ == "__main__":
    main()
