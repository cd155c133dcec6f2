"""Lesson 12: an engine that serves generation while the trainer updates it.

LiveEngine is lesson 09's Engine plus a generation loop in a thread of its own: requests (a
prompt, how many new tokens, the lowest weight version that may serve them) join and leave a
continuous batch between steps; each step is greedy decoding over the engine's TP ranks with a
KV cache per request (model.forward_cached), and every token is tagged with the version of the
weights that produced it. Updates arrive on the control plane as in lesson 09 (the fast path):
the receive fills staging while generation goes on; only the commit (the swap) must not run
during a step. Steps hold a lock shared, the commit holds it exclusive; how the commit waits is
either the seed's polling (short sleeps, PollingLock) or event-driven (RWLock, a condition
variable). What happens to requests in flight at a commit is the policy:
    drain  stop admitting, let in-flight requests finish, commit, admit again
    abort  in-flight requests end at once with status "aborted" (the client retries them)
    keep   in-flight requests stay; their KV caches (built on the old weights) are dropped and
           recomputed on the new ones, so their tokens show the version change
A KV cache is tagged with the version it was built on and never used on another one.

Engine rank 0 schedules: each step it sends the other TP ranks what to compute (which requests,
which tokens, whose cache starts afresh) and, in the same stream, the commit, so every TP rank
swaps its weights between the same two steps. Requests and replies go through the control
plane's store (gen/N, gen_rep/N); the client's side (LiveClient, and Load, a client issuing
requests at a set rate) is traffic.py. An engine on its own (the tests' way), from the
repository root:
    torchrun --nproc-per-node 2 -m weight_sync.serve --port-file /tmp/engine.addr --policy keep
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from weight_sync.control import Refused
from weight_sync.engine import Engine, serve_engine
from weight_sync.fast_path import FastPath
from weight_sync.groups import make_group, seconds, store_client
from weight_sync.model import PRESETS, forward_cached
from weight_sync.plan import checksum_pieces

POLICIES = ("drain", "abort", "keep")
WAITING = ("polling", "event")
NAP_S = 0.01  # the seed's sleep between two looks (asyncio.sleep(0.01) in its update loop)
MAX_BATCH = 16  # requests in one step at most; the others wait in the queue


class RWLock:
    """Event-driven: generation steps hold it shared (any number at once), the commit holds it
    exclusive. A commit that waits keeps new steps out (writer preference): a stream of steps
    never starves it. Nobody sleeps on a timer: whoever leaves wakes whoever waits."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.steps, self.committing, self.waiting = 0, False, 0

    def acquire_shared(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: not self.committing and not self.waiting)
            self.steps += 1

    def release_shared(self) -> None:
        with self.cond:
            self.steps -= 1
            if self.steps == 0:
                self.cond.notify_all()  # a commit may be waiting for the last step

    def acquire_exclusive(self) -> None:
        with self.cond:
            self.waiting += 1  # from here no new step starts
            self.cond.wait_for(lambda: not self.committing and self.steps == 0)
            self.waiting -= 1
            self.committing = True

    def release_exclusive(self) -> None:
        with self.cond:
            self.committing = False
            self.cond.notify_all()  # the steps held back go on

    @contextlib.contextmanager
    def shared(self):
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextlib.contextmanager
    def exclusive(self):
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()


# --8<-- [start:polling]
class PollingLock(RWLock):
    """The seed's way: flags looked at every NAP_S. The commit raises `committing` and naps
    until no step runs; a step that finds `committing` raised naps until it falls. Each nap
    costs up to NAP_S after the event it waits for."""

    def __init__(self) -> None:
        super().__init__()
        self.mutex = threading.Lock()  # only to read-and-count at once, never held while napping

    def acquire_shared(self) -> None:
        while True:
            with self.mutex:
                if not self.committing:
                    self.steps += 1
                    return
            time.sleep(NAP_S)

    def release_shared(self) -> None:
        with self.mutex:
            self.steps -= 1

    def acquire_exclusive(self) -> None:
        while True:
            with self.mutex:
                if not self.committing:
                    self.committing = True
                    break
            time.sleep(NAP_S)
        while self.steps:
            time.sleep(NAP_S)

    def release_exclusive(self) -> None:
        self.committing = False


