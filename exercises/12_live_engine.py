"""Checks for lesson 12's exercise (lessons/12_live_engine.py). Run it: python -m lessons.check 12

First, on every rank, your lock under load in threads: steps that come and go, and a commit
every few ms. Steps must run together (a lock shared by steps), never inside a commit, and
nobody may wait on a timer (no time.sleep, no wait with a timeout: that is the seed's polling).
Then one scene, played in order: a step inside, a commit asking, then a new step asking: the
waiting commit must keep it out (else a stream of steps starves the commit). Then, only if
every rank's lock passed, rank 0 trains and sends requests while ranks 1.. serve them with your
lock: every reply is compared with a single-process greedy decode (weight_sync/traffic.py's
checks).
"""

import threading
import time

import torch
import torch.distributed as dist

import weight_sync as ws
from course.check import lesson_module
from weight_sync import serve, traffic

lesson = lesson_module("12")
STEPPERS, STEP_S, COMMITS, EVERY_S = 3, 0.002, 5, 0.01  # the threads' load
STUCK_S = 3.0  # a thread not done by then is stuck: your lock never let it in
LATE_S = 0.3  # how long the scene gives a step that asked after a waiting commit to slip in
BY_EVENT = "by event: no sleep, no wait with a timeout"  # what 12.1 teaches


# --8<-- [start:check]
def check_lock(ctx, step_begin, step_end, commit_begin, commit_end):
    """Your lock in threads on every rank (yours vs what a read-write lock gives); then, if
    every rank's passed, a live engine of TP = world size - 1 using it, replies checked."""
    moves = (step_begin, step_end, commit_begin, commit_end)
    dry_run(moves)  # a stub raises here, on every rank, before any rank talks to another
    with Timers() as timers:  # time.sleep and timed waits, counted inside your four functions
        yours, expected = under_threads(timers.lock(moves))
        yours["a step asking while a commit waits"] = writer_preference(timers.lock(moves))
    yours["waits"] = timers.said()
    expected["a step asking while a commit waits"] = WAITS_ITS_TURN
    expected["waits"] = BY_EVENT
    ok = torch.tensor([1.0 if yours == expected else 0.0])
    dist.all_reduce(ok, dist.ReduceOp.MIN)  # every rank decides the same: engine or not
    if ok.item() == 1.0:
        engine = serve_with(ctx, moves)
        yours, expected = {**yours, **engine[0]}, {**expected, **engine[1]}
    dist.barrier()  # torchrun's world, to end together
    return yours, expected


def under_threads(lock):
    """STEPPERS threads step (each holds the lock shared STEP_S, then comes back STEP_S / 2
    later), a commit thread commits COMMITS times, EVERY_S apart; while each commit holds the
    lock, a probe asks for a step. Returns (what happened, what should)."""
    seen = {"inside": 0, "most": 0, "in commit": 0, "committing": False, "stuck probes": 0}
    waits, mutex, stop = [], threading.Lock(), threading.Event()

    def stepper():
        while not stop.is_set():
            lock.acquire_shared()
            with mutex:
                seen["inside"] += 1
                seen["most"] = max(seen["most"], seen["inside"])
                seen["in commit"] += seen["committing"]
            time.sleep(STEP_S)
            with mutex:
                seen["inside"] -= 1
            lock.release_shared()
            time.sleep(STEP_S / 2)  # a breath between steps: a waiting step or commit gets a turn

    def probe_step(got_in):
        got_in.append(call(lock.acquire_shared))

    def committer():
        for _ in range(COMMITS):
            time.sleep(EVERY_S)
            asked = time.monotonic()
            got = call(lock.acquire_exclusive)
            with mutex:
                seen["committing"], inside = True, seen["inside"]
            got_in = []  # a step asked for while the commit holds the lock must wait
            probe = threading.Thread(target=probe_step, args=(got_in,), daemon=True)
            probe.start()
            time.sleep(STEP_S)
            with mutex:
                seen["committing"], inside = False, inside + seen["inside"]
            waits.append((asked, got, inside))
            let_go = time.monotonic()
            lock.release_exclusive()
            probe.join(STUCK_S)
            seen["in commit"] += bool(got_in and got_in[0] < let_go)
            if got_in:
                lock.release_shared()
            else:
                seen["stuck probes"] += 1

    threads = [threading.Thread(target=stepper, daemon=True) for _ in range(STEPPERS)]
    threads.append(threading.Thread(target=committer, daemon=True))
    for t in threads:
        t.start()
    threads[-1].join(STUCK_S)
    stop.set()
    for t in threads[:-1]:
        t.join(STUCK_S)
    stuck = sum(t.is_alive() for t in threads) + seen["stuck probes"]
    yours = {
        "steps run together": seen["most"] >= 2
        or f"no: at most {seen['most']} at a time; steps share the lock, only a commit excludes",
        "steps inside a commit": seen["in commit"] + sum(w[2] for w in waits),
        "commits done": len(waits),
        "threads stuck": stuck,
    }
    expected = {
        "steps run together": True,
        "steps inside a commit": 0,
        "commits done": COMMITS,
        "threads stuck": 0,
    }
    return yours, expected


WAITS_ITS_TURN = "waits until the commit is done"