# --8<-- [end:polling]

LOCKS = {"polling": PollingLock, "event": RWLock}


class FunctionLock(RWLock):
    """RWLock's state with its four moves done by functions of (lock): exercise 12.1's."""

    def __init__(self, step_begin, step_end, commit_begin, commit_end) -> None:
        super().__init__()
        self.moves = step_begin, step_end, commit_begin, commit_end

    def acquire_shared(self) -> None:
        self.moves[0](self)

    def release_shared(self) -> None:
        self.moves[1](self)

    def acquire_exclusive(self) -> None:
        self.moves[2](self)

    def release_exclusive(self) -> None:
        self.moves[3](self)


def push_update(group, plan, weights):
    """Exercise 09.1's push, plainly (each bucket packed, sent without waiting, checksummed;
    the table last): the trainer's side of every update here."""
    works, sums = [], []
    for bucket in plan.buckets:
        data = torch.empty(bucket.nbytes, dtype=torch.uint8, device=group.device)
        for p in bucket.pieces:
            rows = weights[p.hf_name][p.hf_index]
            data[p.offset : p.offset + p.nbytes].view(p.dtype).view(rows.shape).copy_(rows)
        works.append(group.send(data, bucket.dst))
        sums.append(checksum_pieces(bucket, data))
    table = torch.cat(sums)
    works.append(group.broadcast(table, 0))
    for work in works:
        work.wait()
    return table


def request_problem(asked: Any, vocab: int) -> str | None:
    """What is wrong with a request, said to its client (None: nothing). A prompt of no tokens
    fails inside a step, and a request for no tokens never finishes: either would stop the
    engine for everyone, so neither gets in."""
    if not isinstance(asked, dict):
        return f"a request is a JSON object with prompt and max_new, not {type(asked).__name__}"
    prompt, max_new = asked.get("prompt"), asked.get("max_new")
    if not isinstance(prompt, list) or not prompt:
        return "prompt: give a list of at least one token id"
    if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
        return f"prompt: token ids are whole numbers from 0 to {vocab - 1}"
    if not isinstance(max_new, int) or max_new < 1:
        return f"max_new {max_new!r}: ask for at least 1 new token"
    if not isinstance(asked.get("min_version", 0), int):
        return f"min_version {asked['min_version']!r}: a whole number"
    return None


class Request:
    """A request on engine rank 0: what it asked for, its tokens so far and their versions."""

    def __init__(self, rid: int, asked: dict[str, Any]) -> None:
        self.rid, self.prompt = rid, list(asked["prompt"])
        self.max_new, self.min_version = int(asked["max_new"]), int(asked.get("min_version", 0))
        self.tokens, self.versions, self.times = [], [], []
        self.cache, self.cache_version = [], None  # the KV cache and the weights it was built on
        self.admitted = None  # when it joined the batch