def writer_preference(lock):
    """The scene: step A inside; a commit asks (it must wait for A) and says so in lock.waiting;
    then step B asks. B must wait for the commit: a lock that lets B in first lets a stream of
    steps starve every commit. What happened, in order."""
    order, threads = [], []

    def commit():
        lock.acquire_exclusive()
        order.append("commit")
        lock.release_exclusive()

    def step_b():
        lock.acquire_shared()
        order.append("step B")
        lock.release_shared()

    lock.acquire_shared()  # step A, in this thread
    threads.append(threading.Thread(target=commit, daemon=True))
    threads[0].start()
    deadline = time.monotonic() + STUCK_S
    while lock.waiting == 0 and not order and time.monotonic() < deadline:
        time.sleep(0.001)  # until the commit has said it waits (this thread's own sleep)
    if order or lock.waiting == 0:
        lock.release_shared()
        return "the commit did not wait for step A, or never said so in lock.waiting"
    threads.append(threading.Thread(target=step_b, daemon=True))
    threads[1].start()
    time.sleep(LATE_S)  # time enough for step B to slip in, if the lock lets it
    lock.release_shared()  # step A leaves: the commit goes, then step B
    for t in threads:
        t.join(STUCK_S)
    if any(t.is_alive() for t in threads):
        return f"stuck: after step A left, only {order or 'nothing'} got the lock"
    if order[0] == "step B":
        return "went first: a waiting commit must keep new steps out (lock.waiting)"
    return WAITS_ITS_TURN


class Timers:
    """While on: time.sleep and Condition waits with a timeout, counted when they happen inside
    one of the four functions (the check's own threads sleep too, outside them)."""

    def __init__(self):
        self.inside, self.sleeps, self.timed = threading.local(), 0, 0
        self.mutex, self.sleep = threading.Lock(), time.sleep
        timers = self

        class Watched(threading.Condition):
            def wait(self, timeout=None):
                if timeout is not None and getattr(timers.inside, "on", False):
                    with timers.mutex:
                        timers.timed += 1
                return super().wait(timeout)

        self.Watched = Watched

    def __enter__(self):
        def sleep(seconds):
            if getattr(self.inside, "on", False):
                with self.mutex:
                    self.sleeps += 1
            self.sleep(seconds)

        time.sleep = sleep
        return self

    def __exit__(self, *exc):
        time.sleep = self.sleep

    def lock(self, moves):
        """A FunctionLock of your moves, each marked as inside, with a watched condition."""

        def marked(move):
            def run(lock):
                self.inside.on = True
                try:
                    move(lock)
                finally:
                    self.inside.on = False

            return run

        lock = serve.FunctionLock(*map(marked, moves))
        lock.cond = self.Watched()
        return lock

    def said(self):
        how = [
            w for w, n in (("time.sleep", self.sleeps), ("waits with a timeout", self.timed)) if n
        ]
        if how:
            return (f"on a timer: {' and '.join(how)} inside your lock; wait with "
                    "lock.cond.wait_for(...), and wake the waiters with notify_all()")  # fmt: skip
        return BY_EVENT


def serve_with(ctx, moves):
    """Rank 0: a client and a trainer as in the lesson (policy keep, your lock); ranks 1..: the
    engine. Rank 0 returns what is wrong with the replies (all empty when right)."""
    if ctx.rank > 0:
        serve.serve_live(
            ctx.rank - 1,
            ctx.world_size - 1,
            "gloo",
            "cpu",
            make_lock=lambda: serve.FunctionLock(*moves),
            preset=lesson.PRESET,
            seed=1,
            dtype="float32",
            timeout_s=20,
            quiet=True,
        )
        return {}, {}
    shape = ws.PRESETS[lesson.PRESET]
    client = traffic.LiveClient(ws.engine_client(20).address, 20)
    try:
        group = ws.create_update_group(client, "live", "gloo", "cpu", warmup=True, timeout_s=20)
        models = {0: ws.make_weights(shape, 1, "cpu")}
        updater = ws.FastUpdater(client, group, models[0], serve.push_update, bucket_bytes=1 << 16)
        updater.prepare()
        load, _ = lesson.serve_while_updating(client, updater, models, "keep", "event", 20)
        wrong = traffic.check_responses(load, models, shape, "keep")
        wrong = {f"replies: {k}": v[:2] for k, v in wrong.items()}
        wrong["replies: versions changed mid-request"] = any(
            len(set(reply["versions"])) > 1 for _, reply, _, _ in load.done
        )
    finally:
        client.shutdown()
    expected = {k: [] for k in wrong} | {"replies: versions changed mid-request": True}
    return wrong, expected
    # --8<-- [end:check]


def call(acquire):
    """acquire(), then the time it returned."""
    acquire()
    return time.monotonic()


def dry_run(moves):
    """Each of your four functions once, in order, on a fresh lock, in a thread: a stub's
    NotImplementedError is raised here (a lock stuck even alone shows later, as threads stuck)."""
    lock, box = serve.FunctionLock(*moves), {}

    def run():
        try:
            for acquire, release in ((lock.acquire_shared, lock.release_shared),) * 2 + (
                (lock.acquire_exclusive, lock.release_exclusive),
            ):
                acquire()
                release()
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(STUCK_S)
    if isinstance(box.get("error"), NotImplementedError):
        raise box["error"]


# Exercise id -> (its check, the functions you write, defined in the lesson).
EXERCISES = {"12.1": (check_lock, "step_begin", "step_end", "commit_begin", "commit_end")}