class LiveEngine(Engine):
    """An Engine that also serves generation, continuously, while it is updated."""

    def __init__(
        self, *args: Any, policy: str = "keep", waiting: str = "event", make_lock=None, **kw
    ) -> None:
        super().__init__(*args, **kw)
        self.make_lock = make_lock  # the event-driven lock to use instead of RWLock
        self.configure_serving(policy, waiting)
        # the step stream: engine rank 0 -> the other TP ranks, its own group and thread
        store = store_client(self.address, seconds(self.timeout_s))
        meet = dist.PrefixStore("live/steps/", store)
        self.steps = make_group(
            meet, self.tp_rank, self.tp_size, self.backend, self.device, seconds(3600), "steps"
        )
        self.steps.store = store  # lives as long as the group
        # replies go out on a connection of their own: the control thread's waits block its own
        self.replies, self.reply_mutex = store_client(self.address, seconds(60)), threading.Lock()
        self.queue, self.active = collections.deque(), {}  # rank 0: waiting, in the batch
        self.caches = {}  # ranks > 0: the KV cache of each request in the batch
        self.cond = threading.Condition()  # wakes the scheduler, and a drain, and rank > 0's commit
        self.draining = self.done = False
        self.broken = None  # why generation stopped, if a step failed: no commit after that
        self.last_step_end = 0.0  # when the latest step ended
        self.timeline = {"steps": [], "commits": []}  # (start, end, ...) for pictures
        self.served = collections.Counter()  # request id -> replies sent (must be 1)

    def configure_serving(self, policy: str, waiting: str) -> None:
        if policy not in POLICIES or waiting not in WAITING:
            raise Refused(f"policy {policy!r}, waiting {waiting!r}: use {POLICIES} and {WAITING}")
        make = self.make_lock if waiting == "event" and self.make_lock else LOCKS[waiting]
        self.policy, self.waiting, self.lock = policy, waiting, make()

    # -- requests on the control plane
    def op_configure_serving(self, policy: str, waiting: str) -> dict[str, Any]:
        """Switch policy and waiting style (no update may be in flight: the control plane is
        sequential, so none is)."""
        with self.lock.exclusive():
            self.configure_serving(policy, waiting)
        return {}

    def op_serving_stats(self, clear: bool = False) -> dict[str, Any]:
        """The timeline so far (steps and commits, monotonic seconds) and requests served twice."""
        with self.reply_mutex:  # the scheduler adds to it meanwhile
            out = {**self.timeline, "twice": [r for r, n in self.served.items() if n > 1]}
            out["served"] = len(self.served)
        if clear:
            self.timeline = {"steps": [], "commits": []}
        return out

    def op_update_weights(self, group_name: str, **plan: Any) -> dict[str, Any]:
        # ranks > 0: the commit may arrive in the step stream before _commit is reached
        self.next_version = self.version + 1
        answer = super().op_update_weights(group_name, **plan)
        return {**answer, **self.last_commit}

    # -- the commit, under the lock; policies
    # --8<-- [start:commit]
    def _commit(self) -> None:
        """Every TP rank agreed to take the update: swap between two generation steps."""
        if self.tp_rank > 0:  # rank 0 sends the commit in the step stream; our thread does it
            with self.cond:
                ready = self.cond.wait_for(  # rank 0 may drain first: up to timeout_s
                    lambda: self.version >= self.next_version, 2 * self.timeout_s
                )
                if not ready:
                    raise RuntimeError("engine rank 0 sent no commit in time")
            self.last_commit = {}
            return
        asked = time.monotonic()
        try:
            if self.policy == "drain":  # stop admitting, wait until the batch is empty
                self.draining = True
                self._wait_until(lambda: not self.active)
            with self.lock.exclusive():  # no step runs from here to the end of the swap
                locked = time.monotonic()
                for request in list(self.active.values()):
                    if self.policy == "abort":  # ends now, with a status the client can act on
                        self._reply(request, "aborted", f"weights updated to v{self.version + 1}")
                    elif self.policy == "drain":  # still running after timeout_s: never mix
                        self._reply(request, "aborted", "the drain timed out: send it again")
                send_step(self.steps, {"commit": self.version + 1})  # the others swap here too
                FastPath._commit(self)  # keep: caches tagged v-1 are rebuilt at the next step
                done = time.monotonic()
        finally:
            with self.cond:
                self.draining = False  # admit again, even if the commit failed
                self.cond.notify_all()
        # the waiting style's own cost: from the last step's end (or the ask) to holding the lock
        handoff = locked - max(asked, self.last_step_end)
        self.last_commit = {
            "drained_s": locked - asked,
            "handoff_s": handoff,
            "commit_s": done - asked,
        }
        self.timeline["commits"].append((asked, locked, done, self.version, self.policy))
        with self.cond:
            self.cond.notify_all()  # requests waiting for this version, and the scheduler

    # --8<-- [end:commit]

    @contextlib.contextmanager
    def _step_lock(self):
        """The lock held shared for one step. configure_serving swaps self.lock while holding
        the old one exclusive: a step that got the old one lets go and takes the new one."""
        while True:
            lock = self.lock
            lock.acquire_shared()
            if lock is self.lock:
                break
            lock.release_shared()
        try:
            yield
        finally:
            lock.release_shared()

    def _wait_until(self, ready) -> None:
        """The drain's wait, in the engine's waiting style."""
        deadline = time.monotonic() + self.timeout_s
        if self.waiting == "polling":
            while not ready() and time.monotonic() < deadline:
                time.sleep(NAP_S)
        else:
            with self.cond:
                self.cond.wait_for(ready, self.timeout_s)

    # -- serving: the scheduler (rank 0) and its followers (ranks > 0)
    def serve(self, idle_s: float) -> None:
        threads = [threading.Thread(target=self._steps_loop, daemon=True)]
        if self.tp_rank == 0:
            threads.append(threading.Thread(target=self._pull_requests, daemon=True))
        for thread in threads:
            thread.start()
        try:
            super().serve(idle_s)
        finally:
            if self.tp_rank == 0:  # the puller's last request: it queues every one before it
                self.replies.set(f"gen/{self.replies.add('gen_seq', 1)}", '{"stop": true}')
                threads[1].join(self.timeout_s)
            with self.cond:  # then the scheduler answers whatever is left, and stops
                self.done = True
                self.cond.notify_all()
            for thread in threads:
                thread.join(self.timeout_s)
            self.steps.close()

    def _wait_for(self, key: str, idle_s: float) -> bool:
        """A control request; idle only after idle_s with neither one nor generation."""
        while not super()._wait_for(key, idle_s):
            busy = self.queue or self.active or time.monotonic() - self.last_step_end < idle_s
            if not busy:
                return False
        return True

    def _verify(self, *received) -> str | None:
        """FastPath's checks, and one more: generation still runs on this rank. A step that
        failed leaves the TP ranks out of step; no rank may commit after it."""
        problem = super()._verify(*received)
        if self.broken:
            return problem or f"generation stopped on engine rank {self.tp_rank}: {self.broken}"
        return problem

    def _pull_requests(self) -> None:
        """Rank 0: move requests from the store into the queue as soon as they arrive, until
        the one that says stop (serve() sends it: requests are numbered in one sequence)."""
        store = store_client(self.address, seconds(self.timeout_s))
        for number in itertools.count(1):
            key = f"gen/{number}"
            while not store.check([key]):
                with contextlib.suppress(RuntimeError):  # a quiet day: look again
                    store.wait([key], seconds(86400))
            asked = json.loads(store.get(key))
            if isinstance(asked, dict) and "stop" in asked:
                break
            problem = request_problem(asked, self.shape.vocab)
            if problem or self.broken:  # answered at once, and never queued
                why = problem or f"generation stopped: {self.broken}"
                empty = {"tokens": [], "versions": [], "times": [], "admitted": None}
                self._send_reply(number, {"status": "refused", "why": why, **empty})
                continue
            with self.cond:
                self.queue.append(Request(number, asked))
                self.cond.notify_all()

    def _steps_loop(self) -> None:
        try:
            self._schedule() if self.tp_rank == 0 else self._follow()
        except Exception as err:  # a step that fails ends generation, said once; no commit now
            self.broken = f"{type(err).__name__}: {err}"
            self.log(f"generation stopped: {self.broken}")
            with self.cond:
                left = [*self.queue, *self.active.values()]
                self.queue.clear()
            for request in left:  # none is left without a reply
                self._reply(request, "error", f"generation stopped: {self.broken}")

    def _admissible(self):
        return [r for r in self.queue if r.min_version <= self.version and not self.draining]

    def _schedule(self) -> None:
        """Rank 0: one step after another while there is work; each holds the lock shared."""
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.done or self.active or self._admissible())
                if self.done:
                    break
            with self._step_lock():
                with self.cond:  # admit between steps (not while a drain waits)
                    for request in self._admissible()[: MAX_BATCH - len(self.active)]:
                        self.queue.remove(request)
                        self.active[request.rid] = request
                        request.admitted = time.monotonic()
                if self.active:
                    self._step(list(self.active.values()))
        for request in [*self.queue, *self.active.values()]:  # none is left without a reply
            self._reply(request, "cancelled", "the engine stopped")
        send_step(self.steps, {"stop": True})

    # --8<-- [start:step]
    def _step(self, batch: list[Request]) -> None:
        """One decoding step of the batch; every token tagged with the version computing it."""
        plan = []
        for r in batch:
            if r.cache_version != self.version:  # built on other weights (or none): rebuild
                r.cache, r.cache_version = [], self.version
                plan.append([r.rid, r.prompt + r.tokens, True])
            else:
                plan.append([r.rid, r.tokens[-1:], False])
        start = time.monotonic()
        send_step(self.steps, {"step": plan})
        logits = forward_cached(
            self.weights,
            self.shape,
            [feed for _, feed, _ in plan],
            [r.cache for r in batch],
            self.tp_rank,
            self.tp_size,
            self.steps,
        )
        end = time.monotonic()
        for r, token in zip(batch, logits.argmax(-1).tolist()):
            r.tokens.append(token)
            r.versions.append(self.version)
            r.times.append(end)
            if len(r.tokens) >= r.max_new:
                self._reply(r, "ok")
        self.timeline["steps"].append((start, end, self.version, len(batch)))
        self.last_step_end = time.monotonic()  # the lock is let go right after

    # --8<-- [end:step]

    def _reply(self, request: Request, status: str, why: str = "") -> None:
        with self.cond:
            self.active.pop(request.rid, None)
            self.cond.notify_all()  # a drain may wait for the batch to empty
        reply = {"status": status, "why": why, "tokens": request.tokens}
        reply |= {
            "versions": request.versions,
            "times": request.times,
            "admitted": request.admitted,
        }
        self._send_reply(request.rid, reply)

    def _send_reply(self, rid: int, reply: dict) -> None:
        with self.reply_mutex:
            self.served[rid] += 1
            self.replies.set(f"gen_rep/{rid}", json.dumps({"rid": rid, **reply}))

    def _follow(self) -> None:
        """Ranks > 0: compute what rank 0 sends, swap when it says so, until it says stop."""
        while True:
            message = recv_step(self.steps)
            if "stop" in message:
                break
            if "commit" in message:
                with self.lock.exclusive():
                    FastPath._commit(self)
                with self.cond:
                    self.cond.notify_all()  # the control thread's _commit waits for this
                continue
            plan = message["step"]
            ids = {rid for rid, _, _ in plan}
            self.caches = {rid: c for rid, c in self.caches.items() if rid in ids}  # left: gone
            for rid, _, fresh in plan:
                if fresh:
                    self.caches[rid] = []
            with self._step_lock():
                forward_cached(
                    self.weights,
                    self.shape,
                    [feed for _, feed, _ in plan],
                    [self.caches[rid] for rid, _, _ in plan],
                    self.tp_rank,
                    self.tp_size,
                    self.steps,
                )
            self.last_step_end = time.monotonic()


def send_step(group, message: dict) -> None:
    """Engine rank 0 -> the other TP ranks: one small JSON message (its length, then it)."""
    if group.size == 1:
        return
    data = torch.frombuffer(bytearray(json.dumps(message).encode()), dtype=torch.uint8)
    group.broadcast(torch.tensor([len(data)], device=group.device), 0).wait()
    group.broadcast(data.to(group.device), 0).wait()


def recv_step(group) -> dict:
    size = torch.zeros(1, dtype=torch.int64, device=group.device)
    group.broadcast(size, 0).wait()
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=group.device)
    group.broadcast(data, 0).wait()
    return json.loads(bytes(data.cpu().numpy()))


def serve_live(tp_rank, tp_size, backend, device, *, policy="keep", waiting="event", **kw):
    """serve_engine with a LiveEngine (same arguments, plus the policy and the waiting style)."""
    return serve_engine(
        tp_rank,
        tp_size,
        backend,
        device,
        engine_type=LiveEngine,
        policy=policy,
        waiting=waiting,
        **kw,
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--port-file", help="write HOST:PORT of the control plane here")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds any wait may take")
    p.add_argument("--idle", type=float, default=120.0, help="stop after this long idle")
    p.add_argument("--policy", choices=POLICIES, default="keep")
    p.add_argument("--waiting", choices=WAITING, default="event")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    args = p.parse_args()
    device = "cpu"
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    serve_live(
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        args.backend,
        device,
        policy=args.policy,
        waiting=args.waiting,
        preset=args.preset,
        seed=1,
        dtype=args.dtype,
        timeout_s=args.timeout,
        idle_s=args.idle,
        port_file=args.port_file,
    )


if __name__ == "__main__":
    main()
